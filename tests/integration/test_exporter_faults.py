"""The exporter's exactly-once, by fault injection against a real Redis: a crash (an exception
that ends the exporter, whose state is then dropped) before the sink writes, after the data is
durable but before its journal, after the journal but before any acknowledgement, or when only some
streams' trims were applied, any number of times while events keep coming: the files end with every
event once, and Redis with none."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from metering.export import jsonl as jsonl_module
from metering.export.exporter import Exporter, Shard
from metering.export.jsonl import JsonlSink
from metering.ledger import Trimmer
from tests.harness import RedisServer

pytestmark = pytest.mark.integration
POINTS = ("before_write", "after_data", "after_journal", "between_acks")


class Crash(Exception):
    """The process died here."""


def arm(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Make the next export crash at `point` (once)."""
    armed = {"on": True}

    def once() -> None:
        if armed["on"]:
            armed["on"] = False
            raise Crash(point)

    if point == "before_write":
        real_write = JsonlSink.write

        async def write(self, entries):  # type: ignore[no-untyped-def]
            if entries:
                once()
            await real_write(self, entries)

        monkeypatch.setattr(JsonlSink, "write", write)
    elif point in ("after_data", "after_journal"):
        real = jsonl_module.Journal.write

        def journal_write(self, state):  # type: ignore[no-untyped-def]
            if point == "after_journal":
                real(self, state)
            once()
            if point == "after_data":
                real(self, state)

        monkeypatch.setattr(jsonl_module.Journal, "write", journal_write)
    else:
        real_through = Trimmer.through

        async def through(self, last):  # type: ignore[no-untyped-def]
            streams = sorted(last)
            if len(streams) > 1 and armed["on"]:
                await real_through(self, {s: last[s] for s in streams[: len(streams) // 2]})
                once()
            await real_through(self, last)

        monkeypatch.setattr(Trimmer, "through", through)


async def add_events(redis: Redis, users: list[str], count: int, start: int) -> list[str]:
    ids = []
    for n in range(start, start + count):
        user = users[n % len(users)]
        rid = f"{user}-r{n}"
        await redis.xadd(
            f"cg:{{u:{user}}}:ledger",
            {"request_id": rid, "user": user, "tier": "t", "model": "m", "prompt_tokens": n,
             "cached_tokens": 0, "completion_tokens": 1, "value_nano": n, "finish_reason": "stop",
             "ttft_ms": "", "duration_ms": "1.000", "ts_ms": n},
        )  # fmt: skip
        ids.append(rid)
    return ids


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(crashes=st.lists(st.sampled_from(POINTS), max_size=6), batch=st.integers(1, 9))
def test_every_event_reaches_the_files_once_whatever_the_crashes(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, crashes: list[str], batch: int
) -> None:
    run = uuid.uuid4().hex[:8]
    users = [f"f{run}-{i}" for i in range(3)]
    out = tmp_path_factory.mktemp("faults")

    async def scenario() -> list[str]:
        redis = Redis.from_url(redis_server.url)
        sent: list[str] = []
        try:
            for crash in [*crashes, None]:
                sent += await add_events(redis, users, 5, len(sent))
                with pytest.MonkeyPatch.context() as monkeypatch:
                    if crash is not None:
                        arm(monkeypatch, crash)
                    sink = JsonlSink(out, "0-of-1", rotate_bytes=700)
                    exporter = Exporter(redis, sink, batch=batch, instance=f"i-{run}")
                    await sink.start()
                    try:
                        while (await exporter.export_pass()).streams:
                            pass
                    except Crash:
                        continue
            left = sum([await redis.xlen(f"cg:{{u:{u}}}:ledger") for u in users])
            assert left == 0, "Redis still holds exported events"
            await exporter.release_shard()
        finally:
            await redis.aclose()
        return sent

    sent = asyncio.run(scenario())
    written = [
        json.loads(line)["request_id"]
        for path in sorted(Path(out).glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    ours = [rid for rid in written if rid.startswith(f"f{run}")]
    assert sorted(ours) == sorted(sent), f"crashes {crashes}: missing or twice"


def test_instances_split_the_streams_by_shard_and_one_process_holds_a_shard(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two shards exported at once by two instances write every event once between them; a
    second instance of a shard already held exports nothing until the lock is given up."""
    run = uuid.uuid4().hex[:8]
    users = [f"s{run}-{i}" for i in range(12)]

    async def scenario() -> list[str]:
        redis = Redis.from_url(redis_server.url)
        try:
            sent = await add_events(redis, users, 60, 0)
            sinks = [JsonlSink(tmp_path / f"shard{i}", f"{i}-of-2", rotate_bytes=1 << 20) for i in range(2)]
            exporters = [
                Exporter(redis, sinks[i], Shard(i, 2), batch=4, instance=f"a{i}-{run}") for i in range(2)
            ]
            twin = Exporter(
                redis, JsonlSink(tmp_path / "twin", "0-of-2", 1 << 20), Shard(0, 2), instance=f"b-{run}"
            )
            for sink in [*sinks, twin.sink]:
                await sink.start()
            assert all([await e.hold_shard() for e in exporters])
            assert not await twin.hold_shard(), "shard 0 is held"

            async def drain(exporter: Exporter) -> None:
                while (await exporter.export_pass()).streams:
                    pass

            await asyncio.gather(*(drain(e) for e in exporters))
            for exporter in exporters:
                await exporter.release_shard()
            assert await twin.hold_shard(), "given up, the shard can be taken"
            await twin.release_shard()
            return sent
        finally:
            await redis.aclose()

    sent = asyncio.run(scenario())
    per_shard = [
        [json.loads(line)["request_id"] for path in sorted((tmp_path / f"shard{i}").glob("*.jsonl"))
         for line in path.read_text().splitlines()]
        for i in range(2)
    ]  # fmt: skip
    ours = [[rid for rid in rids if rid.startswith(f"s{run}")] for rids in per_shard]
    assert sorted(ours[0] + ours[1]) == sorted(sent)
    assert ours[0] and ours[1], "both shards had users"
    assert not list((tmp_path / "twin").glob("*.jsonl"))
