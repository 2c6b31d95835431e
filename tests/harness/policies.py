"""Policy files for tests: tiers as given, one user per (user, tier), key `k-<user>`."""

from __future__ import annotations

from pathlib import Path

import yaml

from policies.keys import hash_key

ADMIN_KEY = "k-admin"


def key_of(user: str) -> str:
    """The API key of a test user."""
    return f"k-{user}"


def write_policy(path: Path, tiers: dict[str, dict], users: dict[str, str]) -> Path:
    """Write a policy with `tiers` and `users` ({user id: tier}) to `path`."""
    policy = {
        "admin_keys": [hash_key(ADMIN_KEY)],
        "tiers": tiers,
        "users": [
            {"id": user, "tier": tier, "keys": [hash_key(key_of(user))]} for user, tier in users.items()
        ],
    }
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path
