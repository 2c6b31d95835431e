"""Where capgate's time goes: py-spy samples a fresh capgate process under one workload on the fast
upstream; the samples are summed by component (the innermost frame of a known package) and by
frame, and drawn as a flame graph (`flame.svg` beside the raw samples)."""

import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import tools
from bench.common.workloads import Workload
from bench.gateway.flamegraph import flame_svg
from bench.gateway.paths import CapgatePath
from bench.gateway.runner import Plan, load_spec, run_load

COMPONENTS = (
    ("upstream HTTP client (httpx, httpcore, anyio, h11)", ("httpx", "httpcore", "anyio/", "h11/")),
    ("Redis client (redis-py)", ("redis/",)),
    ("ASGI server and framework (uvicorn, starlette, fastapi)", ("uvicorn/", "starlette/", "fastapi/")),
    ("Prometheus metrics", ("prometheus_client/",)),
    ("capgate code (proxy, metering, policies)", ("proxy/", "metering/", "policies/")),
)
EVENT_LOOP = "event loop and socket I/O (asyncio, uvloop)"
_LOOP_FRAME = "Runner.run (asyncio/runners.py"


def _component(frames: list[str]) -> str:
    for frame in reversed(frames):
        path = frame.rpartition("(")[2]
        for name, markers in COMPONENTS:
            if path.startswith(markers):
                return name
    return EVENT_LOOP


def summarize(raw: str, top: int = 15) -> dict[str, Any]:
    """Shares of samples by component, the frames with the most samples of their own, and the
    capgate frames with the most samples under them; `raw` is py-spy's raw (collapsed) output."""
    components: Counter[str] = Counter()
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        frames = stack.split(";")
        loop = max((i for i, f in enumerate(frames) if f.startswith(_LOOP_FRAME)), default=-1)
        frames = frames[loop + 1 :] or frames[-1:]
        total += samples
        components[_component(frames)] += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            if any(marker in frame for marker in ("(proxy/", "(metering/", "(policies/")):
                under[frame] += samples

    def shares(counter: Counter[str], limit: int | None) -> list[dict[str, Any]]:
        return [{"frame": k, "share": v / total} for k, v in counter.most_common(limit)] if total else []

    return {
        "samples": total,
        "components": [{"component": e["frame"], "share": e["share"]} for e in shares(components, None)],
        "top_own_frames": shares(own, top),
        "top_capgate_frames": shares(under, top),
    }


def profile_capgate(
    workdir: Path,
    upstream_url: str,
    plan: Plan,
    core: str,
    workload: Workload,
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    """Profile a fresh capgate on `core` for `seconds` under `workload` at `concurrency`."""
    py_spy = tools.ensure_py_spy()
    out = workdir / "py-spy.txt"
    with CapgatePath(workdir, upstream_url, core) as capgate:
        assert capgate.pid is not None
        timed = replace(plan, duration_s=seconds + 1.0, requests=None)
        spec = load_spec(timed, workload, concurrency, capgate)
        record = [str(py_spy), "record", "--pid", str(capgate.pid), "--duration", str(int(seconds))]
        record += ["--rate", "200", "--format", "raw", "--output", str(out)]
        sampler = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run_load(spec, plan.load_core, capgate)
        finally:
            sampler.wait(timeout=seconds + 60)
    raw = out.read_text() if out.exists() else ""
    title = f"capgate, {workload.name} at concurrency {concurrency}"
    flame = workdir / "flame.svg"
    flame.write_text(flame_svg(raw, title))
    summary = summarize(raw)
    return {
        "workload": workload.name,
        "concurrency": concurrency,
        "seconds": seconds,
        "flame_graph": str(flame),
        **summary,
    }
