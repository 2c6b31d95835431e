"""The whole benchmark in one run: the real vLLM part (short; its capture feeds the fake upstream),
then the fast-upstream part, then the JSON, the Markdown table and the plot."""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import machine, procstat, tools
from bench.common.capture import DEFAULT_CAPTURE, capture
from bench.common.policy import users
from bench.common.upstreams import FakeUpstreamProcess, RealVllm
from bench.common.workloads import MODEL, WORKLOADS
from bench.gateway import report, stats
from bench.gateway.paths import CapgatePath, DirectPath, GatewayPath, LitellmPath, NginxPath
from bench.gateway.profile import profile_capgate
from bench.gateway.runner import Batch, Plan, run_plan
from tests.harness.vllm_server import vllm_venv

FAKE, VLLM = "fake", "vllm"
PROFILE_LEVELS = {"one_token": (1, 64), "stream_256": (16,), "mix": (64,)}  # each profile's concurrency
ABOUT = {
    FAKE: (
        "The fast upstream (`bench.common.fake_upstream`) replays bytes captured from the real vLLM, "
        "so that what is measured is the gateway, not the model."
    ),
    VLLM: "The real vLLM CPU server with the tiny model: end-to-end figures on a shared machine.",
}


@dataclass
class Options:
    """Everything a run can be told."""

    out: Path
    workloads: list[str]
    levels: list[int]
    rounds: int
    duration_s: float | None
    requests: int | None
    token_interval_ms: float
    litellm: bool
    vllm: bool
    vllm_url: str | None
    vllm_workloads: list[str]
    vllm_levels: list[int]
    vllm_duration_s: float
    plot: bool = True
    profile: bool = True
    gateway_core: str = "1"
    load_core: str = "0"
    capgate_workers: int = 1
    notes: list[str] = field(default_factory=list)


def _paths(options: Options, workdir: Path, host: str, port: int, url: str) -> list[GatewayPath]:
    paths: list[GatewayPath] = [
        DirectPath(host, port, users()),
        NginxPath(workdir / "nginx", url, options.gateway_core, users()),
        CapgatePath(workdir / "capgate", url, options.gateway_core, options.capgate_workers),
    ]
    if options.litellm:
        paths.append(LitellmPath(workdir / "litellm", url, options.gateway_core, MODEL, tools.litellm_venv()))
    return paths


def _measure(
    plan: Plan, options: Options, workdir: Path, host: str, port: int, url: str
) -> tuple[list[Batch], dict[str, float]]:
    """Per workload: start fresh gateways (so no workload inherits another's connection pools or
    Redis state), run its cells, read their peak memory, stop them. Peak memory is the largest
    over the workloads."""
    batches: list[Batch] = []
    memory: dict[str, float] = {}
    for workload in plan.workloads:
        paths = _paths(options, workdir / workload.name, host, port, url)
        started: list[GatewayPath] = []
        try:
            for path in paths:
                path.start()
                started.append(path)
            batches += run_plan(replace(plan, workloads=[workload]), paths)
            peaks = {path.name: procstat.peak_rss_mib(path.pid) for path in paths if path.pid is not None}
            for path in paths:
                if isinstance(path, CapgatePath) and path.redis_pid is not None:
                    peaks["capgate_redis"] = procstat.peak_rss_mib(path.redis_pid)
            for name, peak in peaks.items():
                memory[name] = max(peak, memory.get(name, 0.0))
        finally:
            for path in reversed(started):
                path.stop()
    return batches, memory


def run(options: Options) -> dict[str, Any]:
    """Run everything; write results.json, results.md and latency.png into `options.out`."""
    began = time.monotonic()
    workdir = options.out / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    description = machine.describe()
    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": description,
        "pinning": (
            f"gateway (capgate and its redis-server, nginx, or LiteLLM) on core {options.gateway_core}; "
            f"load generator and fake upstream on core {options.load_core}; vLLM as it binds itself "
            "(its OpenMP compute thread on core 0, its API server unpinned)"
        ),
        "workloads": options.workloads,
        "workload_about": {name: WORKLOADS[name].about for name in options.workloads},
        "token_interval_ms": options.token_interval_ms,
        "levels": {},
        "upstreams": {},
        "notes": list(options.notes),
        "peak_memory_mib": {},
    }
    description["nginx"] = tools.nginx_version(tools.ensure_nginx())
    if options.litellm:
        description["litellm"] = tools.ensure_litellm(tools.litellm_venv())
    workloads = [WORKLOADS[name] for name in options.workloads]
    batches: list[Batch] = []
    replay = DEFAULT_CAPTURE
    if options.vllm:
        if options.vllm_url is None and not (vllm_venv() / "bin" / "python").exists():
            results["notes"].append(f"real vLLM part skipped: no vLLM environment at {vllm_venv()}")
        else:
            with RealVllm(workdir / "vllm", options.vllm_url) as vllm:
                replay = workdir / "capture.json"
                replay.write_text(json.dumps(capture(vllm.url), ensure_ascii=False))
                if options.vllm_url is None:
                    description["vllm"] = tools.vllm_version(vllm_venv() / "bin" / "python")
                plan = Plan(
                    VLLM,
                    [WORKLOADS[name] for name in options.vllm_workloads],
                    options.vllm_levels,
                    1,
                    options.vllm_duration_s,
                    options.requests,
                    options.load_core,
                )
                host, port = vllm.host_port
                found, memory = _measure(plan, options, workdir / VLLM, host, port, vllm.url)
                batches += found
                results["levels"][VLLM] = options.vllm_levels
                results["upstreams"][VLLM] = ABOUT[VLLM]
                results["peak_memory_mib"][VLLM] = memory
    source = json.loads(replay.read_text())["source"]
    description.setdefault("vllm", source["server"])
    results["capture"] = source
    with FakeUpstreamProcess(workdir, options.token_interval_ms, replay, options.load_core) as fake:
        plan = Plan(
            FAKE,
            workloads,
            options.levels,
            options.rounds,
            options.duration_s,
            options.requests,
            options.load_core,
        )
        found, memory = _measure(plan, options, workdir / FAKE, "127.0.0.1", fake.port, fake.url)
        batches += found
        if options.profile:
            results["profiles"] = [
                profile_capgate(
                    workdir / "profile" / f"{workload.name}-c{level}",
                    fake.url,
                    plan,
                    options.gateway_core,
                    workload,
                    level,
                    8.0,
                )
                for workload in workloads
                for level in PROFILE_LEVELS.get(workload.name, ())
            ]
    results["levels"][FAKE] = options.levels
    results["upstreams"] = {FAKE: ABOUT[FAKE], **results["upstreams"]}
    results["peak_memory_mib"][FAKE] = memory
    table = stats.cells(batches)
    saturated = stats.saturation(table)
    ratio_table = stats.ratios(table, saturated)
    results.update(
        {
            "cells": table,
            "saturation": saturated,
            "ratios": ratio_table,
            "targets": stats.targets(table, ratio_table, FAKE),
            "wall_s": time.monotonic() - began,
        }
    )
    description["load_average_at_end"] = list(os.getloadavg())
    options.out.mkdir(parents=True, exist_ok=True)
    results_path = options.out / "results.json"
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    (options.out / "results.md").write_text(report.markdown(results))
    if options.plot:
        plot = [
            str(tools.plot_python()),
            "-m",
            "bench.gateway.plot",
            str(results_path),
            str(options.out / "latency.png"),
        ]
        subprocess.run(plot, check=True, cwd=tools.REPO)
    print(f"bench: wrote results.json, results.md and the plot into {options.out}", file=sys.stderr)
    return results
