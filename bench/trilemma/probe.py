"""Readings taken before and after a run, from sources that do not trust capgate's own code where
they can avoid it: Redis's `INFO commandstats` (every metering call is one EVALSHA) and `INFO
cpu`, the gateway process's CPU time from /proc, the gateway's and vLLM's `/metrics`, and the
users' ledgers (a request is settled once its event is there). Plus Prometheus's histogram
quantile, which the report needs. The Redis client must decode responses."""

import asyncio
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from redis.asyncio import Redis

from metering.keys import UserKeys
from tests.harness.prom import Samples, parse, sample_sum

_TICKS = os.sysconf("SC_CLK_TCK")
SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval")


@dataclass(frozen=True)
class Reading:
    """One moment's counters. `script_calls` counts the scripts Redis ran to the end (a NOSCRIPT
    reply, before a client loads a script, is a failed call, not a round trip of metering)."""

    at: float
    metrics: Samples
    script_calls: int
    script_usec: int
    redis_cpu_s: float
    gateway_cpu_s: float


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def read(http: httpx.AsyncClient, gateway_url: str, redis: Redis, gateway_pid: int) -> Reading:
    """Read the gateway's metrics, Redis's script calls and CPU, and the gateway's CPU."""
    metrics = parse((await http.get(f"{gateway_url}/metrics")).text)
    stats = await redis.info("commandstats")
    cpu = await redis.info("cpu")
    calls = sum(
        int(stats.get(name, {}).get("calls", 0)) - int(stats.get(name, {}).get("failed_calls", 0))
        for name in SCRIPT_COMMANDS
    )
    usec = sum(int(stats.get(name, {}).get("usec", 0)) for name in SCRIPT_COMMANDS)
    return Reading(
        at=time.perf_counter(),
        metrics=metrics,
        script_calls=calls,
        script_usec=usec,
        redis_cpu_s=float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        gateway_cpu_s=process_cpu_s(gateway_pid),
    )


async def wait_ledgered(redis: Redis, wanted: dict[str, set[str]], timeout: float = 15.0) -> set[str]:
    """Wait until every request id of `wanted` ({user id: request ids}) is in its user's ledger,
    that is settled; return the ids still missing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        missing: set[str] = set()
        for user, ids in wanted.items():
            events = await redis.xrange(UserKeys(user).ledger)
            missing |= ids - {fields["request_id"] for _, fields in events}
        if not missing or time.monotonic() >= deadline:
            return missing
        await asyncio.sleep(0.05)


async def vllm_counters(http: httpx.AsyncClient, vllm_url: str) -> dict[str, float]:
    """vLLM's generated-token total and its running and waiting requests."""
    samples = parse((await http.get(f"{vllm_url}/metrics")).text)
    return {
        "generated": sample_sum(samples, "vllm:generation_tokens_total"),
        "busy": sample_sum(samples, "vllm:num_requests_running")
        + sample_sum(samples, "vllm:num_requests_waiting"),
    }


async def wait_vllm_idle(http: httpx.AsyncClient, vllm_url: str, timeout: float = 30.0) -> float:
    """Wait until vLLM runs nothing (aborted streams included); its generated-token total then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counters = await vllm_counters(http, vllm_url)
        if counters["busy"] == 0:
            await asyncio.sleep(0.3)
            return (await vllm_counters(http, vllm_url))["generated"]
        await asyncio.sleep(0.1)
    raise TimeoutError(f"vLLM at {vllm_url} still busy after {timeout} s")


def counter_delta(before: Reading, after: Reading, name: str, labels: dict[str, str] | None = None) -> float:
    """How much a counter (summed over matching label sets) grew between two readings."""
    return sample_sum(after.metrics, name, labels) - sample_sum(before.metrics, name, labels)


def histogram_delta(
    before: Reading, after: Reading, name: str, labels: dict[str, str] | None = None
) -> list[tuple[float, float]]:
    """The cumulative buckets (upper bound, count) a histogram gained between two readings,
    summed over the label sets that include `labels`."""
    wanted = set((labels or {}).items())
    buckets: dict[float, float] = {}
    for key, value in after.metrics.items():
        sample_name, sample_labels = key
        if sample_name != f"{name}_bucket" or not wanted <= sample_labels:
            continue
        bound = float(dict(sample_labels)["le"])
        buckets[bound] = buckets.get(bound, 0.0) + value - before.metrics.get(key, 0.0)
    return sorted(buckets.items())


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Prometheus's `histogram_quantile`: linear inside the bucket that holds the rank."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower
