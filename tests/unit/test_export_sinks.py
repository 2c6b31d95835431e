"""The ledger export's pure parts and the file sink on a temporary directory: entry records,
shards, CloudEvents, signatures, and the JSON Lines sink's recovery from a batch that never
committed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.export.exporter import Shard
from metering.export.http import cloud_event, signature, verify
from metering.export.jsonl import JsonlSink
from metering.ledger import LedgerEntry

FIELDS = {
    "request_id": "req-1", "user": "alice", "tier": "pro", "model": "tiny", "prompt_tokens": "12",
    "cached_tokens": "4", "completion_tokens": "30", "value_nano": "123456", "finish_reason": "stop",
    "ttft_ms": "", "duration_ms": "41.250", "ts_ms": "1796473320564",
}  # fmt: skip


def entry(n: int, stream: str = "cg:{u:alice}:ledger", **fields: str) -> LedgerEntry:
    return LedgerEntry(stream, f"1796473320564-{n}", {**FIELDS, "request_id": f"req-{n}", **fields})


def test_a_record_is_typed_and_names_its_team_and_entry() -> None:
    record = entry(3, "cg:{t:eng}:u:alice:ledger").record()
    assert record["team"] == "eng" and record["user"] == "alice" and record["request_id"] == "req-3"
    assert (record["prompt_tokens"], record["cached_tokens"], record["completion_tokens"]) == (12, 4, 30)
    assert record["value_nano"] == 123456 and record["ts_ms"] == 1796473320564
    assert record["ttft_ms"] is None and record["duration_ms"] == 41.25
    assert record["entry_id"] == "1796473320564-3"
    assert entry(1).record()["team"] is None


@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=50), st.integers(1, 8))
def test_every_stream_is_in_exactly_one_shard(names: list[str], count: int) -> None:
    for name in names:
        stream = f"cg:{{u:{name}}}:ledger"
        assert sum(Shard(i, count).owns(stream) for i in range(count)) == 1


def test_a_cloud_event_carries_the_request_id_subject_and_time() -> None:
    event = cloud_event(entry(7), "capgate-eu")
    assert event["id"] == "req-7" and event["subject"] == "alice" and event["source"] == "capgate-eu"
    assert event["specversion"] == "1.0" and event["time"] == "2026-12-05T12:22:00.564Z"
    assert event["data"]["completion_tokens"] == 30
    late = cloud_event(entry(8, replaces="1796473320000-0"), "capgate")
    assert late["id"] == "req-8/1796473320564-8", "a replacement is an event of its own"


@given(st.binary(max_size=300), st.integers(0, 2**31))
def test_a_signature_verifies_only_its_body_secret_and_time(body: bytes, now: int) -> None:
    secret = b"s" * 32
    header = signature(secret, now, body)
    assert verify(secret, header, body, now)
    assert not verify(secret, header, body + b"x", now)
    assert not verify(b"t" * 32, header, body, now)
    assert not verify(secret, header, body, now + 301), "an old signature is a replay"
    assert not verify(secret, "t=abc,v1=00", body, now)


def lines(directory: Path) -> list[dict]:
    return [
        json.loads(line) for p in sorted(directory.glob("*.jsonl")) for line in p.read_text().splitlines()
    ]


def test_the_file_sink_cuts_what_a_crash_left_uncommitted(tmp_path: Path) -> None:
    async def run() -> None:
        sink = JsonlSink(tmp_path, "0-of-1", rotate_bytes=10_000)
        await sink.start()
        await sink.write([entry(1), entry(2)])
        assert sink.recent == {entry(1).key, entry(2).key}
        current = next(tmp_path.glob("*.jsonl"))
        with open(current, "ab") as out:  # a batch written, then the crash before its journal
            out.write(b'{"request_id":"req-3"}\n{"request_')
        newer = tmp_path / "ledger-0-of-1-20990101T000000Z-00000009.jsonl"
        newer.write_text('{"request_id":"req-4"}\n')  # a rotation, then the crash
        again = JsonlSink(tmp_path, "0-of-1", rotate_bytes=10_000)
        await again.start()
        assert [r["request_id"] for r in lines(tmp_path)] == ["req-1", "req-2"]
        assert again.recent == {entry(1).key, entry(2).key}, "the last committed batch is known"
        assert (tmp_path / (newer.stem + ".uncommitted")).exists(), "kept aside, not deleted"
        await again.write([entry(3)])
        assert [r["request_id"] for r in lines(tmp_path)] == ["req-1", "req-2", "req-3"]

    asyncio.run(run())


@pytest.mark.parametrize("rotate_bytes", [1, 600, 10_000])
def test_the_file_sink_rotates_by_size_between_batches(tmp_path: Path, rotate_bytes: int) -> None:
    async def run() -> None:
        sink = JsonlSink(tmp_path, "0-of-1", rotate_bytes=rotate_bytes)
        await sink.start()
        for n in range(6):
            await sink.write([entry(2 * n), entry(2 * n + 1)])
        assert [r["request_id"] for r in lines(tmp_path)] == [f"req-{n}" for n in range(12)]
        files = len(list(tmp_path.glob("*.jsonl")))
        assert files == {1: 6, 600: 3, 10_000: 1}[rotate_bytes]

    asyncio.run(run())


def notice(stream: str = "cg:{t:eng}:u:alice:ledger", scope: str = "team") -> LedgerEntry:
    fields = {"kind": "threshold", "user": "alice", "window": "month", "scope": scope, "unit": "spend",
              "share": "800", "cap": "50000000000", "used": "40000000001", "period": "24311",
              "request_id": "req-9", "ts_ms": "1796473320564"}  # fmt: skip
    return LedgerEntry(stream, "1796473320564-1", fields)


def test_a_notification_record_names_whose_window_which_threshold_and_period() -> None:
    record = notice().record()
    assert record["id"] == "team:eng:month:spend:800:24311"
    assert record["share"] == 0.8 and record["cap"] == 50_000_000_000 and record["used"] == 40_000_000_001
    assert notice("cg:{u:alice}:ledger", "user").record()["id"] == "user:alice:month:spend:800:24311"
    event = cloud_event(notice(), "capgate")
    assert event["type"] == "dev.capgate.threshold" and event["id"] == "team:eng:month:spend:800:24311"
    assert event["subject"] == "alice"
