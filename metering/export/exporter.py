"""The exporter: moves ledger entries from Redis into a sink exactly once, then drops them from
Redis, so that Redis holds only what is not exported yet.

One pass reads a page of every stream of its shard, writes the pages to the sink in batches and,
once a batch is durable there, acknowledges it (`XTRIM MINID` just past what was written,
pipelined; the trim is the checkpoint; a stream found empty later is deleted by `ledger_drop.lua`).
A crash anywhere leaves each entry either acknowledged (it is in the sink) or still in Redis, to be
written again: sinks are idempotent on the request id, or
journal their last batch (`Sink.recent`), which a restarted exporter acknowledges before it writes
anything.

With `notices`, an exporter moves the users' threshold notifications (`cg:{...}:notices`, written
by settle.lua next to their copy in the ledger) the same way, to the notification receiver.

Streams are split among instances by shard (a CRC32 of the stream's key modulo the shard count),
and a shard is held by one instance at a time through a lock in Redis (`exporter_lock.lua`)
refreshed before every acknowledgement; an instance that loses it stops before acknowledging.
"""

import asyncio
import logging
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from metering.export.sink import Sink
from metering.keys import LEDGER_PATTERN, NOTICES_PATTERN, PREFIX
from metering.ledger import LedgerEntry, Trimmer, ledger_streams, read_pages
from metering.meter import RedisClient, load_script

log = logging.getLogger("capgate.export")
READ_CHUNK = 256  # streams read per pipelined call


class ShardLost(Exception):
    """Another instance holds the shard now: this one must not acknowledge."""


@dataclass(frozen=True, slots=True)
class Shard:
    """This instance's share of the users' streams: `index` of `count`."""

    index: int = 0
    count: int = 1

    def owns(self, stream: str) -> bool:
        return self.count == 1 or zlib.crc32(stream.encode()) % self.count == self.index

    def lock_key(self, what: str) -> str:
        """The lock of this shard of the `what` streams (`ledger` or `notices`)."""
        return f"{PREFIX}:exporter:{what}:{self.index}/{self.count}"


@dataclass(frozen=True, slots=True)
class PassResult:
    """What one pass did and saw: entries written and acknowledged, entries acknowledged without
    writing (the sink's last batch, at the first pass after a start), streams of the shard with
    entries, entries left in them before the pass, the oldest entry's time (ms), and whether a
    page was full (more waits: the next pass starts at once)."""

    exported: int
    skipped: int
    streams: int
    backlog: int
    oldest_ms: int | None
    full: bool


class Exporter:
    def __init__(
        self,
        redis: RedisClient,
        sink: Sink,
        shard: Shard = Shard(),
        *,
        batch: int = 500,
        lock_ttl_s: float = 30.0,
        instance: str | None = None,
        notices: bool = False,
    ) -> None:
        self.redis = redis
        self.sink = sink
        self.shard = shard
        self.pattern = NOTICES_PATTERN if notices else LEDGER_PATTERN
        self.lock_key = shard.lock_key("notices" if notices else "ledger")
        self.batch = batch
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.instance = instance or uuid.uuid4().hex
        self._lock = redis.register_script(load_script("exporter_lock"))
        self._trim = Trimmer(redis)
        self._recovered = False

    async def hold_shard(self) -> bool:
        """Take or keep this instance's shard for `lock_ttl_s`; False when another holds it."""
        return bool(await self._lock(keys=[self.lock_key], args=[self.instance, self.lock_ttl_ms]))

    async def release_shard(self) -> None:
        """Give the shard up (at a clean stop), if this instance holds it."""
        if await self.redis.get(self.lock_key) in (self.instance, self.instance.encode()):
            await self.redis.delete(self.lock_key)

    async def export_pass(self) -> PassResult:
        """Export one page of every stream of the shard (see the module's docstring); streams
        are read READ_CHUNK at a time in one pipelined call, and a stream found empty (all of it
        exported) is deleted."""
        skipped = await self._recover()
        owned = [s async for s in ledger_streams(self.redis, self.pattern) if self.shard.owns(s)]
        pending: list[LedgerEntry] = []
        exported = streams = backlog = 0
        oldest: int | None = None
        full_pages: list[str] = []
        for start in range(0, len(owned), READ_CHUNK):
            chunk = owned[start : start + READ_CHUNK]
            for stream, entries in zip(chunk, await read_pages(self.redis, chunk, self.batch), strict=True):
                if not entries:
                    await self._trim.drop_if_empty(stream)
                    continue
                streams += 1
                if len(entries) == self.batch:
                    full_pages.append(stream)
                else:
                    backlog += len(entries)
                first = entries[0].order[0]
                oldest = first if oldest is None else min(oldest, first)
                pending += entries
                if len(pending) >= self.batch:
                    exported += await self._flush(pending)
                    pending = []
        exported += await self._flush(pending)
        for stream in full_pages:
            backlog += self.batch + await self.redis.xlen(stream)
        return PassResult(exported, skipped, streams, backlog, oldest, bool(full_pages))

    async def _recover(self) -> int:
        """Once, before anything else is written: acknowledge the sink's last batch (`recent`),
        which a crash may have cut off before its acknowledgement. A batch took the oldest
        entries of each of its streams, so acknowledging up to its newest one per stream drops
        exactly what the sink holds."""
        if self._recovered:
            return 0
        held = [LedgerEntry(*key.rsplit(" ", 1), {}) for key in self.sink.recent]
        await self._acknowledge(held)
        self._recovered = True
        return len(held)

    async def _flush(self, entries: list[LedgerEntry]) -> int:
        """Write `entries` to the sink and, once they are durable there, acknowledge them."""
        if not entries:
            return 0
        await self.sink.write(entries)
        await self._acknowledge(entries)
        return len(entries)

    async def _acknowledge(self, entries: list[LedgerEntry]) -> None:
        if not entries:
            return
        if not await self.hold_shard():
            raise ShardLost(self.lock_key)
        last: dict[str, LedgerEntry] = {}
        for entry in entries:
            if entry.stream not in last or entry.order > last[entry.stream].order:
                last[entry.stream] = entry
        await self._trim.through({stream: entry.entry_id for stream, entry in last.items()})

    async def run(
        self,
        stop: asyncio.Event,
        interval_s: float,
        on_pass: Callable[[PassResult], None] = lambda _: None,
        on_error: Callable[[BaseException], None] = lambda _: None,
    ) -> None:
        """Export until `stop` is set: a pass every `interval_s` (at once after a full page); an
        error is logged and the pass tried again after `interval_s`."""
        await self.sink.start()
        try:
            while not stop.is_set():
                again = False
                try:
                    if await self.hold_shard():
                        result = await self.export_pass()
                        on_pass(result)
                        again = result.full
                    else:
                        log.info("export shard %s is held by another instance", self.lock_key)
                except Exception as exc:
                    log.warning("export pass failed: %r", exc)
                    on_error(exc)
                if not again:
                    await _wait(stop, interval_s)
        finally:
            await self.sink.close()
            try:
                await self.release_shard()
            except Exception as exc:
                log.warning("export shard not released: %r", exc)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return


def age_s(oldest_ms: int | None) -> float:
    """How old the oldest entry waiting is, in seconds (0 when none waits)."""
    return 0.0 if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
