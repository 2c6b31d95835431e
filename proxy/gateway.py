"""One generation request, end to end: the policy decides, the meter reserves, the proxy
streams, the meter settles, the metrics observe.

`Gateway.handle` serves `POST /v1/chat/completions` and `POST /v1/completions`. Settlement runs
exactly once per request whatever way it ends (normal end, upstream error, client hang-up,
budget cut, shutdown) and is shielded from cancellation.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from metering.events import UsageEvent
from metering.lease import StreamBudget
from metering.meter import (
    CapExceeded,
    ConcurrencyExceeded,
    Meter,
    MeterUnavailable,
    Reservation,
    ReserveRequest,
)
from metering.prompt import chat_prompt_bound, completion_prompt_bound, completion_prompts
from metering.settler import Settler
from metering.spool import SpoolFull
from policies.budget import BudgetPlan, PromptOverCap, plan_budget
from policies.index import Principal
from policies.pricing import Usage, counted_tokens, value_nano
from proxy import metrics
from proxy.admission import Admission
from proxy.errors import APIError, rate_limited, unauthorized
from proxy.policy_store import PolicyStore
from proxy.relay import StreamTally, UsageMode, relay
from proxy.settings import Settings
from proxy.upstream import UpstreamPool, UpstreamState

log = logging.getLogger("capgate.gateway")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions
HANG_UP_GRACE_S = 0.25
# Outcomes the ledger records as the finish reason, whatever vLLM's last chunk said.
ABNORMAL_ENDS = frozenset(
    {"cut_at_budget", "client_disconnected", "upstream_error", "upstream_timeout", "shutdown"}
)


@dataclass
class Flight:
    """One request in flight, from admission to settlement."""

    request_id: str
    principal: Principal
    model: str
    endpoint: str
    started: float
    plan: BudgetPlan
    reservation: Reservation | None = None
    tally: StreamTally = field(default_factory=lambda: StreamTally(time.monotonic()))
    upstream: UpstreamState | None = None
    outcome: str = "ok"
    settled: bool = False


def bearer_key(request: Request) -> str:
    """The API key of `Authorization: Bearer KEY`, or a 401."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return key.strip()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"request body is over {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict:
    """The body as a JSON object, or a 400."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def _int_field(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer", param=name, code="invalid_value")
    return value


class RelayResponse(StreamingResponse):
    """Streams `body` to the client while watching for the client hanging up.

    On a hang-up `on_disconnect` is called and the body gets `HANG_UP_GRACE_S` to drain and
    finish by itself before it is cancelled; `finish` runs after the stream in every case,
    shielded from cancellation.
    """

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        status_code: int,
        headers: dict[str, str],
        on_disconnect: Callable[[], None],
        finish: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(body, status_code=status_code, headers=headers, media_type="text/event-stream")
        self.on_disconnect = on_disconnect
        self.finish = finish
        self._gone = False

    def _hang_up(self) -> None:
        if not self._gone:
            self._gone = True
            self.on_disconnect()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streamer = asyncio.create_task(self._stream(send))

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self._hang_up()
            await asyncio.wait({streamer}, timeout=HANG_UP_GRACE_S)
            streamer.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            streamer.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            await asyncio.shield(asyncio.ensure_future(self.finish()))

    async def _stream(self, send: Send) -> None:
        body = self.body_iterator
        assert isinstance(body, AsyncGenerator)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in body:
                if self._gone:
                    continue
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:
                    self._hang_up()
        finally:
            await body.aclose()
        if not self._gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class Gateway:
    """The generation endpoints over the policy, the meter and the upstreams."""

    def __init__(
        self,
        settings: Settings,
        policies: PolicyStore,
        pool: UpstreamPool,
        meter: Meter,
        settler: Settler,
        admission: Admission,
    ) -> None:
        self.settings = settings
        self.policies = policies
        self.pool = pool
        self.meter = meter
        self.settler = settler
        self.admission = admission
        self.flights: dict[str, Flight] = {}
        self._local_live: dict[str, int] = {}

    async def handle(self, request: Request) -> Response:
        started = time.monotonic()
        try:
            return await self._handle(request, started)
        except APIError as error:
            return error.response()

    def principal(self, request: Request) -> Principal:
        """The caller, from their bearer key, or a 401."""
        found = self.policies.index.principal_for_key(bearer_key(request))
        if found is None:
            raise unauthorized("unknown API key")
        return found

    async def _handle(self, request: Request, started: float) -> Response:
        endpoint = request.url.path
        principal = self.principal(request)
        body = parse_json_object(await read_body(request, self.settings.max_body_bytes))
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required", param="model", code="missing_model")
        served = self.pool.models()
        if not served:
            raise APIError(
                502,
                "no upstream vLLM server is reachable",
                type="upstream_error",
                code="upstream_unreachable",
            )
        if model not in served:
            raise APIError(
                404,
                f"The model `{model}` does not exist.",
                type="NotFoundError",
                param="model",
                code="model_not_found",
            )
        tier = principal.tier
        if not tier.allows_model(model):
            raise APIError(
                403,
                f"tier '{principal.tier_name}' may not use model `{model}`",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )
        upstream = self.pool.pick(model)
        if upstream is None:
            raise APIError(502, "no healthy upstream serves this model", type="upstream_error")
        chat = endpoint == CHAT
        streaming = bool(body.get("stream"))
        plan, outputs = await self._plan(body, principal, upstream, served[model], chat, streaming)
        best = min(t.priority for t in self.policies.index.policy.tiers.values())
        await self.admission.admit(principal.tier_name, tier.priority, best, model)
        flight = Flight(uuid.uuid4().hex, principal, model, endpoint, started, plan)
        flight.tally.outputs = outputs
        flight.tally.open_choices = set(range(outputs))
        flight.upstream = upstream
        budget = await self._reserve(flight)
        mode = UsageMode.of(body)
        self._rewrite(body, flight, budget, chat=chat, context=served[model])
        self.flights[flight.request_id] = flight
        upstream.in_flight += 1
        metrics.ADDED.observe(time.monotonic() - started)
        try:
            if streaming:
                return await self._stream(body, flight, budget, mode, chat)
            return await self._unary(body, flight)
        except BaseException:
            await self._finish(flight, budget)
            raise

    async def _plan(
        self,
        body: dict,
        principal: Principal,
        upstream: UpstreamState,
        context: int,
        chat: bool,
        streaming: bool,
    ) -> tuple[BudgetPlan, int]:
        """The budget plan: prompt bound, the client's limit, the model's room, n outputs."""
        n = _int_field(body, "n") or 1
        if chat:
            asked = _int_field(body, "max_completion_tokens")
            if asked is None:
                asked = _int_field(body, "max_tokens")
            prompts = 1
        else:
            asked = _int_field(body, "max_tokens")
            if asked is None:
                asked = COMPLETIONS_DEFAULT_MAX_TOKENS
            prompts = len(completion_prompts(body.get("prompt", "")))
            n = max(n, _int_field(body, "best_of") or 1)
        outputs = n * prompts
        overhead = upstream.overheads.get(body["model"])
        if self.settings.prompt_bound == "tokenize" or overhead is None:
            key = "messages" if chat else "prompt"
            try:
                bound = await self.pool.count_prompt(
                    upstream, {"model": body["model"], key: body.get(key, "")}
                )
            except httpx.HTTPStatusError as exc:
                raise APIError(400, f"cannot tokenize the prompt: {exc.response.text}") from exc
            except httpx.HTTPError as exc:
                raise APIError(502, f"upstream unreachable: {exc}", type="upstream_error") from exc
        elif chat:
            bound = chat_prompt_bound(body, overhead)
        else:
            bound = completion_prompt_bound(body, overhead)
        room = max(1, context - 1)
        try:
            plan = plan_budget(
                principal.tier,
                prompt_bound=bound,
                asked=asked,
                room=room,
                outputs=outputs,
                streaming=streaming,
            )
        except PromptOverCap as exc:
            raise APIError(400, str(exc), code="prompt_over_cap") from exc
        return plan, outputs

    async def _reserve(self, flight: Flight) -> StreamBudget:
        """Reserve in Redis; on outage follow the tier's fail mode."""
        principal, plan = flight.principal, flight.plan
        tier = principal.tier
        request = ReserveRequest(
            flight.request_id,
            principal.user_id,
            principal.tier_name,
            tier,
            flight.model,
            plan.fixed,
            plan.want_min,
            plan.first,
        )
        began = time.perf_counter()
        try:
            reservation = await self.meter.reserve(request)
        except CapExceeded as exc:
            metrics.CAP_REJECTIONS.labels(tier=principal.tier_name, window=exc.window).inc()
            metrics.REQUESTS.labels(principal.tier_name, flight.model, "cap_exceeded").inc()
            raise rate_limited(
                f"token cap reached for window '{exc.window}': {exc.used} of {exc.cap} tokens used",
                "cap_exceeded",
                exc.retry_after,
            ) from exc
        except ConcurrencyExceeded as exc:
            metrics.REQUESTS.labels(principal.tier_name, flight.model, "concurrency_limited").inc()
            raise rate_limited(
                f"too many concurrent requests: the tier allows {exc.limit}", "concurrency_exceeded", 1
            ) from exc
        except MeterUnavailable as exc:
            metrics.REDIS_ERRORS.labels(operation="reserve").inc()
            if tier.fail_mode == "closed":
                metrics.REQUESTS.labels(principal.tier_name, flight.model, "meter_unavailable").inc()
                raise APIError(
                    503,
                    "metering is unavailable; this tier is not served without it",
                    type="service_unavailable",
                    code="meter_unavailable",
                    headers={"Retry-After": "1"},
                ) from exc
            return self._fail_open(flight)
        finally:
            metrics.REDIS_LATENCY.labels(operation="reserve").observe(time.perf_counter() - began)
        flight.reservation = reservation
        metrics.RESERVATIONS.inc()
        limit = reservation.granted
        ceiling = plan.ceiling
        if plan.leased and reservation.left >= 0:
            ceiling = min(ceiling, reservation.granted + reservation.left)
        return StreamBudget(
            self.meter,
            reservation,
            limit=limit,
            ceiling=ceiling if plan.leased else limit,
            lease=tier.lease_tokens if plan.leased else None,
            counts_completion=tier.counts("completion"),
            fail_open=tier.fail_mode == "open",
        )

    def _fail_open(self, flight: Flight) -> StreamBudget:
        """Serve without Redis within the per-request cap; usage settles through the spool."""
        principal = flight.principal
        limit = principal.tier.max_concurrent
        live = self._local_live.get(principal.user_id, 0)
        if limit is not None and live >= limit:
            raise rate_limited(
                f"too many concurrent requests: the tier allows {limit}", "concurrency_exceeded", 1
            )
        if self.settler.spool.size() >= self.settler.spool.max_bytes:
            raise APIError(
                503,
                "metering is unavailable and the usage spool is full",
                type="service_unavailable",
                code="meter_unavailable",
            )
        self._local_live[principal.user_id] = live + 1
        flight.outcome = "ok_fail_open"
        return StreamBudget(
            None,
            None,
            limit=flight.plan.ceiling,
            ceiling=flight.plan.ceiling,
            lease=None,
            counts_completion=principal.tier.counts("completion"),
        )

    def _rewrite(self, body: dict, flight: Flight, budget: StreamBudget, *, chat: bool, context: int) -> None:
        """Set vLLM's priority from the tier, lower the completion limit to what the budget holds
        (and vLLM's `min_tokens` with it), and ask for cumulative usage on every chunk of a stream.

        A client limit over the model's context is left alone: vLLM refuses it with its own 400.
        """
        body["priority"] = flight.principal.tier.priority
        if flight.principal.tier.counts("completion"):
            allowance = budget.ceiling if budget.leased else budget.limit
            per_output = allowance // flight.tally.outputs
            names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
            present = [name for name in names if body.get(name) is not None]
            limit = min((body[name] for name in present), default=context)
            for name in present or names[-1:]:
                asked = body.get(name)
                if asked is None or per_output < asked <= context:
                    body[name] = per_output
            floor = body.get("min_tokens")
            if isinstance(floor, int) and per_output < floor <= limit:
                body["min_tokens"] = per_output  # vLLM refuses min_tokens over max_tokens
        if body.get("stream"):
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}

    def _upstream_request(self, flight: Flight, body: dict) -> httpx.Request:
        assert flight.upstream is not None
        return self.pool.client.build_request(
            "POST",
            flight.upstream.upstream.url + flight.endpoint,
            content=json.dumps(body, separators=(",", ":")).encode(),
            headers={"content-type": "application/json", "x-request-id": flight.request_id},
        )

    async def _send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        try:
            return await self.pool.client.send(request, stream=stream)
        except httpx.TimeoutException as exc:
            metrics.UPSTREAM_ERRORS.labels(kind="timeout").inc()
            raise APIError(
                504,
                f"upstream timed out: {type(exc).__name__}",
                type="upstream_error",
                code="upstream_timeout",
            ) from exc
        except httpx.HTTPError as exc:
            metrics.UPSTREAM_ERRORS.labels(kind="unreachable").inc()
            raise APIError(
                502, f"upstream unreachable: {exc}", type="upstream_error", code="upstream_unreachable"
            ) from exc

    async def _unary(self, body: dict, flight: Flight) -> Response:
        response = await self._send(self._upstream_request(flight, body), stream=False)
        content = response.content
        if response.is_success:
            reply = json.loads(content)
            flight.tally.record(reply.get("usage") or {})
            reasons = [c.get("finish_reason") for c in reply.get("choices") or [] if c.get("finish_reason")]
            flight.tally.finish_reason = reasons[-1] if reasons else None
        else:
            flight.outcome = "upstream_error"
        return Response(
            content,
            status_code=response.status_code,
            headers={"x-request-id": flight.request_id},
            media_type=response.headers.get("content-type"),
            background=BackgroundTask(self._finish, flight, None),
        )

    async def _stream(
        self, body: dict, flight: Flight, budget: StreamBudget, mode: UsageMode, chat: bool
    ) -> Response:
        response = await self._send(self._upstream_request(flight, body), stream=True)
        if not response.is_success:
            content = await response.aread()
            await response.aclose()
            flight.outcome = "upstream_error"
            await self._finish(flight, budget)
            return Response(
                content, status_code=response.status_code, media_type=response.headers.get("content-type")
            )

        async def body_bytes() -> AsyncGenerator[bytes, None]:
            try:
                async for chunk in relay(response, flight.tally, budget, mode, chat=chat):
                    yield chunk
            except httpx.HTTPError as exc:
                timeout = isinstance(exc, httpx.TimeoutException)
                metrics.UPSTREAM_ERRORS.labels(kind="timeout" if timeout else "stream_broken").inc()
                flight.outcome = "upstream_timeout" if timeout else "upstream_error"
                error = APIError(
                    504 if timeout else 502, f"upstream stream failed: {exc!r}", type="upstream_error"
                )
                yield b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n"
            except asyncio.CancelledError:
                flight.outcome = "client_disconnected"
                raise
            finally:
                await response.aclose()

        def hang_up() -> None:
            flight.tally.client_gone = True
            if flight.tally.open_choices:  # after every choice finished (SDKs close at [DONE]): served
                flight.outcome = "client_disconnected"

        async def finish() -> None:
            await self._finish(flight, budget)

        headers = {"x-request-id": flight.request_id, "cache-control": "no-cache"}
        return RelayResponse(body_bytes(), response.status_code, headers, hang_up, finish)

    async def _finish(self, flight: Flight, budget: StreamBudget | None) -> None:
        """Settle once, release what the request held, and observe it."""
        if flight.settled:
            return
        flight.settled = True
        self.flights.pop(flight.request_id, None)
        if flight.upstream is not None:
            flight.upstream.in_flight -= 1
        if budget is not None:
            await budget.close()
            if budget.leased:
                metrics.LEASES.labels(outcome="granted").inc(budget.granted_leases)
                metrics.LEASES.labels(outcome="refused").inc(int(budget.refused))
        principal, tally = flight.principal, flight.tally
        tier = principal.tier
        if tally.cut:
            flight.outcome = "cut_at_budget"
        elif tally.upstream_error and flight.outcome == "ok":
            flight.outcome = "upstream_error"
        usage = Usage(tally.prompt_tokens, tally.completion_tokens, tally.cached_tokens)
        now = time.monotonic()
        ttft = tally.first_token_at - flight.started if tally.first_token_at else None
        event = UsageEvent(
            request_id=flight.request_id,
            user=principal.user_id,
            tier=principal.tier_name,
            model=flight.model,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            value_nano=value_nano(tier, usage),
            counted=counted_tokens(tier, usage),
            finish_reason=flight.outcome
            if flight.outcome in ABNORMAL_ENDS
            else tally.finish_reason or flight.outcome,
            ttft_ms=None if ttft is None else ttft * 1000,
            duration_ms=(now - flight.started) * 1000,
            ts_ms=int(time.time() * 1000),
        )
        began = time.perf_counter()
        try:
            await self.settler.settle(event, tier.caps.windows)
        except SpoolFull:
            log.error("usage of %s lost: redis down and spool full", flight.request_id)
        metrics.REDIS_LATENCY.labels(operation="settle").observe(time.perf_counter() - began)
        if flight.reservation is not None:
            metrics.RESERVATIONS.dec()
        else:
            live = self._local_live.get(principal.user_id, 1) - 1
            if live > 0:
                self._local_live[principal.user_id] = live
            else:
                self._local_live.pop(principal.user_id, None)
        if usage.prompt_tokens > flight.plan.fixed and tier.counts("prompt"):
            metrics.PROMPT_BOUND_EXCEEDED.inc()
        self._observe(flight, event, now)

    def _observe(self, flight: Flight, event: UsageEvent, now: float) -> None:
        tier, tally = event.tier, flight.tally
        metrics.REQUESTS.labels(tier, event.model, flight.outcome).inc()
        metrics.TOKENS.labels(tier, "prompt").inc(event.prompt_tokens - event.cached_tokens)
        metrics.TOKENS.labels(tier, "cached_prompt").inc(event.cached_tokens)
        metrics.TOKENS.labels(tier, "completion").inc(event.completion_tokens)
        metrics.VALUE.labels(tier).inc(event.value_nano / 1e9)
        metrics.DURATION.labels(tier).observe(now - flight.started)
        if event.ttft_ms is not None:
            metrics.TTFT.labels(tier).observe(event.ttft_ms / 1000)
        if tally.first_token_at and tally.last_token_at and event.completion_tokens > 1:
            gap = (tally.last_token_at - tally.first_token_at) / (event.completion_tokens - 1)
            metrics.ITL.labels(tier).observe(gap)

    async def shutdown(self) -> None:
        """Settle every request still in flight (the server is stopping)."""
        for flight in list(self.flights.values()):
            flight.outcome = "shutdown"
            await self._finish(flight, None)
