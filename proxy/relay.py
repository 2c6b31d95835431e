"""Relaying vLLM's server-sent events to the client, chunk by chunk, counting from vLLM's usage.

The gateway always asks vLLM for cumulative usage on every chunk
(`stream_options: {"include_usage": true, "continuous_usage_stats": true}`) and gives the
client exactly what vLLM would have sent for the client's own `stream_options`: the `usage`
member is cut out of chunks the client did not ask it on, and the final usage-only chunk is
dropped when the client did not ask for usage at all. Tokens are counted from `usage`, never
from chunks or text.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from time import monotonic

import httpx
import orjson

from metering.stream_budget import StreamBudget
from proxy.generation import UsageMode

_USAGE = b',"usage":'
_DONE = b"data: [DONE]"
_EMPTY_CHOICES = b'"choices":[]'
_FINISHED = b'"finish_reason":"'
_FINGERPRINT = b',"system_fingerprint":'
_decoder = json.JSONDecoder()
DRAIN_READ_S = 0.005
DRAIN_TOTAL_S = 1.0
# A preempted stream frees a slot a protected request waits for: what vLLM sends while it is
# drained is read for this long at most (vLLM keeps generating until the connection closes).
PREEMPT_DRAIN_S = 0.1


def split_usage(payload: bytes) -> tuple[dict | None, bytes]:
    """The top-level `usage` object of a JSON chunk, and the chunk without that member.

    vLLM serialises `usage` after `choices`, so the last `,"usage":` is the top-level one (a
    quote inside generated text is escaped and never matches). Usage holds numbers, nulls and
    objects of those, so its end is the brace that balances its first: only those bytes are
    parsed (by orjson). Were a string with a brace ever in it, that cut is not valid JSON, and
    the whole rest of the chunk is decoded instead (`python -m bench.gateway.relay_parse` compares the two).
    """
    start = payload.rfind(_USAGE)
    if start < 0:
        return None, payload
    begin = start + len(_USAGE)
    if payload.startswith(b"null", begin):
        return None, payload[:start] + payload[begin + 4 :]
    end = payload.find(b"}", begin) + 1
    while end and payload.count(b"{", begin, end) != payload.count(b"}", begin, end):
        end = payload.find(b"}", end) + 1
    if end:
        try:
            return orjson.loads(payload[begin:end]), payload[:start] + payload[end:]
        except orjson.JSONDecodeError:
            pass
    return split_usage_decoding(payload)


def split_usage_decoding(payload: bytes) -> tuple[dict | None, bytes]:
    """`split_usage` by decoding everything after `,"usage":` with the standard library (the
    fallback, and the baseline of `python -m bench.gateway.relay_parse`)."""
    start = payload.rfind(_USAGE)
    if start < 0:
        return None, payload
    tail = payload[start + len(_USAGE) :].decode()
    usage, end = _decoder.raw_decode(tail)
    return usage, payload[:start] + tail[end:].encode()


@dataclass
class StreamTally:
    """What a relayed stream has shown so far."""

    started: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    upstream_error: bool = False
    cut: bool = False
    preempt: bool = False  # asked: end the stream at the next chunk, to free its slot
    preempted: bool = False  # done: the stream was ended for a protected tier
    client_gone: bool = False
    chunks: int = 0
    outputs: int = 1
    head: dict = field(default_factory=dict)
    open_choices: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.open_choices = set(range(self.outputs))

    def record(self, usage: dict) -> None:
        """Take vLLM's cumulative `usage` (counts kept non-negative, cached within the prompt)."""
        self.prompt_tokens = max(0, int(usage.get("prompt_tokens") or 0))
        completion = max(0, int(usage.get("completion_tokens") or 0))
        details = usage.get("prompt_tokens_details") or {}
        self.cached_tokens = min(self.prompt_tokens, max(0, int(details.get("cached_tokens") or 0)))
        if completion > self.completion_tokens:
            now = monotonic()
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
        self.completion_tokens = max(self.completion_tokens, completion)


def _note_choices(tally: StreamTally, payload: bytes) -> None:
    """Keep the first chunk's id/created/model, and which choices finished (parses JSON only
    for the first chunk and for chunks that carry a finish reason)."""
    if tally.head and _FINISHED not in payload:
        return
    chunk = json.loads(payload)
    if not tally.head:
        tally.head = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason"):
            tally.open_choices.discard(choice.get("index", 0))
            tally.finish_reason = choice["finish_reason"]


