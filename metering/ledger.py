"""The ledger in Redis: each user's stream of usage events (one per request, written by
settle.lua and reap.lua), read in pages, merged over users by time, and trimmed once a sink holds
what was read.

An entry's id (`<ms>-<seq>`, given by Redis when it was appended) orders a user's events; over
users, events merge by that id's time. A late settlement after a reap appends a new event for the
same request (with `replaces` naming the reaper's entry): sinks keep the newest per request id.
"""

import heapq
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from metering.keys import LEDGER_PATTERN, user_keys_of
from metering.meter import RedisClient, decoded, load_script

INT_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens", "value_nano", "ts_ms")
FLOAT_FIELDS = ("ttft_ms", "duration_ms")
NOTICE_INT_FIELDS = ("cap", "used", "period", "ts_ms")


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One event of one user's ledger stream, its fields as Redis holds them (text)."""

    stream: str
    entry_id: str
    fields: dict[str, str]

    @property
    def key(self) -> str:
        """Unique over the whole ledger: the stream and the entry id."""
        return f"{self.stream} {self.entry_id}"

    @property
    def order(self) -> tuple[int, int]:
        """The entry id as numbers: when it was appended (ms), then its sequence in that ms."""
        ms, _, seq = self.entry_id.partition("-")
        return int(ms), int(seq or 0)

    @property
    def is_notice(self) -> bool:
        """Whether this is a threshold notification rather than a request's usage."""
        return self.fields.get("kind") == "threshold"

    def record(self) -> dict[str, object]:
        """The event with typed values, its user and team (from the stream's key) and its entry
        id: what every sink writes. A threshold notification has `kind: threshold` and an `id`
        unique to its window, threshold and period."""
        owner = user_keys_of(self.stream)
        out: dict[str, object] = dict(self.fields)
        out["user"] = self.fields.get("user") or owner.user_id
        out["team"] = owner.team
        if self.is_notice:
            for name in NOTICE_INT_FIELDS:
                out[name] = int(self.fields.get(name) or 0)
            out["share"] = int(self.fields["share"]) / 1000
            scope = self.fields.get("scope", "user")
            whose = f"team:{owner.team}" if scope == "team" else f"user:{out['user']}"
            parts = (
                whose,
                self.fields.get("window"),
                self.fields.get("unit"),
                self.fields["share"],
                out["period"],
            )
            out["id"] = ":".join(str(p) for p in parts)
        else:
            for name in INT_FIELDS:
                out[name] = int(self.fields.get(name) or 0)
            for name in FLOAT_FIELDS:
                text = self.fields.get(name) or ""
                out[name] = float(text) if text else None
        out["entry_id"] = self.entry_id
        return out


def _entries(stream: str, reply: list) -> list[LedgerEntry]:
    return [
        LedgerEntry(stream, decoded(entry_id), {decoded(k): decoded(v) for k, v in fields.items()})
        for entry_id, fields in reply
    ]


async def ledger_streams(
    redis: RedisClient, pattern: str = LEDGER_PATTERN, count: int = 1000
) -> AsyncIterator[str]:
    """Every user's ledger stream, or their notices with NOTICES_PATTERN (a SCAN of every node;
    a stream exported to its end is deleted, so this finds the users with events waiting, and
    each key once per call)."""
    seen: set[str] = set()
    async for key in redis.scan_iter(match=pattern, count=count):
        name = decoded(key)
        if name not in seen:
            seen.add(name)
            yield name


async def read_entries(
    redis: RedisClient, stream: str, count: int, after: str | None = None, until: str = "+"
) -> list[LedgerEntry]:
    """Up to `count` entries of `stream`, oldest first, after the entry id `after` (from the
    start when None) and up to `until`."""
    start = "-" if after is None else f"({after}"
    return _entries(stream, await redis.xrange(stream, min=start, max=until, count=count))


async def read_pages(redis: RedisClient, streams: Sequence[str], count: int) -> list[list[LedgerEntry]]:
    """The first `count` entries of each of `streams`, in one pipelined round trip (per node)."""
    pipe = redis.pipeline(transaction=False)
    for stream in streams:
        pipe.xrange(stream, min="-", max="+", count=count)
    replies = await pipe.execute()
    return [_entries(stream, reply) for stream, reply in zip(streams, replies, strict=True)]


def next_id(entry_id: str) -> str:
    """The smallest entry id after `entry_id`."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


class Trimmer:
    """Drops from the ledger what a sink holds durably."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._drop = redis.register_script(load_script("ledger_drop"))

    async def through(self, last: Mapping[str, str]) -> None:
        """Drop the entries of each stream up to and including its entry id in `last` (`XTRIM
        MINID` past it: whatever came after stays), in one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for stream, entry_id in last.items():
            pipe.xtrim(stream, minid=next_id(entry_id), approximate=False)
        await pipe.execute()

    async def drop_if_empty(self, stream: str) -> bool:
        """Delete `stream` if it holds no entry (atomically: an event appended meanwhile stays)."""
        return bool(await self._drop(keys=[stream]))


@dataclass(order=True)
class _Cursor:
    head: tuple[int, int, str]
    stream: str = field(compare=False)
    page: list[LedgerEntry] = field(compare=False)
    done: bool = field(compare=False, default=False)


async def merged_entries(
    redis: RedisClient, since_ms: int = 0, until_ms: int | None = None, page: int = 64
) -> AsyncIterator[LedgerEntry]:
    """Every ledger entry appended in [since_ms, until_ms], all users merged, oldest first. Memory
    is bounded by `page` entries per stream: each stream is read a page at a time as the merge
    reaches it, never the whole ledger at once."""
    until = "+" if until_ms is None else str(until_ms)
    heap: list[_Cursor] = []
    async for stream in ledger_streams(redis):
        entries = _entries(stream, await redis.xrange(stream, min=str(since_ms), max=until, count=page))
        if entries:
            heap.append(_Cursor((*entries[0].order, stream), stream, entries, len(entries) < page))
    heapq.heapify(heap)
    while heap:
        cursor = heap[0]
        entry = cursor.page.pop(0)
        yield entry
        if not cursor.page and not cursor.done:
            cursor.page = await read_entries(redis, cursor.stream, page, entry.entry_id, until)
            cursor.done = len(cursor.page) < page
        if cursor.page:
            cursor.head = (*cursor.page[0].order, cursor.stream)
            heapq.heapreplace(heap, cursor)
        else:
            heapq.heappop(heap)
