"""End to end with the official openai SDK: what the client gets through capgate is what vLLM
itself gives (greedy decoding makes both deterministic), and usage equals vLLM's own."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai import OpenAI

from tests.harness import VllmServer
from tests.harness.capgate_server import CapgateServer
from tests.harness.clients import openai_client
from tests.harness.vllm_server import MAX_MODEL_LEN

pytestmark = pytest.mark.integration

KEY = "cg-demo-pro"
MESSAGES = [{"role": "user", "content": "Tell me about token caps."}]
PROMPT = "Pricing generative models"
USAGE_OPTIONS = [
    pytest.param(None, id="no-usage"),
    pytest.param({"include_usage": True}, id="final-usage"),
    pytest.param({"include_usage": True, "continuous_usage_stats": True}, id="continuous-usage"),
]


@pytest.fixture(scope="module")
def proxied(gateway: CapgateServer) -> OpenAI:
    return openai_client(gateway.base_url, KEY)


@pytest.fixture(scope="module")
def direct(vllm_server: VllmServer) -> OpenAI:
    return openai_client(vllm_server.base_url, "unused")


def test_models_lists_what_vllm_serves(proxied: OpenAI, direct: OpenAI) -> None:
    through, own = proxied.models.list(), direct.models.list()
    assert [m.id for m in through.data] == [m.id for m in own.data] == ["tiny", "tiny-b"]
    card = through.data[0].model_dump()
    assert card["max_model_len"] == MAX_MODEL_LEN

    # vLLM stamps `created` and a fresh permission id when it answers; the rest is passed on as it is.
    def stable(listed: dict) -> dict:
        return {key: value for key, value in listed.items() if key not in ("created", "permission")}

    assert stable(card) == stable(own.data[0].model_dump())


def test_a_route_capgate_does_not_serve_is_an_openai_error(proxied: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        proxied.post("/nowhere", cast_to=httpx.Response, body={"model": "tiny"})
    assert unknown.value.code == "unknown_url" and "POST /v1/nowhere" in unknown.value.message
    with pytest.raises(openai.APIStatusError) as wrong_method:
        proxied.get("/chat/completions", cast_to=httpx.Response)
    assert wrong_method.value.status_code == 405 and wrong_method.value.code == "method_not_allowed"
    assert wrong_method.value.response.headers["allow"] == "POST"


def test_models_needs_a_key(gateway: CapgateServer) -> None:
    assert httpx.get(f"{gateway.base_url}/v1/models").status_code == 401


def test_chat_unary_equals_direct(proxied: OpenAI, direct: OpenAI) -> None:
    args = {"model": "tiny", "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    ours, theirs = proxied.chat.completions.create(**args), direct.chat.completions.create(**args)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason == "length"
    assert ours.usage == theirs.usage
    assert ours.usage is not None and ours.usage.completion_tokens == 24


def test_completion_unary_equals_direct(proxied: OpenAI, direct: OpenAI) -> None:
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    ours, theirs = proxied.completions.create(**args), direct.completions.create(**args)
    assert ours.choices[0].text == theirs.choices[0].text
    assert ours.usage == theirs.usage


def _collect(stream) -> tuple[str, list, str | None]:  # type: ignore[no-untyped-def]
    text, usages, finish = "", [], None
    for chunk in stream:
        usages.append(chunk.usage)
        for choice in chunk.choices:
            piece = getattr(choice, "delta", None)
            text += (piece.content or "") if piece is not None else (choice.text or "")
            finish = choice.finish_reason or finish
    return text, usages, finish


def _assert_usage_as_asked(ours: list, theirs: list, options: dict | None) -> None:
    """Usage appears where the client's stream_options put it, and the totals are vLLM's.
    (vLLM may merge tokens into fewer chunks under load, so chunk counts are not compared.)"""
    if options is None:
        assert all(u is None for u in ours) and all(u is None for u in theirs)
        return
    assert ours[-1] is not None and ours[-1].model_dump() == theirs[-1].model_dump()
    if options.get("continuous_usage_stats"):
        assert all(u is not None for u in ours)
        counts = [u.completion_tokens for u in ours]
        assert counts == sorted(counts)
    else:
        assert all(u is None for u in ours[:-1])


@pytest.mark.parametrize("options", USAGE_OPTIONS)
def test_chat_stream_equals_direct(proxied: OpenAI, direct: OpenAI, options: dict | None) -> None:
    args = {"model": "tiny", "messages": MESSAGES, "max_tokens": 40, "temperature": 0, "stream": True}
    if options is not None:
        args["stream_options"] = options
    ours = _collect(proxied.chat.completions.create(**args))
    theirs = _collect(direct.chat.completions.create(**args))
    assert ours[0] == theirs[0] and ours[2] == theirs[2] == "length"
    _assert_usage_as_asked(ours[1], theirs[1], options)
    if options is not None:
        assert ours[1][-1].completion_tokens == 40


@pytest.mark.parametrize("options", USAGE_OPTIONS)
def test_completion_stream_equals_direct(proxied: OpenAI, direct: OpenAI, options: dict | None) -> None:
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stream": True}
    if options is not None:
        args["stream_options"] = options
    ours = _collect(proxied.completions.create(**args))
    theirs = _collect(direct.completions.create(**args))
    assert ours[0] == theirs[0] and ours[2] == theirs[2]
    _assert_usage_as_asked(ours[1], theirs[1], options)


def _events(base_url: str, key: str, body: dict) -> list[dict | str]:
    events: list[dict | str] = []
    headers = {"authorization": f"Bearer {key}"}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    for event in events:
        if isinstance(event, dict):
            event.pop("id", None)
            event.pop("created", None)
    return events


def _shape(events: list[dict | str]) -> tuple:
    """What must match between two streams of the same greedy request, whatever the chunking:
    the key layouts of the events, the text, the finish reason and the final usage event."""
    layouts = sorted({tuple(e) for e in events if isinstance(e, dict)})
    text = "".join(
        c.get("delta", {}).get("content") or "" for e in events if isinstance(e, dict) for c in e["choices"]
    )
    finals = [e for e in events if isinstance(e, dict) and not e["choices"]]
    finish = [
        c["finish_reason"] for e in events if isinstance(e, dict) for c in e["choices"] if c["finish_reason"]
    ]
    return layouts, text, finals, finish, events[-1]


@pytest.mark.parametrize("options", USAGE_OPTIONS)
def test_sse_events_are_vllms_own(
    gateway: CapgateServer, vllm_server: VllmServer, options: dict | None
) -> None:
    """The events are the ones vLLM sends for the client's own stream_options."""
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 16, "temperature": 0, "stream": True}
    if options is not None:
        body["stream_options"] = options
    ours = _shape(_events(gateway.base_url, KEY, body))
    theirs = _shape(_events(vllm_server.base_url, "unused", body))
    assert ours == theirs
    assert ours[-1] == "[DONE]"


def test_stream_first_byte_arrives_before_the_stream_ends(gateway: CapgateServer) -> None:
    """Chunks are relayed as vLLM produces them, not buffered until the end."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
    headers = {"authorization": f"Bearer {KEY}"}
    arrivals: list[int] = []
    with httpx.stream(
        "POST", f"{gateway.base_url}/v1/completions", json=body, headers=headers, timeout=60
    ) as r:
        for _ in r.iter_raw():
            arrivals.append(len(arrivals))
    assert len(arrivals) > 50, "the stream arrived in a few large pieces: it was buffered"


def test_request_id_is_returned(gateway: CapgateServer) -> None:
    reply = httpx.post(
        f"{gateway.base_url}/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 1},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] in reply.json()["id"]
