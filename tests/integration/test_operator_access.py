"""Operator access: a user's budget and usage by CLI and admin endpoint, users reading only their
own, and the ledger exported for billing."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.harness import RedisServer, VllmServer
from tests.harness.capgate_server import REPO, CapgateServer
from tests.harness.clients import openai_client
from tests.harness.policies import ADMIN_KEY, key_of, write_policy

pytestmark = pytest.mark.integration

TIERS = {
    "paid": {"caps": {"windows": [{"per": "day", "tokens": 5000}]}, "prices": {"completion": "2 USD/1M"}}
}
USERS = {"ops-alice": "paid", "ops-bob": "paid"}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, vllm_server: VllmServer, redis_server: RedisServer
) -> Iterator[CapgateServer]:
    workdir = tmp_path_factory.mktemp("operator")
    policy = write_policy(workdir / "policy.yaml", TIERS, USERS)
    with CapgateServer(
        workdir, upstreams=[vllm_server.base_url], redis_url=redis_server.url, policy=policy
    ) as server:
        for user, tokens in (("ops-alice", 7), ("ops-bob", 3)):
            client = openai_client(server.base_url, key_of(user))
            client.completions.create(model="tiny", prompt="x", max_tokens=tokens)
        yield server


def get(server: CapgateServer, path: str, key: str) -> httpx.Response:
    return httpx.get(server.base_url + path, headers={"authorization": f"Bearer {key}"}, timeout=10)


def cli(server: CapgateServer, redis: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CAPGATE_CONFIG": str(server.config_path)}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=False,
    )


def test_users_read_their_own_usage_and_no_one_elses(server: CapgateServer) -> None:
    own = get(server, "/v1/usage", key_of("ops-alice")).json()
    assert own["user"] == "ops-alice" and own["totals"]["completion_tokens"] == 7
    assert own["windows"][0]["window"] == "day" and own["windows"][0]["cap"] == 5000
    assert own["value"] == "0.000014" and own["currency"] == "USD"
    assert get(server, "/admin/users/ops-bob/usage", key_of("ops-alice")).status_code == 401
    assert get(server, "/admin/ledger", key_of("ops-alice")).status_code == 401


def test_admin_reads_any_user(server: CapgateServer) -> None:
    bob = get(server, "/admin/users/ops-bob/usage", ADMIN_KEY).json()
    assert bob["totals"]["completion_tokens"] == 3
    assert bob["windows"][0]["left"] == 5000 - bob["totals"]["prompt_tokens"] - 3
    assert get(server, "/admin/users/nobody/usage", ADMIN_KEY).status_code == 404
    paid = get(server, "/admin/tiers", ADMIN_KEY).json()["tiers"]["paid"]
    assert paid["completion_tokens"] == 10 and paid["requests"] == 2 and paid["value_nano"] == 10 * 2000
    assert get(server, "/admin/tiers", key_of("ops-bob")).status_code == 401


def test_cli_usage_matches_the_endpoint(server: CapgateServer, redis_server: RedisServer) -> None:
    result = cli(server, redis_server, "usage", "ops-alice")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == get(server, "/v1/usage", key_of("ops-alice")).json() | {"windows": printed["windows"]}
    assert (
        printed["windows"][0]["used"]
        == get(server, "/v1/usage", key_of("ops-alice")).json()["windows"][0]["used"]
    )


def test_ledger_exports_as_csv_and_json_lines(server: CapgateServer, redis_server: RedisServer) -> None:
    rows = list(csv.DictReader(io.StringIO(get(server, "/admin/ledger?format=csv", ADMIN_KEY).text)))
    ours = [row for row in rows if row["user"] in USERS]
    assert sorted(int(row["completion_tokens"]) for row in ours) == [3, 7]
    assert {row["tier"] for row in ours} == {"paid"} and all(row["request_id"] for row in ours)
    result = cli(server, redis_server, "export", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    exported = result.stdout.splitlines()
    events = [json.loads(line) for line in exported]
    assert {e["request_id"] for e in events if e["user"] in USERS} == {row["request_id"] for row in ours}
    assert sum(int(e["value_nano"]) for e in events if e["user"] == "ops-alice") == 7 * 2000
