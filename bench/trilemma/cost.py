"""What metering costs a request, per lease size: the same streamed chat completion of N tokens
sent to the fast upstream directly and through capgate, interleaved, with Redis's own count of
the metering round trips (EVALSHA calls) as the honest number of round trips per request.

Per lease size and round, a block of `pairs` (direct, capgate) pairs runs at `concurrency`;
blocks of different lease sizes alternate, and their order rotates each round, so slow phases of
a shared machine spread over every lease size.
"""

import asyncio
import math
import time
from dataclasses import dataclass, field

import httpx
from redis.asyncio import Redis

from bench.common.quantiles import quantile
from bench.trilemma.client import CHAT_PATH, StreamResult, chat_body, stream_chat
from bench.trilemma.probe import (
    Reading,
    counter_delta,
    histogram_delta,
    histogram_quantile,
    read,
    wait_ledgered,
)
from bench.trilemma.stack import Account, Lease, lease_label

PROMPT = "Explain in one sentence what a token-metering gateway does."
WARM_UP = 2


@dataclass(frozen=True)
class CostPlan:
    """How much to send: `pairs` per lease size and round, `rounds` rounds."""

    leases: list[Lease]
    pairs: int
    rounds: int
    concurrency: int
    stream_tokens: int


@dataclass(frozen=True)
class Target:
    """Where requests go: the gateway (and its process, for CPU) and the upstream directly."""

    gateway_url: str
    gateway_pid: int
    direct_url: str


@dataclass
class Samples:
    """Everything one lease size collected over its blocks."""

    direct: list[StreamResult] = field(default_factory=list)
    capgate: list[StreamResult] = field(default_factory=list)
    readings: list[tuple[Reading, Reading]] = field(default_factory=list)
    unsettled: int = 0


def expected_round_trips(lease: Lease, tokens: int) -> int:
    """Reserve, one extension per further lease, settle: for a stream using all `tokens`."""
    if lease is None or lease >= tokens:
        return 2
    return 1 + math.ceil(tokens / lease)


async def _settled(redis: Redis, account: Account, results: list[StreamResult]) -> int:
    """Wait for `results` to settle; how many did not within the wait."""
    ids = {r.request_id for r in results if r.request_id}
    return len(await wait_ledgered(redis, {account.user: ids}))


async def _observed(
    http: httpx.AsyncClient, redis: Redis, target: Target, before: Reading, settled: int
) -> Reading:
    """A reading taken once the gateway's metrics count `settled` more settlements (it observes
    each just after Redis answers, so a reading right after the ledger row may miss the last)."""
    deadline = time.monotonic() + 5.0
    while True:
        after = await read(http, target.gateway_url, redis, target.gateway_pid)
        done = counter_delta(before, after, "capgate_redis_call_seconds_count", {"operation": "settle"})
        if done >= settled or time.monotonic() > deadline:
            return after
        await asyncio.sleep(0.05)


async def _pair(
    http: httpx.AsyncClient, target: Target, key: str, body: dict, capgate_first: bool
) -> tuple[StreamResult, StreamResult]:
    async def direct() -> StreamResult:
        return await stream_chat(http, target.direct_url + CHAT_PATH, body)

    async def through() -> StreamResult:
        return await stream_chat(http, target.gateway_url + CHAT_PATH, body, key=key)

    if capgate_first:
        via = await through()
        return await direct(), via
    first = await direct()
    return first, await through()


async def _block(
    http: httpx.AsyncClient, redis: Redis, target: Target, account: Account, plan: CostPlan, samples: Samples
) -> None:
    body = chat_body(PROMPT, plan.stream_tokens)
    sent: list[StreamResult] = []

    async def worker(index: int, pairs: int) -> None:
        for n in range(pairs):
            direct, via = await _pair(http, target, account.key, body, capgate_first=(index + n) % 2 == 1)
            samples.direct.append(direct)
            sent.append(via)

    shares = [
        plan.pairs // plan.concurrency + (i < plan.pairs % plan.concurrency) for i in range(plan.concurrency)
    ]
    before = await read(http, target.gateway_url, redis, target.gateway_pid)
    await asyncio.gather(*(worker(i, n) for i, n in enumerate(shares) if n))
    samples.unsettled += await _settled(redis, account, sent)
    after = await _observed(http, redis, target, before, len(sent))
    samples.capgate += sent
    samples.readings.append((before, after))


