"""The Responses API's pure parts: request validation, the prompt bound, the body vLLM gets, the
output bound of a stored response, and what a relayed event stream records."""

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.meter import MeterUnavailable, StoredResponse
from metering.prompt import TemplateOverhead, responses_prompt_bound
from policies.index import Principal
from policies.schema import Tier
from proxy.errors import APIError
from proxy.generation import MAX_INT
from proxy.relay import StreamTally
from proxy.responses.protocol import parse_request
from proxy.responses.serving import note_event, output_bound, owned, upstream_body
from proxy.typed_events import relay_typed, split_event

GOOD = {"model": "tiny", "input": "hi"}


def raw(**changes: object) -> bytes:
    body = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def test_a_valid_request_is_typed() -> None:
    request = parse_request(raw(stream=True, max_output_tokens=30, previous_response_id="resp_abc-1"))
    assert (request.api, request.stream, request.limit, request.limit_fields) == (
        "responses",
        True,
        30,
        ("max_output_tokens",),
    )
    assert request.previous_response_id == "resp_abc-1" and request.media is None
    assert parse_request(raw()).limit is None and parse_request(raw()).limit_fields == ()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (raw(model=...), "model"),
        (raw(input=...), "input"),
        (raw(input=[]), "input"),
        (raw(input=5), "input"),
        (raw(input=["text"]), "input[0]"),
        (raw(instructions=7), "instructions"),
        (raw(max_output_tokens=0), "max_output_tokens"),
        (raw(max_output_tokens=-100000), "max_output_tokens"),
        (raw(max_output_tokens=MAX_INT + 1), "max_output_tokens"),
        (raw(max_output_tokens="5"), "max_output_tokens"),
        (raw(max_output_tokens=True), "max_output_tokens"),
        (raw(stream="yes"), "stream"),
        (raw(background=True), "background"),
        (raw(background="no"), "background"),
        (raw(store="no"), "store"),
        (raw(prompt={"id": "pmpt_1"}), "prompt"),
        (raw(request_id="resp_someone-elses"), "request_id"),
        (raw(previous_response_id="resp_"), "previous_response_id"),
        (raw(previous_response_id="resp_a/../b"), "previous_response_id"),
        (raw(previous_response_id="resp_" + "a" * 129), "previous_response_id"),
        (raw(previous_response_id=12), "previous_response_id"),
    ],
)
def test_a_hostile_value_is_a_400_naming_its_parameter(body: bytes, param: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_request(body)
    assert caught.value.status == 400 and caught.value.param == param


def test_content_that_is_not_text_is_named() -> None:
    image = {"type": "input_image", "image_url": "http://x/y.png"}
    words = {"type": "input_text", "text": "look"}
    items = [{"role": "user", "content": "plain"}, {"role": "user", "content": [words, image]}]
    assert parse_request(raw(input=items)).media == "input[1].content[1]"
    assert parse_request(raw(input=[{"role": "user", "content": [words]}])).media is None


def test_the_body_names_the_response_and_lowers_the_limit_to_the_allowance() -> None:
    request = parse_request(raw(max_output_tokens=500, request_id=None))
    body = upstream_body(request, priority=3, allowance=120, context=8192, response_id="resp_x")
    assert (body["max_output_tokens"], body["priority"], body["request_id"]) == (120, 3, "resp_x")
    assert (
        upstream_body(request, priority=0, allowance=900, context=8192, response_id="r")["max_output_tokens"]
        == 500
    )
    unlimited = parse_request(raw())
    assert (
        upstream_body(unlimited, priority=0, allowance=77, context=8192, response_id="r")["max_output_tokens"]
        == 77
    )
    assert "max_output_tokens" not in upstream_body(
        unlimited, priority=0, allowance=None, context=8192, response_id="r"
    )


OVERHEAD = TemplateOverhead(fixed=10, per_message=4)
texts = st.text(st.characters(codec="utf-8"), max_size=40)
items = st.lists(
    st.one_of(
        st.builds(lambda t: {"role": "user", "content": t}, texts),
        st.builds(lambda t: {"role": "user", "content": [{"type": "input_text", "text": t}]}, texts),
        st.builds(lambda t: {"type": "function_call_output", "call_id": "c", "output": t}, texts),
    ),
    min_size=1,
    max_size=5,
)


@given(st.one_of(texts, items), st.one_of(st.none(), texts))
def test_the_prompt_bound_covers_every_serialisation_of_the_request(
    given_input: object, instructions: str | None
) -> None:
    body = {"input": given_input, "instructions": instructions}
    sent = {k: v for k, v in body.items() if v is not None}
    count = (len(given_input) if isinstance(given_input, list) else 1) + 1
    bound = responses_prompt_bound(body, OVERHEAD)
    for ascii_only in (True, False):
        for separators in ((",", ":"), (", ", ": ")):
            serialised = json.dumps(sent, ensure_ascii=ascii_only, separators=separators)
            assert bound >= OVERHEAD.fixed + OVERHEAD.per_message * count + len(serialised.encode())


def test_the_output_bound_is_the_larger_of_the_tokens_and_the_output_bytes() -> None:
    output = [{"type": "message", "content": [{"type": "output_text", "text": "banana"}]}]
    assert output_bound({"usage": {"output_tokens": 3}, "output": output}) == len(orjson.dumps(output))
    assert output_bound({"usage": {"output_tokens": 9000}, "output": output}) == 9000
    assert output_bound({"usage": {"output_tokens": 0}}) == 2


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}".encode()


