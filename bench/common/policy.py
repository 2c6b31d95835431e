"""The benchmark's policy: 200 users over 3 tiers with generous caps, and their keys.

Keys are derived from the user's number, so every run (and the load generator) has the same ones.
Caps are far above what a run uses, but every check runs: calendar and rolling windows, per-request
caps, concurrency limits, prices and, for the top tier's streams, leases.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from policies.keys import hash_key

USERS = 200
TIERS: dict[str, dict[str, Any]] = {
    "gold": {
        "priority": 0,
        "max_concurrent": 1024,
        "fail_mode": "open",
        "lease_tokens": 128,
        "caps": {"windows": [{"per": "month", "tokens": 10**12}], "count": ["completion"]},
        "prices": {"prompt": "0.15 USD/1M", "cached_prompt": "0.03 USD/1M", "completion": "0.60 USD/1M"},
    },
    "silver": {
        "priority": 10,
        "max_concurrent": 1024,
        "fail_mode": "open",
        "lease_tokens": 256,
        "caps": {
            "per_request": 8192,
            "windows": [
                {"per": "minute", "tokens": 10**10, "mode": "rolling"},
                {"per": "day", "tokens": 10**11},
                {"per": "month", "tokens": 10**12},
            ],
        },
        "prices": {"prompt": "0.20 USD/1M", "completion": "0.80 USD/1M"},
    },
    "bronze": {
        "priority": 20,
        "max_concurrent": 1024,
        "fail_mode": "closed",
        "caps": {
            "per_request": 2048,
            "windows": [
                {"per": "minute", "tokens": 10**10, "mode": "rolling"},
                {"per": "day", "tokens": 10**11},
            ],
        },
        "prices": {"prompt": "0 USD/1M", "completion": "0 USD/1M"},
    },
}


@dataclass(frozen=True)
class BenchUser:
    """A user of the benchmark policy and the key it sends."""

    id: str
    tier: str
    key: str


def users() -> list[BenchUser]:
    """The policy's users; user 0 (gold, the top tier) sends the single-user workloads."""
    names = list(TIERS)
    found = []
    for number in range(USERS):
        secret = hashlib.sha256(f"capgate-bench-{number}".encode()).hexdigest()[:32]
        found.append(BenchUser(f"bench-{number:03d}", names[number % len(names)], f"cg-bench-{secret}"))
    return found


def write_policy(path: Path) -> list[BenchUser]:
    """Write the policy file to `path`; return its users."""
    members = users()
    policy = {
        "default_tier": "bronze",
        "tiers": TIERS,
        "users": [{"id": u.id, "tier": u.tier, "keys": [hash_key(u.key)]} for u in members],
    }
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return members
