"""One generation request, end to end: validated once, the policy decides, the meter reserves,
the upstream streams, the meter settles, the metrics observe.

`Gateway.handle` owns each request's lifecycle: once a reservation is held (or the tier's fail
mode serves without one), settlement runs exactly once whatever way the request ends, as the
`finish` of the response or, when no response is sent, in the handler's own `except`. How it
ended is decided by `proxy.flight.outcome_of` from the facts recorded along the way.
"""

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response

from metering.events import UsageEvent
from metering.meter import (
    AccountMoving,
    CapExceeded,
    ConcurrencyExceeded,
    Meter,
    MeterUnavailable,
    ReserveRequest,
    StoredResponse,
)
from metering.prompt import TemplateOverhead
from metering.settler import Settler
from metering.stream_budget import StreamBudget
from metering.windows import Scope
from policies.budget import BudgetPlan, OutputsOverCap, PromptOverCap, plan_budget
from policies.index import Principal
from policies.money import nano_to_decimal
from proxy import metrics
from proxy.admission import Admission
from proxy.dialect import Dialect
from proxy.directory import AccountUnusable, Directory
from proxy.errors import APIError, rate_limited, unauthorized
from proxy.flight import Flight, Outcome, outcome_of, usage_event
from proxy.generation import GenerationRequest
from proxy.inbound import api_key, read_body
from proxy.policy_store import PolicyStore
from proxy.server_timing import GatewayTime
from proxy.settings import Settings
from proxy.streaming import run_shielded
from proxy.upstream import UpstreamPool, UpstreamState

log = logging.getLogger("capgate.gateway")


def _no_upstream() -> APIError:
    return APIError(502, "no healthy upstream serves this model", type="upstream_error")


def _meter_unavailable(message: str) -> APIError:
    return APIError(
        503, message, type="service_unavailable", code="meter_unavailable", headers={"Retry-After": "1"}
    )


def _timed(response: Response, started: float, flight: Flight | None) -> Response:
    """`response` with its `Server-Timing` header (capgate's own time, the upstream's wait)."""
    forwarded = answered = None
    if flight is not None:
        forwarded, answered = flight.forwarded_at, flight.answered_at
    spent = GatewayTime.of(started, forwarded, answered, time.monotonic())
    if spent.pre is not None:
        metrics.OWN_TIME.observe(spent.total)
    response.headers["server-timing"] = spent.header()
    return response


