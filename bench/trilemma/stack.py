"""The policy of a trilemma run and the gateway that serves it.

Redis and capgate are the test harness's (`tests/harness`); the upstreams are `bench.common.upstreams`'
(the replaying fake, or the real vLLM). A lease size of None stands for "reserve the whole
completion allowance up front" (a tier without `lease_tokens`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.capgate_server import CapgateServer

Lease = int | None
PRICES = {"prompt": "0.20 USD/1M", "completion": "0.80 USD/1M"}
GATEWAY_SETTINGS: dict[str, Any] = {
    "admission": {"enabled": False},
    "log_level": "warning",
    "reap_interval_s": 5.0,
    # vLLM, Redis, the gateway and the load share the machine's cores: a Redis call can outlast the
    # default 0.5 s with no fault at all (docs/reliability.md, the soak), and a fail-closed tier
    # would answer 503.
    "timeouts": {"redis_s": 2.0},
}


@dataclass(frozen=True)
class Account:
    """A user of the run's policy and the API key it sends."""

    user: str
    key: str


def lease_label(lease: Lease) -> str:
    """`whole` or `lease-N`: the name of a lease size in tiers, tables and the JSON."""
    return "whole" if lease is None else f"lease-{lease}"


def cost_tier(lease: Lease) -> dict[str, Any]:
    """A tier whose caps never bind (the cost runs must not be refused), with a realistic shape:
    a rolling-minute and a monthly window, prompt and completion counted."""
    tier: dict[str, Any] = {
        "priority": 0,
        "max_concurrent": 64,
        "fail_mode": "closed",
        "caps": {
            "windows": [
                {"per": "minute", "tokens": 10**9, "mode": "rolling"},
                {"per": "month", "tokens": 10**12},
            ],
            "count": ["prompt", "completion"],
        },
        "prices": PRICES,
    }
    if lease is not None:
        tier["lease_tokens"] = lease
    return tier


def capped_tier(lease: Lease, cap: int, max_concurrent: int) -> dict[str, Any]:
    """A tier with one monthly window of `cap` completion tokens (prompts not counted, so that
    what is held and what is used are the same kind of token)."""
    tier: dict[str, Any] = {
        "priority": 0,
        "max_concurrent": max_concurrent,
        "fail_mode": "closed",
        "caps": {"windows": [{"per": "month", "tokens": cap}], "count": ["completion"]},
        "prices": PRICES,
    }
    if lease is not None:
        tier["lease_tokens"] = lease
    return tier


def gateway(workdir: Path, upstream_url: str, redis_url: str, policy: Path) -> CapgateServer:
    """A capgate (one worker) in front of `upstream_url`; admission control is off so that
    only metering decides who is served."""
    return CapgateServer(
        workdir, upstreams=[upstream_url], redis_url=redis_url, policy=policy, settings=GATEWAY_SETTINGS
    )
