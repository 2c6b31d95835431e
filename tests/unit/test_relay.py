"""The SSE relay's byte surgery on vLLM chunks (pure)."""

import json

from hypothesis import given
from hypothesis import strategies as st

from proxy.generation import UsageMode
from proxy.relay import StreamTally, cut_events, split_usage, split_usage_decoding

CHUNK = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[{"index":0,'
    b'"delta":{"content":"a \\"usage\\": b"},"logprobs":null,"finish_reason":null,"token_ids":null}],'
    b'"usage":{"prompt_tokens":23,"total_tokens":25,"completion_tokens":2,"completion_tokens_details":null},'
    b'"prompt_token_ids":null}'
)


def test_split_usage_returns_usage_and_the_chunk_without_it() -> None:
    usage, rest = split_usage(CHUNK)
    assert usage == {
        "prompt_tokens": 23,
        "total_tokens": 25,
        "completion_tokens": 2,
        "completion_tokens_details": None,
    }
    expected = json.loads(CHUNK)
    del expected["usage"]
    assert json.loads(rest) == expected
    assert rest == json.dumps(expected, separators=(",", ":")).encode()


def test_split_usage_leaves_chunks_without_usage_alone() -> None:
    chunk = b'{"id":"x","choices":[{"delta":{"content":"\\"usage\\":{}"}}]}'
    assert split_usage(chunk) == (None, chunk)


def test_split_usage_reads_nested_details_and_null_usage() -> None:
    nested = b'{"choices":[],"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":4}},"x":{}}'
    assert split_usage(nested) == (
        {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 4}},
        b'{"choices":[],"x":{}}',
    )
    assert split_usage(b'{"choices":[],"usage":null}') == (None, b'{"choices":[]}')


_USAGE_VALUES = st.recursive(
    st.none() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


@given(
    usage=st.dictionaries(st.text(max_size=8), _USAGE_VALUES, max_size=5) | st.none(),
    after=st.dictionaries(st.text(max_size=6), _USAGE_VALUES, max_size=3),
)
def test_split_usage_agrees_with_decoding_the_whole_rest(usage: dict | None, after: dict) -> None:
    """Whatever the usage holds (strings with braces included), the byte-cut reading and the
    stdlib's full decoding give the same usage and the same rest."""
    chunk = {"id": "c", "choices": [{"delta": {"content": "{}"}}], "usage": usage, **after}
    payload = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()
    assert split_usage(payload) == split_usage_decoding(payload)


def test_cut_events_finish_open_choices_with_length_and_usage() -> None:
    tally = StreamTally(started=0.0, prompt_tokens=5, completion_tokens=9, outputs=2)
    tally.head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "tiny"}
    tally.open_choices = {1}
    text = cut_events(tally, UsageMode.FINAL, chat=True).decode()
    events = [line[6:] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    finish, usage = json.loads(events[0]), json.loads(events[1])
    assert finish["choices"] == [{"index": 1, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 14
    assert len(events) == 3


def test_cut_events_without_usage_when_not_asked() -> None:
    tally = StreamTally(started=0.0, outputs=1)
    text = cut_events(tally, UsageMode.NONE, chat=False).decode()
    assert '"usage"' not in text and '"text":""' in text and text.endswith("data: [DONE]\n\n")
