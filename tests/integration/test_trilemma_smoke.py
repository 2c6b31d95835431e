"""The trilemma benchmark end to end in a tiny configuration: two lease sizes (the whole request, and
leases of 4 tokens), the fast upstream for the cost part and the session's vLLM for the capped
workload. Checks that the JSON has every figure with sane values, not how fast anything is."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import VllmServer

REPO = Path(__file__).resolve().parents[2]
LEASES = [None, 4]
COST_PAIRS = 3
STREAM_TOKENS = 256
USERS, SLOTS, REQUESTS = 2, 2, 3
PLOT = importlib.util.find_spec("matplotlib") is not None

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory, vllm_server: VllmServer) -> Path:
    out = tmp_path_factory.mktemp("trilemma")
    command = [
        sys.executable, "-m", "bench.trilemma", "--quick", "--leases", "whole,4",
        "--cost-pairs", str(COST_PAIRS), "--cost-rounds", "1",
        "--users", str(USERS), "--slots", str(SLOTS), "--requests", str(REQUESTS), "--rounds", "1",
        "--vllm-url", vllm_server.base_url, "--out", str(out),
    ]  # fmt: skip
    if not PLOT:
        command.append("--no-plot")
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def results(out: Path) -> dict:
    return json.loads((out / "trilemma.json").read_text())


def by_lease(part: dict) -> dict:
    return {row["lease"]: row for row in part["rows"]}


def test_writes_the_table_and_the_plot(out: Path) -> None:
    text = (out / "trilemma.md").read_text()
    assert text.startswith("# capgate trilemma")
    assert "| whole |" in text and "| lease-4 |" in text
    if PLOT:
        assert (out / "trilemma.png").read_bytes().startswith(b"\x89PNG")


def test_every_lease_size_has_its_rows_and_no_request_failed(results: dict) -> None:
    cost, tri = by_lease(results["cost"]), by_lease(results["trilemma"])
    assert list(cost) == list(tri) == LEASES
    for row in cost.values():
        assert row["requests"] == COST_PAIRS and row["errors"] == 0, row
    for row in tri.values():
        assert row["attempted"] == USERS * SLOTS * REQUESTS, row
        assert row["errors"] == 0, row["error_samples"]
        assert row["served"] + row["refused"] == row["attempted"]


def test_round_trips_counted_by_redis_grow_as_the_lease_shrinks(results: dict) -> None:
    cost, tri = by_lease(results["cost"]), by_lease(results["trilemma"])
    assert cost[None]["round_trips_per_request"] == 2
    assert cost[4]["round_trips_per_request"] == cost[4]["round_trips_expected"] == 1 + STREAM_TOKENS // 4
    assert tri[4]["round_trips_per_request"] > tri[None]["round_trips_per_request"] >= 1
    for row in [*cost.values(), *tri.values()]:
        assert row["round_trips_from_metrics"] == pytest.approx(row["round_trips_per_request"]), row


def test_latency_and_cpu_figures_are_sane(results: dict) -> None:
    for row in results["cost"]["rows"]:
        for name in ("ttft_direct", "ttft_capgate", "duration_direct", "duration_capgate"):
            assert 0 < row[f"{name}_median_ms"] <= row[f"{name}_p99_ms"], (name, row)
        assert row["duration_direct_median_ms"] >= STREAM_TOKENS * results["cost"]["token_interval_ms"] / 2
        for name in ("added_ttft_median_ms", "added_duration_p99_ms", "added_itl_median_us"):
            assert isinstance(row[name], float), (name, row)
        assert 0 < row["gateway_added_median_ms"] <= row["gateway_added_p99_ms"]
        assert row["gateway_cpu_ms_per_request"] > 0 and row["redis_cpu_ms_per_request"] >= 0
    for row in results["trilemma"]["rows"]:
        assert 0 < row["ttft_median_ms"] <= row["ttft_p99_ms"], row
        assert 0 < row["itl_median_ms"] <= row["itl_p99_ms"], row


def test_leases_hold_fewer_unused_tokens_than_whole_requests(results: dict) -> None:
    tri = by_lease(results["trilemma"])
    for row in tri.values():
        assert row["occupancy_samples"] > 0
        assert 0 <= row["unused_token_s"] <= row["held_token_s"]
        assert 0 <= row["unused_mean_share_of_cap"] < 1
        assert 0 <= row["denied_would_fit_requests"] <= row["refused"] + row["cut_short"]
        assert row["cap_use"] > 0
    assert tri[4]["unused_token_s"] < tri[None]["unused_token_s"]


def test_billing_is_exact_against_vllm_and_whole_requests_never_pass_the_cap(results: dict) -> None:
    tri = by_lease(results["trilemma"])
    for row in tri.values():
        assert (
            0 < row["client_seen_tokens"] <= row["billed_completion_tokens"] <= row["vllm_generated_tokens"]
        )
        assert row["over_cap_tokens_total"] >= row["over_cap_tokens_max"] >= 0
        for request in row["requests"]:
            if request["status"] == 200:
                assert request["seen"] <= request["billed"], request
    assert tri[None]["over_cap_tokens_total"] == 0
    assert tri[None]["cut_at_budget"] == 0
