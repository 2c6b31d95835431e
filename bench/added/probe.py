"""`python -m bench.added`: the latency capgate adds to a one-token chat completion against the same
vLLM, direct and proxied, interleaved request by request in one run.

Every round sends one request down each path (direct, capgate, and LiteLLM with `--litellm`) in a
fresh random order, from one client on keep-alive connections, so that whatever the machine is
doing hits every path alike. Prints the median and p99 of each path and what each gateway adds:
its median and p99 less the direct ones, and the median of the per-round differences. Writes
`added.json` (default into bench/results/).

The idle-gap probe runs the same alternation against the fast upstream (`bench.common.fake_upstream`),
back to back and then with the client idle between requests for as long as the real vLLM took at
the median. It tells how much of the figure against vLLM is the gateway's own work and how much is
that work running on a core that has just been idle: on a shared virtual machine a core that idles
for a few milliseconds runs the next request's code several times slower, and at concurrency 1 a
real vLLM's forward pass is exactly such an idle gap for the gateway's core.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import machine, procstat, tools
from bench.common.capture import DEFAULT_CAPTURE
from bench.common.client import Connection, build_request
from bench.common.locations import RESULTS
from bench.common.policy import users
from bench.common.quantiles import quantile
from bench.common.upstreams import FakeUpstreamProcess, RealVllm
from bench.common.workloads import CHAT_PATH, MODEL, ONE_TOKEN
from bench.gateway.paths import CapgatePath, DirectPath, GatewayPath, LitellmPath
from tests.harness.redis_server import RedisServer


@dataclass
class Lane:
    """One path as the client sees it: a keep-alive connection and the exact request bytes."""

    name: str
    connection: Connection
    raw: bytes


def _lanes(paths: list[GatewayPath]) -> list[Lane]:
    body = json.dumps(ONE_TOKEN.body).encode()
    lanes = []
    for path in paths:
        host, port = path.host_port
        headers = {"authorization": f"Bearer {path.keys(spread=False)[0]}"}
        raw = build_request(host, port, CHAT_PATH, body, headers)
        lanes.append(Lane(path.name, Connection(host, port), raw))
    return lanes


async def _alternate(lanes: list[Lane], rounds: int, warmup: int, gap_s: float) -> dict[str, list[float]]:
    """Latencies in milliseconds per lane, one request per lane per round in random order, with
    the client idle for `gap_s` after every request."""
    seen: dict[str, list[float]] = {lane.name: [] for lane in lanes}
    for number in range(warmup + rounds):
        order = random.sample(lanes, len(lanes))
        for lane in order:
            began = time.perf_counter()
            reply = await lane.connection.request(lane.raw)
            took = (time.perf_counter() - began) * 1000
            if reply.status != 200:
                raise RuntimeError(f"{lane.name} answered {reply.status}")
            if number >= warmup:
                seen[lane.name].append(took)
            if gap_s:
                time.sleep(gap_s)
    for lane in lanes:
        await lane.connection.close()
    return seen


def summarize(seen: dict[str, list[float]]) -> dict[str, Any]:
    """Median and p99 per path; for each gateway, what it adds over the direct path."""
    direct = seen["direct"]
    figures: dict[str, Any] = {}
    for name, values in seen.items():
        entry: dict[str, Any] = {
            "requests": len(values),
            "median_ms": quantile(values, 0.5),
            "p99_ms": quantile(values, 0.99),
        }
        if name != "direct":
            paired = [v - d for v, d in zip(values, direct, strict=True)]
            entry["added_median_ms"] = entry["median_ms"] - figures["direct"]["median_ms"]
            entry["added_p99_ms"] = entry["p99_ms"] - figures["direct"]["p99_ms"]
            entry["paired_difference_median_ms"] = quantile(paired, 0.5)
        figures[name] = entry
    return figures


def _measure(paths: list[GatewayPath], rounds: int, warmup: int, gap_s: float) -> dict[str, Any]:
    with contextlib.ExitStack() as running:
        for path in paths:
            running.enter_context(path)
        return summarize(asyncio.run(_alternate(_lanes(paths), rounds, warmup, gap_s)))


def _cores(text: str) -> set[int]:
    """The cores of a comma-separated list such as `--gateway-core`."""
    return {int(core) for core in text.split(",")}


def redis_round_trip_ms(workdir: Path, core: str, rounds: int, gap_s: float) -> float:
    """The median of a bare `PING` round trip (a raw socket, no client library) to a redis-server,
    caller and server both on `core`, the caller idle for `gap_s` before each: the least one Redis
    call costs on the critical path."""
    server = RedisServer(data_dir=workdir / "redis-ping")
    kept = os.sched_getaffinity(0)
    try:
        server.start()
        with server.client() as client:
            procstat.pin(int(client.info("server")["process_id"]), core)
        os.sched_setaffinity(0, _cores(core))
        seen = []
        with socket.create_connection((server.host, server.port)) as sock:
            for number in range(rounds + 10):
                time.sleep(gap_s)
                began = time.perf_counter()
                sock.sendall(b"PING\r\n")
                reply = b""
                while not reply.endswith(b"\r\n"):
                    reply += sock.recv(64)
                if number >= 10:
                    seen.append((time.perf_counter() - began) * 1000)
        return statistics.median(seen)
    finally:
        os.sched_setaffinity(0, kept)
        server.close()


def table(figures: dict[str, Any]) -> str:
    """The figures as a Markdown table."""
    rows = [
        "| path | requests | median ms | p99 ms | added median ms | added p99 ms | paired diff. median ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in figures.items():
        added = [f.get(k) for k in ("added_median_ms", "added_p99_ms", "paired_difference_median_ms")]
        cells = ["–" if v is None else f"{v:+.2f}" for v in added]
        own = f"{f['median_ms']:.2f} | {f['p99_ms']:.2f}"
        rows.append(f"| {name} | {f['requests']} | {own} | {' | '.join(cells)} |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.added", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory (default: bench/results)")
    p.add_argument("--vllm-url", help="use the vLLM server at this URL instead of starting one")
    p.add_argument("--rounds", type=int, default=1000, help="measured rounds (default %(default)s)")
    p.add_argument("--warmup", type=int, default=50, help="rounds before measuring (default %(default)s)")
    p.add_argument("--litellm", action="store_true", help="add the LiteLLM proxy as a third path")
    p.add_argument("--no-probe", action="store_true", help="skip the idle-gap probe on the fast upstream")
    p.add_argument("--probe-rounds", type=int, default=500, help="rounds per probe run (default %(default)s)")
    p.add_argument("--gateway-core", default="1", help="core for the gateways (taskset list)")
    p.add_argument("--load-core", default="0", help="core for this client and the fast upstream")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.sched_setaffinity(0, _cores(args.load_core))
    workdir = args.out / "work-added"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine.describe(),
        "workload": ONE_TOKEN.about,
        "rounds": args.rounds,
        "pinning": f"gateways and capgate's redis-server on core {args.gateway_core}; "
        f"client and fast upstream on core {args.load_core}; vLLM as it binds itself",
    }
    with RealVllm(workdir / "vllm", args.vllm_url) as vllm:
        host, port = vllm.host_port
        paths: list[GatewayPath] = [
            DirectPath(host, port, users()),
            CapgatePath(workdir / "capgate", vllm.url, args.gateway_core),
        ]
        if args.litellm:
            venv = tools.litellm_venv()
            results["machine"]["litellm"] = tools.ensure_litellm(venv)
            paths.append(LitellmPath(workdir / "litellm", vllm.url, args.gateway_core, MODEL, venv))
        results["vllm"] = _measure(paths, args.rounds, args.warmup, 0.0)
    print(f"## Against the real vLLM ({args.rounds} interleaved rounds)\n\n{table(results['vllm'])}\n")
    if not args.no_probe:
        gap_ms = results["vllm"]["direct"]["median_ms"]
        gaps = {"back_to_back": 0.0, "idle_gap": gap_ms / 1000}
        results["probe"] = {"gap_ms": gap_ms}
        with FakeUpstreamProcess(workdir, 1.0, DEFAULT_CAPTURE, args.load_core) as fake:
            for label, gap in gaps.items():
                paths = [
                    DirectPath("127.0.0.1", fake.port, users()),
                    CapgatePath(workdir / f"probe-{label}", fake.url, args.gateway_core),
                ]
                results["probe"][label] = _measure(paths, args.probe_rounds, args.warmup, gap)
                title = "back to back" if not gap else f"idle {gap_ms:.1f} ms after every request"
                print(f"## Idle-gap probe, fast upstream, {title}\n\n{table(results['probe'][label])}\n")
        ping = {
            label: redis_round_trip_ms(workdir, args.gateway_core, args.probe_rounds, gap)
            for label, gap in gaps.items()
        }
        results["probe"]["redis_ping_ms"] = ping
        print(
            f"A bare Redis PING round trip on core {args.gateway_core}: median "
            f"{ping['back_to_back']:.3f} ms back to back, "
            f"{ping['idle_gap']:.3f} ms after {gap_ms:.1f} ms idle\n"
        )
    results["load_average_at_end"] = list(os.getloadavg())
    (args.out / "added.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"bench.added: wrote {args.out / 'added.json'}", file=sys.stderr)
    return 0
