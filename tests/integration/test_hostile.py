"""Hostile clients against the real gateway, Redis and vLLM: the reported cap bypass, bodies and
headers fuzzed with hypothesis. Invariants: never a 5xx, a refused request changes no window's
committed tokens, and afterwards every window's room is its cap minus what the ledger billed."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import RedisServer
from tests.harness.capgate_server import CapgateServer
from tests.harness.ledger import ledger, usage_left, wait_for_events
from tests.harness.policies import key_of, write_policy

pytestmark = pytest.mark.integration

CAP = 300
FUZZ_CAP = 10**6
TIERS = {
    "tight": {"caps": {"windows": [{"per": "day", "tokens": CAP}], "count": ["completion"]}},
    "fuzzed": {"caps": {"per_request": 160, "windows": [{"per": "day", "tokens": FUZZ_CAP}]}},
}
USERS = {"bypass": "tight", "fuzz": "fuzzed", "headers": "fuzzed"}
FUZZ_EXAMPLES = 150


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, vllm_server, redis_server: RedisServer
) -> Iterator[CapgateServer]:  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("hostile")
    policy = write_policy(workdir / "policy.yaml", TIERS, USERS)
    with CapgateServer(
        workdir, upstreams=[vllm_server.base_url], redis_url=redis_server.url, policy=policy
    ) as gw:
        yield gw


def post(
    server: CapgateServer, user: str, body: bytes | dict, path: str = "/v1/chat/completions", **kw
) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {
        "authorization": f"Bearer {key_of(user)}",
        "content-type": "application/json",
        **kw.pop("headers", {}),
    }
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=60, **kw)


def committed(redis: RedisServer, user: str) -> dict[str, int]:
    """Every window's committed (used + held) tokens of `user`, read from Redis (windows at 0 left out)."""
    client = redis.client()
    windows = {}
    for key in client.scan_iter(match=f"cg:{{u:{user}}}:w:*"):
        windows[key.decode()] = sum(int(v) for v in client.hgetall(key).values())
    return {name: tokens for name, tokens in windows.items() if tokens}


def settled(redis: RedisServer, user: str, timeout: float = 10.0) -> None:
    """Wait until `user` holds no reservation (settlement follows the response)."""
    client = redis.client()
    deadline = time.monotonic() + timeout
    while client.zcard(f"cg:{{u:{user}}}:live") and time.monotonic() < deadline:
        time.sleep(0.02)


def test_negative_max_tokens_cannot_lend_budget_to_concurrent_requests(
    server: CapgateServer, redis_server: RedisServer
) -> None:
    """The reported bypass: requests with `max_tokens: -100000` sent alongside ordinary ones of the
    same user (cap 300 completion tokens a day) must not let the ordinary ones past the cap."""
    hostile = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -100000}
    honest = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "y"}],
        "max_tokens": 100,
        "min_tokens": 100,
    }
    jobs = [hostile] * 12 + [honest] * 8
    random.Random(3).shuffle(jobs)
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda body: post(server, "bypass", body), jobs))
    for body, reply in zip(jobs, replies, strict=True):
        if body is hostile:
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"
        else:
            assert reply.status_code in (200, 429), reply.text
    served = [r for r in replies if r.status_code == 200]
    events = wait_for_events(server, "bypass", len(served))
    billed = sum(int(e["completion_tokens"]) for e in events)
    assert billed <= CAP, f"billed {billed} tokens against a cap of {CAP}"
    assert sum(r.json()["usage"]["completion_tokens"] for r in served) == billed
    assert len(events) == len(served)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
        (b'{"model": "tiny", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None),
        (b'{"model": "tiny", "messages": [{"role": "u"}], "tools": ' + b"[" * 99 + b"]" * 99 + b"}", "tools"),
    ],
    ids=["lone-surrogate", "nested-50000", "nested-100"],
)  # fmt: skip
def test_reported_500s_are_400s(server: CapgateServer, raw: bytes, param: str | None) -> None:
    reply = post(server, "fuzz", raw)
    assert reply.status_code == 400, reply.text
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert reply.json()["error"]["param"] == param


