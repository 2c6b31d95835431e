"""The Anthropic Messages API's pure parts: request validation, the error shape, the prompt
bound, the body vLLM gets, and what a relayed event stream records."""

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request

from metering.prompt import TemplateOverhead, messages_prompt_bound
from proxy.anthropic.api_router import DIALECT
from proxy.anthropic.protocol import error_body, parse_count_request, parse_request
from proxy.anthropic.serving import note_event, upstream_body
from proxy.errors import APIError
from proxy.generation import MAX_DEPTH, MAX_INT
from proxy.relay import StreamTally
from proxy.typed_events import relay_typed, split_event

GOOD = {"model": "tiny", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def raw(**changes: object) -> bytes:
    body = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def test_a_valid_request_is_typed() -> None:
    request = parse_request(raw(stream=True, system="be brief"))
    assert (request.api, request.model, request.stream, request.limit, request.outputs) == (
        "messages",
        "tiny",
        True,
        10,
        1,
    )
    assert request.chat and request.media is None and request.limit_fields == ("max_tokens",)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (raw(max_tokens=...), "max_tokens"),
        (raw(max_tokens=0), "max_tokens"),
        (raw(max_tokens=-100000), "max_tokens"),
        (raw(max_tokens=MAX_INT + 1), "max_tokens"),
        (raw(max_tokens=True), "max_tokens"),
        (raw(max_tokens="10"), "max_tokens"),
        (raw(max_tokens=1.5), "max_tokens"),
        (raw(model=...), "model"),
        (raw(model=""), "model"),
        (raw(model=7), "model"),
        (raw(messages=[]), "messages"),
        (raw(messages="hi"), "messages"),
        (raw(messages=[{"content": "hi"}]), "messages[0]"),
        (raw(messages=[{"role": "user"}]), "messages[0].content"),
        (raw(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (raw(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages[0].content[0]"),
        (raw(system=5), "system"),
        (raw(stream="yes"), "stream"),
        (raw(metadata=json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))), "metadata"),
    ],
)
def test_a_hostile_value_is_a_400_naming_its_parameter(body: bytes, param: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_request(body)
    assert caught.value.status == 400 and caught.value.param == param
    assert param in error_body(caught.value)["error"]["message"]


@pytest.mark.parametrize("body", [b"", b"[1]", b'{"model": "tiny",', b'{"a": NaN}', b'"\\ud800"'])
def test_a_body_that_is_not_a_json_object_is_a_400(body: bytes) -> None:
    with pytest.raises(APIError) as caught:
        parse_request(body)
    assert caught.value.status == 400


def test_content_that_is_not_text_is_named() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}
    text = {"type": "text", "text": "look"}
    assert parse_request(raw(messages=[{"role": "user", "content": [text, image]}])).media == (
        "messages[0].content[1]"
    )
    result = {"type": "tool_result", "tool_use_id": "t", "content": [text, image]}
    assert parse_request(raw(messages=[{"role": "user", "content": [result]}])).media == (
        "messages[0].content[0].content[1]"
    )
    assert parse_request(raw(system=[image])).media == "system[0]"
    assert parse_request(raw(messages=[{"role": "user", "content": [text]}])).media is None


def test_count_tokens_needs_no_max_tokens_but_a_model() -> None:
    assert parse_count_request(orjson.dumps({"model": "tiny", "messages": GOOD["messages"]})) == "tiny"
    with pytest.raises(APIError) as caught:
        parse_count_request(orjson.dumps({"messages": GOOD["messages"]}))
    assert caught.value.param == "model"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
    ],
)
def test_errors_take_anthropics_type_for_their_status(status: int, kind: str) -> None:
    assert error_body(APIError(status, "no")) == {"type": "error", "error": {"type": kind, "message": "no"}}


def test_the_error_response_keeps_its_headers() -> None:
    response = DIALECT.render(APIError(429, "cap", headers={"Retry-After": "7"}))
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert orjson.loads(response.body)["error"]["type"] == "rate_limit_error"


