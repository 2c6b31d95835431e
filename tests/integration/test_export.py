"""The ledger exporter against the real things: two capgate replicas in front of the session's
vLLM, real Redis (and Redis Cluster), a real PostgreSQL, JSON Lines files, and `capgate exporter`
SIGKILLed at random points while traffic flows. Every request ends as exactly one row or line,
equal field by field to the event capgate settled, and Redis is left holding none of them."""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from policies.keys import hash_key
from tests.harness import RedisCluster, RedisServer, VllmServer, parse, sample_sum
from tests.harness.capgate_server import CapgateServer, replicas
from tests.harness.clients import openai_client
from tests.harness.exporter_process import ExporterProcess
from tests.harness.ledger import ledger
from tests.harness.policies import ADMIN_KEY, key_of, write_policy
from tests.harness.postgres_server import PostgresServer
from tests.harness.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = [f"exp-{i}" for i in range(4)]
PROMPT_NANO, COMPLETION_NANO = 2000, 8000  # nano-units per token: 2 and 8 USD per 1M
TIERS = {
    "paid": {
        "priority": 0,
        "fail_mode": "closed",
        "caps": {"windows": [{"per": "month", "tokens": 10**9}], "count": ["prompt", "completion"]},
        "prices": {"prompt": "2 USD/1M", "completion": "8 USD/1M"},
    }
}
BEFORE, DURING = 40, 120  # requests settled before the exporter first runs, and while it is killed
SEED = 20261205
# vLLM, Redis, PostgreSQL, the replicas, the exporter and the load share the machine's cores.
SLOW_REDIS = {"timeouts": {"redis_s": 2.0}}
FAST = {"batch": 7, "interval_s": 0.05, "lock_ttl_s": 1.0}  # small batches: many crash points


@dataclass(frozen=True)
class Sent:
    """One request as its client saw it."""

    request_id: str
    user: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_policy(
        tmp_path_factory.mktemp("export") / "policy.yaml", TIERS, dict.fromkeys(USERS, "paid")
    )


def traffic(gateways: list[CapgateServer], count: int, seed: int) -> list[Sent]:
    """`count` chat completions with the openai SDK, four at a time, over both replicas."""
    rng = random.Random(seed)
    plan = [(gateways[i % 2].base_url, rng.choice(USERS), rng.randint(1, 8)) for i in range(count)]

    def one(item: tuple[str, str, int]) -> Sent:
        base_url, user, max_tokens = item
        raw = openai_client(base_url, key_of(user)).chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=max_tokens
        )
        reply = raw.parse()
        assert reply.usage is not None
        return Sent(
            raw.headers["x-request-id"],
            user,
            reply.usage.prompt_tokens,
            reply.usage.completion_tokens,
            reply.choices[0].finish_reason,
        )

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, plan))