def cut_events(tally: StreamTally, mode: UsageMode, chat: bool) -> bytes:
    """The events that end a stream cut short (at its budget, or preempted): `finish_reason:
    "length"` on every open choice, the usage if the client asked for it, then `[DONE]`."""
    choices = []
    for index in sorted(tally.open_choices):
        if chat:
            choices.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": "length"})
        else:
            choices.append({"index": index, "text": "", "logprobs": None, "finish_reason": "length"})
    events = [{**tally.head, "choices": choices}]
    if mode is not UsageMode.NONE:
        usage = {
            "prompt_tokens": tally.prompt_tokens,
            "total_tokens": tally.prompt_tokens + tally.completion_tokens,
            "completion_tokens": tally.completion_tokens,
        }
        events.append({**tally.head, "choices": [], "usage": usage})
    tally.finish_reason = "length"
    body = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events)
    return body + _DONE + b"\n\n"


async def _drain(
    reads: AsyncIterator[bytes], tally: StreamTally, buffer: bytes, total_s: float = DRAIN_TOTAL_S
) -> None:
    """Read what vLLM already sent (each read may wait `DRAIN_READ_S`, all of it `total_s`)
    and count its usage, so that a hang-up or a cut bills every token vLLM reported."""
    deadline = monotonic() + total_s
    while monotonic() < deadline:
        try:
            buffer += await asyncio.wait_for(anext(reads), DRAIN_READ_S)
        except (TimeoutError, StopAsyncIteration, httpx.HTTPError):
            break
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            usage, _ = split_usage(event[6:]) if event.startswith(b"data: {") else (None, b"")
            if usage is not None:
                tally.record(usage)


async def _cut_short(
    reads: AsyncIterator[bytes],
    tally: StreamTally,
    buffer: bytes,
    out: list[bytes],
    mode: UsageMode,
    chat: bool,
) -> bytes:
    """The client's last bytes of a stream ended early: what is ready in `out`, then the events
    that end it, once what vLLM already sent is drained and counted (for `PREEMPT_DRAIN_S` at
    most when preempted)."""
    await _drain(reads, tally, buffer, PREEMPT_DRAIN_S if tally.preempted else DRAIN_TOTAL_S)
    return b"".join([*out, cut_events(tally, mode, chat)])


async def relay(
    upstream: httpx.Response,
    tally: StreamTally,
    budget: StreamBudget,
    mode: UsageMode,
    *,
    chat: bool,
) -> AsyncIterator[bytes]:
    """Yield the client's bytes for each read from vLLM; stop early when the budget refuses or
    the stream is preempted (`tally.preempt`, acted on once its first chunk was relayed).

    When the client is gone (`tally.client_gone`) or the stream is cut, what vLLM already sent
    is drained and counted before returning; the caller then closes the upstream response, which
    makes vLLM abort the request.
    """
    buffer = b""
    held = b""
    reads = upstream.aiter_raw()
    while not tally.client_gone:
        try:
            buffer += await anext(reads)
        except StopAsyncIteration:
            break
        out: list[bytes] = []
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2 :]
            final = _EMPTY_CHOICES in event
            if held and not (final and mode is UsageMode.NONE):
                out.append(held)
                held = b""
            if not event.startswith(b"data: ") or event == _DONE:
                out.append(event + b"\n\n")
                continue
            payload = event[6:]
            if payload.startswith(b'{"error"'):
                tally.upstream_error = True
                out.append(event + b"\n\n")
                continue
            usage, stripped = split_usage(payload)
            if usage is not None:
                tally.record(usage)
                budget.observe(tally.prompt_tokens, tally.cached_tokens, tally.completion_tokens)
                if not final and not await budget.admit(tally.completion_tokens):
                    tally.cut = True
                    yield await _cut_short(reads, tally, buffer, out, mode, chat)
                    return
            if not final:
                _note_choices(tally, payload)
            tally.chunks += 1
            if mode is UsageMode.CONTINUOUS or (mode is UsageMode.FINAL and final):
                out.append(event + b"\n\n")
            elif mode is UsageMode.FINAL:
                out.append(b"data: " + stripped + b"\n\n")
            elif final:
                out.append(_with_fingerprint(held, payload))
                held = b""
            elif _FINISHED in payload:
                held = b"data: " + stripped + b"\n\n"
            else:
                out.append(b"data: " + stripped + b"\n\n")
        if tally.preempt and tally.head and tally.open_choices:
            tally.preempted = True
            yield await _cut_short(reads, tally, buffer, [*out, held], mode, chat)
            return
        if out:
            yield b"".join(out)
    if held:
        yield held
    if tally.client_gone:
        await _drain(reads, tally, buffer)


def _with_fingerprint(held: bytes, usage_chunk: bytes) -> bytes:
    """A finish chunk held back (client asked no usage) with the `system_fingerprint` of vLLM's
    usage-only chunk moved onto it, as vLLM itself serialises the last chunk without usage."""
    start = usage_chunk.rfind(_FINGERPRINT)
    if not held or start < 0:
        return held
    return held[:-3] + usage_chunk[start:-1] + b"}\n\n"
