"""Serving an Anthropic messages request against vLLM's `/v1/messages`: the prompt bound, the
body vLLM gets, and the answer, one JSON body or Anthropic's server-sent events relayed as vLLM
sent them, byte for byte.

vLLM gives no running usage on this route: `message_start` carries the prompt's tokens and only
the closing `message_delta` the output's. So a messages request reserves its whole `max_tokens`
up front (no leases: it is never cut at a budget nor preempted), and is billed:
- ended normally or at `max_tokens`: exactly, from the closing `message_delta`;
- the client hung up, or vLLM's stream broke: the `content_block_delta` events seen (each
  carries one token or more, so this is never over what vLLM generated; vLLM may have
  generated a few more, up to the tokens of one incomplete UTF-8 character per delta and
  those of its last steps before the abort).
"""

import functools
from typing import Any

import httpx
import orjson
from starlette.responses import Response

from metering.meter import Meter
from metering.prompt import TemplateOverhead, messages_prompt_bound
from metering.stream_budget import StreamBudget
from proxy.anthropic.protocol import error_event
from proxy.errors import APIError
from proxy.flight import Flight
from proxy.forward import serve_unary, upstream_request
from proxy.generation import GenerationRequest
from proxy.relay import StreamTally
from proxy.streaming import Finish
from proxy.typed_events import delta_seen, serve_typed_stream
from proxy.upstream import UpstreamPool, UpstreamState

PRIORITY_HEADER = "x-vllm-priority"  # vLLM's Anthropic request has no `priority` field
COUNT_TOKENS = "/v1/messages/count_tokens"


def local_prompt_bound(request: GenerationRequest, overhead: TemplateOverhead) -> int:
    """The prompt bound computed without the tokenizer (see `metering.prompt`)."""
    return messages_prompt_bound(dict(request.body), overhead)


async def tokenized_prompt_bound(
    pool: UpstreamPool, upstream: UpstreamState, request: GenerationRequest
) -> int:
    """The exact prompt tokens, from the upstream's `count_tokens` (vLLM renders the request
    as it will for generation; one round trip)."""
    body = {k: v for k, v in request.body.items() if k not in ("max_tokens", "stream")}
    try:
        reply = await pool.client.post(upstream.upstream.url + COUNT_TOKENS, json=body, timeout=5.0)
        reply.raise_for_status()
        return int(reply.json()["input_tokens"])
    except httpx.HTTPStatusError as exc:
        raise APIError(400, f"cannot count the prompt: {exc.response.text}", param="messages") from exc
    except httpx.HTTPError as exc:
        raise APIError(502, f"upstream unreachable: {exc}", type="upstream_error") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise APIError(502, "the upstream's token count is unreadable", type="upstream_error") from exc


def upstream_body(request: GenerationRequest, *, allowance: int | None, context: int) -> dict[str, Any]:
    """The body vLLM gets: `max_tokens` lowered to what the budget holds (`allowance`, None when
    completions are not capped). A limit over the model's context is left for vLLM's own 400."""
    body = dict(request.body)
    asked = body["max_tokens"]
    if allowance is not None and allowance < asked <= context:
        body["max_tokens"] = allowance
    return body


def record_usage(tally: StreamTally, usage: object) -> None:
    """Take an Anthropic `usage` object: vLLM's prompt tokens are its input, cache-read and
    cache-creation tokens together; the cache-read ones are the cached prompt tokens."""
    if not isinstance(usage, dict):
        return
    cached = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cached + int(usage.get("cache_creation_input_tokens") or 0)
    tally.record({"prompt_tokens": prompt, "prompt_tokens_details": {"cached_tokens": cached}})
    if "output_tokens" in usage:
        tally.completion_tokens = max(0, int(usage.get("output_tokens") or 0))


def note_event(tally: StreamTally, name: bytes, data: bytes) -> dict | None:
    """Record what one server-sent event of vLLM's messages stream shows (a `Note`)."""
    if name == b"content_block_delta":
        delta_seen(tally)
    elif name in (b"message_start", b"message_delta"):
        payload = orjson.loads(data)
        if name == b"message_start":
            record_usage(tally, (payload.get("message") or {}).get("usage"))
        else:
            record_usage(tally, payload.get("usage"))
            tally.finish_reason = (payload.get("delta") or {}).get("stop_reason") or tally.finish_reason
    elif name == b"message_stop":
        tally.open_choices.clear()
    elif name == b"error":
        tally.upstream_error = True
    return None


def read_answer(flight: Flight, reply: dict) -> None:
    """Record a whole messages answer's usage and stop reason on the flight."""
    record_usage(flight.tally, reply.get("usage"))
    flight.tally.finish_reason = reply.get("stop_reason")
    flight.tally.open_choices.clear()


async def serve(
    pool: UpstreamPool,
    meter: Meter,
    flight: Flight,
    budget: StreamBudget,
    finish: Finish,
    priority: int,
    context: int,
) -> Response:
    """Ask vLLM for the flight's request (the tier's priority in vLLM's priority header) and
    answer the client."""
    body = upstream_body(flight.request, allowance=budget.allowance, context=context)
    headers = {PRIORITY_HEADER: str(priority)}
    if flight.request.stream:
        request = upstream_request(pool, flight, body, headers)
        return await serve_typed_stream(pool, flight, request, finish, note_event, error_event)
    request = upstream_request(pool, flight, body, headers)
    return await serve_unary(pool, flight, request, finish, functools.partial(read_answer, flight))
