"""Serving a Responses API request against vLLM's `/v1/responses`: the prompt bound, the body
vLLM gets, stored responses' owners, and the answer, one JSON body or the typed `response.*`
events relayed as vLLM sent them, byte for byte.

capgate names the response (`request_id` in vLLM's body, which vLLM uses as the response id:
`resp_` and capgate's request id), so its owner is recorded in Redis before vLLM stores it.

vLLM gives no running usage on this route: `usage` is only on the final response object. So a
responses request reserves its whole `max_output_tokens` up front (no leases: never cut at a
budget nor preempted), and is billed:
- completed, or incomplete at `max_output_tokens`: exactly, from vLLM's final `usage`
  (`output_tokens` includes reasoning tokens);
- the client hung up, or vLLM's stream broke: the prompt at its bound (reserved before the
  request, never below the truth) and the output at the delta events seen (each one token or
  more: never over what vLLM generated).
"""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from time import monotonic
from typing import Any

import httpx
import orjson
from starlette.responses import Response

from metering.lease import StreamBudget
from metering.meter import Meter, MeterUnavailable, StoredResponse
from metering.prompt import TemplateOverhead, responses_prompt_bound
from policies.index import Principal
from proxy.errors import APIError
from proxy.flight import Flight, Outcome
from proxy.forward import relay_failed, send, stream_failed, upstream_request
from proxy.generation import GenerationRequest
from proxy.relay import DRAIN_READ_S, DRAIN_TOTAL_S, StreamTally
from proxy.streaming import Finish, RelayResponse, SettledResponse
from proxy.upstream import UpstreamPool, UpstreamState

KEEP_S = 30 * 24 * 3600  # how long capgate remembers who owns a stored response
TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")
OnEnd = Callable[[dict], Awaitable[None]]


def response_id_of(flight: Flight) -> str:
    """The id vLLM gives the flight's response (capgate sets it)."""
    return f"resp_{flight.request_id}"


def not_found(response_id: str) -> APIError:
    return APIError(
        404,
        f"Response with id '{response_id}' not found.",
        type="invalid_request_error",
        param="response_id",
        code="response_not_found",
    )


async def owned(meter: Meter, principal: Principal, response_id: str) -> StoredResponse:
    """The owner record of a stored response of `principal`, or a 404 (another user's response
    is not found, as one that does not exist); a 503 when Redis cannot be reached."""
    try:
        found = await meter.response_owner(response_id)
    except MeterUnavailable as exc:
        raise APIError(
            503, "stored responses are unavailable while metering is", type="service_unavailable"
        ) from exc
    if found is None or found.user_id != principal.user_id:
        raise not_found(response_id)
    return found


async def prior(meter: Meter, principal: Principal, request: GenerationRequest) -> StoredResponse | None:
    """The stored response a request continues (`previous_response_id`), the caller's own and
    complete (its tokens known: they bound the conversation it adds to the prompt); else None."""
    previous = request.previous_response_id
    if previous is None:
        return None
    found = await owned(meter, principal, previous)
    if found.prompt_tokens < 0 or found.output_bound < 0:
        raise APIError(
            400,
            f"response '{previous}' did not complete (still running, or it ended early): "
            "it cannot be continued",
            param="previous_response_id",
            code="previous_response_incomplete",
        )
    return found


def local_prompt_bound(request: GenerationRequest, overhead: TemplateOverhead) -> int:
    """The prompt bound computed without the tokenizer (see `metering.prompt`)."""
    return responses_prompt_bound(dict(request.body), overhead)


async def tokenized_prompt_bound(
    pool: UpstreamPool, upstream: UpstreamState, request: GenerationRequest
) -> int:
    """vLLM has no token count for a Responses request: `prompt_bound: tokenize` is refused here."""
    raise APIError(
        400,
        "this gateway counts prompts with vLLM's tokenizer, which has no count for the Responses API",
        param="input",
        code="unsupported_route",
    )


def upstream_body(
    request: GenerationRequest, *, priority: int, allowance: int | None, context: int, response_id: str
) -> dict[str, Any]:
    """The body vLLM gets: the tier's `priority`, capgate's response id, `max_output_tokens`
    lowered to what the budget holds (`allowance`, None when completions are not capped)."""
    body = dict(request.body)
    body["priority"] = priority
    body["request_id"] = response_id
    asked = body.get("max_output_tokens")
    if allowance is not None and (asked is None or allowance < asked <= context):
        body["max_output_tokens"] = allowance
    return body


def record_usage(tally: StreamTally, response: object) -> None:
    """Take a final response object's `usage` and how it ended."""
    if not isinstance(response, dict):
        return
    usage = response.get("usage")
    if isinstance(usage, dict):
        details = usage.get("input_tokens_details") or {}
        tally.record(
            {
                "prompt_tokens": usage.get("input_tokens"),
                "prompt_tokens_details": {"cached_tokens": details.get("cached_tokens")},
            }
        )
        tally.completion_tokens = max(0, int(usage.get("output_tokens") or 0))
        tally.open_choices.clear()
    reason = (response.get("incomplete_details") or {}).get("reason")
    tally.finish_reason = reason or response.get("status") or tally.finish_reason


def _delta_seen(tally: StreamTally) -> None:
    now = monotonic()
    if tally.first_token_at is None:
        tally.first_token_at = now
    tally.last_token_at = now
    tally.completion_tokens += 1


