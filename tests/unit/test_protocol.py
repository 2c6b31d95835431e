"""The validated generation request: every hostile value is a 400 naming its parameter, every
valid one parses to the limits metering reads (property-based with hypothesis)."""

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import APIError
from proxy.generation import MAX_DEPTH, MAX_INT, MAX_N, UsageMode
from proxy.openai.protocol import parse_request

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> bytes:
    return json.dumps({"model": "tiny", "messages": MESSAGES, **fields}).encode()


def completion(**fields: object) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hi", **fields}).encode()


def refused(api: str, raw: bytes) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_request(api, raw)  # type: ignore[arg-type]
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [-100000, -1, 0, MAX_INT + 1, 10**30, 1.5, "10", True, [], {}])
def test_chat_limits_out_of_range_or_of_the_wrong_type_are_refused(name: str, value: object) -> None:
    assert refused("chat", chat(**{name: value})).param == name


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": MAX_N + 1}, "n"),
        ({"n": -3}, "n"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": MAX_N + 1}, "best_of"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": []}, "stream_options"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt[0]"),
        ({"prompt": [-1, 2]}, "prompt"),
        ({"prompt": [1, True]}, "prompt[0]"),
        ({"prompt": ["a", 3]}, "prompt[1]"),
        ({"prompt": {"text": "a"}}, "prompt"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_completion_fields_out_of_range_are_refused(fields: dict, param: str) -> None:
    assert refused("completions", completion(**fields)).param == param


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hi", "messages"),
        (None, "messages"),
        ([1], "messages[0]"),
        ([{"content": "x"}], "messages[0]"),
    ],
)
def test_chat_messages_must_be_a_list_of_messages(messages: object, param: str) -> None:
    raw = json.dumps({"model": "tiny", "messages": messages}).encode()
    assert refused("chat", raw).param == param


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff x"}]}',
        b'{"model": "tiny", "max_tokens": NaN}',
        b'{"model": "tiny", "max_tokens": 1e400}',
        b"\xff\xfe{}",
        b"[" * 50_000 + b"]" * 50_000,
        b'{"model": "tiny", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b"",
        b"null",
        b'"a string"',
    ],
    ids=["lone-high-surrogate", "lone-low-surrogate", "nan", "infinity", "not-utf8", "deep-array",
         "deep-messages", "empty", "null", "string"],
)  # fmt: skip
def test_malformed_bodies_are_400_not_500(raw: bytes) -> None:
    refused("chat", raw)


def test_nesting_beyond_the_limit_names_the_field() -> None:
    deep: object = "x"
    for _ in range(MAX_DEPTH):
        deep = [deep]
    raw = json.dumps({"model": "tiny", "messages": MESSAGES, "tools": deep}).encode()
    assert refused("chat", raw).param == "tools"
    shallow: object = "x"
    for _ in range(MAX_DEPTH - 2):
        shallow = [shallow]
    parse_request("chat", json.dumps({"model": "tiny", "messages": MESSAGES, "tools": shallow}).encode())


def test_model_is_required_and_a_string() -> None:
    for body in (
        {"messages": MESSAGES},
        {"model": 5, "messages": MESSAGES},
        {"model": "", "messages": MESSAGES},
    ):
        assert refused("chat", json.dumps(body).encode()).param == "model"


def test_limits_outputs_and_usage_mode_are_read_once() -> None:
    req = parse_request(
        "chat",
        chat(
            max_tokens=50, max_completion_tokens=20, n=3, stream=True, stream_options={"include_usage": True}
        ),
    )
    assert (req.limit, req.limit_fields, req.outputs, req.stream) == (
        20,
        ("max_completion_tokens", "max_tokens"),
        3,
        True,
    )
    assert req.usage is UsageMode.FINAL
    assert parse_request("chat", chat()).limit is None
    req = parse_request("completions", completion(prompt=["a", [1, 2], "c"], n=2, best_of=4))
    assert (req.limit, req.limit_fields, req.outputs) == (16, (), 12)
    assert parse_request("completions", completion(prompt=[1, 2, 3])).outputs == 1
    options = {"include_usage": True, "continuous_usage_stats": True}
    assert parse_request("chat", chat(stream_options=options)).usage is UsageMode.CONTINUOUS


def test_the_parsed_body_is_read_only() -> None:
    req = parse_request("chat", chat(max_tokens=5))
    with pytest.raises(TypeError):
        req.body["max_tokens"] = -5  # type: ignore[index]


def test_duplicate_keys_resolve_like_vllm_to_the_last() -> None:
    req = parse_request(
        "chat", b'{"model": "tiny", "messages": [{"role": "user"}], "max_tokens": 5, "max_tokens": 7}'
    )
    assert req.limit == 7 and req.body["max_tokens"] == 7  # capgate forwards its own serialisation


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "min_tokens", "n", "best_of",
          "stream", "stream_options", "priority", "logprobs"]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    api=st.sampled_from(["chat", "completions"]),
    body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), json_values, max_size=8),
)
def test_any_json_object_parses_or_is_a_400(api: str, body: dict) -> None:
    try:
        raw = orjson.dumps(body)
    except orjson.JSONEncodeError:
        return
    try:
        req = parse_request(api, raw)  # type: ignore[arg-type]
    except APIError as error:
        assert error.status == 400 and error.body()["error"]["message"]
        return
    assert 1 <= req.outputs <= MAX_N * 1024
    assert req.limit is None or 1 <= req.limit <= MAX_INT
    assert req.min_tokens is None or 0 <= req.min_tokens <= MAX_INT


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_parse_or_are_a_400(raw: bytes) -> None:
    try:
        parse_request("chat", raw)
    except APIError as error:
        assert error.status == 400


@pytest.mark.parametrize(
    ("content", "media"),
    [
        ("plain text", None),
        ([{"type": "text", "text": "a"}, {"type": "refusal", "refusal": "no"}], None),
        (
            [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
            "[1]",
        ),
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "[0]"),
        ([{"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}], "[0]"),
        (["not a part"], "[0]"),
    ],
)
def test_chat_content_parts_that_are_not_text_are_named(content: object, media: str | None) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
    request = parse_request("chat", chat(messages=messages))
    assert request.media == (None if media is None else f"messages[1].content{media}")
