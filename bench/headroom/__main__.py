"""`python -m bench.headroom`: the real-time vs optimality trade-off of admission headroom, on the
real vLLM.

For each headroom setting, one capgate in front of a vLLM running `--max-num-seqs SLOTS` (told
`slots: SLOTS`) serves, for `--duration` seconds:
- the low tier (priority 7): `2 x SLOTS` clients in a closed loop, each streaming `--low-tokens`
  tokens again and again (a shed request, 429, is counted and retried after 0.2 s);
- the top tier (priority 0, `ttft_objective_s` = `--objective`): an open loop of short streams
  (`--top-tokens`), Poisson arrivals `--top-rate` per second (seeded, the same for every setting).

Measured per setting: the top tier's time to first token (p50, p99, misses of the objective), the
low tier's served tokens per second and shed rate, and vLLM's own generation tokens per second
(`vllm:generation_tokens_total`), the utilization the headroom leaves. Writes headroom.json,
headroom.md and headroom.png (default into bench/results/). Every process it starts is stopped at
the end, also on failure.
"""

import argparse
import asyncio
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common.locations import RESULTS
from bench.common.quantiles import quantile
from bench.common.upstreams import RealVllm
from tests.harness.capgate_server import CapgateServer
from tests.harness.policies import key_of, write_policy
from tests.harness.prom import parse, sample_sum
from tests.harness.redis_server import RedisServer
from tests.harness.vllm_server import VllmServer

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@dataclass
class Tally:
    """What one tier's clients saw."""

    sent: int = 0
    shed: int = 0
    failed: int = 0
    tokens: int = 0
    ttfts: list[float] = field(default_factory=list)


@dataclass
class Row:
    """One headroom setting's figures."""

    headroom: int
    top_requests: int
    top_ttft_p50_ms: float
    top_ttft_p99_ms: float
    top_missed: int
    top_shed: int
    low_tokens_per_s: float
    low_shed_rate: float
    vllm_tokens_per_s: float


async def stream(http: httpx.AsyncClient, user: str, max_tokens: int, tally: Tally) -> None:
    """One streamed chat completion; its first-token time and tokens go to `tally`."""
    tally.sent += 1
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    sent = time.monotonic()
    headers = {"authorization": f"Bearer {key_of(user)}"}
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as reply:
        if reply.status_code == 429:
            tally.shed += 1
            await reply.aread()
            return
        if reply.status_code != 200:
            tally.failed += 1
            await reply.aread()
            return
        first = True
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                tally.ttfts.append(time.monotonic() - sent)
                first = False
            if chunk.get("usage"):
                tally.tokens += chunk["usage"]["completion_tokens"]


async def workload(base_url: str, args: argparse.Namespace) -> tuple[Tally, Tally, float]:
    top, low = Tally(), Tally()
    deadline = time.monotonic() + args.duration
    arrivals = random.Random(args.seed)

    async def low_client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            shed = low.shed
            await stream(http, "low", args.low_tokens, low)
            if low.shed > shed:
                await asyncio.sleep(0.2)

    async def top_arrivals(http: httpx.AsyncClient) -> None:
        tasks = []
        while (now := time.monotonic()) < deadline:
            tasks.append(asyncio.create_task(stream(http, "top", args.top_tokens, top)))
            await asyncio.sleep(min(arrivals.expovariate(args.top_rate), deadline - now))
        await asyncio.gather(*tasks)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(top_arrivals(http), *(low_client(http) for _ in range(2 * args.slots)))
        return top, low, time.monotonic() - started


def _ms(seconds: float | None) -> float:
    """Seconds as milliseconds to 0.1 ms; NaN when nothing was measured."""
    return math.nan if seconds is None else round(seconds * 1000, 1)


