"""From user types to an enforced tier file: `capgate optimize` computes the menu, `capgate
check-config` accepts the policy built from it, and the gateway cuts a user of each tier at
their tier's cap."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from policies.keys import hash_key
from tests.harness.capgate_server import REPO, CapgateServer
from tests.harness.clients import openai_client
from tests.harness.policies import ADMIN_KEY, key_of

pytestmark = pytest.mark.integration

TYPES = """\
currency: USD
period: day
cost_per_million: 0.5
types:
  - {name: hurried, probability: 0.5, value_per_million: 2.0, urgency: 9000}
  - {name: steady, probability: 0.3, value_per_million: 2.0, urgency: 4000}
  - {name: patient, probability: 0.2, value_per_million: 2.0, urgency: 2000}
"""


def capgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, cwd=REPO, check=False
    )


def test_optimized_menu_is_enforced(tmp_path: Path, start_gateway: Callable[..., CapgateServer]) -> None:
    types = tmp_path / "types.yaml"
    types.write_text(TYPES)
    tiers_file = tmp_path / "tiers.yaml"
    optimized = capgate("optimize", str(types), "--out", str(tiers_file))
    assert optimized.returncode == 0, optimized.stderr
    assert "optimal menu" in optimized.stdout and "best single plan" in optimized.stdout

    tiers = yaml.safe_load(tiers_file.read_text())["tiers"]
    assert len(tiers) == 3
    users = {f"user-{name}": name for name in tiers}
    policy = {
        "admin_keys": [hash_key(ADMIN_KEY)],
        "tiers": tiers,
        "users": [{"id": u, "tier": t, "keys": [hash_key(key_of(u))]} for u, t in users.items()],
    }
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
    checked = capgate("check-config", str(policy_file))
    assert checked.returncode == 0, checked.stderr

    server = start_gateway(policy=policy_file)
    for user, tier in users.items():
        cap = tiers[tier]["caps"]["windows"][0]["tokens"]
        client = openai_client(server.base_url, key_of(user))
        served: list[tuple[int, int, str | None]] = []
        for _ in range(cap):
            try:
                reply = client.completions.create(
                    model="tiny", prompt="x", max_tokens=40, extra_body={"ignore_eos": True}
                )
            except openai.RateLimitError as refused:
                error = refused.body
                break
            assert reply.usage is not None
            served.append(
                (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.choices[0].finish_reason)
            )
        else:
            pytest.fail(f"{user} was never cut off")
        assert isinstance(error, dict) and error["code"] == "cap_exceeded" and "'day'" in error["message"]
        billed = sum(p + c for p, c, _ in served)
        assert served and billed <= cap, f"{user} billed {billed} over the cap of {cap}"
        assert served[-1][1] < 40, f"{user}'s last request was not cut down to the cap"
        usage = httpx.get(
            f"{server.base_url}/v1/usage", headers={"authorization": f"Bearer {key_of(user)}"}, timeout=10
        ).json()
        assert usage["windows"][0]["left"] == cap - billed
        print(f"{tier}: cap {cap}, {len(served)} requests served, {billed} tokens billed, then 429")
