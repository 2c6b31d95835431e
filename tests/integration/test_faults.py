"""Faults injected between capgate and its dependencies, against the real gateway, Redis and
vLLM: Redis blackholed or answering errors, vLLM's link reset or blackholed mid-stream, leases
outliving their TTL, a replica SIGKILLed mid-stream. Invariants checked in each: one ledger row
per request, billed equal to what vLLM generated (or within the bound docs/metering.md states),
nothing generated twice, the tier's fail mode followed."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.harness import RedisServer, VllmServer
from tests.harness.capgate_server import CapgateServer
from tests.harness.clients import openai_client
from tests.harness.fault_proxy import FaultProxy
from tests.harness.ledger import generated, ledger, wait_for_events
from tests.harness.policies import key_of, write_policy
from tests.harness.processes import port_is_free
from tests.harness.relay_proxy import RelayProxy

pytestmark = pytest.mark.integration

TIERS = {
    "closed": {"fail_mode": "closed", "caps": {"windows": [{"per": "day", "tokens": 10**6}]}},
    "open": {"fail_mode": "open", "caps": {"per_request": 600, "windows": [{"per": "day", "tokens": 10**6}]}},
}
USERS = {
    "bh-closed": "closed",
    "bh-open": "open",
    "oom-closed": "closed",
    "oom-open": "open",
    "slow-unary": "closed",
    "slow-stream": "closed",
    "reset": "closed",
    "stall": "closed",
    "killed": "closed",
    "drop-closed": "closed",
    "drop-open": "open",
    "half": "closed",
    "vllm-killed": "closed",
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_policy(tmp_path_factory.mktemp("faults") / "policy.yaml", TIERS, USERS)


def chat(server: CapgateServer, user: str, *, max_tokens: int = 8, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key_of(user)}"},
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": f"hi {user}"}],
            "max_tokens": max_tokens,
        },
        timeout=timeout,
    )


def proxied(redis: RedisServer, proxy: FaultProxy) -> str:
    return redis.url.replace(urlsplit(redis.url).netloc, proxy.url)


@contextlib.contextmanager
def fresh_redis() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_redis_blackholed_follows_the_fail_mode_and_recovers(
    policy: Path, start_gateway: Callable[..., CapgateServer]
) -> None:
    """Redis stops answering without closing anything (a host that vanished): the fail-closed tier
    gets 503s, the fail-open tier is served and spooled. Once Redis is reachable again the dead
    connection is replaced (it would otherwise time out forever) and the spool is replayed: every
    served request has exactly one ledger row."""
    with fresh_redis() as redis, FaultProxy("127.0.0.1", redis.port) as proxy:
        server = start_gateway(
            redis_url=proxied(redis, proxy), policy=policy, settings={"reap_interval_s": 0.5}
        )
        assert chat(server, "bh-closed").status_code == 200
        proxy.blackhole()
        during = {user: [chat(server, user) for _ in range(4)] for user in ("bh-closed", "bh-open")}
        assert {r.status_code for r in during["bh-closed"]} == {503}
        assert {r.json()["error"]["code"] for r in during["bh-closed"]} == {"meter_unavailable"}
        assert {r.status_code for r in during["bh-open"]} == {200}
        proxy.heal()
        deadline = time.monotonic() + 15
        while (reply := chat(server, "bh-closed")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert reply.status_code == 200, "capgate never recovered from the blackholed connection"
        served = [r.headers["x-request-id"] for r in during["bh-open"]]
        events = wait_for_events(server, "bh-open", len(served))
        assert sorted(e["request_id"] for e in events) == sorted(served)
        assert [e["finish_reason"] for e in events] == ["length"] * len(served)


def test_redis_reset_and_refusing_connections_follows_the_fail_mode_and_recovers(
    policy: Path, start_gateway: Callable[..., CapgateServer]
) -> None:
    """Every connection to Redis is reset and new ones are dropped as they are accepted: 503 for the
    fail-closed tier, served and spooled for the fail-open tier; once Redis accepts connections
    again both are served and the spooled usage has one ledger row per request."""
    with fresh_redis() as redis, FaultProxy("127.0.0.1", redis.port) as proxy:
        server = start_gateway(
            redis_url=proxied(redis, proxy), policy=policy, settings={"reap_interval_s": 0.5}
        )
        assert chat(server, "drop-closed").status_code == 200
        proxy.refuse()
        proxy.reset()
        during = {user: [chat(server, user) for _ in range(3)] for user in ("drop-closed", "drop-open")}
        assert {r.status_code for r in during["drop-closed"]} == {503}
        assert {r.status_code for r in during["drop-open"]} == {200}
        proxy.heal()
        deadline = time.monotonic() + 15
        while (reply := chat(server, "drop-closed")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert reply.status_code == 200
        served = sorted(r.headers["x-request-id"] for r in during["drop-open"])
        assert sorted(e["request_id"] for e in wait_for_events(server, "drop-open", len(served))) == served


def test_redis_out_of_memory_follows_the_fail_mode(
    policy: Path, start_gateway: Callable[..., CapgateServer]
) -> None:
    """Redis answers every script with OOM (maxmemory reached under noeviction): 503 for the
    fail-closed tier, served and spooled for the fail-open tier, replayed once memory is back."""
    with fresh_redis() as redis:
        server = start_gateway(redis_url=redis.url, policy=policy, settings={"reap_interval_s": 0.5})
        admin = redis.client()
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        closed, opened = chat(server, "oom-closed"), chat(server, "oom-open")
        assert closed.status_code == 503 and closed.json()["error"]["code"] == "meter_unavailable"
        assert opened.status_code == 200, opened.text
        assert admin.xlen("cg:{u:oom-open}:ledger") == 0
        admin.config_set("maxmemory", 0)
        [event] = wait_for_events(server, "oom-open", 1)
        assert event["request_id"] == opened.headers["x-request-id"]
        assert int(event["completion_tokens"]) == opened.json()["usage"]["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream-still-queued"])
def test_a_request_outliving_its_lease_ttl_is_refreshed_not_reaped(
    stream: bool, policy: Path, vllm_server: VllmServer, start_gateway: Callable[..., CapgateServer]
) -> None:
    """A request whose answer takes longer than `lease_ttl_s` (here: the link to vLLM holds every
    byte 3 s; a unary answer or a stream still waiting for its first chunk) keeps its reservation:
    no reap, one ledger row, billed what vLLM reported."""
    user = "slow-stream" if stream else "slow-unary"
    upstream = urlsplit(vllm_server.base_url)
    with FaultProxy("127.0.0.1", upstream.port or 80) as link:
        server = start_gateway(
            upstreams=[f"http://{link.url}"],
            policy=policy,
            settings={"lease_ttl_s": 1.5, "reap_interval_s": 0.25},
        )
        link.delay(3.0)
        client = openai_client(server.base_url, key_of(user))
        messages = [{"role": "user", "content": "a slow answer"}]
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model="tiny",
                    messages=messages,
                    max_tokens=12,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            completion = chunks[-1].usage.completion_tokens
        else:
            completion = client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=12
            ).usage.completion_tokens
        link.heal()
        wait_for_events(server, user, 1)
        time.sleep(1.0)
        events = ledger(server, user)
        assert len(events) == 1, events
        assert events[0]["finish_reason"] != "expired" and int(events[0]["completion_tokens"]) == completion


def test_vllm_link_reset_mid_stream_bills_what_was_generated_once(
    policy: Path, vllm_server: VllmServer, start_gateway: Callable[..., CapgateServer]
) -> None:
    """The connection to vLLM is reset while a stream runs (vLLM gone, as capgate sees it): the
    client gets an error event and `[DONE]`, the ledger one `upstream_error` row with what vLLM
    reported, and the request was not sent again (vLLM processed its prompt once)."""
    upstream = urlsplit(vllm_server.base_url)
    with (
        RelayProxy(vllm_server.base_url, bytes_per_s=4000) as slow,
        FaultProxy("127.0.0.1", urlsplit(slow.base_url).port or 80) as link,
    ):
        del upstream
        server = start_gateway(upstreams=[f"http://{link.url}"], policy=policy)
        vllm_server.wait_quiet()
        before = generated(vllm_server)
        lines: list[str] = []

        def stream() -> None:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 400,
                    "min_tokens": 400, "stream": True}  # fmt: skip
            with httpx.stream(
                "POST", f"{server.base_url}/v1/chat/completions", json=body,
                headers={"authorization": f"Bearer {key_of('reset')}"}, timeout=60,
            ) as reply:  # fmt: skip
                lines.extend(line for line in reply.iter_lines() if line)

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(2.0)
        link.reset()
        reader.join(60)
        assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2]
        [event] = wait_for_events(server, "reset", 1)
        assert event["finish_reason"] == "upstream_error"
        vllm_server.wait_quiet()
        after = generated(vllm_server)
        assert after[1] - before[1] == int(event["prompt_tokens"]), "the prompt was processed twice"
        assert 0 < int(event["completion_tokens"]) <= after[0] - before[0]


def test_vllm_half_closing_mid_stream_is_an_upstream_error_settled_once(
    policy: Path, vllm_server: VllmServer, start_gateway: Callable[..., CapgateServer]
) -> None:
    """vLLM's side of the link ends (FIN) in the middle of a chunked stream: the client gets an
    error event and `[DONE]`, the ledger one `upstream_error` row with what was seen."""
    with (
        RelayProxy(vllm_server.base_url, bytes_per_s=4000) as slow,
        FaultProxy("127.0.0.1", urlsplit(slow.base_url).port or 80) as link,
    ):
        server = start_gateway(upstreams=[f"http://{link.url}"], policy=policy)
        client = openai_client(server.base_url, key_of("half"))
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "go"}],
            max_tokens=400,
            extra_body={"min_tokens": 400},
            stream=True,
            stream_options={"include_usage": True},
        )
        first = next(iter(stream))
        link.half_close()
        with pytest.raises(Exception, match="upstream"):
            for _ in stream:
                pass
        [event] = wait_for_events(server, "half", 1)
        assert event["finish_reason"] == "upstream_error"
        assert int(event["completion_tokens"]) >= (first.usage.completion_tokens if first.usage else 0)


def test_vllm_blackholed_mid_stream_times_out_and_settles_once(
    policy: Path, vllm_server: VllmServer, start_gateway: Callable[..., CapgateServer]
) -> None:
    """vLLM's link goes silent mid-stream: after the read timeout the client gets an error event
    and `[DONE]`, and the ledger one `upstream_timeout` row."""
    with (
        RelayProxy(vllm_server.base_url, bytes_per_s=4000) as slow,
        FaultProxy("127.0.0.1", urlsplit(slow.base_url).port or 80) as link,
    ):
        server = start_gateway(
            upstreams=[f"http://{link.url}"], policy=policy, settings={"timeouts": {"read_s": 2.0}}
        )
        client = openai_client(server.base_url, key_of("stall"))
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "go"}],
            max_tokens=400,
            extra_body={"min_tokens": 400},
            stream=True,
        )
        next(iter(stream))
        link.blackhole()
        with pytest.raises(Exception, match="upstream"):
            for _ in stream:
                pass
        [event] = wait_for_events(server, "stall", 1)
        assert event["finish_reason"] == "upstream_timeout"


def test_a_replica_sigkilled_mid_stream_is_reaped_once_by_another(
    tmp_path: Path,
    policy: Path,
    vllm_server: VllmServer,
    redis_server: RedisServer,
    start_gateway: Callable[..., CapgateServer],
) -> None:
    """Replica A is SIGKILLed while it streams; replica B's reaper returns A's reservation after
    the lease TTL, charging what A last recorded: one ledger row (`expired`), nothing held, and
    no more billed than vLLM generated (docs/metering.md's bound: what A saw after its last refresh)."""
    with RelayProxy(vllm_server.base_url, bytes_per_s=3000) as slow:
        settings = {"lease_ttl_s": 3.0, "reap_interval_s": 0.5}
        a = start_gateway(upstreams=[slow.base_url], policy=policy, settings=settings)
        b = start_gateway(policy=policy, settings=settings)
        vllm_server.wait_quiet()
        before = generated(vllm_server)
        client = openai_client(a.base_url, key_of("killed"))
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "go"}],
            max_tokens=300,
            extra_body={"min_tokens": 300},
            stream=True,
        )
        next(iter(stream))
        time.sleep(1.5)  # past one refresh (every lease_ttl_s / 3)
        a.process.kill()
        [event] = wait_for_events(b, "killed", 1, timeout=20)
        assert event["finish_reason"] == "expired"
        redis = redis_server.client()
        assert redis.zcard("cg:{u:killed}:live") == 0
        vllm_server.wait_quiet()
        after = generated(vllm_server)
        assert int(event["completion_tokens"]) <= after[0] - before[0]
        committed = sum(int(v) for v in redis.hgetall("cg:{u:killed}:w:day").values())
        assert committed == int(event["prompt_tokens"]) + int(event["completion_tokens"])


