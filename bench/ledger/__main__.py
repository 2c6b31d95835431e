"""`python -m bench.ledger`: the ledger exporter under load, and what the ledger costs Redis.

Against its own `redis-server` and PostgreSQL (the test harness's, on free loopback ports), with
settlements made as the gateway makes them (`Meter.settle`, settle.lua over the pipelined
connection; a tier with one monthly window, users `bench-<i>`):

1. **growth**: N settlements over U users with no exporter running: Redis `used_memory` per
   settlement, of which the ledger streams (`MEMORY USAGE`, summed) and the rest (the settled-id
   set kept for idempotency, counters, totals).
2. **drain**: the exporter (PostgreSQL sink, batch B) started on that backlog: events per second
   until Redis holds no ledger event, and `used_memory` after.
3. **sustained**: settlements at R per second for T seconds while the exporter runs: each second
   the backlog it saw and `used_memory`; then the exporter's rate and the largest backlog.

Reproduce:

    .venv/bin/python -m bench.ledger                       # 100k settlements, 10k users, 2k/s for 60 s
    .venv/bin/python -m bench.ledger --events 20000 --users 2000 --rate 500 --seconds 10

Prints a table and writes `ledger.json` (default into bench/results/).
"""

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import uvloop

from bench.common import machine
from bench.common.locations import RESULTS
from metering.events import UsageEvent
from metering.export.exporter import Exporter, PassResult
from metering.export.postgres import PostgresSink
from metering.keys import LEDGER_PATTERN
from metering.meter import Meter, decoded
from metering.pipeline import ScriptConnection
from metering.windows import Scope
from policies.schema import Window
from tests.harness.postgres_server import PostgresServer
from tests.harness.redis_server import RedisServer

WINDOWS = (Window.model_validate({"per": "month", "tokens": 10**12}),)
CONCURRENCY = 64


@dataclass
class Sample:
    """One second of the sustained run."""

    at_s: float
    settled: int
    exported: int
    backlog: int
    used_memory: int


@dataclass
class Run:
    """Everything measured, as written to the JSON."""

    settings: dict[str, Any]
    growth: dict[str, float] = field(default_factory=dict)
    drain: dict[str, float] = field(default_factory=dict)
    sustained: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)


def event(n: int, users: int, now_ms: int) -> tuple[UsageEvent, Scope]:
    """Settlement `n`: a request of user `n mod users` with a realistic shape."""
    user = f"bench-{n % users}"
    usage = UsageEvent(
        request_id=f"bench-r{n}", user=user, tier="paid", model="tiny", prompt_tokens=120,
        cached_tokens=0, completion_tokens=200, value_nano=240_000 + n % 97, counted=320,
        finish_reason="stop", ttft_ms=41.5, duration_ms=812.25, ts_ms=now_ms,
    )  # fmt: skip
    return usage, Scope(user, WINDOWS)


