"""Relaying vLLM's typed server-sent events (`event: <type>` then `data: <json>`), as it streams
the Anthropic Messages and the Responses API: byte for byte as vLLM sent them, each whole event
recorded on the flight's tally by the API's own `Note`, and, after a hang-up, what vLLM already
sent read and recorded (for `DRAIN_TOTAL_S` at most) before the upstream is closed.

These streams carry no running usage: a `Note` counts each delta event as one token (each holds
one or more), and takes the exact usage from the event that ends the stream.
"""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from time import monotonic

import httpx
from starlette.responses import Response

from proxy.errors import APIError
from proxy.flight import Flight
from proxy.forward import refused_response, relay_failed, send, stream_failed
from proxy.relay import DRAIN_READ_S, DRAIN_TOTAL_S, StreamTally
from proxy.streaming import Finish, RelayResponse
from proxy.upstream import UpstreamPool

# (tally, event type, data) -> the final object of the stream when this event ends it, else None
Note = Callable[[StreamTally, bytes, bytes], dict | None]
OnEnd = Callable[[dict], Awaitable[None]]


def split_event(event: bytes) -> tuple[bytes, bytes]:
    """The type and the data of one server-sent event (empty when absent)."""
    name, data = b"", b""
    for line in event.split(b"\n"):
        if line.startswith(b"event: "):
            name = line[7:].strip()
        elif line.startswith(b"data: "):
            data = line[6:]
    return name, data


def delta_seen(tally: StreamTally) -> None:
    """One more delta event: at least one more output token."""
    now = monotonic()
    if tally.first_token_at is None:
        tally.first_token_at = now
    tally.last_token_at = now
    tally.completion_tokens += 1


def _note_all(tally: StreamTally, note: Note, events: list[bytes]) -> dict | None:
    ended = None
    for event in events:
        ended = note(tally, *split_event(event)) or ended
    return ended


async def relay_typed(
    upstream: httpx.Response, tally: StreamTally, note: Note, on_end: OnEnd | None = None
) -> AsyncIterator[bytes]:
    """Yield vLLM's bytes as they come, recording each whole event with `note`; `on_end` is
    awaited with the stream's final object before the bytes that carry it go out. Once the
    client is gone, drain and record what vLLM already sent, and return."""
    buffer = b""
    reads = upstream.aiter_raw()
    async for chunk in reads:
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        ended = _note_all(tally, note, events)
        if tally.client_gone:
            break
        if ended is not None and on_end is not None:
            await on_end(ended)
        yield chunk
    if not tally.client_gone:
        return
    deadline = monotonic() + DRAIN_TOTAL_S
    while monotonic() < deadline:
        try:
            buffer += await asyncio.wait_for(anext(reads), DRAIN_READ_S)
        except (TimeoutError, StopAsyncIteration, httpx.HTTPError):
            return
        *events, buffer = buffer.split(b"\n\n")
        _note_all(tally, note, events)


async def serve_typed_stream(
    pool: UpstreamPool,
    flight: Flight,
    request: httpx.Request,
    finish: Finish,
    note: Note,
    error_event: Callable[[APIError], bytes],
    on_end: OnEnd | None = None,
) -> Response:
    """Send `request` and relay its typed events unchanged; a failure after the first byte
    becomes the API's own `error_event`. A stream that ends before vLLM told its prompt tokens
    (a hang-up, a broken stream) bills the prompt at its bound: reserved, never below the truth."""
    response = await send(pool, flight, request, stream=True)
    if not response.is_success:
        return await refused_response(flight, response, finish)

    async def body_bytes() -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in relay_typed(response, flight.tally, note, on_end):
                yield chunk
        except httpx.HTTPError as exc:
            yield error_event(stream_failed(flight, exc))
        except Exception as exc:
            yield error_event(relay_failed(flight, exc))
        finally:
            await response.aclose()
            if flight.tally.open_choices and flight.tally.prompt_tokens == 0:
                flight.tally.prompt_tokens = flight.plan.prompt_bound

    return RelayResponse(
        body_bytes(),
        response.status_code,
        {"x-request-id": flight.request_id, "cache-control": "no-cache"},
        flight.hang_up,
        lambda exc: relay_failed(flight, exc),
        finish,
    )
