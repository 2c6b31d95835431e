"""A short run of the soak (`python -m bench.soak`, docs/reliability.md) as part of the suite:
every fault kind injected at least once under mixed load over two replicas, then the audit's
targets of 0 hold and the stated bounds are respected."""

from __future__ import annotations

import pytest

from bench.soak.run import FAULTS, soak
from tests.harness import VllmServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_soak_with_every_fault_kind_meets_its_targets(vllm_server: VllmServer) -> None:
    report = soak(40.0, vllm_server, seed=5)
    print(f"\nsoak: {report}")
    assert set(report.faults) == set(FAULTS), report.faults
    assert report.requests > 100 and report.by_kind.get("hostile", 0) > 0
    assert report.failures() == [], report
    assert report.ledger_rows >= report.statuses.get("200", 0)
    assert report.generated_not_billed >= 0, "billed more than vLLM generated"