async def settle_range(meter: Meter, start: int, count: int, users: int) -> None:
    """Settle events `start` to `start + count`, CONCURRENCY at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)
    now_ms = int(time.time() * 1000)

    async def one(n: int) -> None:
        async with gate:
            usage, scope = event(n, users, now_ms)
            await meter.settle(usage, scope)

    await asyncio.gather(*(one(n) for n in range(start, start + count)))


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def ledger_bytes(client: aioredis.Redis) -> int:
    total = 0
    async for key in client.scan_iter(match=LEDGER_PATTERN, count=1000):
        total += int(await client.memory_usage(decoded(key)) or 0)
    return total


class Watched:
    """The exporter, run in this process, with its last pass and its total kept."""

    def __init__(self, client: aioredis.Redis, dsn: str, batch: int) -> None:
        self.exporter = Exporter(client, PostgresSink(dsn), batch=batch, lock_ttl_s=30)
        self.stop = asyncio.Event()
        self.exported = 0
        self.backlog = 0

    def observe(self, result: PassResult) -> None:
        self.exported += result.exported
        self.backlog = result.backlog

    def start(self, interval_s: float) -> "asyncio.Task[None]":
        return asyncio.create_task(self.exporter.run(self.stop, interval_s, self.observe))


async def measure(args: argparse.Namespace, redis_url: str, dsn: str) -> Run:
    run = Run(settings={k: v for k, v in vars(args).items() if k != "out"})
    client = aioredis.Redis.from_url(redis_url)
    scripts = ScriptConnection(redis_url, timeout_s=5.0)
    meter = Meter(client, scripts=scripts)
    try:
        base = await used_memory(client)
        began = time.perf_counter()
        await settle_range(meter, 0, args.events, args.users)
        settle_s = time.perf_counter() - began
        grown = await used_memory(client) - base
        streams = await ledger_bytes(client)
        run.growth = {
            "settlements": args.events,
            "settle_per_s": args.events / settle_s,
            "used_memory_per_settlement_b": grown / args.events,
            "ledger_per_settlement_b": streams / args.events,
            "rest_per_settlement_b": (grown - streams) / args.events,
        }

        watched = Watched(client, dsn, args.batch)
        began = time.perf_counter()
        task = watched.start(args.interval)
        while watched.exported < args.events:
            await asyncio.sleep(0.01)
        drain_s = time.perf_counter() - began
        run.drain = {
            "events": args.events,
            "seconds": drain_s,
            "events_per_s": args.events / drain_s,
            "used_memory_before_b": base + grown,
            "used_memory_after_b": await used_memory(client),
            "ledger_after_b": await ledger_bytes(client),
        }

        next_n = args.events
        start = time.perf_counter()
        exported_before = watched.exported
        watched.backlog = 0
        for second in range(args.seconds):
            tick = time.perf_counter()
            await settle_range(meter, next_n, args.rate, args.users)
            next_n += args.rate
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - tick)))
            exported = watched.exported - exported_before
            memory = await used_memory(client)
            run.samples.append(Sample(second + 1, next_n - args.events, exported, watched.backlog, memory))
        elapsed = time.perf_counter() - start
        settled = next_n - args.events
        while watched.exported - exported_before < settled:
            await asyncio.sleep(0.01)
        caught_up = time.perf_counter() - start
        watched.stop.set()
        await task
        memories = [s.used_memory for s in run.samples]
        run.sustained = {
            "settled": settled,
            "settle_per_s": settled / elapsed,
            "export_per_s": settled / caught_up,
            "max_backlog": max(s.backlog for s in run.samples),
            "used_memory_start_b": memories[0],
            "used_memory_max_b": max(memories),
            "used_memory_end_b": await used_memory(client),
            "ledger_end_b": await ledger_bytes(client),
        }
    finally:
        await scripts.aclose()
        await client.aclose()
    return run


def report(run: Run) -> str:
    g, d, s = run.growth, run.drain, run.sustained
    mib = 1 << 20
    rows = [
        ("settlements without an exporter", f"{g['settlements']:,} at {g['settle_per_s']:,.0f}/s"),
        ("Redis memory per settlement", f"{g['used_memory_per_settlement_b']:.0f} B"),
        ("  of which the ledger stream", f"{g['ledger_per_settlement_b']:.0f} B (exported, then trimmed)"),
        ("  the rest (settled ids for 7 days, counters, totals)", f"{g['rest_per_settlement_b']:.0f} B"),
        ("exporter draining that backlog (PostgreSQL)", f"{d['events_per_s']:,.0f} events/s"),
        ("Redis memory before / after the drain",
         f"{d['used_memory_before_b'] / mib:.1f} / {d['used_memory_after_b'] / mib:.1f} MiB"),
        ("sustained: settled / exported", f"{s['settle_per_s']:,.0f}/s / {s['export_per_s']:,.0f}/s"),
        ("sustained: largest backlog seen", f"{s['max_backlog']:,.0f} events"),
        ("sustained: Redis memory start / max / end",
         f"{s['used_memory_start_b'] / mib:.1f} / {s['used_memory_max_b'] / mib:.1f} / "
         f"{s['used_memory_end_b'] / mib:.1f} MiB"),
    ]  # fmt: skip
    lines = ["| measurement | figure |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=2_000, help="settlements per second, sustained")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--interval", type=float, default=0.5, help="exporter.interval_s")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with RedisServer() as redis_server, PostgresServer() as postgres:
        run = uvloop.run(measure(args, redis_server.url, postgres.dsn))
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"meta": machine.describe(), **vars(run), "samples": [vars(s) for s in run.samples]}
    (args.out / "ledger.json").write_text(json.dumps(data, indent=2))
    print(report(run))


if __name__ == "__main__":
    main()
