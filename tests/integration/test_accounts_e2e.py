"""Accounts through the admin API and the CLI, teams and spend caps, end to end: two capgate
replicas on the real vLLM and Redis (and the 3-master Redis Cluster), the openai SDK as client.

- a user and key created through the API serve at once on both replicas; a revoked key is refused
  by both within a second; an expired key is refused;
- two members of a team with a team cap, 100 concurrent streams between them over two replicas:
  billed never passes the team cap nor either user's own, and equals what vLLM generated;
- a spend cap over two models of different prices: billed value never passes the cap and equals
  each request's tokens times its model's prices exactly; a request the money left cannot pay for
  whole is served with its output limit lowered to what it can;
- a user changing team takes their usage along;
- hostile admin input is a 400 naming the parameter and changes nothing.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from policies.keys import hash_key
from tests.harness import RedisCluster, RedisServer, VllmServer
from tests.harness.capgate_server import REPO, CapgateServer, replicas
from tests.harness.clients import openai_client
from tests.harness.ledger import generated, ledger, wait_for_events
from tests.harness.policies import ADMIN_KEY

pytestmark = pytest.mark.integration

USER_CAP = 2000
TEAM_CAP = 3000
SPEND_CAP_NANO = 40_000_000  # "0.04 USD"
PRICES = {
    "prompt": "10 USD/1M",
    "completion": "20 USD/1M",
    "models": {"tiny-b": {"prompt": "30 USD/1M", "completion": "70 USD/1M"}},
}
RATES = {"tiny": (10_000, 20_000), "tiny-b": (30_000, 70_000)}  # nano per prompt, completion token
TIERS = {
    "basic": {"prices": PRICES},
    "member": {"caps": {"windows": [{"per": "day", "tokens": USER_CAP}]}, "prices": PRICES},
    "spender": {"caps": {"windows": [{"per": "month", "spend": "0.04 USD"}]}, "prices": PRICES},
}
# 100 streams arrive at once on 2 cores that also run vLLM: Redis calls get more than the default.
SETTINGS = {"timeouts": {"redis_s": 5.0}, "accounts": {"last_used_interval_s": 0.5}}


@dataclass
class Reply:
    status: int
    model: str
    asked: int
    completion_tokens: int | None = None
    error: str | None = None


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accounts") / "policy.yaml"
    document = {"default_tier": "basic", "admin_keys": [hash_key(ADMIN_KEY)], "tiers": TIERS}
    path.write_text(json.dumps(document))
    return path


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, vllm_server: VllmServer, redis_server: RedisServer, policy: Path
) -> Iterator[tuple[CapgateServer, CapgateServer]]:
    """Two replicas sharing one Redis."""
    redis_server.client().flushall()
    workdir = tmp_path_factory.mktemp("pair")
    with replicas(workdir, ("a", "b"), [vllm_server.base_url], redis_server.url, policy, SETTINGS) as (a, b):
        yield a, b


@pytest.fixture(scope="module")
def cluster_pair(
    tmp_path_factory: pytest.TempPathFactory,
    vllm_server: VllmServer,
    redis_cluster: RedisCluster,
    policy: Path,
) -> Iterator[tuple[CapgateServer, CapgateServer]]:
    """Two replicas sharing the 3-master Redis Cluster."""
    workdir = tmp_path_factory.mktemp("cluster-pair")
    settings = {**SETTINGS, "redis_cluster": True}
    with replicas(workdir, ("a", "b"), [vllm_server.base_url], redis_cluster.url, policy, settings) as (a, b):
        yield a, b


def admin(server: CapgateServer, method: str, path: str, body: object = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, f"{server.base_url}{path}", json=body, headers=headers, timeout=30)


def new_user(server: CapgateServer, user: str, tier: str, team: str | None = None) -> str:
    """Create `user` and a key of theirs through the admin API; the key."""
    created = admin(server, "POST", "/admin/users", {"id": user, "tier": tier, "team": team})
    assert created.status_code == 201, created.text
    minted = admin(server, "POST", f"/admin/users/{user}/keys", {"name": "test"})
    assert minted.status_code == 201, minted.text
    return minted.json()["key"]


def status_of(server: CapgateServer, key: str) -> int:
    reply = httpx.get(f"{server.base_url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
    return reply.status_code


def chat(server: CapgateServer, key: str, model: str = "tiny", max_tokens: int = 5) -> Reply:
    client = openai_client(server.base_url, key)
    try:
        messages = [{"role": "user", "content": f"hi {random.random()}"}]
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        reply = Reply(200, model, max_tokens)
        for chunk in stream:
            if chunk.usage is not None:
                reply.completion_tokens = chunk.usage.completion_tokens
        return reply
    except openai.APIStatusError as exc:
        return Reply(exc.status_code, model, max_tokens, error=exc.message)


def until_refused(servers: tuple[CapgateServer, ...], key: str, limit_s: float) -> list[float]:
    """Seconds until each server first refuses `key` (401), polling all of them."""
    start = time.monotonic()
    refused: dict[int, float] = {}
    while len(refused) < len(servers) and time.monotonic() - start < limit_s + 2:
        for i, server in enumerate(servers):
            if i not in refused and status_of(server, key) == 401:
                refused[i] = time.monotonic() - start
        time.sleep(0.02)
    assert len(refused) == len(servers), f"not refused by every replica within {limit_s + 2} s: {refused}"
    return [refused[i] for i in range(len(servers))]


def test_an_api_account_serves_at_once_on_both_replicas_and_its_revoked_key_is_refused_within_1s(
    pair: tuple[CapgateServer, CapgateServer],
) -> None:
    a, b = pair
    key = new_user(a, "acct-1", "basic")
    assert chat(a, key).status == 200 and chat(b, key).status == 200
    listed = admin(b, "GET", "/admin/users/acct-1/keys").json()["data"]
    assert len(listed) == 1 and "key" not in listed[0] and key not in json.dumps(listed)
    deadline = time.monotonic() + 10
    while admin(a, "GET", "/admin/users/acct-1/keys").json()["data"][0]["last_used_at"] is None:
        assert time.monotonic() < deadline, "last use never recorded"
        time.sleep(0.2)
    assert admin(b, "DELETE", f"/admin/keys/{listed[0]['id']}").status_code == 200
    seconds = until_refused((a, b), key, 1.0)
    print(f"revoked key refused after {seconds[0]:.3f} s (replica a), {seconds[1]:.3f} s (replica b)")
    assert max(seconds) <= 1.0
    assert status_of(a, key) == status_of(b, key) == 401
    assert admin(a, "DELETE", f"/admin/keys/{listed[0]['id']}").status_code == 404


def test_an_expired_key_is_refused_by_both_replicas(pair: tuple[CapgateServer, CapgateServer]) -> None:
    a, b = pair
    admin(a, "POST", "/admin/users", {"id": "acct-2"})
    expires = int(time.time()) + 3
    minted = admin(b, "POST", "/admin/users/acct-2/keys", {"expires_at": expires}).json()
    assert minted["expires_at"] == expires
    assert status_of(a, minted["key"]) == status_of(b, minted["key"]) == 200
    time.sleep(max(0.0, expires - time.time()) + 0.1)
    assert status_of(a, minted["key"]) == status_of(b, minted["key"]) == 401
    past = admin(a, "POST", "/admin/users/acct-2/keys", {"expires_at": "2020-01-01T00:00:00Z"})
    assert past.status_code == 400 and past.json()["error"]["param"] == "expires_at"


def test_a_deleted_users_keys_are_refused_by_both_replicas(
    pair: tuple[CapgateServer, CapgateServer],
) -> None:
    a, b = pair
    key = new_user(a, "acct-3", "basic")
    assert status_of(b, key) == 200
    assert admin(a, "DELETE", "/admin/users/acct-3").status_code == 200
    until_refused((a, b), key, 1.0)
    assert admin(a, "GET", "/admin/users/acct-3").status_code == 404


HOSTILE = [
    ("POST", "/admin/users", {"id": 7}, "id"),
    ("POST", "/admin/users", {"id": "a:b"}, "id"),
    ("POST", "/admin/users", {"id": "x" * 65}, "id"),
    ("POST", "/admin/users", {"id": "ok-id", "tier": ["basic"]}, "tier"),
    ("POST", "/admin/users", {"id": "ok-id", "tier": "nope"}, "tier"),
    ("POST", "/admin/users", {"id": "ok-id", "team": "no-such-team"}, "team"),
    ("POST", "/admin/users", {"id": "ok-id", "admin": True}, "admin"),
    ("POST", "/admin/users", {"id": "\u202eevil"}, "id"),
    ("POST", "/admin/users/acct-h/keys", {"expires_at": -5}, "expires_at"),
    ("POST", "/admin/users/acct-h/keys", {"expires_at": True}, "expires_at"),
    ("POST", "/admin/users/acct-h/keys", {"expires_at": 10**30}, "expires_at"),
    ("POST", "/admin/users/acct-h/keys", {"expires_at": "tomorrow"}, "expires_at"),
    ("POST", "/admin/users/acct-h/keys", {"name": "a\x00b"}, "name"),
    ("POST", "/admin/users/acct-h/keys", {"name": "n" * 500}, "name"),
    ("PATCH", "/admin/users/acct-h", {"tier": 5}, "tier"),
    ("POST", "/admin/teams", {"id": "t1", "windows": [{"per": "day"}]}, "windows.0"),
    ("POST", "/admin/teams", {"id": "t1", "windows": [{"per": "day", "tokens": -1}]}, "windows.0.tokens"),
    ("POST", "/admin/teams", {"id": "t1", "windows": [{"per": "day", "spend": "1 EUR"}]}, "windows.0.spend"),
    ("POST", "/admin/teams", {"id": "t1", "tier": "basic", "windows": []}, "windows"),
]


@pytest.mark.parametrize(("method", "path", "body", "param"), HOSTILE)
def test_hostile_admin_input_is_a_400_naming_the_parameter_and_changes_nothing(
    pair: tuple[CapgateServer, CapgateServer], method: str, path: str, body: object, param: str
) -> None:
    a, _ = pair
    if admin(a, "GET", "/admin/users/acct-h").status_code == 404:
        admin(a, "POST", "/admin/users", {"id": "acct-h"})
    before = admin(a, "GET", "/admin/users?limit=1000").json(), admin(a, "GET", "/admin/teams").json()
    reply = admin(a, method, path, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.json()
    after = admin(a, "GET", "/admin/users?limit=1000").json(), admin(a, "GET", "/admin/teams").json()
    assert before == after
    assert admin(a, "GET", "/admin/users/acct-h/keys").json()["data"] == []


def test_the_admin_api_refuses_other_keys_bad_json_and_unknown_ids(
    pair: tuple[CapgateServer, CapgateServer],
) -> None:
    a, _ = pair
    key = new_user(a, "acct-4", "basic")
    assert (
        httpx.get(f"{a.base_url}/admin/users", headers={"authorization": f"Bearer {key}"}).status_code == 401
    )
    assert httpx.get(f"{a.base_url}/admin/users").status_code == 401
    headers = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
    for raw in (b"{", b"[1]", b'"x"', b"{" * 5000 + b"}" * 5000):
        bad = httpx.post(f"{a.base_url}/admin/users", content=raw, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error", raw[:10]
    assert admin(a, "GET", "/admin/users/" + "%7B" * 80).status_code == 404
    assert admin(a, "POST", "/admin/users", {"id": "acct-4"}).status_code == 409
    assert admin(a, "DELETE", "/admin/keys/key_0000").status_code == 404
    assert admin(a, "PUT", "/admin/users/acct-4", {}).status_code == 405
    assert admin(a, "GET", "/admin/users?limit=0").json()["error"]["param"] == "limit"


def test_the_cli_manages_the_accounts_the_replicas_serve(pair: tuple[CapgateServer, CapgateServer]) -> None:
    a, b = pair
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPGATE_")}

    def cli(*args: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args, "--config", str(a.config_path)],
            capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    cli("teams", "add", "cli-team", "--windows", '[{"per": "day", "tokens": 100000}]')
    assert cli("teams", "show", "cli-team")["windows"] == [
        {"per": "day", "tokens": 100000, "mode": "calendar"}
    ]
    assert cli("users", "add", "cli-user", "--tier", "member", "--team", "cli-team")["team"] == "cli-team"
    minted = cli("keys", "new", "cli-user", "--name", "ci")
    assert chat(b, minted["key"]).status == 200
    usage = httpx.get(f"{a.base_url}/v1/usage", headers={"authorization": f"Bearer {minted['key']}"}).json()
    assert usage["team"]["id"] == "cli-team" and usage["team"]["windows"][0]["used"] > 0
    assert [k["id"] for k in cli("keys", "list", "cli-user")["data"]] == [minted["id"]]
    assert "cli-user" in [u["id"] for u in cli("users", "list")["data"]]
    cli("keys", "revoke", minted["id"])
    until_refused((a, b), minted["key"], 1.0)
    refused = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "teams", "rm", "cli-team", "--config", str(a.config_path)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1 and "has members" in refused.stderr
    cli("users", "set", "cli-user", "--no-team")
    cli("teams", "rm", "cli-team")
    cli("users", "rm", "cli-user")
    assert admin(b, "GET", "/admin/users/cli-user").status_code == 404


def team_round(servers: tuple[CapgateServer, CapgateServer], vllm: VllmServer, team: str) -> None:
    """Two members of `team` (cap TEAM_CAP; each USER_CAP), 100 concurrent streams between them
    over both replicas."""
    a, b = servers
    assert (
        admin(
            a, "POST", "/admin/teams", {"id": team, "windows": [{"per": "day", "tokens": TEAM_CAP}]}
        ).status_code
        == 201
    )
    users = [f"{team}-x", f"{team}-y"]
    keys = {user: new_user(a, user, "member", team) for user in users}
    vllm.wait_quiet()
    before = generated(vllm)[0]
    rng = random.Random(team)
    asks = [rng.randint(TEAM_CAP // 10 + 1, TEAM_CAP // 4) for _ in range(100)]
    barrier = threading.Barrier(100)

    def one(i: int) -> Reply:
        barrier.wait()
        return chat(servers[i % 2], keys[users[(i // 2) % 2]], max_tokens=asks[i])

    with ThreadPoolExecutor(100) as pool:
        replies = list(pool.map(one, range(100)))
    served = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 429]
    assert served and refused and len(served) + len(refused) == 100, {r.status for r in replies}
    assert any("team day" in (r.error or "") for r in refused)
    events = {user: wait_for_events(a, user, 1) for user in users}
    deadline = time.monotonic() + 30
    while sum(len(e) for e in events.values()) < len(served) and time.monotonic() < deadline:
        time.sleep(0.2)
        events = {user: ledger(a, user) for user in users}
    vllm.wait_quiet()
    made = generated(vllm)[0] - before
    billed = {u: sum(int(e["prompt_tokens"]) + int(e["completion_tokens"]) for e in events[u]) for u in users}
    completion = sum(int(e["completion_tokens"]) for u in users for e in events[u])
    print(
        f"team {team}: {len(served)} of 100 served, billed {billed} (team cap {TEAM_CAP}), vLLM made {made}"
    )
    assert sum(len(e) for e in events.values()) == len(served)
    assert sum(billed.values()) <= TEAM_CAP
    assert all(n <= USER_CAP for n in billed.values())
    assert completion == made == sum(r.completion_tokens or 0 for r in served)
    usage = httpx.get(f"{b.base_url}/v1/usage", headers={"authorization": f"Bearer {keys[users[0]]}"}).json()
    assert usage["team"]["windows"][0]["used"] == sum(billed.values())
    assert usage["windows"][0]["used"] == billed[users[0]]


def test_a_team_cap_holds_over_two_members_and_two_replicas(
    pair: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    team_round(pair, vllm_server, "team-r")


def test_a_team_cap_holds_on_redis_cluster(
    cluster_pair: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    team_round(cluster_pair, vllm_server, "team-c")


def test_a_user_changing_team_takes_their_usage_along(pair: tuple[CapgateServer, CapgateServer]) -> None:
    a, b = pair
    for team in ("move-from", "move-to"):
        admin(a, "POST", "/admin/teams", {"id": team, "windows": [{"per": "day", "tokens": 100_000}]})
    key = new_user(a, "mover", "member", "move-from")
    for _ in range(3):
        assert chat(b, key, max_tokens=20).status == 200
    wait_for_events(a, "mover", 3)

    def usage(server: CapgateServer) -> dict:
        return httpx.get(f"{server.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"}).json()

    used = usage(a)["windows"][0]["used"]
    assert used > 60 and usage(a)["team"]["id"] == "move-from"
    moved = admin(b, "PATCH", "/admin/users/mover", {"team": "move-to"})
    assert moved.status_code == 200 and moved.json()["team"] == "move-to"
    time.sleep(0.6)
    for server in (a, b):
        report = usage(server)
        assert report["team"]["id"] == "move-to" and report["windows"][0]["used"] == used
        assert report["team"]["windows"][0]["used"] == 0, "the old team's usage stays the old team's"
    assert chat(a, key, max_tokens=20).status == 200
    gone = admin(b, "PATCH", "/admin/users/mover", {"team": None}).json()
    assert gone["team"] is None
    time.sleep(0.6)
    assert usage(b)["team"] is None and usage(b)["windows"][0]["used"] > used


def test_a_spend_cap_over_two_models_bills_exactly_and_never_past_the_cap(
    pair: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    a, b = pair
    key = new_user(a, "spender-1", "spender")
    first = [chat(a, key, "tiny", 30), chat(b, key, "tiny-b", 30)]
    assert [r.status for r in first] == [200, 200]
    rng = random.Random(11)
    jobs = [(("tiny", "tiny-b")[(i // 2) % 2], rng.randint(40, 250)) for i in range(60)]
    barrier = threading.Barrier(len(jobs))

    def one(i: int) -> Reply:
        barrier.wait()
        model, asked = jobs[i]
        return chat((a, b)[i % 2], key, model, asked)

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(one, range(len(jobs))))
    served = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 429]
    assert served and refused and len(served) + len(refused) == len(jobs), {r.status for r in replies}
    served += first
    assert all("spend cap reached for window 'month'" in (r.error or "") for r in refused), refused[0].error
    assert {r.model for r in served} == {"tiny", "tiny-b"}
    events = wait_for_events(a, "spender-1", len(served))
    assert len(events) == len(served)
    for event in events:
        prompt_rate, completion_rate = RATES[event["model"]]
        expected = (
            int(event["prompt_tokens"]) * prompt_rate + int(event["completion_tokens"]) * completion_rate
        )
        assert int(event["value_nano"]) == expected, event
    value = sum(int(e["value_nano"]) for e in events)
    print(f"spend cap: {len(served)} of {len(jobs)} served, billed {value} of {SPEND_CAP_NANO} nano-USD")
    assert value <= SPEND_CAP_NANO
    report = httpx.get(f"{b.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"}).json()
    assert report["spend"][0]["window"] == "month" and report["spend"][0]["cap"] == "0.04"
    assert report["totals"]["value_nano"] == value


def test_the_output_limit_is_lowered_to_what_the_money_left_pays_for(
    pair: tuple[CapgateServer, CapgateServer],
) -> None:
    """A request whose worst case (2,500 tokens at 20 USD/1M = 0.05 USD) is more than the whole cap
    (0.04 USD) is served with its output limit lowered to what the cap pays for (about 2,000 tokens
    after its prompt); the next is refused, the money left paying for no prompt and one token."""
    a, b = pair
    key = new_user(a, "spender-2", "spender")
    lowered = chat(a, key, "tiny", 2500)
    assert lowered.status == 200 and 1000 < (lowered.completion_tokens or 0) < 2000, lowered
    refused = chat(b, key, "tiny", 2500)
    assert refused.status == 429 and "spend cap reached for window 'month'" in (refused.error or ""), refused
    (event,) = wait_for_events(a, "spender-2", 1)
    assert int(event["completion_tokens"]) == lowered.completion_tokens
    assert int(event["value_nano"]) <= SPEND_CAP_NANO
