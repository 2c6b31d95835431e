"""Errors, with raw httpx: OpenAI-shaped, answered by capgate without touching vLLM where they
should be, vLLM's own passed through unchanged, and upstream failures mapped to 502/504."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from tests.harness import VllmServer, sample_sum
from tests.harness.capgate_server import CapgateServer
from tests.harness.processes import free_port
from tests.harness.vllm_server import MAX_MODEL_LEN

pytestmark = pytest.mark.integration

KEY = {"authorization": "Bearer cg-demo-pro"}


def post(
    server: CapgateServer, body: bytes | dict, headers: dict | None = None, path: str = "/v1/chat/completions"
) -> httpx.Response:
    headers = {**KEY, **(headers or {})}
    if isinstance(body, dict):
        return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)
    return httpx.post(server.base_url + path, content=body, headers=headers, timeout=60)


def assert_openai_error(reply: httpx.Response, status: int, code: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def requests_seen_by_vllm(vllm: VllmServer) -> float:
    return sample_sum(vllm.metrics(), "vllm:request_success_total") + sample_sum(
        vllm.metrics(), "vllm:num_requests_running"
    )


@pytest.mark.parametrize(
    ("headers", "message"),
    [({"authorization": ""}, "missing API key"), ({"authorization": "Bearer cg-nope"}, "unknown API key")],
)
def test_missing_or_unknown_key_is_401(gateway: CapgateServer, headers: dict, message: str) -> None:
    reply = post(gateway, {"model": "tiny", "messages": []}, headers)
    error = assert_openai_error(reply, 401, "invalid_api_key")
    assert message in error["message"]
    assert "cg-nope" not in gateway.log_text()


def test_admin_key_cannot_generate(gateway: CapgateServer) -> None:
    reply = post(
        gateway,
        {"model": "tiny", "prompt": "x"},
        {"authorization": "Bearer cg-demo-admin"},
        "/v1/completions",
    )
    assert_openai_error(reply, 401)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "missing_model"),
        (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found"),
        (b'{"model": "tiny", "messages": [], "max_tokens": "ten"}', 400, "invalid_value"),
    ],
    ids=["malformed", "not-an-object", "missing-model", "unknown-model", "bad-max-tokens"],
)
def test_bad_requests_never_reach_vllm(
    gateway: CapgateServer, vllm_server: VllmServer, body: bytes, status: int, code: str
) -> None:
    before = requests_seen_by_vllm(vllm_server)
    assert_openai_error(post(gateway, body, {"content-type": "application/json"}), status, code)
    assert requests_seen_by_vllm(vllm_server) == before


def test_body_over_the_limit_is_413(gateway: CapgateServer, vllm_server: VllmServer) -> None:
    before = requests_seen_by_vllm(vllm_server)
    huge = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    assert_openai_error(post(gateway, huge), 413, "request_too_large")
    assert requests_seen_by_vllm(vllm_server) == before


def test_vllm_errors_pass_through_unchanged(gateway: CapgateServer, vllm_server: VllmServer) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": MAX_MODEL_LEN + 1}
    ours = post(gateway, body)
    theirs = httpx.post(f"{vllm_server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert ours.status_code == theirs.status_code == 400
    assert ours.json() == theirs.json()


def test_unreachable_vllm_is_502(start_gateway: Callable[..., CapgateServer]) -> None:
    server = start_gateway(upstreams=[f"http://127.0.0.1:{free_port()}"], wait_ready=False)
    reply = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert_openai_error(reply, 502, "upstream_unreachable")
    ready = httpx.get(f"{server.base_url}/readyz", timeout=10)
    assert ready.status_code == 503 and "unreachable" in " ".join(ready.json()["reasons"])


def test_upstream_timeout_is_504(
    start_gateway: Callable[..., CapgateServer], vllm_server: VllmServer
) -> None:
    """vLLM frozen (SIGSTOP) while a request waits: capgate gives up after its read timeout."""
    server = start_gateway(settings={"timeouts": {"read_s": 1.0}})
    assert vllm_server.pid is not None
    os.killpg(vllm_server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        reply = post(
            server, {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
        )
        waited = time.monotonic() - started
    finally:
        os.killpg(vllm_server.pid, signal.SIGCONT)
    assert_openai_error(reply, 504, "upstream_timeout")
    assert waited < 30


def test_client_hang_up_aborts_the_vllm_request(gateway: CapgateServer, vllm_server: VllmServer) -> None:
    vllm_server.wait_quiet()
    body = {"model": "tiny", "prompt": "a long story", "max_tokens": 7000, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{gateway.base_url}/v1/completions", json=body, headers=KEY, timeout=60
    ) as reply:
        chunks = reply.iter_raw()
        for _ in range(5):
            next(chunks)
        # vLLM's gauges are set once per engine step: wait until they show the stream.
        running = time.monotonic()
        while sample_sum(vllm_server.metrics(), "vllm:num_requests_running") != 1:
            assert time.monotonic() - running < 10.0, "vLLM does not show the stream as running"
            time.sleep(0.05)
    hung_up = time.monotonic()
    while sample_sum(vllm_server.metrics(), "vllm:num_requests_running") > 0:
        assert time.monotonic() - hung_up < 2.0, "vLLM still runs the request 2 s after the hang-up"
        time.sleep(0.05)
