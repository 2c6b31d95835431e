"""The SSE relay's byte surgery on vLLM chunks (pure)."""

import json

from proxy.generation import UsageMode
from proxy.relay import StreamTally, cut_events, split_usage

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