async def measure_cost(
    http: httpx.AsyncClient, redis: Redis, target: Target, accounts: dict[Lease, Account], plan: CostPlan
) -> list[dict]:
    """Run every block and return one row of figures per lease size."""
    body = chat_body(PROMPT, plan.stream_tokens)
    for lease in plan.leases:
        warm = []
        for _ in range(WARM_UP):
            warm.append(
                await stream_chat(http, target.gateway_url + CHAT_PATH, body, key=accounts[lease].key)
            )
            await stream_chat(http, target.direct_url + CHAT_PATH, body)
        await _settled(redis, accounts[lease], warm)
    collected = {lease: Samples() for lease in plan.leases}
    for round_ in range(plan.rounds):
        shift = round_ % len(plan.leases)
        for lease in plan.leases[shift:] + plan.leases[:shift]:
            await _block(http, redis, target, accounts[lease], plan, collected[lease])
    return [row(lease, plan.stream_tokens, collected[lease]) for lease in plan.leases]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _merged(samples: Samples, name: str, labels: dict[str, str] | None = None) -> list[tuple[float, float]]:
    total: dict[float, float] = {}
    for before, after in samples.readings:
        for bound, count in histogram_delta(before, after, name, labels):
            total[bound] = total.get(bound, 0.0) + count
    return sorted(total.items())


def _summed(samples: Samples, name: str, labels: dict[str, str] | None = None) -> float:
    return sum(counter_delta(before, after, name, labels) for before, after in samples.readings)


def row(lease: Lease, tokens: int, samples: Samples) -> dict:
    """The figures of one lease size. `added_ttft_*` and `added_duration_*` are quantiles of
    each capgate request's time minus its paired direct request's; `added_itl_*` (gaps between
    token events, not paired) is capgate's quantile minus direct's."""
    requests = len(samples.capgate)
    errors = sum(1 for r in samples.direct + samples.capgate if not r.ok or r.tokens != tokens)
    errors += samples.unsettled
    calls = sum(after.script_calls - before.script_calls for before, after in samples.readings)
    usec = sum(after.script_usec - before.script_usec for before, after in samples.readings)
    redis_cpu = sum(after.redis_cpu_s - before.redis_cpu_s for before, after in samples.readings)
    gateway_cpu = sum(after.gateway_cpu_s - before.gateway_cpu_s for before, after in samples.readings)
    reserves = _summed(samples, "capgate_redis_call_seconds_count", {"operation": "reserve"})
    settles = _summed(samples, "capgate_redis_call_seconds_count", {"operation": "settle"})
    extensions = _summed(samples, "capgate_lease_extensions_total")
    figures: dict = {
        "lease": lease,
        "label": lease_label(lease),
        "requests": requests,
        "errors": errors,
        "round_trips_per_request": calls / requests,
        "round_trips_expected": expected_round_trips(lease, tokens),
        "round_trips_from_metrics": (reserves + settles + extensions) / requests,
        "lease_extensions_per_request": extensions / requests,
        "redis_script_us_per_request": round(usec / requests, 1),
        "redis_cpu_ms_per_request": _ms(redis_cpu / requests),
        "gateway_cpu_ms_per_request": _ms(gateway_cpu / requests),
    }
    for name, of in (("ttft", lambda r: r.ttft), ("duration", lambda r: r.duration)):
        direct = [v for v in map(of, samples.direct) if v is not None]
        via = [v for v in map(of, samples.capgate) if v is not None]
        pairs = zip(samples.capgate, samples.direct, strict=True)
        added = [a - b for a, b in ((of(x), of(y)) for x, y in pairs) if a is not None and b is not None]
        for q, tag in ((0.5, "median"), (0.99, "p99")):
            figures[f"{name}_direct_{tag}_ms"] = _ms(quantile(direct, q))
            figures[f"{name}_capgate_{tag}_ms"] = _ms(quantile(via, q))
            figures[f"added_{name}_{tag}_ms"] = _ms(quantile(added, q))
    direct_gaps = [g for r in samples.direct for g in r.gaps]
    via_gaps = [g for r in samples.capgate for g in r.gaps]
    for q, tag in ((0.5, "median"), (0.99, "p99")):
        figures[f"itl_direct_{tag}_us"] = _us(quantile(direct_gaps, q))
        figures[f"itl_capgate_{tag}_us"] = _us(quantile(via_gaps, q))
        figures[f"added_itl_{tag}_us"] = _us(_diff(quantile(via_gaps, q), quantile(direct_gaps, q)))
    added = _merged(samples, "capgate_added_latency_seconds")
    reserve = _merged(samples, "capgate_redis_call_seconds", {"operation": "reserve"})
    settle = _merged(samples, "capgate_redis_call_seconds", {"operation": "settle"})
    for q, tag in ((0.5, "median"), (0.99, "p99")):
        figures[f"gateway_added_{tag}_ms"] = _ms(histogram_quantile(added, q))
        figures[f"redis_reserve_{tag}_ms"] = _ms(histogram_quantile(reserve, q))
        figures[f"redis_settle_{tag}_ms"] = _ms(histogram_quantile(settle, q))
    return figures
