"""Sending a request to the upstream it was admitted to, and what a failure to send becomes.

Every API's serving module forwards through here: one request id header, one mapping of
transport failures to a 504 (timed out) or a 502 (unreachable) counted in
`capgate_upstream_errors_total`, one log line for an error of capgate's own while relaying.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from proxy import metrics
from proxy.errors import APIError
from proxy.flight import Flight, Outcome
from proxy.streaming import Finish, SettledResponse
from proxy.upstream import UpstreamPool

log = logging.getLogger("capgate.forward")


def upstream_request(
    pool: UpstreamPool, flight: Flight, body: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Request:
    """The request vLLM gets: `body` as JSON to the flight's endpoint on its upstream, with the
    client's timeouts."""
    return httpx.Request(
        "POST",
        pool.url(flight.upstream, flight.endpoint),
        content=orjson.dumps(body),
        headers={"content-type": "application/json", "x-request-id": flight.request_id, **(headers or {})},
        extensions={"timeout": pool.timeouts},
    )


async def send(pool: UpstreamPool, flight: Flight, request: httpx.Request, stream: bool) -> httpx.Response:
    """vLLM's response (its body unread when `stream`, read to its end otherwise), its arrival
    noted on the flight; a transport failure is recorded on the flight and raised as a 504 or
    502 `APIError`."""
    try:
        response = await pool.transport.handle_async_request(request)
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
    except httpx.TimeoutException as exc:
        metrics.UPSTREAM_ERRORS.labels(kind="timeout").inc()
        flight.fail(Outcome.UPSTREAM_TIMEOUT)
        raise APIError(
            504, f"upstream timed out: {type(exc).__name__}", type="upstream_error", code="upstream_timeout"
        ) from exc
    except httpx.HTTPError as exc:
        metrics.UPSTREAM_ERRORS.labels(kind="unreachable").inc()
        flight.fail(Outcome.UPSTREAM_ERROR)
        raise APIError(
            502, f"upstream unreachable: {exc}", type="upstream_error", code="upstream_unreachable"
        ) from exc
    flight.answered_at = time.monotonic()
    return response


ReadAnswer = Callable[[dict], None]
AfterAnswer = Callable[[dict], Awaitable[None]]


async def serve_unary(
    pool: UpstreamPool,
    flight: Flight,
    request: httpx.Request,
    finish: Finish,
    read: ReadAnswer,
    after: AfterAnswer | None = None,
) -> SettledResponse:
    """Send `request` and answer with vLLM's body as it is. A successful answer is handed to the
    API's `read` (which records its usage and end on the flight), then to `after`; one that is
    not a readable JSON object is a 502. vLLM's own error answers pass through."""
    response = await send(pool, flight, request, stream=False)
    content = response.content
    if response.is_success:
        try:
            reply = orjson.loads(content)
            if not isinstance(reply, dict):
                raise TypeError(f"a JSON {type(reply).__name__}, not an object")
            read(reply)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            log.error("request %s: unreadable answer from vLLM: %r", flight.request_id, exc)
            flight.fail(Outcome.UPSTREAM_ERROR)
            raise APIError(502, "the upstream's answer is unreadable", type="upstream_error") from exc
        if after is not None:
            await after(reply)
    else:
        flight.fail(Outcome.UPSTREAM_ERROR)
    media = response.headers.get("content-type")
    return SettledResponse(content, response.status_code, {"x-request-id": flight.request_id}, media, finish)


async def refused_response(flight: Flight, response: httpx.Response, finish: Finish) -> SettledResponse:
    """vLLM's own error answer to a streamed request, passed on as it is (the flight records an
    upstream error)."""
    content = await response.aread()
    await response.aclose()
    flight.fail(Outcome.UPSTREAM_ERROR)
    media = response.headers.get("content-type")
    return SettledResponse(content, response.status_code, {"x-request-id": flight.request_id}, media, finish)


def stream_failed(flight: Flight, exc: httpx.HTTPError) -> APIError:
    """Record a stream from vLLM that broke or went silent; the error to tell the client."""
    timeout = isinstance(exc, httpx.TimeoutException)
    metrics.UPSTREAM_ERRORS.labels(kind="timeout" if timeout else "stream_broken").inc()
    flight.fail(Outcome.UPSTREAM_TIMEOUT if timeout else Outcome.UPSTREAM_ERROR)
    return APIError(504 if timeout else 502, f"upstream stream failed: {exc!r}", type="upstream_error")


def relay_failed(flight: Flight, exc: BaseException) -> APIError:
    """Log and record an error of capgate's own while relaying a stream; the error to tell the client."""
    log.error("request %s: relay failed: %r", flight.request_id, exc, exc_info=exc)
    flight.fail(Outcome.RELAY_ERROR)
    return APIError(500, "capgate failed while relaying the stream", type="server_error")