def settled(gateway: CapgateServer, request_ids: set[str], timeout: float = 30.0) -> dict[str, dict]:
    """The ledger events of USERS in Redis (the session's Redis holds other modules' too), by
    request id, once every one of `request_ids` is there."""
    deadline = time.monotonic() + timeout
    while True:
        events = {e["request_id"]: e for e in ledger(gateway) if e["user"] in USERS}
        if request_ids <= set(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def crash_loop(exporter: ExporterProcess, busy: Callable[[], bool], rng: random.Random) -> int:
    """Start the exporter and SIGKILL it after a random time, again and again while `busy()`
    (at least five times); return how many times it was killed."""
    kills = 0
    while busy() or kills < 5:
        exporter.start()
        time.sleep(rng.uniform(0.3, 2.5))
        exporter.kill()
        kills += 1
    return kills


def assert_same_event(row: dict, event: dict) -> None:
    """A sink's row equals the event capgate settled, field by field."""
    for name in ("request_id", "user", "tier", "model", "finish_reason"):
        assert str(row[name]) == event[name], (name, row, event)
    for name in ("prompt_tokens", "cached_tokens", "completion_tokens", "value_nano", "ts_ms"):
        assert int(row[name]) == int(event[name]), (name, row, event)
    for name in ("ttft_ms", "duration_ms"):
        expected = float(event[name]) if event[name] else None
        assert row[name] == expected, (name, row, event)
    assert row["entry_id"] == event["entry_id"], (row, event)


def assert_as_sent(row: dict, sent: Sent) -> None:
    """A sink's row bills what the client was told it used, at the tier's prices."""
    assert (row["user"], row["tier"], row["model"]) == (sent.user, "paid", "tiny")
    assert (int(row["prompt_tokens"]), int(row["completion_tokens"])) == (
        sent.prompt_tokens,
        sent.completion_tokens,
    )
    assert row["finish_reason"] == sent.finish_reason
    value = sent.prompt_tokens * PROMPT_NANO + sent.completion_tokens * COMPLETION_NANO
    assert int(row["value_nano"]) == value


def postgres_rows(postgres: PostgresServer) -> list[dict]:
    text = postgres.query(
        "SELECT row_to_json(t) FROM (SELECT request_id, user_id AS user, tier, model, prompt_tokens,"
        " cached_tokens, completion_tokens, value_nano, finish_reason, ttft_ms, duration_ms,"
        " (extract(epoch FROM settled_at) * 1000)::bigint AS ts_ms,"
        " ledger_ms || '-' || ledger_seq AS entry_id FROM usage_events) t"
    )
    return [json.loads(line) for line in text.splitlines() if line]


def jsonl_rows(directory: Path) -> list[dict]:
    files = sorted(directory.glob("*.jsonl"))
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


def export_and_check(
    gateways: list[CapgateServer], exporter: ExporterProcess, sink_rows: Callable[[], list[dict]]
) -> None:
    """Traffic before the exporter runs, then while it is killed again and again, then the
    exporter left to finish: the sink holds each request once, as capgate settled it. The
    exporter is stopped on leaving, whatever happened."""

    def rows() -> list[dict]:
        return [row for row in sink_rows() if row["user"] in USERS]

    try:
        before = traffic(gateways, BEFORE, SEED)
        events = settled(gateways[0], {s.request_id for s in before})
        assert len(events) == BEFORE
        rng = random.Random(SEED)
        with ThreadPoolExecutor(1) as pool:
            during_f = pool.submit(traffic, gateways, DURING, SEED + 1)
            kills = crash_loop(exporter, lambda: not during_f.done(), rng)
            during = during_f.result()
        sent = {s.request_id: s for s in before + during}
        assert len(sent) == BEFORE + DURING
        exporter.start()

        def all_exported() -> bool:
            return not ledger(gateways[0]) and len(rows()) >= len(sent) and backlog(exporter) == 0

        wait_until(all_exported, 60, exporter)
    finally:
        exporter.stop()
    written = rows()
    print(f"\nexporter killed {kills} times; {len(written)} rows for {len(sent)} requests")
    ids = [row["request_id"] for row in written]
    assert len(ids) == len(set(ids)), "an event was written twice"
    assert set(ids) == set(sent), "an event is missing, or one no request made"
    by_id = {row["request_id"]: row for row in written}
    for request_id, event in events.items():
        assert_same_event(by_id[request_id], event)
    for request_id, one in sent.items():
        assert_as_sent(by_id[request_id], one)


def backlog(exporter: ExporterProcess) -> float | None:
    """The exporter's backlog gauge (None while it does not answer)."""
    try:
        text = httpx.get(exporter.metrics_url, timeout=5).text
    except httpx.HTTPError:
        return None
    return sample_sum(parse(text), "capgate_ledger_backlog_events")


@pytest.fixture(scope="module")
def on_redis(
    tmp_path_factory: pytest.TempPathFactory, vllm_server: VllmServer, redis_server: RedisServer, policy: Path
) -> Iterator[list[CapgateServer]]:
    with replicas(
        tmp_path_factory.mktemp("export-redis"),
        ("a", "b"),
        [vllm_server.base_url],
        redis_server.url,
        policy,
        SLOW_REDIS,
    ) as servers:
        yield servers


@pytest.fixture(scope="module")
def on_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    vllm_server: VllmServer,
    redis_cluster: RedisCluster,
    policy: Path,
) -> Iterator[list[CapgateServer]]:
    with replicas(
        tmp_path_factory.mktemp("export-cluster"),
        ("a", "b"),
        [vllm_server.base_url],
        redis_cluster.url,
        policy,
        {"redis_cluster": True, **SLOW_REDIS},
    ) as servers:
        yield servers


def test_postgres_gets_every_event_once_though_the_exporter_is_killed_at_random(
    on_redis: list[CapgateServer], redis_server: RedisServer, postgres: PostgresServer, tmp_path: Path
) -> None:
    postgres.query("DROP TABLE IF EXISTS usage_events CASCADE")
    sink = {"kind": "postgres", "dsn": postgres.dsn}
    exporter = ExporterProcess(tmp_path, redis_server.url, sink, **FAST)
    export_and_check(on_redis, exporter, lambda: postgres_rows(postgres))


def test_jsonl_files_get_every_event_once_though_the_exporter_is_killed_at_random(
    on_redis: list[CapgateServer], redis_server: RedisServer, tmp_path: Path
) -> None:
    """Files cannot deduplicate: exactly once rests on the journal (the tail of a batch that never
    committed is cut, the last committed batch is not written again)."""
    out = tmp_path / "ledger"
    sink = {"kind": "jsonl", "dir": str(out), "rotate_bytes": 4096}
    exporter = ExporterProcess(tmp_path, redis_server.url, sink, **FAST)
    export_and_check(on_redis, exporter, lambda: jsonl_rows(out))
    assert len(list(out.glob("*.jsonl"))) > 1, "rotated by size"