def _prompt_param(request: GenerationRequest) -> str:
    """The field a request's prompt is sent in."""
    if "messages" in request.body:
        return "messages"
    return "input" if request.api in ("responses", "embeddings") else "prompt"


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
        directory: Directory,
    ) -> None:
        self.settings = settings
        self.policies = policies
        self.directory = directory
        self.pool = pool
        self.meter = meter
        self.settler = settler
        self.admission = admission
        self.flights: dict[str, Flight] = {}
        self._local_live: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._preempting: set[asyncio.Task[bool]] = set()

    async def principal(self, request: Request, key_header: str | None = None) -> Principal:
        """The caller, from their API key (bearer, or `key_header` when sent): a 401 for an unknown
        or expired key, a 403 for an account the policy cannot serve, a 503 when the key must be
        looked up in Redis and Redis cannot answer."""
        try:
            found = await self.directory.principal_for_key(api_key(request, key_header))
        except MeterUnavailable as exc:
            metrics.REDIS_ERRORS.labels(operation="account").inc()
            raise _meter_unavailable("accounts are unavailable: the API key cannot be checked") from exc
        except AccountUnusable as exc:
            raise APIError(403, str(exc), type="permission_error", code="account_unusable") from exc
        if found is None:
            raise unauthorized("unknown API key")
        return found

    async def handle(self, request: Request, dialect: Dialect) -> Response:
        """Serve one generation request; every error is a response in the dialect's shape."""
        started = time.monotonic()
        try:
            flight, budget = await self._open(request, dialect, started)
        except APIError as error:
            return _timed(dialect.render(error), started, None)
        finish = functools.partial(self._finish, flight, budget)
        try:
            context = self.pool.models().get(flight.model, flight.plan.ceiling)
            flight.forwarded_at = time.monotonic()
            metrics.ADDED.observe(flight.forwarded_at - started)
            response = await dialect.serve(
                self.pool, self.meter, flight, budget, finish, flight.principal.tier.priority, context
            )
        except APIError as error:
            await run_shielded(finish)
            response = dialect.render(error)
        except Exception as exc:
            log.error("request %s failed in capgate: %r", flight.request_id, exc, exc_info=exc)
            flight.fail(Outcome.RELAY_ERROR)
            await run_shielded(finish)
            failed = APIError(500, "capgate failed to serve the request", type="server_error")
            response = dialect.render(failed)
        except BaseException:
            await run_shielded(finish)
            raise
        return _timed(response, started, flight)

    def served_model(self, principal: Principal, model: str) -> int:
        """The context length of `model` when an upstream serves it and the caller's tier may use
        it; else a 502, 404 or 403."""
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
        if not principal.tier.allows_model(model):
            raise APIError(
                403,
                f"tier '{principal.tier_name}' may not use model `{model}`",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )
        return served[model]

    async def _open(self, request: Request, dialect: Dialect, started: float) -> tuple[Flight, StreamBudget]:
        """Authenticate, validate, plan, admit and reserve: a flight holding its budget."""
        principal = await self.principal(request, dialect.key_header)
        generation = dialect.parse(await read_body(request, self.settings.max_body_bytes))
        model = generation.model
        tier = principal.tier
        context = self.served_model(principal, model)
        prior = None if dialect.prior is None else await dialect.prior(self.meter, principal, generation)
        url = None if prior is None else prior.upstream
        upstream = self.pool.pick(model, url)
        if upstream is None:
            raise _no_upstream()
        plan = await self._plan(dialect, generation, principal, upstream, context, prior)
        request_id = uuid.uuid4().hex
        preemptible = tier.preemptible and generation.stream and dialect.leases
        ticket = await self.admission.admit(
            request_id,
            principal.tier_name,
            tier,
            self.policies.index.policy.tiers,
            model=model,
            user=principal.user_id,
            cost=plan.ceiling,
            preemptible=preemptible,
            starved=self._preempt,
            url=url,
        )
        if ticket is None:
            raise _no_upstream()
        try:
            flight = Flight(
                request_id,
                principal,
                generation,
                request.scope["path"],
                started,
                plan,
                ticket.upstream,
                preemptible=preemptible,
            )
            flight.tally.outputs = generation.outputs
            flight.tally.open_choices = set(range(generation.outputs))
            budget = await self._reserve(flight)
        except BaseException:
            await run_shielded(functools.partial(self.admission.free, ticket))
            raise
        self.flights[request_id] = flight
        objective = tier.ttft_objective_s
        if ticket.over_capacity and objective is not None:
            delay = objective * self.settings.admission.preempt_after
            self._timers[request_id] = asyncio.get_running_loop().call_later(
                delay, self._starved_in_vllm, flight
            )
        return flight, budget

    async def _plan(
        self,
        dialect: Dialect,
        request: GenerationRequest,
        principal: Principal,
        upstream: UpstreamState,
        context: int,
        prior: StoredResponse | None = None,
    ) -> BudgetPlan:
        """The budget plan: prompt bound, the client's limit, the model's room, the outputs.

        A request that continues a stored response (`prior`) has its conversation in the prompt:
        the prior's prompt tokens, the bound of its output, and the template of two messages more.

        A content part that is not text (an image, audio, a file) may stand for more prompt
        tokens than any bound capgate can prove without running the model's processor: for a
        tier that counts prompt tokens, or a user with a spend cap, such a request is refused."""
        if request.media is not None and (principal.tier.counts("prompt") or Scope.of(principal).spends):
            raise APIError(
                400,
                f"'{request.media}' is not text: this tier counts prompt tokens (or caps spend), and "
                "capgate cannot bound the prompt tokens of images, audio, video or files",
                param=request.media,
                code="unsupported_content",
            )
        overhead = upstream.overheads.get(request.model)
        if self.settings.prompt_bound == "tokenize" or overhead is None:
            bound = await dialect.exact_bound(self.pool, upstream, request)
        else:
            bound = dialect.local_bound(request, overhead)
        if prior is not None:
            per_message = (overhead or TemplateOverhead()).per_message
            bound += prior.prompt_tokens + prior.output_bound + 2 * per_message
        try:
            return plan_budget(
                principal.tier,
                prompt_bound=bound,
                asked=request.limit,
                room=max(1, context - 1),
                outputs=request.outputs,
                streaming=request.stream and dialect.leases,
                generates=dialect.generates,
                spends=Scope.of(principal).spends,
            )
        except PromptOverCap as exc:
            raise APIError(400, str(exc), param=_prompt_param(request), code="prompt_over_cap") from exc
        except OutputsOverCap as exc:
            raise APIError(400, str(exc), param="n", code="outputs_over_cap") from exc

    async def _reserve(self, flight: Flight) -> StreamBudget:
        """Reserve in Redis; when Redis fails, follow the tier's fail mode."""
        principal, plan = flight.principal, flight.plan
        tier = principal.tier
        scope = Scope.of(principal)
        request = ReserveRequest(
            flight.request_id,
            scope,
            principal.tier_name,
            tier,
            flight.model,
            plan.fixed,
            plan.want_min,
            plan.first,
            plan.prompt_bound,
        )
        began = time.perf_counter()
        try:
            reservation = await self.meter.reserve(request)
        except CapExceeded as exc:
            metrics.CAP_REJECTIONS.labels(tier=principal.tier_name, window=exc.window).inc()
            metrics.REQUESTS.labels(
                principal.tier_name, flight.model, flight.request.api, "cap_exceeded"
            ).inc()
            if exc.spend:
                currency = self.policies.index.policy.currency
                message = (
                    f"spend cap reached for window '{exc.window}': {nano_to_decimal(exc.used)} of "
                    f"{nano_to_decimal(exc.cap)} {currency} spent or held"
                )
            else:
                message = f"token cap reached for window '{exc.window}': {exc.used} of {exc.cap} tokens used"
            raise rate_limited(message, "cap_exceeded", exc.retry_after) from exc
        except AccountMoving as exc:
            self.directory.forget("user", principal.user_id)
            raise _meter_unavailable("the account is moving between teams; retry in a moment") from exc
        except ConcurrencyExceeded as exc:
            metrics.REQUESTS.labels(
                principal.tier_name, flight.model, flight.request.api, "concurrency_limited"
            ).inc()
            raise rate_limited(
                f"too many concurrent requests: the tier allows {exc.limit}", "concurrency_exceeded", 1
            ) from exc
        except MeterUnavailable as exc:
            metrics.REDIS_ERRORS.labels(operation="reserve").inc()
            if tier.fail_mode == "closed":
                metrics.REQUESTS.labels(
                    principal.tier_name, flight.model, flight.request.api, "meter_unavailable"
                ).inc()
                raise _meter_unavailable(
                    "metering is unavailable; this tier is not served without it"
                ) from exc
            log.warning("request %s served fail-open: redis unavailable (%s)", flight.request_id, exc)
            return self._fail_open(flight)
        finally:
            metrics.REDIS_LATENCY.labels(operation="reserve").observe(time.perf_counter() - began)
        flight.reservation = reservation
        metrics.RESERVATIONS.inc()
        ceiling = plan.ceiling
        if plan.leased and reservation.left >= 0:
            ceiling = min(ceiling, reservation.granted + reservation.left)
        return StreamBudget(
            self.meter,
            reservation,
            limit=reservation.granted,
            ceiling=ceiling if plan.leased else reservation.granted,
            lease=tier.lease_tokens if plan.leased else None,
            counts_completion=tier.counts("completion") or scope.spends,
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
        if self.settler.spool.full():
            raise APIError(
                503,
                "metering is unavailable and the usage spool is full",
                type="service_unavailable",
                code="meter_unavailable",
            )
        self._local_live[principal.user_id] = live + 1
        flight.fail_open = True
        return StreamBudget(
            None,
            None,
            limit=flight.plan.ceiling,
            ceiling=flight.plan.ceiling,
            lease=None,
            counts_completion=principal.tier.counts("completion") or Scope.of(principal).spends,
        )

    async def _finish(self, flight: Flight, budget: StreamBudget | None) -> None:
        """Settle once (to Redis or the spool), release what the request held, observe it."""
        if self.flights.pop(flight.request_id, None) is None:
            return
        timer = self._timers.pop(flight.request_id, None)
        if timer is not None:
            timer.cancel()
        ticket = self.admission.tickets.get(flight.request_id)
        if ticket is not None:
            await self.admission.free(ticket)
        if budget is not None:
            await budget.close()
            if budget.leased:
                metrics.LEASES.labels(outcome="granted").inc(budget.granted_leases)
                metrics.LEASES.labels(outcome="refused").inc(int(budget.refused))
        outcome = outcome_of(flight)
        now = time.monotonic()
        event = usage_event(flight, outcome, now, int(time.time() * 1000))
        tier = flight.principal.tier
        began = time.perf_counter()
        await self.settler.settle(event, Scope.of(flight.principal))
        metrics.REDIS_LATENCY.labels(operation="settle").observe(time.perf_counter() - began)
        if flight.reservation is not None:
            metrics.RESERVATIONS.dec()
        else:
            user = flight.principal.user_id
            live = self._local_live.get(user, 1) - 1
            if live > 0:
                self._local_live[user] = live
            else:
                self._local_live.pop(user, None)
        if event.prompt_tokens > flight.plan.fixed and tier.counts("prompt"):
            metrics.PROMPT_BOUND_EXCEEDED.inc()
        self._observe(flight, outcome, event, now)

    def _observe(self, flight: Flight, outcome: Outcome, event: UsageEvent, now: float) -> None:
        tier, tally = event.tier, flight.tally
        route = flight.request.api
        metrics.REQUESTS.labels(tier, event.model, route, outcome.value).inc()
        metrics.TOKENS.labels(tier, route, "prompt").inc(event.prompt_tokens - event.cached_tokens)
        metrics.TOKENS.labels(tier, route, "cached_prompt").inc(event.cached_tokens)
        metrics.TOKENS.labels(tier, route, "completion").inc(event.completion_tokens)
        metrics.VALUE.labels(tier).inc(event.value_nano / 1e9)
        metrics.DURATION.labels(tier, route).observe(now - flight.started)
        if event.ttft_ms is not None:
            metrics.TTFT.labels(tier, route).observe(event.ttft_ms / 1000)
            self.admission.observe_ttft(tier, flight.principal.tier, event.ttft_ms / 1000)
        if tally.first_token_at and tally.last_token_at and event.completion_tokens > 1:
            gap = (tally.last_token_at - tally.first_token_at) / (event.completion_tokens - 1)
            metrics.ITL.labels(tier, route).observe(gap)

    async def _preempt(self, priority: int, upstreams: Sequence[UpstreamState]) -> bool:
        """Ask the stream that matters least on one of `upstreams` to end, for a request of
        `priority` that has no slot: the worst-priority stream of a `preemptible` tier worse
        than `priority`, chosen over every replica in Redis (its replica ends it within
        `release_interval_s`); else, of this process's streams Redis does not list (it was
        unreachable when they started), one already generating, the worst, the newest. False
        when there is none."""
        chosen = await self.admission.preempt(priority, upstreams)
        if chosen is not None:
            if (flight := self.flights.get(chosen)) is not None:
                self._end_early(flight, priority)
            return True
        victims = [
            flight
            for flight in self.flights.values()
            if flight.preemptible
            and flight.principal.tier.priority > priority
            and not flight.tally.preempt
            and any(flight.upstream is state for state in upstreams)
            and not self._listed(flight)
        ]
        if not victims:
            return False
        victim = max(
            victims,
            key=lambda f: (f.tally.first_token_at is not None, f.principal.tier.priority, f.started),
        )
        self._end_early(victim, priority)
        return True

    def _listed(self, flight: Flight) -> bool:
        ticket = self.admission.tickets.get(flight.request_id)
        return ticket is not None and ticket.preemptible

    def _end_early(self, flight: Flight, priority: int | None = None) -> None:
        """Have a preempted stream end at its next chunk."""
        if flight.tally.preempt:
            return
        flight.tally.preempt = True
        metrics.PREEMPTIONS.labels(tier=flight.principal.tier_name).inc()
        log.info("request %s preempted for a request of priority %s", flight.request_id, priority)

    async def end_preempted(self) -> None:
        """End this process's streams that a replica asked to end (see `_preempt`)."""
        for request_id in await self.admission.asked_to_end():
            if (flight := self.flights.get(request_id)) is not None:
                self._end_early(flight)

    def _starved_in_vllm(self, flight: Flight) -> None:
        """A protected request sent past its upstream's capacity has no first token yet."""
        self._timers.pop(flight.request_id, None)
        if flight.request_id in self.flights and flight.tally.first_token_at is None:
            task = asyncio.create_task(self._preempt(flight.principal.tier.priority, [flight.upstream]))
            self._preempting.add(task)
            task.add_done_callback(self._preempting.discard)

    async def refresh(self) -> None:
        """Push out the lease of every reservation in flight and record its usage so far, whatever
        the request is doing (waiting in vLLM's queue, generating a unary answer, streaming), so
        the reaper never takes a live request's reservation. Run every third of the lease TTL."""

        async def touch(flight: Flight) -> None:
            assert flight.reservation is not None
            tally = flight.tally
            try:
                await self.meter.extend(
                    flight.reservation,
                    want_min=0,
                    want_max=0,
                    prompt_tokens=tally.prompt_tokens,
                    cached_tokens=tally.cached_tokens,
                    completion_tokens=tally.completion_tokens,
                )
            except MeterUnavailable as exc:
                metrics.REDIS_ERRORS.labels(operation="refresh").inc()
                log.warning("lease of %s not refreshed: redis unavailable (%s)", flight.request_id, exc)

        held = [flight for flight in self.flights.values() if flight.reservation is not None]
        await asyncio.gather(*(touch(flight) for flight in held))

    async def shutdown(self) -> None:
        """Settle every request still in flight (the server is stopping)."""
        for flight in list(self.flights.values()):
            flight.fail(Outcome.SHUTDOWN)
            await self._finish(flight, None)
