"""Sending a request to the upstream it was admitted to, and what a failure to send becomes.

Every API's serving module forwards through here: one request id header, one mapping of
transport failures to a 504 (timed out) or a 502 (unreachable) counted in
`capgate_upstream_errors_total`, one log line for an error of capgate's own while relaying.
"""

import logging
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
    """The request vLLM gets: `body` as JSON to the flight's endpoint on its upstream."""
    return pool.client.build_request(
        "POST",
        flight.upstream.upstream.url + flight.endpoint,
        content=orjson.dumps(body),
        headers={"content-type": "application/json", "x-request-id": flight.request_id, **(headers or {})},
    )


async def send(pool: UpstreamPool, flight: Flight, request: httpx.Request, stream: bool) -> httpx.Response:
    """vLLM's response (its body unread when `stream`); a transport failure is recorded on the
    flight and raised as a 504 or 502 `APIError`."""
    try:
        return await pool.client.send(request, stream=stream)
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
