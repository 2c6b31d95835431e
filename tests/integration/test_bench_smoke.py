"""The benchmark harness end to end in a tiny configuration: the fast upstream only, concurrency 1
and 4, a few requests per batch, capgate and the direct path (the LiteLLM proxy is skipped: its
install takes long). Checks that the JSON has every figure with sane values, not how fast it is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REQUESTS = 6
LEVELS = (1, 4)
WORKLOADS = ("one_token", "stream_256", "mix")
STREAM_TOKENS = 256

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable, "-m", "bench", "--quick", "--no-litellm", "--no-vllm", "--no-plot",
        "--levels", ",".join(map(str, LEVELS)), "--requests", str(REQUESTS), "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (out / "results.md").read_text().startswith("# capgate benchmark")
    return json.loads((out / "results.json").read_text())


def test_every_cell_is_there(results: dict) -> None:
    found = {(e["workload"], e["concurrency"], e["path"]) for e in results["cells"]}
    expected = {(w, c, p) for w in WORKLOADS for c in LEVELS for p in ("direct", "capgate")}
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
        if cell["path"] == "capgate":
            assert cell["gateway_cpu_s"] is not None and cell["gateway_cpu_s"] >= 0
            assert cell["added_latency_median_us"] is not None
        else:
            assert cell["gateway_cpu_s"] is None


def test_streams_count_every_token(results: dict) -> None:
    for cell in results["cells"]:
        if cell["workload"] != "stream_256":
            assert "tokens" not in cell
            continue
        assert cell["tokens"] == REQUESTS * STREAM_TOKENS, cell
        assert 0 < cell["ttft_median_us"] <= cell["latency_median_us"]
        assert cell["itl_median_us"] > 0
        if cell["path"] == "capgate":
            assert cell["added_itl_median_us"] is not None


def test_summary_describes_the_machine_and_judges_the_targets(results: dict) -> None:
    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0 and machine["capgate"]
    assert {r["path"] for r in results["saturation"]} == {"direct", "capgate"}
    assert len(results["targets"]) == 4
    assert results["peak_memory_mib"]["fake"]["capgate"] > 0
