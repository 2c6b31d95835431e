"""`python -m bench.trilemma`: granularity, real-time cost and optimality of metering, measured
on the real gateway and Redis, for several lease sizes.

1. Cost (fast replaying upstream): what metering adds per request, median and p99, and how many
   Redis round trips a request makes, for a streamed completion of 256 tokens per lease size
   (see `bench.trilemma.cost`).
2. Trilemma (real vLLM): the same capped, concurrent workload per lease size; held-but-unused
   tokens, denials that would have fit, round trips, latency, and billed against generated
   tokens (see `bench.trilemma.workload`).

Writes trilemma.json, trilemma.md and trilemma.png (default into bench/results/). Every process
it starts (Redis, the fake upstream, vLLM, capgate) is stopped at the end, also on failure.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvloop
from redis.asyncio import Redis

from bench.common.locations import REPO, RESULTS
from bench.common.upstreams import FakeUpstreamProcess, RealVllm
from bench.trilemma import report
from bench.trilemma.cost import CostPlan, Target, measure_cost
from bench.trilemma.stack import (
    Account,
    Lease,
    capped_tier,
    cost_tier,
    gateway,
    lease_label,
)
from bench.trilemma.workload import Run, WorkloadPlan, merge, row, run_lease
from proxy import __version__
from tests.harness.capgate_server import CapgateServer
from tests.harness.policies import key_of, write_policy
from tests.harness.redis_server import RedisServer

STREAM_TOKENS = 256  # the fast upstream's capture streams exactly this many tokens
NOTES = [
    "Round trips are counted by Redis itself (INFO commandstats: EVALSHA calls that ran, one per "
    "metering call), divided by requests (refused ones included: a refusal is one round trip); "
    "'capgate metrics' is reserve + settle + lease extensions from capgate's /metrics, as a "
    "cross-check. Lease refreshes (every lease_ttl/3 = 40 s) never happen in these short streams.",
    "Added latency pairs each capgate request with a direct request to the same upstream sent "
    "right before or after it; 'capgate pre-forward' is capgate_added_latency_seconds (auth, "
    "policy, reservation: before the upstream is called), interpolated from its buckets.",
    "Workload lengths: each request asks max_tokens, and vLLM's own min_tokens and stop_token_ids "
    "make the model stop after the tokens the request needs (finish_reason stop), as real answers "
    "end before their limit. Prompts are not counted against these caps, so what is held and what "
    "is used are both completion tokens.",
    "Held, never used: every 50 ms the run reads each user's live reservations from Redis; the "
    "tokens each holds beyond what its request was billed in the end are tokens no other request "
    "of that user could get, and that this one never used (time average per user, as a share of "
    "the cap). 'Not yet received' subtracts what the client had received at the sample instead: "
    "an upper bound, which also counts tokens held for the request's own next tokens and the "
    "client's lag.",
    "Denied that would have fit: the requests refused (429 cap_exceeded) or cut short (a smaller "
    "whole-request grant, or a refused lease), smallest first, whose missing tokens still fit "
    "together under the user's cap after everything settled.",
    "Exactness: 'generated, never billed' is vLLM's own vllm:generation_tokens_total delta minus the "
    "ledger: tokens vLLM generated after capgate cut a stream, before vLLM saw the abort and after "
    "capgate's 100 ms drain. 'Billed over the caps': a cut stream's tokens past what it held (vLLM "
    "was ahead of capgate by more than the half lease kept for that), settled over the cap.",
    "Errors: requests that failed or did not settle within 15 s. On a loaded machine a Redis call "
    "over capgate's 0.5 s timeout shows here: a 503 meter_unavailable at reservation, or a stream "
    "cut short because a lease extension timed out (every extension is one more such chance).",
    "Gateway CPU includes capgate's background pollers (upstream /metrics every 0.5 s, reaper) "
    "during the run; Redis CPU includes the benchmark's own INFO calls.",
]


@dataclass(frozen=True)
class Options:
    out: Path
    leases: list[Lease]
    cost: CostPlan | None
    workload: WorkloadPlan | None
    token_interval_ms: float
    vllm_url: str | None
    plot: bool


def _leases(text: str) -> list[Lease]:
    leases: list[Lease] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            leases.append(None if part == "whole" else int(part))
    return leases


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.trilemma", description=__doc__)
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results)")
    p.add_argument("--quick", action="store_true", help="3 lease sizes, few requests (about 2 minutes)")
    p.add_argument(
        "--leases", type=_leases, help="lease sizes, 'whole' for none (default whole,128,64,16,4,1)"
    )
    p.add_argument(
        "--cost-pairs", type=int, help="direct+capgate pairs per lease size and round (default 20)"
    )
    p.add_argument("--cost-rounds", type=int, help="rounds over the lease sizes (default 2)")
    p.add_argument("--cost-concurrency", type=int, default=1, help="concurrent pairs (default 1)")
    p.add_argument("--token-interval-ms", type=float, default=1.0, help="fast upstream's token spacing")
    p.add_argument("--users", type=int, help="users of the capped workload (default 4)")
    p.add_argument("--slots", type=int, help="concurrent clients per user (default 3)")
    p.add_argument("--requests", type=int, help="requests per client (default 5)")
    p.add_argument("--rounds", type=int, help="runs of the workload per lease size (default 2)")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens each workload request asks")
    p.add_argument("--cap-fraction", type=float, default=0.75, help="cap as a share of the mean demand")
    p.add_argument("--seed", type=int, default=7, help="seed of the workload's lengths and pauses")
    p.add_argument("--no-cost", action="store_true", help="skip part 1 (fast upstream)")
    p.add_argument("--no-vllm", action="store_true", help="skip part 2 (real vLLM)")
    p.add_argument("--vllm-url", help="use the vLLM server at this URL instead of starting one")
    p.add_argument("--no-plot", action="store_true", help="write the JSON and the table only")
    return p


def options_from(args: argparse.Namespace) -> Options:
    quick = args.quick
    leases = args.leases or ([None, 16, 1] if quick else [None, 128, 64, 16, 4, 1])
    cost = None
    if not args.no_cost:
        cost = CostPlan(
            leases=leases,
            pairs=args.cost_pairs or (4 if quick else 20),
            rounds=args.cost_rounds or (1 if quick else 2),
            concurrency=args.cost_concurrency,
            stream_tokens=STREAM_TOKENS,
        )
    workload = None
    if not args.no_vllm:
        workload = WorkloadPlan(
            users=args.users or (2 if quick else 4),
            slots=args.slots or (2 if quick else 3),
            per_slot=args.requests or (3 if quick else 5),
            rounds=args.rounds or (1 if quick else 2),
            max_tokens=args.max_tokens,
            cap_fraction=args.cap_fraction,
            seed=args.seed,
        )
    return Options(args.out, leases, cost, workload, args.token_interval_ms, args.vllm_url, not args.no_plot)


def log(message: str) -> None:
    """Progress on stderr (the report is the output)."""
    print(f"[trilemma {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cost_user(lease: Lease) -> str:
    return f"cost-{lease_label(lease)}"


def workload_users(lease: Lease, round_: int, count: int) -> list[str]:
    return [f"tri-{lease_label(lease)}-r{round_}-{n}" for n in range(count)]


def write_run_policy(path: Path, options: Options) -> None:
    """One policy for both parts: a tier and users per lease size and part."""
    tiers: dict[str, dict[str, Any]] = {}
    users: dict[str, str] = {}
    for lease in options.leases:
        if options.cost is not None:
            tiers[cost_user(lease)] = cost_tier(lease)
            users[cost_user(lease)] = cost_user(lease)
        if options.workload is not None:
            plan = options.workload
            name = f"tri-{lease_label(lease)}"
            tiers[name] = capped_tier(lease, plan.cap, max_concurrent=2 * plan.slots)
            for round_ in range(plan.rounds):
                users.update({user: name for user in workload_users(lease, round_, plan.users)})
    write_policy(path, tiers, users)


def run_async(work: Callable[[httpx.AsyncClient, Redis], Awaitable[Any]], redis_url: str) -> Any:
    """Run `work` on uvloop with one HTTP client and one Redis client."""

    async def main() -> Any:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        redis = Redis.from_url(redis_url, decode_responses=True)
        try:
            async with httpx.AsyncClient(timeout=120.0, limits=limits) as http:
                return await work(http, redis)
        finally:
            await redis.aclose()

    return uvloop.run(main())


def run_cost(options: Options, workdir: Path, policy: Path, redis_url: str) -> dict:
    plan = options.cost
    assert plan is not None
    log(f"part 1: fast upstream, lease sizes {[lease_label(x) for x in plan.leases]}")
    with (
        FakeUpstreamProcess(workdir, options.token_interval_ms) as fake,
        gateway(workdir / "gateway-fake", fake.url, redis_url, policy) as server,
    ):
        target = Target(server.base_url, _pid(server), fake.url)
        accounts = {lease: Account(cost_user(lease), key_of(cost_user(lease))) for lease in plan.leases}
        rows = run_async(lambda http, redis: measure_cost(http, redis, target, accounts, plan), redis_url)
    return {
        "upstream": "fake",
        "stream_tokens": plan.stream_tokens,
        "token_interval_ms": options.token_interval_ms,
        "concurrency": plan.concurrency,
        "requests_per_lease": plan.pairs * plan.rounds,
        "rounds": plan.rounds,
        "rows": rows,
    }


def run_workload(options: Options, workdir: Path, policy: Path, redis_url: str) -> dict:
    plan = options.workload
    assert plan is not None
    log("part 2: real vLLM" + (f" at {options.vllm_url}" if options.vllm_url else " (starting it)"))
    with (
        RealVllm(workdir, options.vllm_url) as vllm,
        gateway(workdir / "gateway-vllm", vllm.url, redis_url, policy) as server,
    ):
        runs: dict[Lease, list[Run]] = {lease: [] for lease in options.leases}
        for round_ in range(plan.rounds):
            shift = round_ % len(options.leases)
            for lease in options.leases[shift:] + options.leases[:shift]:
                log(f"part 2: round {round_ + 1}, {lease_label(lease)}")
                accounts = [Account(u, key_of(u)) for u in workload_users(lease, round_, plan.users)]

                async def work(
                    http: httpx.AsyncClient, redis: Redis, accounts: list[Account] = accounts
                ) -> Any:
                    return await run_lease(
                        http, redis, server.base_url, _pid(server), vllm.url, accounts, plan
                    )

                runs[lease].append(run_async(work, redis_url))
    rows = [row(lease, plan, merge(runs[lease])) for lease in options.leases]
    demands = [sum(a.wants for slot in user for a in slot) for user in plan.asks()]
    return {
        "upstream": "vllm",
        "users": plan.users,
        "slots": plan.slots,
        "per_slot": plan.per_slot,
        "rounds": plan.rounds,
        "max_tokens": plan.max_tokens,
        "cap_fraction": plan.cap_fraction,
        "cap_tokens_per_user": plan.cap,
        "mean_demand": round(sum(demands) / len(demands)),
        "seed": plan.seed,
        "sample_s": plan.sample_s,
        "rows": rows,
    }


def _pid(server: CapgateServer) -> int:
    assert server.process.pid is not None
    return server.process.pid


def _git() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run(options: Options) -> dict:
    """Run the parts asked for and write the results; return them."""
    began = time.monotonic()
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "capgate": __version__,
        "git": _git(),
        "cores": os.cpu_count(),
        "load_before": _load(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="capgate-trilemma-"))
    results: dict[str, Any] = {"meta": meta, "cost": None, "trilemma": None, "notes": NOTES}
    try:
        policy = workdir / "policy.yaml"
        write_run_policy(policy, options)
        with RedisServer() as redis:
            if options.cost is not None:
                results["cost"] = run_cost(options, workdir, policy, redis.url)
            if options.workload is not None:
                results["trilemma"] = run_workload(options, workdir, policy, redis.url)
    except BaseException:
        log(f"failed; logs kept in {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    meta["load_after"] = _load()
    meta["seconds"] = round(time.monotonic() - began, 1)
    write(results, options)
    return results


def write(results: dict, options: Options) -> None:
    """trilemma.json, trilemma.md and (unless --no-plot) trilemma.png; the table on stdout."""
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "trilemma.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report.markdown(results)
    (options.out / "trilemma.md").write_text(text)
    if options.plot:
        report.plot(results, options.out / "trilemma.png")
    print(text)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.no_cost and args.no_vllm:
        parser().error("nothing to run: --no-cost and --no-vllm together")
    run(options_from(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