scalars = st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=20)
anything = st.recursive(
    scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
small_int = st.integers(-3, 12) | st.sampled_from([0, -1, 2**31, 2**63, 10**20, -(2**31)])
limit = small_int | st.floats(-2, 2) | st.text(max_size=3) | st.booleans() | st.none()
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "", "\u202e"]) | anything},
    optional={"content": st.text(max_size=40) | anything, "name": st.text(max_size=8)},
)
token_ids = st.lists(st.integers(-2, 600) | st.sampled_from([2**31, 2**40]), max_size=6)
prompt = st.text(max_size=40) | token_ids | st.lists(st.text(max_size=10) | token_ids, max_size=3) | anything
common = {
    "model": st.sampled_from(["tiny", "tiny", "tiny", "", "gpt-9", "tiny\u0000", "Tiny"]) | anything,
    "max_tokens": limit,
    "n": small_int | st.none() | anything,
    "min_tokens": small_int | st.none(),
    "stream": st.booleans() | st.none() | anything,
    "stream_options": st.none()
    | anything
    | st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans() | anything, "continuous_usage_stats": st.booleans()}
    ),
    "priority": small_int | anything,
    "temperature": st.floats(-1, 3) | anything,
}  # fmt: skip
chat_bodies = st.fixed_dictionaries(
    {"model": common["model"], "messages": st.lists(message, max_size=3) | anything},
    optional={
        **{k: v for k, v in common.items() if k != "model"},
        "max_completion_tokens": limit,
        "tools": anything,
    },
)
completion_bodies = st.fixed_dictionaries(
    {"model": common["model"], "prompt": prompt},
    optional={
        **{k: v for k, v in common.items() if k != "model"},
        "best_of": small_int | anything,
        "echo": st.booleans(),
    },
)


@settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(
    case=st.one_of(
        st.tuples(st.just("/v1/chat/completions"), chat_bodies),
        st.tuples(st.just("/v1/completions"), completion_bodies),
    ),
    duplicate=st.booleans(),
)
def test_fuzzed_bodies_never_5xx_and_refusals_change_no_budget(
    server: CapgateServer, redis_server: RedisServer, case: tuple[str, dict], duplicate: bool
) -> None:
    path, body = case
    raw = json.dumps(body).encode()
    if duplicate and raw.startswith(b"{") and len(raw) > 2:
        raw = b'{"max_tokens": -5, ' + raw[1:]  # a duplicate key that an earlier parser might take
    before = committed(redis_server, "fuzz")
    reply = post(server, "fuzz", raw, path)
    assert reply.status_code < 500, (reply.status_code, reply.text[:300], raw[:300])
    if reply.headers.get("content-type", "").startswith("application/json"):
        data = reply.json()
        if reply.status_code >= 400:
            assert set(data["error"]) >= {"message", "type", "param", "code"}
    if reply.status_code >= 400 and "x-request-id" not in reply.headers:
        assert committed(redis_server, "fuzz") == before, "a request refused by capgate changed the budget"
    else:
        settled(redis_server, "fuzz")
        if reply.status_code >= 400:
            assert committed(redis_server, "fuzz") == before, "a request vLLM refused changed the budget"


def test_after_fuzzing_the_budget_left_is_the_cap_minus_the_ledger(
    server: CapgateServer, redis_server: RedisServer
) -> None:
    settled(redis_server, "fuzz")
    events = ledger(server, "fuzz")
    billed = sum(int(e["prompt_tokens"]) + int(e["completion_tokens"]) for e in events)
    assert usage_left(server, "fuzz") == {"day": FUZZ_CAP - billed}
    assert len({e["request_id"] for e in events}) == len(events)


def raw_post(server: CapgateServer, headers: list[tuple[bytes, bytes]], body: bytes) -> int | None:
    """POST with headers exactly as given, over a plain socket: the status, or None when the HTTP
    server closed the connection without an answer."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    head += b"content-length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body)
        reply = b""
        while b"\r\n" not in reply and (data := sock.recv(65536)):
            reply += data
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None


header_values = st.binary(max_size=48).filter(lambda v: b"\r" not in v and b"\n" not in v) | st.sampled_from(
    [b"x" * 60_000, b"Bearer " + b"k" * 10_000, "Bearer k-headers\u00e9".encode(), b"bearer  k-headers ",
     b"Basic abc", b"", b" ", b"Bearer k-headers\x00", "Bearer \u202ek-headers".encode()]
)  # fmt: skip
header_names = st.sampled_from(
    [b"x-junk", b"x-vllm-priority", b"authorization", b"priority", b"x-request-id"]
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(auth=header_values, extra=st.lists(st.tuples(header_names, header_values), max_size=3))
def test_fuzzed_headers_never_5xx(
    server: CapgateServer, redis_server: RedisServer, auth: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    """Odd bytes, huge values, duplicate `authorization`, headers vLLM would act on: the HTTP server
    refuses what it cannot parse, capgate answers the rest with at most a 4xx, and only a request
    with the right key (once) is served, never with the client's priority."""
    before = committed(redis_server, "headers")
    body = json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "h"}], "max_tokens": 1}
    ).encode()
    headers = [(b"authorization", auth), (b"content-type", b"application/json"), *extra]
    status = raw_post(server, headers, body)
    assert status is None or status < 500, status
    if status != 200:
        settled(redis_server, "headers")
        assert committed(redis_server, "headers") == before