def measure(headroom: int, vllm_url: str, redis: RedisServer, workdir: Path, args: argparse.Namespace) -> Row:
    tiers = {
        "top": {"priority": 0, "ttft_objective_s": args.objective},
        "low": {"priority": 7},
    }
    policy = write_policy(workdir / "policy.yaml", tiers, {"top": "top", "low": "low"})
    settings = {
        "upstreams": [{"url": vllm_url, "slots": args.slots}],
        "admission": {"headroom": headroom},
        "log_level": "warning",
    }
    gateway = CapgateServer(
        workdir / f"capgate-h{headroom}", upstreams=[vllm_url], redis_url=redis.url, policy=policy,
        settings=settings,
    )  # fmt: skip
    gateway.start()
    try:
        before = sample_sum(parse(httpx.get(f"{vllm_url}/metrics").text), "vllm:generation_tokens_total")
        top, low, elapsed = asyncio.run(workload(gateway.base_url, args))
        after = sample_sum(parse(httpx.get(f"{vllm_url}/metrics").text), "vllm:generation_tokens_total")
    finally:
        gateway.stop()
    return Row(
        headroom=headroom,
        top_requests=top.sent,
        top_ttft_p50_ms=_ms(quantile(top.ttfts, 0.5)),
        top_ttft_p99_ms=_ms(quantile(top.ttfts, 0.99)),
        top_missed=sum(t > args.objective for t in top.ttfts) + top.shed + top.failed,
        top_shed=top.shed,
        low_tokens_per_s=round(low.tokens / elapsed, 1),
        low_shed_rate=round(low.shed / max(1, low.sent), 3),
        vllm_tokens_per_s=round((after - before) / elapsed, 1),
    )


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"vLLM `--max-num-seqs {args.slots}`, {args.duration:.0f} s per setting; top tier: "
        f"{args.top_rate}/s Poisson, {args.top_tokens}-token streams, objective {args.objective} s; "
        f"low tier: {2 * args.slots} closed-loop clients, {args.low_tokens}-token streams.",
        "",
        "| headroom | top requests | top TTFT p50 / p99 | top over objective | low tokens/s | low shed rate "
        "| vLLM tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.headroom} | {r.top_requests} | {r.top_ttft_p50_ms:.0f} / {r.top_ttft_p99_ms:.0f} ms "
            f"| {r.top_missed} | {r.low_tokens_per_s:.0f} | {r.low_shed_rate:.0%} "
            f"| {r.vllm_tokens_per_s:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], objective: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headrooms = [r.headroom for r in rows]
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(10, 4))
    latency.plot(headrooms, [r.top_ttft_p50_ms for r in rows], "o-", label="top tier TTFT p50")
    latency.plot(headrooms, [r.top_ttft_p99_ms for r in rows], "o--", label="top tier TTFT p99")
    latency.axhline(objective * 1000, color="tab:red", linewidth=1, label="objective")
    latency.set_xlabel("headroom (slots)")
    latency.set_ylabel("ms")
    latency.set_xticks(headrooms)
    latency.legend()
    throughput.plot(headrooms, [r.vllm_tokens_per_s for r in rows], "o-", label="vLLM generated")
    throughput.plot(headrooms, [r.low_tokens_per_s for r in rows], "o--", label="low tier served")
    throughput.set_xlabel("headroom (slots)")
    throughput.set_ylabel("tokens/s")
    throughput.set_xticks(headrooms)
    throughput.legend()
    fig.suptitle("Admission headroom: top-tier latency against utilization")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.headroom", description=__doc__.split("\n\n")[0])
    p.add_argument("--headrooms", default="0,1,2", help="comma-separated settings (%(default)s)")
    p.add_argument("--slots", type=int, default=4, help="vLLM's --max-num-seqs (%(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per setting (%(default)s)")
    p.add_argument("--objective", type=float, default=1.0, help="top tier's ttft_objective_s (%(default)s)")
    p.add_argument("--top-rate", type=float, default=1.0, help="top-tier arrivals per second (%(default)s)")
    p.add_argument("--top-tokens", type=int, default=16, help="top-tier stream length (%(default)s)")
    p.add_argument("--low-tokens", type=int, default=256, help="low-tier stream length (%(default)s)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--vllm-url", help="a vLLM already running with --max-num-seqs SLOTS (left running)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    headrooms = [int(h) for h in args.headrooms.split(",") if h]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="capgate-headroom-") as scratch:
        workdir = Path(scratch)
        vllm = RealVllm(workdir, args.vllm_url)
        if vllm.server is not None:
            vllm.server = VllmServer(
                extra_args=["--max-num-seqs", str(args.slots)], log_path=workdir / "vllm.log"
            )
        redis = RedisServer()
        redis.start()
        try:
            with vllm:
                rows = []
                for headroom in headrooms:
                    rows.append(measure(headroom, vllm.url, redis, workdir, args))
                    print(table(rows[-1:], args).splitlines()[-1], flush=True)
        finally:
            redis.close()
    report: dict[str, Any] = {
        "settings": vars(args) | {"out": str(args.out)},
        "rows": [asdict(r) for r in rows],
    }
    (args.out / "headroom.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "headroom.md").write_text(table(rows, args))
    plot(rows, args.objective, args.out / "headroom.png")
    print(table(rows, args))


if __name__ == "__main__":
    main()
