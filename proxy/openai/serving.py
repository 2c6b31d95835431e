"""Serving an OpenAI generation request against vLLM: the prompt bound, the body vLLM gets, and
the two ways the answer comes back (one JSON body, or server-sent events relayed chunk by chunk).

The functions here record what they see on the `Flight` (usage, failures, hang-ups); how the
request ended is decided by `proxy.flight.outcome_of`, and settlement is the `finish` callback
the gateway hands in, which the response classes run exactly once.
"""

import functools
import logging
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import orjson
from starlette.responses import Response

from metering.meter import Meter
from metering.prompt import TemplateOverhead, chat_prompt_bound, completion_prompt_bound
from metering.stream_budget import StreamBudget
from policies.budget import per_output_limit
from proxy import forward
from proxy.errors import APIError
from proxy.flight import Flight
from proxy.forward import refused_response, relay_failed, send, stream_failed, upstream_request
from proxy.generation import GenerationRequest
from proxy.relay import relay
from proxy.streaming import Finish, RelayResponse
from proxy.upstream import UpstreamPool, UpstreamState

log = logging.getLogger("capgate.openai")


def local_prompt_bound(request: GenerationRequest, overhead: TemplateOverhead) -> int:
    """The prompt bound computed without the tokenizer (see `metering.prompt`)."""
    body = dict(request.body)
    return chat_prompt_bound(body, overhead) if request.chat else completion_prompt_bound(body, overhead)


def embeddings_prompt_bound(request: GenerationRequest, overhead: TemplateOverhead) -> int:
    """The prompt bound of an embeddings request: its `input` as a completions prompt, or its
    chat `messages`."""
    body = dict(request.body)
    if "messages" in body:
        return chat_prompt_bound(body, overhead)
    return completion_prompt_bound({"prompt": body["input"]}, overhead)


async def tokenized_prompt_bound(
    pool: UpstreamPool, upstream: UpstreamState, request: GenerationRequest
) -> int:
    """The exact prompt tokens, from the upstream's `/tokenize` (one round trip)."""
    key = "messages" if request.chat or "messages" in request.body else "prompt"
    sent = request.body[key] if key in request.body else request.body["input"]
    try:
        return await pool.count_prompt(upstream, {"model": request.model, key: sent})
    except httpx.HTTPStatusError as exc:
        raise APIError(400, f"cannot tokenize the prompt: {exc.response.text}", param=key) from exc
    except httpx.HTTPError as exc:
        raise APIError(502, f"upstream unreachable: {exc}", type="upstream_error") from exc


def upstream_body(
    request: GenerationRequest, *, priority: int, allowance: int | None, context: int
) -> dict[str, Any]:
    """The body vLLM gets: the tier's `priority`, the completion limit lowered to what the budget
    holds (`allowance` shared by every output; None when completions are not capped) with vLLM's
    `min_tokens` under it, and cumulative usage on every chunk of a stream.

    A client limit over the model's context is left alone: vLLM refuses it with its own 400.
    """
    body = dict(request.body)
    body["priority"] = priority
    if allowance is not None:
        per_output = per_output_limit(allowance, request.outputs)
        for name in request.limit_fields or ("max_tokens",):
            asked = body.get(name)
            if asked is None or per_output < asked <= context:
                body[name] = per_output
        limit = min((request.body[name] for name in request.limit_fields), default=context)
        floor = request.min_tokens
        if floor is not None and per_output < floor <= limit:
            body["min_tokens"] = per_output  # vLLM refuses min_tokens over max_tokens
    if request.stream:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return body


def _error_event(error: APIError) -> bytes:
    return b"data: " + orjson.dumps(error.body()) + b"\n\ndata: [DONE]\n\n"


def read_answer(flight: Flight, reply: dict) -> None:
    """Record a whole OpenAI answer's usage and last finish reason on the flight."""
    flight.tally.record(reply.get("usage") or {})
    reasons = [c.get("finish_reason") for c in reply.get("choices") or [] if c.get("finish_reason")]
    flight.tally.finish_reason = reasons[-1] if reasons else None


async def serve_unary(pool: UpstreamPool, flight: Flight, body: dict[str, Any], finish: Finish) -> Response:
    """Send the request, record vLLM's usage and finish reason, answer with vLLM's body."""
    request = upstream_request(pool, flight, body)
    return await forward.serve_unary(pool, flight, request, finish, functools.partial(read_answer, flight))


async def serve_stream(
    pool: UpstreamPool, flight: Flight, body: dict[str, Any], budget: StreamBudget, finish: Finish
) -> Response:
    """Send the request and relay its events; a failure after the first byte becomes an error
    event and `[DONE]`, as vLLM sends its own."""
    response = await send(pool, flight, upstream_request(pool, flight, body), stream=True)
    if not response.is_success:
        return await refused_response(flight, response, finish)
    request = flight.request

    async def body_bytes() -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in relay(response, flight.tally, budget, request.usage, chat=request.chat):
                yield chunk
        except httpx.HTTPError as exc:
            yield _error_event(stream_failed(flight, exc))
        except Exception as exc:
            yield _error_event(relay_failed(flight, exc))
        finally:
            await response.aclose()

    headers = {"x-request-id": flight.request_id, "cache-control": "no-cache"}
    return RelayResponse(
        body_bytes(),
        response.status_code,
        headers,
        flight.hang_up,
        lambda exc: relay_failed(flight, exc),
        finish,
    )


async def serve(
    pool: UpstreamPool,
    meter: Meter,
    flight: Flight,
    budget: StreamBudget,
    finish: Finish,
    priority: int,
    context: int,
) -> Response:
    """Ask vLLM for the flight's request (the body of `upstream_body`) and answer the client."""
    body = upstream_body(flight.request, priority=priority, allowance=budget.allowance, context=context)
    if flight.request.stream:
        return await serve_stream(pool, flight, body, budget, finish)
    return await serve_unary(pool, flight, body, finish)


async def serve_embeddings(
    pool: UpstreamPool,
    meter: Meter,
    flight: Flight,
    budget: StreamBudget,
    finish: Finish,
    priority: int,
    context: int,
) -> Response:
    """Ask vLLM for the embeddings (at the tier's `priority`) and answer with its body; its
    `usage` has the prompt tokens, the only ones an embedding uses."""
    body = dict(flight.request.body)
    body["priority"] = priority
    return await serve_unary(pool, flight, body, finish)
