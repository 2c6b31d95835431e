"""Failures of capgate's own code paths that a real vLLM cannot be made to trigger, through a
scripted upstream: an error while relaying is logged with the request id and recorded as what it
was (never `ok`), and a poller fed garbage goes on polling."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest

from tests.harness.capgate_server import CapgateServer
from tests.harness.ledger import wait_for_events
from tests.harness.policies import key_of, write_policy
from tests.harness.scripted_upstream import ScriptedUpstream

pytestmark = pytest.mark.integration

CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "tiny"}


def event(usage: str) -> bytes:
    """A chat chunk of one token carrying `usage` as given (raw JSON text, possibly broken)."""
    head = json.dumps({**CHUNK, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]})
    return (head[:-1] + ',"usage":' + usage + "}").encode()


def test_an_error_while_relaying_is_logged_and_recorded(
    tmp_path, start_gateway: Callable[..., CapgateServer]
) -> None:  # type: ignore[no-untyped-def]
    policy = write_policy(tmp_path / "policy.yaml", {"t": {}}, {"relay": "t"})
    good = '{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}'
    broken = '{"prompt_tokens":3,"completion_tokens":'  # a usage object cut off
    with ScriptedUpstream([event(good), event(broken), b"[DONE]"]) as upstream:
        server = start_gateway(upstreams=[upstream.base_url], policy=policy)
        with httpx.stream(
            "POST",
            f"{server.base_url}/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": True},
            headers={"authorization": f"Bearer {key_of('relay')}"},
            timeout=30,
        ) as reply:
            request_id = reply.headers["x-request-id"]
            lines = [line for line in reply.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and '"server_error"' in lines[-2]
        [row] = wait_for_events(server, "relay", 1)
        assert row["request_id"] == request_id and row["finish_reason"] == "relay_error"
        assert int(row["completion_tokens"]) == 1
        log = server.log_text()
        assert f"request {request_id}: relay failed" in log
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert 'outcome="relay_error"' in metrics


def test_the_upstream_poller_survives_garbage_and_keeps_polling(
    tmp_path, start_gateway: Callable[..., CapgateServer]
) -> None:  # type: ignore[no-untyped-def]
    """`/v1/models` answering a list of strings made the poll loop die silently, leaving the
    upstream's last state in force for good. Now the step's error is counted and the loop goes on:
    the upstream is marked unhealthy while it answers garbage and healthy again once it doesn't."""
    policy = write_policy(tmp_path / "policy.yaml", {"t": {}}, {"poll": "t"})
    with ScriptedUpstream([b"[DONE]"]) as upstream:
        server = start_gateway(
            upstreams=[upstream.base_url], policy=policy, settings={"admission": {"interval_s": 0.1}}
        )
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        headers = {"authorization": f"Bearer {key_of('poll')}"}
        upstream.models = json.dumps({"data": ["tiny"]}).encode()
        time.sleep(1.0)
        refused = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=headers, timeout=10)
        assert refused.status_code == 502
        assert (
            'capgate_background_errors_total{loop="upstream_poll"}'
            in httpx.get(f"{server.base_url}/metrics").text
        )
        upstream.models = json.dumps({"data": [{"id": "tiny", "max_model_len": 1024}]}).encode()
        time.sleep(1.0)
        assert "tiny" in httpx.get(f"{server.base_url}/v1/models", headers=headers, timeout=10).text