def request_with(headers: dict[str, str]) -> Request:
    scope = {"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope)


def test_the_key_comes_from_x_api_key_or_the_bearer_header() -> None:
    assert DIALECT.key(request_with({"x-api-key": "sk-a"})) == "sk-a"
    assert DIALECT.key(request_with({"authorization": "Bearer sk-b"})) == "sk-b"
    assert DIALECT.key(request_with({"x-api-key": "sk-a", "authorization": "Bearer sk-b"})) == "sk-a"
    for headers in ({}, {"x-api-key": "k" * 600}, {"authorization": "Basic abc"}):
        with pytest.raises(APIError) as caught:
            DIALECT.key(request_with(headers))
        assert caught.value.status == 401


def test_max_tokens_is_lowered_to_the_allowance_only() -> None:
    request = parse_request(raw(max_tokens=500))
    assert upstream_body(request, allowance=120, context=8192)["max_tokens"] == 120
    assert upstream_body(request, allowance=900, context=8192)["max_tokens"] == 500
    assert upstream_body(request, allowance=None, context=8192)["max_tokens"] == 500
    assert (
        upstream_body(parse_request(raw(max_tokens=9000)), allowance=120, context=8192)["max_tokens"] == 9000
    )


OVERHEAD = TemplateOverhead(fixed=10, per_message=4)
texts = st.text(st.characters(codec="utf-8"), max_size=40)
blocks = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.builds(
        lambda t, i: {"type": "tool_use", "id": "t1", "name": t or "f", "input": {"q": i}}, texts, texts
    ),
    st.builds(lambda t: {"type": "tool_result", "tool_use_id": "t1", "content": t}, texts),
)
messages = st.lists(
    st.builds(
        lambda role, content: {"role": role, "content": content},
        st.sampled_from(["user", "assistant"]),
        st.one_of(texts, st.lists(blocks, max_size=4)),
    ),
    min_size=1,
    max_size=5,
)


@given(messages, st.one_of(st.none(), texts))
def test_the_prompt_bound_covers_every_serialisation_of_the_request(
    messages: list[dict], system: str | None
) -> None:
    """vLLM re-serialises tool inputs (`json.dumps`, default separators, ASCII or not) and adds a
    message for the system prompt and for each tool block: the bound is never below the UTF-8
    bytes of any of those plus the template's overhead per message."""
    body = {"messages": messages, "system": system}
    bound = messages_prompt_bound(body, OVERHEAD)
    sent = {k: v for k, v in body.items() if v is not None}
    own = sum(
        isinstance(b, dict) and b["type"] in ("tool_use", "tool_result")
        for m in messages
        if isinstance(m["content"], list)
        for b in m["content"]
    )
    overhead = OVERHEAD.fixed + OVERHEAD.per_message * (len(messages) + 1 + own)
    for ascii_only in (True, False):
        for separators in ((",", ":"), (", ", ": ")):
            text = json.dumps(sent, ensure_ascii=ascii_only, separators=separators)
            assert bound >= overhead + len(text.encode())


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}".encode()


START = event(
    "message_start",
    {
        "type": "message_start",
        "message": {"id": "m1", "usage": {"input_tokens": 10, "cache_read_input_tokens": 3}},
    },
)
DELTA = event(
    "content_block_delta",
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a"}},
)
END = event(
    "message_delta",
    {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens"},
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 3, "output_tokens": 5},
    },
)
STOP = event("message_stop", {"type": "message_stop"})


def test_events_record_the_prompt_the_deltas_and_the_exact_end() -> None:
    tally = StreamTally(0.0)
    for one in (START, DELTA, DELTA, DELTA):
        note(tally, one)
    assert (tally.prompt_tokens, tally.cached_tokens, tally.completion_tokens) == (13, 3, 3)
    assert tally.first_token_at is not None and tally.open_choices == {0}
    note(tally, END)
    note(tally, STOP)
    assert (tally.completion_tokens, tally.finish_reason, tally.open_choices) == (5, "max_tokens", set())
    note(tally, event("error", {"type": "error", "error": {"type": "internal_error", "message": "x"}}))
    assert tally.upstream_error


def note(tally: StreamTally, event: bytes) -> dict | None:
    return note_event(tally, *split_event(event))


def upstream(chunks: list[bytes]) -> httpx.Response:
    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

    return httpx.Response(200, stream=Chunks())


def test_the_relay_passes_vllms_bytes_unchanged_however_they_are_split() -> None:
    whole = b"\n\n".join([START, DELTA, DELTA, END, STOP]) + b"\n\n"
    pieces = [whole[i : i + 7] for i in range(0, len(whole), 7)]
    tally = StreamTally(0.0)

    async def run() -> bytes:
        return b"".join([chunk async for chunk in relay_typed(upstream(pieces), tally, note_event)])

    assert asyncio.run(run()) == whole
    assert (tally.completion_tokens, tally.prompt_tokens, tally.open_choices) == (5, 13, set())


def test_after_a_hang_up_the_relay_counts_what_vllm_already_sent_and_stops() -> None:
    chunks = [START + b"\n\n", DELTA + b"\n\n", DELTA + b"\n\n" + DELTA + b"\n\n", DELTA + b"\n\n"]
    tally = StreamTally(0.0)

    async def run() -> list[bytes]:
        out = []
        async for chunk in relay_typed(upstream(chunks), tally, note_event):
            out.append(chunk)
            tally.client_gone = True
        return out

    assert asyncio.run(run()) == [chunks[0]]
    assert tally.completion_tokens == 4 and tally.open_choices == {0}
