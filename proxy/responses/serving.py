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

import logging
from typing import Any

import orjson
from starlette.responses import Response

from metering.meter import Meter, MeterUnavailable, StoredResponse
from metering.prompt import TemplateOverhead, responses_prompt_bound
from metering.stream_budget import StreamBudget
from policies.index import Principal
from proxy.errors import APIError
from proxy.flight import Flight
from proxy.forward import serve_unary, upstream_request
from proxy.generation import GenerationRequest
from proxy.relay import StreamTally
from proxy.streaming import Finish
from proxy.typed_events import delta_seen, serve_typed_stream
from proxy.upstream import UpstreamPool, UpstreamState

log = logging.getLogger("capgate.responses")

KEEP_S = 30 * 24 * 3600  # how long capgate remembers who owns a stored response
TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")


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


def note_event(tally: StreamTally, name: bytes, data: bytes) -> dict | None:
    """Record what one server-sent event of vLLM's responses stream shows (a `Note`); the final
    response object when the event ends the response."""
    if name.endswith(b".delta"):
        delta_seen(tally)
    elif name in TERMINAL:
        response = orjson.loads(data).get("response")
        record_usage(tally, response)
        return response if isinstance(response, dict) else None
    elif name == b"error":
        tally.upstream_error = True
    return None


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

    async def write(self, response: dict | None = None) -> bool:
        """Whether the record was written (False: Redis cannot be reached)."""
        usage = (response or {}).get("usage")
        done = response is not None and isinstance(usage, dict)
        owner = StoredResponse(
            self.flight.principal.user_id,
            self.flight.upstream.upstream.url,
            int(usage.get("input_tokens") or 0) if done else -1,  # type: ignore[union-attr]
            output_bound(response) if done else -1,  # type: ignore[arg-type]
        )
        try:
            return await self.meter.own_response(self.response_id, owner, KEEP_S)
        except MeterUnavailable as exc:
            log.warning("response %s: owner not recorded: redis unavailable (%s)", self.response_id, exc)
            return False


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
    answer the client. When the owner cannot be recorded (Redis away, a tier served fail-open)
    the response is not stored."""
    body = upstream_body(
        flight.request,
        priority=priority,
        allowance=budget.allowance,
        context=context,
        response_id=response_id_of(flight),
    )
    owners = Owners(meter, flight) if body.get("store", True) else None
    if owners is not None and not await owners.write():
        body["store"] = False  # no owner on record: nobody could read it back
        owners = None

    async def on_end(response: dict) -> None:
        if owners is not None:
            await owners.write(response)

    if not flight.request.stream:
        request = upstream_request(pool, flight, body)
        return await serve_unary(
            pool, flight, request, finish, lambda reply: record_usage(flight.tally, reply), on_end
        )
    return await serve_typed_stream(
        pool, flight, upstream_request(pool, flight, body), finish, note_event, _error_event, on_end
    )