def test_postgres_gets_every_event_once_on_redis_cluster(
    on_cluster: list[CapgateServer], redis_cluster: RedisCluster, postgres: PostgresServer, tmp_path: Path
) -> None:
    postgres.query("DROP TABLE IF EXISTS usage_events CASCADE")
    sink = {"kind": "postgres", "dsn": postgres.dsn}
    exporter = ExporterProcess(tmp_path, redis_cluster.url, sink, cluster=True, **FAST)
    export_and_check(on_cluster, exporter, lambda: postgres_rows(postgres))


def test_a_webhook_receiver_down_for_a_minute_gets_every_event_once_signed(
    on_redis: list[CapgateServer], redis_server: RedisServer, tmp_path: Path
) -> None:
    """The HTTP sink: batched CloudEvents with a valid signature, each request's event once; a
    receiver refusing (503) or down for a minute makes the exporter retry, and loses nothing."""
    secret = "a-secret-of-thirty-two-bytes-abc"
    receiver = WebhookReceiver(secret.encode())
    receiver.start()
    sink = {"kind": "http", "url": receiver.url, "secret": secret, "max_backoff_s": 5.0,
            "state_dir": str(tmp_path / "state")}  # fmt: skip
    exporter = ExporterProcess(tmp_path, redis_server.url, sink, batch=7, interval_s=0.05)
    try:
        exporter.start()
        receiver.refuse = 3
        first = traffic(on_redis, 30, SEED + 2)
        wait_until(lambda: {s.request_id for s in first} <= set(receiver.ids()), 60, exporter)
        receiver.stop()
        down = time.monotonic()
        second = traffic(on_redis, 30, SEED + 3)
        time.sleep(max(0.0, 60 - (time.monotonic() - down)))
        assert not {s.request_id for s in second} & set(receiver.ids())
        receiver.start()
        wait_until(lambda: {s.request_id for s in second} <= set(receiver.ids()), 60, exporter)
    finally:
        exporter.stop()
        receiver.stop()
    sent = {s.request_id: s for s in first + second}
    ours = [event for event in receiver.events if event["subject"] in USERS]
    ids = [event["id"] for event in ours]
    assert len(ids) == len(set(ids)) == len(sent), "each request's event once"
    assert set(ids) == set(sent)
    assert receiver.bad_signatures == 0
    for event in ours:
        assert event["specversion"] == "1.0" and event["type"] == "dev.capgate.usage"
        assert event["subject"] == event["data"]["user"] and event["time"].endswith("Z")
        assert_as_sent(event["data"], sent[event["id"]])
    assert "retrying" in exporter.log_text()


def wait_until(done: Callable[[], bool], timeout: float, exporter: ExporterProcess) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, exporter.log_text()[-3000:]
        time.sleep(0.2)


NOTIFY_CAP, TEAM_CAP, SHARES = 400, 700, (0.25, 0.5, 0.8, 1.0)


@pytest.fixture(scope="module")
def notifying(
    tmp_path_factory: pytest.TempPathFactory, vllm_server: VllmServer, redis_server: RedisServer
) -> Iterator[list[CapgateServer]]:
    """Two replicas; tier `watched` notifies at SHARES of its monthly cap; two of its users share
    team `crew`, whose own monthly cap they count against too."""
    run = uuid.uuid4().hex[:6]
    tier = {
        "priority": 0,
        "caps": {
            "windows": [{"per": "month", "tokens": NOTIFY_CAP}],
            "count": ["prompt", "completion"],
            "notify_at": list(SHARES),
        },
        "prices": {"prompt": "2 USD/1M", "completion": "8 USD/1M"},
    }
    users = [f"n{run}-{i}" for i in range(3)]
    policy = {
        "admin_keys": [hash_key(ADMIN_KEY)],
        "tiers": {"watched": tier},
        "teams": [{"id": f"crew{run}", "windows": [{"per": "month", "tokens": TEAM_CAP}]}],
        "users": [
            {
                "id": u,
                "tier": "watched",
                "keys": [hash_key(key_of(u))],
                **({"team": f"crew{run}"} if i < 2 else {}),
            }
            for i, u in enumerate(users)
        ],
    }
    workdir = tmp_path_factory.mktemp("notify")
    path = workdir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    with replicas(workdir, ("a", "b"), [vllm_server.base_url], redis_server.url, path, SLOW_REDIS) as servers:
        yield servers