def note_event(tally: StreamTally, event: bytes) -> dict | None:
    """Record what one server-sent event of vLLM's responses stream shows; the final response
    object when the event ends the response."""
    name, data = b"", b""
    for line in event.split(b"\n"):
        if line.startswith(b"event: "):
            name = line[7:].strip()
        elif line.startswith(b"data: "):
            data = line[6:]
    if name.endswith(b".delta"):
        _delta_seen(tally)
    elif name in TERMINAL:
        response = orjson.loads(data).get("response")
        record_usage(tally, response)
        return response if isinstance(response, dict) else None
    elif name == b"error":
        tally.upstream_error = True
    return None


async def relay_events(upstream: httpx.Response, tally: StreamTally, on_end: OnEnd) -> AsyncIterator[bytes]:
    """Yield vLLM's bytes as they come, recording each whole event; `on_end` is awaited before
    the bytes of the event that ends the response go out. Once the client is gone, read and
    record what vLLM already sent (for `DRAIN_TOTAL_S` at most) and return."""
    buffer = b""
    reads = upstream.aiter_raw()
    async for chunk in reads:
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        ended = None
        for event in events:
            ended = note_event(tally, event) or ended
        if tally.client_gone:
            break
        if ended is not None:
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
        for event in events:
            note_event(tally, event)


def _error_event(error: APIError) -> bytes:
    return b"event: error\ndata: " + orjson.dumps({"type": "error", **error.body()["error"]}) + b"\n\n"


def output_bound(response: dict) -> int:
    """A bound of the tokens a response's output adds to the prompt of a continuation: its
    output tokens, or the bytes of its output items serialised (a re-tokenised text has at most
    one token per byte), whichever is more."""
    usage = response.get("usage") or {}
    return max(int(usage.get("output_tokens") or 0), len(orjson.dumps(response.get("output") or [])))


class Owners:
    """Writes the owner record of one flight's response: before vLLM sees the request (tokens
    unknown) and once it ends, with its prompt tokens and the bound of its output."""

    def __init__(self, meter: Meter, flight: Flight) -> None:
        self.meter = meter
        self.flight = flight
        self.response_id = response_id_of(flight)

    async def write(self, response: dict | None = None) -> None:
        usage = (response or {}).get("usage")
        done = response is not None and isinstance(usage, dict)
        owner = StoredResponse(
            self.flight.principal.user_id,
            self.flight.upstream.upstream.url,
            int(usage.get("input_tokens") or 0) if done else -1,  # type: ignore[union-attr]
            output_bound(response) if done else -1,  # type: ignore[arg-type]
        )
        try:
            await self.meter.own_response(self.response_id, owner, KEEP_S)
        except MeterUnavailable as exc:
            raise APIError(
                503, "stored responses are unavailable while metering is", type="service_unavailable"
            ) from exc


async def serve(
    pool: UpstreamPool,
    meter: Meter,
    flight: Flight,
    budget: StreamBudget,
    finish: Finish,
    priority: int,
    context: int,
) -> Response:
    """Record the owner (when vLLM stores the response), ask vLLM for the flight's request and
    answer the client."""
    owners = Owners(meter, flight) if flight.request.body.get("store", True) is not False else None
    if owners is not None:
        await owners.write()
    body = upstream_body(
        flight.request,
        priority=priority,
        allowance=budget.allowance,
        context=context,
        response_id=response_id_of(flight),
    )

    async def on_end(response: dict) -> None:
        if owners is not None:
            await owners.write(response)

    if not flight.request.stream:
        return await _serve_unary(pool, flight, body, finish, on_end)
    return await _serve_stream(pool, flight, body, finish, on_end)


async def _serve_unary(
    pool: UpstreamPool, flight: Flight, body: dict[str, Any], finish: Finish, on_end: OnEnd
) -> Response:
    response = await send(pool, flight, upstream_request(pool, flight, body), stream=False)
    content = response.content
    if response.is_success:
        try:
            reply = orjson.loads(content)
            record_usage(flight.tally, reply)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            flight.fail(Outcome.UPSTREAM_ERROR)
            raise APIError(502, "the upstream's answer is unreadable", type="upstream_error") from exc
        await on_end(reply)
    else:
        flight.fail(Outcome.UPSTREAM_ERROR)
    media = response.headers.get("content-type")
    return SettledResponse(content, response.status_code, {"x-request-id": flight.request_id}, media, finish)


async def _serve_stream(
    pool: UpstreamPool, flight: Flight, body: dict[str, Any], finish: Finish, on_end: OnEnd
) -> Response:
    response = await send(pool, flight, upstream_request(pool, flight, body), stream=True)
    if not response.is_success:
        content = await response.aread()
        await response.aclose()
        flight.fail(Outcome.UPSTREAM_ERROR)
        media = response.headers.get("content-type")
        return SettledResponse(
            content, response.status_code, {"x-request-id": flight.request_id}, media, finish
        )

    async def body_bytes() -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in relay_events(response, flight.tally, on_end):
                yield chunk
        except httpx.HTTPError as exc:
            yield _error_event(stream_failed(flight, exc))
        except Exception as exc:
            yield _error_event(relay_failed(flight, exc))
        finally:
            if flight.tally.open_choices and flight.tally.prompt_tokens == 0:
                flight.tally.prompt_tokens = flight.plan.prompt_bound
            await response.aclose()

    return RelayResponse(
        body_bytes(),
        response.status_code,
        {"x-request-id": flight.request_id, "cache-control": "no-cache"},
        flight.hang_up,
        lambda exc: relay_failed(flight, exc),
        finish,
    )
