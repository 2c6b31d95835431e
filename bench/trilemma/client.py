"""One streamed chat completion as its client sees it: when tokens arrived and how it ended.

Tokens are counted from the cumulative `usage` vLLM puts on every chunk (the client asks for
`continuous_usage_stats`), never from text.

A request can ask the model to stop by itself after a given number of tokens, as a real model
stops at its end of text well before `max_tokens`: vLLM's own sampling parameters `min_tokens`
and `stop_token_ids` (every token id of the tiny test model but 16) forbid stopping before
`min_tokens` and make the next token a stop token, so the stream ends with `finish_reason`
"stop" after exactly `min_tokens + 1` tokens.
"""

import json
import re
import time
from dataclasses import dataclass, field

import httpx

MODEL = "tiny"
CHAT_PATH = "/v1/chat/completions"
VOCABULARY = 512  # the tiny test model's (deploy/tiny_model.py)
STOP_TOKEN_IDS = list(range(16, VOCABULARY))
_COMPLETION = re.compile(rb'"completion_tokens":(\d+)')
_FINISH = re.compile(rb'"finish_reason":"(\w+)"')
_DONE = b"data: [DONE]"


def chat_body(prompt: str, max_tokens: int, stop_after: int | None = None) -> dict:
    """A streamed chat request asking for cumulative usage on every chunk; with `stop_after`
    (below `max_tokens`) the model stops by itself after that many tokens."""
    body: dict = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if stop_after is not None and stop_after < max_tokens:
        body["min_tokens"] = stop_after - 1
        body["stop_token_ids"] = STOP_TOKEN_IDS
    return body


@dataclass
class StreamResult:
    """What one stream showed its client. Times are `time.perf_counter()` seconds.

    `gaps` are the times between successive events that brought new tokens; `error` is the error
    code of a refusal (non-200 reply) or of an error event inside the stream.
    """

    status: int
    started: float
    request_id: str | None = None
    ended: float = 0.0
    first_token_at: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    done: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def mean_gap(self) -> float | None:
        """Seconds per token after the first (bursts of several tokens in one read included)."""
        return sum(self.gaps) / (self.tokens - 1) if self.gaps and self.tokens > 1 else None

    @property
    def duration(self) -> float:
        return self.ended - self.started

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.done


def _error_code(payload: bytes) -> str:
    try:
        error = json.loads(payload).get("error") or {}
    except (ValueError, AttributeError):
        return "unparsable"
    return str(error.get("code") or error.get("type") or "error")


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    *,
    key: str | None = None,
    seen: dict[str, int] | None = None,
) -> StreamResult:
    """POST `body` to `url` and read the whole stream.

    `seen`, if given, is kept up to date with the tokens received so far under the gateway's
    `x-request-id`, so that a sampler can compare what a request holds with what it received.
    """
    headers = {"authorization": f"Bearer {key}"} if key else {}
    result = StreamResult(status=0, started=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            result.status = response.status_code
            result.request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                result.error = _error_code(await response.aread())
                return result
            await _read(response, result, seen)
    except httpx.HTTPError as exc:
        result.error = type(exc).__name__
    finally:
        result.ended = time.perf_counter()
    return result


async def _read(response: httpx.Response, result: StreamResult, seen: dict[str, int] | None) -> None:
    buffer = b""
    last = 0.0
    async for data in response.aiter_raw():
        buffer += data
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if event == _DONE:
                result.done = True
                continue
            if event.startswith(b'data: {"error"'):
                result.error = _error_code(event[6:])
                continue
            found = _COMPLETION.search(event)
            if found is not None and int(found[1]) > result.tokens:
                now = time.perf_counter()
                if result.first_token_at is None:
                    result.first_token_at = now
                else:
                    result.gaps.append(now - last)
                last = now
                result.tokens = int(found[1])
                if seen is not None and result.request_id:
                    seen[result.request_id] = result.tokens
            finish = _FINISH.search(event)
            if finish is not None:
                result.finish_reason = finish[1].decode()
