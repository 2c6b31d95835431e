"""The benchmark harness end to end in a tiny configuration: the fast upstream only, concurrency 1
and 4, a few requests per batch, all four paths (direct, nginx, capgate, the LiteLLM proxy), so
none of them rots. Checks that the JSON has every figure with sane values, not how fast it is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import VllmServer

REPO = Path(__file__).resolve().parents[2]
REQUESTS = 6
LEVELS = (1, 4)
WORKLOADS = ("one_token", "stream_256", "mix")
STREAM_TOKENS = 256
PATHS = ("direct", "nginx", "capgate", "litellm")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable, "-m", "bench.gateway", "--quick", "--no-vllm", "--no-plot",
        "--levels", ",".join(map(str, LEVELS)), "--requests", str(REQUESTS), "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (out / "results.md").read_text().startswith("# capgate benchmark")
    return json.loads((out / "results.json").read_text())


def test_every_cell_is_there(results: dict) -> None:
    found = {(e["workload"], e["concurrency"], e["path"]) for e in results["cells"]}
    expected = {(w, c, p) for w in WORKLOADS for c in LEVELS for p in PATHS}
    assert found == expected
    assert {e["upstream"] for e in results["cells"]} == {"fake"}


def test_every_request_sent_came_back_without_error(results: dict) -> None:
    for cell in results["cells"]:
        assert cell["sent"] == REQUESTS, cell
        assert cell["completed"] == REQUESTS, cell
        assert cell["errors"] == 0, cell["error_samples"]


def test_latencies_and_throughput_are_sane(results: dict) -> None:
    for cell in results["cells"]:
        assert 0 < cell["latency_median_us"] <= cell["latency_p99_us"], cell
        assert cell["requests_per_s"] > 0, cell
        if cell["path"] == "direct":
            assert cell["gateway_cpu_s"] is None
        else:
            assert cell["gateway_cpu_s"] is not None and cell["gateway_cpu_s"] >= 0
            assert cell["added_latency_median_us"] is not None


def test_streams_count_every_token(results: dict) -> None:
    for cell in results["cells"]:
        if cell["workload"] != "stream_256":
            assert "tokens" not in cell
            continue
        assert cell["tokens"] == REQUESTS * STREAM_TOKENS, cell
        assert 0 < cell["ttft_median_us"] <= cell["latency_median_us"]
        assert cell["itl_median_us"] > 0
        if cell["path"] != "direct":
            assert cell["added_itl_median_us"] is not None


def test_summary_describes_the_machine_and_judges_the_targets(results: dict) -> None:
    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0 and machine["capgate"]
    assert machine["nginx"] and machine["litellm"]
    assert {r["path"] for r in results["saturation"]} == set(PATHS)
    assert len(results["targets"]) == 5
    assert all(t["value"] is not None for t in results["targets"]), results["targets"]
    for path in PATHS[1:]:
        assert results["peak_memory_mib"]["fake"][path] > 0, path
    for ratio in results["ratios"]:
        assert ratio["capgate_over_nginx_added_latency_median"] is not None
        assert ratio["capgate_over_litellm_requests_per_s_saturated"] is not None


ADDED_ROUNDS = 20
PROBE_ROUNDS = 10


def test_added_latency_script_against_the_real_vllm(tmp_path: Path, vllm_server: VllmServer) -> None:
    """`python -m bench.added` alternates direct and capgate requests to the session's vLLM and
    runs its idle-gap probe; every figure it prints is in added.json and adds up."""
    vllm_server.wait_quiet()
    command = [
        sys.executable, "-m", "bench.added", "--vllm-url", vllm_server.base_url, "--out", str(tmp_path),
        "--rounds", str(ADDED_ROUNDS), "--warmup", "2", "--probe-rounds", str(PROBE_ROUNDS),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"## Against the real vLLM ({ADDED_ROUNDS} interleaved rounds)" in run.stdout
    results = json.loads((tmp_path / "added.json").read_text())
    probe = results["probe"]
    assert probe["gap_ms"] == results["vllm"]["direct"]["median_ms"]
    for figures, rounds in (
        (results["vllm"], ADDED_ROUNDS),
        (probe["back_to_back"], PROBE_ROUNDS),
        (probe["idle_gap"], PROBE_ROUNDS),
    ):
        assert set(figures) == {"direct", "capgate"}
        for path in figures.values():
            assert path["requests"] == rounds
            assert 0 < path["median_ms"] <= path["p99_ms"]
        direct, capgate = figures["direct"], figures["capgate"]
        assert capgate["added_median_ms"] == pytest.approx(capgate["median_ms"] - direct["median_ms"])
        assert capgate["added_p99_ms"] == pytest.approx(capgate["p99_ms"] - direct["p99_ms"])
        assert f"| capgate | {rounds} | {capgate['median_ms']:.2f} |" in run.stdout