CREATED = event(
    "response.created", {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}
)
DELTA = event("response.output_text.delta", {"type": "response.output_text.delta", "delta": "a"})
FINAL = {
    "id": "resp_1",
    "status": "incomplete",
    "incomplete_details": {"reason": "max_output_tokens"},
    "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 5},
    "output": [],
}
DONE = event("response.incomplete", {"type": "response.incomplete", "response": FINAL})


def test_events_record_the_deltas_and_the_exact_end() -> None:
    tally = StreamTally(0.0)
    assert note(tally, CREATED) is None
    for _ in range(3):
        assert note(tally, DELTA) is None
    assert (tally.prompt_tokens, tally.completion_tokens, tally.open_choices) == (0, 3, {0})
    assert note(tally, DONE) == FINAL
    assert (tally.prompt_tokens, tally.cached_tokens, tally.completion_tokens) == (12, 4, 5)
    assert tally.finish_reason == "max_output_tokens" and tally.open_choices == set()


def note(tally: StreamTally, event: bytes) -> dict | None:
    return note_event(tally, *split_event(event))


def upstream(chunks: list[bytes]) -> httpx.Response:
    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

    return httpx.Response(200, stream=Chunks())


def test_the_owner_is_written_before_the_last_event_goes_out() -> None:
    whole = b"\n\n".join([CREATED, DELTA, DELTA, DONE]) + b"\n\n"
    pieces = [whole[i : i + 11] for i in range(0, len(whole), 11)]
    tally = StreamTally(0.0)
    seen: list[tuple[dict, int]] = []
    out: list[bytes] = []

    async def on_end(response: dict) -> None:
        seen.append((response, len(b"".join(out))))

    async def run() -> None:
        async for chunk in relay_typed(upstream(pieces), tally, note_event, on_end):
            out.append(chunk)

    asyncio.run(run())
    assert b"".join(out) == whole
    assert len(seen) == 1 and seen[0][0] == FINAL and seen[0][1] < len(whole)


class Meters:
    """What `owned` reads of a `Meter`: one owner record, or Redis away."""

    def __init__(self, found: StoredResponse | None, down: bool = False) -> None:
        self.found, self.down = found, down

    async def response_owner(self, response_id: str) -> StoredResponse | None:
        if self.down:
            raise MeterUnavailable("connection refused")
        return self.found


def test_a_stored_response_is_its_owners_a_404_for_others_and_a_503_without_redis() -> None:
    alice = Principal("alice", "pro", Tier())
    mallory = Principal("mallory", "pro", Tier())
    record = StoredResponse("alice", "http://127.0.0.1:9000", 10, 20)

    def status(meter: Meters, principal: Principal) -> int:
        try:
            asyncio.run(owned(meter, principal, "resp_1"))  # type: ignore[arg-type]
        except APIError as error:
            return error.status
        return 200

    assert status(Meters(record), alice) == 200
    assert status(Meters(record), mallory) == 404
    assert status(Meters(None), alice) == 404
    assert status(Meters(record, down=True), alice) == 503