@pytest.mark.slow
def test_vllm_killed_mid_stream_and_restarted(
    tmp_path: Path, policy: Path, start_gateway: Callable[..., CapgateServer]
) -> None:
    """A real vLLM (its own, not the session's) SIGKILLed while it streams: the client gets an
    error event and `[DONE]`, the ledger one `upstream_error` row billing at least what the client
    was shown; once vLLM is started again capgate serves through it, and the killed request was
    not sent to the new vLLM (its prompt counter holds only the new request's prompt)."""
    vllm = VllmServer(log_path=tmp_path / "vllm.log")
    with vllm:
        server = start_gateway(
            upstreams=[vllm.base_url], policy=policy, settings={"admission": {"interval_s": 0.2}}
        )
        client = openai_client(server.base_url, key_of("vllm-killed"))
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "go"}],
            max_tokens=3000,
            extra_body={"min_tokens": 3000},
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
        shown, killed_at, error = 0, None, None
        try:
            for chunk in stream:
                shown = chunk.usage.completion_tokens if chunk.usage else shown
                if shown >= 20 and killed_at is None:
                    vllm.kill()
                    killed_at = shown
        except openai.APIError as exc:
            error = exc
        assert killed_at is not None, f"the stream ended after {shown} tokens, before vLLM was killed"
        assert error is not None and "upstream" in error.message, (
            f"no upstream error: {error!r} after {shown} tokens, vLLM killed at {killed_at}, "
            f"its port {'free' if port_is_free(vllm.port) else 'still taken'}"
        )
        [event] = wait_for_events(server, "vllm-killed", 1)
        assert event["finish_reason"] == "upstream_error" and int(event["completion_tokens"]) >= shown >= 20
        vllm.start()
        deadline = time.monotonic() + 30
        while (reply := chat(server, "vllm-killed", max_tokens=4)).status_code != 200:
            assert time.monotonic() < deadline, reply.text
            time.sleep(0.3)
        assert generated(vllm)[1] == reply.json()["usage"]["prompt_tokens"], "a request was sent again"
