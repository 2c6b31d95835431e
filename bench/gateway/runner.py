"""Running batches: one load-generator process per (workload, concurrency, path, round), the
paths of a cell interleaved in a rotating order so that machine noise hits all of them alike."""

import json
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import procstat
from bench.common.locations import REPO
from bench.common.workloads import CHAT_PATH, ONE_TOKEN, Workload
from bench.gateway.load import LoadSpec
from bench.gateway.paths import CapgatePath, GatewayPath

_GRACE_S = 180.0


@dataclass(frozen=True)
class Plan:
    """How hard and how long to load one upstream."""

    upstream: str
    workloads: list[Workload]
    levels: list[int]
    rounds: int
    duration_s: float | None
    requests: int | None
    load_core: str


@dataclass
class Batch:
    """One load run against one path, and what the gateway spent on it."""

    upstream: str
    workload: str
    concurrency: int
    path: str
    round: int
    result: dict[str, Any]
    cpu_s: float | None
    redis_cpu_s: float | None


def _cpu(pid: int | None) -> float | None:
    return procstat.cpu_seconds(pid) if pid is not None else None


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def run_load(
    spec: LoadSpec, core: str, gateway: GatewayPath
) -> tuple[dict[str, Any], float | None, float | None]:
    """Run the load generator pinned to `core`; read the gateway's (and its Redis') CPU counters
    at the start and end of the timed phase."""
    argv = [
        "taskset",
        "--cpu-list",
        core,
        sys.executable,
        "-m",
        "bench.gateway.load",
        json.dumps(asdict(spec)),
    ]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert process.stdin is not None and process.stdout is not None
    limit = (spec.duration_s or 0.0) + _GRACE_S
    watchdog = threading.Timer(limit, process.kill)
    watchdog.start()
    redis_pid = gateway.redis_pid if isinstance(gateway, CapgatePath) else None
    try:
        ready = process.stdout.readline().strip()
        if ready != "READY":
            raise RuntimeError(f"load generator did not get ready (said {ready!r})")
        cpu_before, redis_before = _cpu(gateway.pid), _cpu(redis_pid)
        process.stdin.write("go\n")
        process.stdin.flush()
        line = process.stdout.readline()
        cpu_after, redis_after = _cpu(gateway.pid), _cpu(redis_pid)
        if not line:
            raise RuntimeError("load generator ended without a result")
        result = json.loads(line)
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    return result, _delta(cpu_before, cpu_after), _delta(redis_before, redis_after)


def load_spec(plan: Plan, workload: Workload, concurrency: int, gateway: GatewayPath) -> LoadSpec:
    """What the load generator sends to `gateway` for one batch."""
    host, port = gateway.host_port
    return LoadSpec(
        host=host,
        port=port,
        path=CHAT_PATH,
        body=json.dumps(workload.body, separators=(",", ":")),
        keys=gateway.keys(workload.spread),
        stream=workload.stream,
        concurrency=concurrency,
        duration_s=plan.duration_s,
        requests=plan.requests,
        warmup=max(1, -(-20 // concurrency)),
        warmup_body=json.dumps(ONE_TOKEN.body, separators=(",", ":")) if workload.stream else None,
    )


def run_plan(plan: Plan, paths: list[GatewayPath]) -> list[Batch]:
    """Every batch of `plan`, each cell's paths in a rotating order."""
    batches: list[Batch] = []
    cell = 0
    for workload in plan.workloads:
        for concurrency in plan.levels:
            for round_ in range(plan.rounds):
                shift = (cell + round_) % len(paths)
                for gateway in paths[shift:] + paths[:shift]:
                    spec = load_spec(plan, workload, concurrency, gateway)
                    result, cpu_s, redis_cpu_s = run_load(spec, plan.load_core, gateway)
                    batch = Batch(
                        plan.upstream,
                        workload.name,
                        concurrency,
                        gateway.name,
                        round_,
                        result,
                        cpu_s,
                        redis_cpu_s,
                    )
                    batches.append(batch)
                    _progress(batch)
            cell += 1
    return batches


def _progress(batch: Batch) -> None:
    result = batch.result
    latencies = sorted(result["latency_us"])
    median = latencies[len(latencies) // 2] / 1000 if latencies else float("nan")
    rate = result["completed"] / result["wall_s"] if result["wall_s"] else 0.0
    print(
        f"bench: [{batch.upstream}] {batch.workload:<10} c={batch.concurrency:<3} {batch.path:<8} "
        f"{result['completed']:>6} ok {result['errors']:>3} err {rate:>8.0f} req/s  median {median:.2f} ms",
        file=sys.stderr,
        flush=True,
    )