def mark(cap: int, share: float) -> int:
    return math.ceil(cap * round(share * 1000) / 1000)


def test_each_threshold_crossed_is_notified_once_under_concurrency_over_two_replicas(
    notifying: list[CapgateServer], redis_server: RedisServer, postgres: PostgresServer, tmp_path: Path
) -> None:
    """80 requests, eight at a time, over two replicas, by three users (two in a team) until their
    caps refuse them: the receiver gets exactly one notification per threshold their committed
    usage crossed (the users' windows and the team's), and PostgreSQL holds the same."""
    policy = yaml.safe_load(notifying[0].policy.read_text())
    users = [u["id"] for u in policy["users"]]
    team = policy["teams"][0]["id"]
    secret = "another-secret-of-32-bytes-12345"
    receiver = WebhookReceiver(secret.encode())
    receiver.start()
    postgres.query("DROP TABLE IF EXISTS threshold_notifications")
    sink = {"kind": "postgres", "dsn": postgres.dsn}
    notify = {"url": receiver.url, "secret": secret, "state_dir": str(tmp_path / "state")}
    exporter = ExporterProcess(tmp_path, redis_server.url, sink, notify=notify, **FAST)
    rng = random.Random(SEED + 4)
    plan = [(notifying[i % 2].base_url, rng.choice(users)) for i in range(80)]

    def one(item: tuple[str, str]) -> int:
        reply = httpx.post(
            f"{item[0]}/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 8},
            headers={"authorization": f"Bearer {key_of(item[1])}"},
            timeout=60,
        )
        assert reply.status_code in (200, 429), reply.text
        return reply.status_code

    try:
        exporter.start()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, plan))
        assert codes.count(429) > 0, "the caps were reached"
        wait_until(lambda: not ledger(notifying[0]) and backlog(exporter) == 0, 60, exporter)
        time.sleep(1.0)
    finally:
        exporter.stop()
        receiver.stop()
    used: dict[str, int] = {}
    for row in postgres_rows(postgres):
        if row["user"] in users:
            used[row["user"]] = (
                used.get(row["user"], 0) + int(row["prompt_tokens"]) + int(row["completion_tokens"])
            )
    used_team = sum(used.get(u, 0) for u in users[:2])
    expected = {
        (f"user:{u}", share) for u in users for share in SHARES if used.get(u, 0) >= mark(NOTIFY_CAP, share)
    }
    expected |= {(f"team:{team}", share) for share in SHARES if used_team >= mark(TEAM_CAP, share)}
    notes = [e for e in receiver.events if e["type"] == "dev.capgate.threshold" and e["subject"] in users]
    got = [(":".join(e["id"].split(":")[:2]), e["data"]["share"]) for e in notes]
    print(f"\nused {used}, team {used_team}; {len(notes)} notifications")
    assert len(got) == len(set(got)), "a threshold was notified twice"
    assert set(got) == expected
    assert receiver.bad_signatures == 0
    for event in notes:
        data = event["data"]
        cap = TEAM_CAP if data["scope"] == "team" else NOTIFY_CAP
        assert data["used"] >= mark(cap, data["share"]) and data["cap"] == cap and data["window"] == "month"
    rows = postgres.query("SELECT id FROM threshold_notifications").splitlines()
    assert sorted(rows) == sorted(e["id"] for e in notes), "the ledger's sink holds the same"


def test_the_admin_ledger_refuses_hostile_queries_and_answers_503_while_redis_is_down(
    start_gateway: Callable[..., CapgateServer], policy: Path
) -> None:
    """`GET /admin/ledger` streams its answer: a bad parameter is a 400 naming it, and Redis down
    is a 503 in the API's error shape before any byte of a 200 is sent."""
    with RedisServer() as own_redis:
        gateway = start_gateway(redis_url=own_redis.url, policy=policy)
        url = f"{gateway.base_url}/admin/ledger"
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        for params, name in (
            ({"format": "xml"}, "format"),
            ({"since_ms": "-1"}, "since_ms"),
            ({"since_ms": "1e3"}, "since_ms"),
            ({"until_ms": "٣"}, "until_ms"),
            ({"since_ms": "9" * 400}, "since_ms"),
        ):
            reply = httpx.get(url, params=params, headers=headers, timeout=10)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == name, (params, reply.text)
        now_ms = str(int(time.time() * 1000))
        assert httpx.get(url, headers=headers, timeout=10).status_code == 200
        window = {"since_ms": "0", "until_ms": now_ms}
        assert httpx.get(url, params=window, headers=headers, timeout=10).status_code == 200, "epoch ms"
        own_redis.stop()
        reply = httpx.get(url, headers=headers, timeout=30)
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "meter_unavailable"
