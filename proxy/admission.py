"""Capacity-aware admission: which upstream a request goes to, and whether it goes now, waits or
is shed.

Every request sent to an upstream holds one of its slots, counted in Redis (`slot_take.lua`) by
every capgate replica and worker, so what all of them have sent to one vLLM at once is known
exactly, including bursts that arrive between two polls of vLLM's `/metrics`. An upstream's
capacity is its `slots` setting, else learned from vLLM's gauges (`UpstreamState.capacity`).

The tier(s) with the best (lowest) priority are never held: they take a slot even past capacity
(then they wait in vLLM's own priority queue). Every other tier may fill an upstream only up to
the limit its protected tiers leave: a protected tier is a best-priority tier or one with a
`ttft_objective_s`; tiers below it never take its `headroom` slots, nor more than the share of
capacity its `HeadroomControl` adapts to its measured time to first token. vLLM's own gauges
are a second signal: an upstream with `max_waiting` requests waiting or its KV cache fuller than
`max_kv_cache_usage` takes no request of a held tier.

A request that finds no room waits in a `FairQueue` (priority first, then the users of one
priority in turn, weighted by the tokens asked); across replicas, the slot script lets the
replica whose next request has the better priority, or has waited longer, go first. The queue is
retried every `release_interval_s` and whenever this process frees a slot; a request still waiting after
`queue_timeout_s` is shed with a 429. When Redis cannot be reached, slots are counted by this
process alone (`capgate_redis_errors_total{operation="slot"}`) once takes have failed for
`local_count_after_s` (until then held tiers wait: a slow Redis reply is not an outage, and
counting alone while other replicas count too would overfill the upstream); once it is back those
tickets still count against this process's takes until they end; when an upstream's load is
unknown (stale or missing metrics) only its slot count applies, said in a log line and in
`capgate_admission_degraded`.
"""

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from metering.meter import Meter, MeterUnavailable, SlotTurn
from policies.schema import Tier
from proxy import background, metrics
from proxy.errors import rate_limited
from proxy.fair_queue import FairQueue
from proxy.headroom import HeadroomControl
from proxy.settings import AdmissionSettings
from proxy.upstream import UpstreamPool, UpstreamState

log = logging.getLogger("capgate.admission")

UNLIMITED = 1 << 30
Starved = Callable[[int, Sequence[UpstreamState]], Awaitable[bool]]


@dataclass(eq=False)
class Ticket:
    """A request's slot on the upstream it was admitted to."""

    request_id: str
    upstream: UpstreamState
    counted: bool  # counted in Redis (else by this process alone)
    over_capacity: bool = False  # every slot was taken: it waits in vLLM's own queue
    preemptible: bool = False  # listed in Redis as a stream another replica may ask to end


@dataclass(eq=False)
class _Waiter:
    request_id: str
    tier: Tier
    tiers: Mapping[str, Tier]
    best: int  # the best priority of `tiers`
    model: str
    preemptible: bool
    url: str | None  # the one upstream it may go to (a stored response's), else any
    ready: asyncio.Future[Ticket] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission:
    """Decides, per request, which upstream it goes to and when, or sheds it."""

    def __init__(self, settings: AdmissionSettings, pool: UpstreamPool, meter: Meter) -> None:
        self.settings = settings
        self.pool = pool
        self.meter = meter
        self.replica = uuid.uuid4().hex  # this process, in the slot scripts' waiting records
        self.tickets: dict[str, Ticket] = {}
        self.controls: dict[str, HeadroomControl] = {}
        self._uncounted: dict[str, int] = {}  # per upstream: tickets Redis does not count
        self._queue: FairQueue[_Waiter] = FairQueue()
        self._wake = asyncio.Event()
        self._degraded = False
        self._unreachable_since: float | None = None  # when slot takes started failing
        self._loops: list[asyncio.Task[None]] = []

    @property
    def _wait_ttl_s(self) -> float:
        """How long this process's waiting record lasts in Redis unless its pump asks again."""
        return max(0.25, 4 * self.settings.release_interval_s)

    # --- deciding ---------------------------------------------------------------------------------

    def control(self, name: str, tier: Tier) -> HeadroomControl | None:
        """The headroom control of a tier with a time-to-first-token objective."""
        objective = tier.ttft_objective_s
        if objective is None:
            self.controls.pop(name, None)
            return None
        found = self.controls.get(name)
        if found is None:
            s = self.settings
            found = self.controls[name] = HeadroomControl(objective, s.min_share, s.backoff, s.step)
        found.objective_s = objective
        return found

    def limit(self, tier: Tier, tiers: Mapping[str, Tier], best: int, capacity: int | None) -> int:
        """The most requests an upstream of `capacity` slots may hold once one of `tier` is let in
        (`best`: the best priority of `tiers`)."""
        if tier.priority <= best or capacity is None:
            return UNLIMITED
        limit = capacity
        for name, guarded in tiers.items():
            if guarded.priority >= tier.priority:
                continue
            control = self.control(name, guarded)
            if control is not None:
                limit = min(limit, control.limit(capacity, self.settings.headroom))
            elif guarded.priority == best:
                limit = min(limit, max(0, capacity - self.settings.headroom))
        return limit

    def _saturated(self, state: UpstreamState, now: float) -> bool:
        load = state.fresh_load(now, self.settings.stale_after_s)
        return load is not None and (
            load.waiting >= self.settings.max_waiting
            or load.kv_cache_usage >= self.settings.max_kv_cache_usage
        )

    def _note_degraded(self, states: Sequence[UpstreamState], now: float) -> None:
        degraded = any(state.fresh_load(now, self.settings.stale_after_s) is None for state in states)
        if degraded != self._degraded:
            self._degraded = degraded
            metrics.ADMISSION_DEGRADED.set(int(degraded))
            if degraded:
                log.warning("vLLM load unknown (no fresh metrics): admission forwards all within slots")
            else:
                log.info("vLLM load known again: load-aware admission resumed")

    async def _take(self, waiter: _Waiter) -> Ticket | None:
        """A slot for `waiter` on the upstream with the most room for its tier, or None."""
        now = time.monotonic()
        tier, tiers, best = waiter.tier, waiter.tiers, waiter.best
        states = self.pool.candidates(waiter.model, waiter.url)
        if tier.priority > best:
            states = [state for state in states if not self._saturated(state, now)]
        if not states:
            return None
        limits = [self.limit(tier, tiers, best, state.capacity) for state in states]
        try:
            index, sizes = await self.meter.take_slot(
                waiter.request_id,
                [
                    (state.upstream.label, max(0, limit - self._uncounted.get(state.upstream.label, 0)))
                    for state, limit in zip(states, limits, strict=True)
                ],
                self.settings.slot_ttl_s,
                SlotTurn(self.replica, waiter.model, tier.priority, self._wait_ttl_s),
                waiter.preemptible,
            )
            counted = True
            self._unreachable_since = None
        except MeterUnavailable as exc:
            metrics.REDIS_ERRORS.labels(operation="slot").inc()
            if self._unreachable_since is None:
                self._unreachable_since = now
            if tier.priority > best and now - self._unreachable_since < self.settings.local_count_after_s:
                log.debug("held: slot take failed (%s)", exc)
                return None
            log.debug("slots counted locally: redis unavailable (%s)", exc)
            rooms = [limit - state.in_flight for state, limit in zip(states, limits, strict=True)]
            index = max(range(len(states)), key=rooms.__getitem__)
            index = index if rooms[index] > 0 else None
            sizes, counted = [states[index].in_flight + 1] if index is not None else [], False
        if index is None:
            return None
        state = states[index]
        capacity = state.capacity
        over = capacity is not None and sizes[0] > capacity
        return self._issue(Ticket(waiter.request_id, state, counted, over, counted and waiter.preemptible))

    def _issue(self, ticket: Ticket) -> Ticket:
        ticket.upstream.in_flight += 1
        if not ticket.counted:
            label = ticket.upstream.upstream.label
            self._uncounted[label] = self._uncounted.get(label, 0) + 1
        self.tickets[ticket.request_id] = ticket
        return ticket

    async def admit(
        self,
        request_id: str,
        tier_name: str,
        tier: Tier,
        tiers: Mapping[str, Tier],
        *,
        model: str,
        user: str,
        cost: int,
        preemptible: bool = False,
        starved: Starved | None = None,
        url: str | None = None,
    ) -> Ticket | None:
        """The ticket of a request let through, None when none of the model's upstreams is
        healthy; a 429 `APIError` when it is shed. `preemptible`: a stream of a preemptible tier
        (another replica may ask to end it). `starved` is awaited once when a held request of a
        tier with an objective has waited `preempt_after` of it (it may free a slot). `url`: the
        only upstream the request may go to."""
        states = self.pool.candidates(model, url)
        if not states:
            return None
        if not self.settings.enabled:
            return self._issue(Ticket(request_id, states[0], counted=False))
        best = min(t.priority for t in tiers.values())
        waiter = _Waiter(request_id, tier, tiers, best, model, preemptible, url)
        ahead = self._queue.best_priority()
        if ahead is None or ahead > tier.priority or tier.priority <= waiter.best:
            ticket = await self._take(waiter)
            if ticket is not None:
                return ticket
        return await self._hold(waiter, tier_name, user, cost, starved)

    async def _hold(
        self, waiter: _Waiter, tier_name: str, user: str, cost: int, starved: Starved | None
    ) -> Ticket:
        self._queue.push(waiter, priority=waiter.tier.priority, user=user, cost=cost)
        gauge = metrics.ADMISSION_QUEUE.labels(tier=tier_name)
        gauge.inc()
        timeout = self.settings.queue_timeout_s
        objective = waiter.tier.ttft_objective_s
        handed = False
        try:
            if starved is not None and objective is not None:
                patience = min(timeout, objective * self.settings.preempt_after)
                with contextlib.suppress(TimeoutError):
                    ticket = await asyncio.wait_for(asyncio.shield(waiter.ready), patience)
                    handed = True
                    return ticket
                timeout -= patience
                await starved(waiter.tier.priority, self.pool.candidates(waiter.model, waiter.url))
            ticket = await asyncio.wait_for(asyncio.shield(waiter.ready), timeout)
            handed = True
            return ticket
        except TimeoutError:
            metrics.ADMISSION_SHED.labels(tier=tier_name).inc()
            raise rate_limited(
                "the model is saturated; requests of this tier are shed until it recovers",
                "server_overloaded",
                self.settings.retry_after_s,
            ) from None
        finally:
            gauge.dec()
            self._queue.remove(waiter)
            if not waiter.ready.done():
                waiter.ready.cancel()
            elif not handed and not waiter.ready.cancelled():
                await self.free(waiter.ready.result())

    async def _release(self) -> None:
        """Let held requests through, head of the queue first, while it finds a slot."""
        self._note_degraded([state for state in self.pool.states if state.healthy], time.monotonic())
        while (waiter := self._queue.peek()) is not None:
            ticket = await self._take(waiter)
            if ticket is None:
                return
            self._queue.take(waiter)
            if waiter.ready.done():
                await self.free(ticket)
            else:
                waiter.ready.set_result(ticket)

    # --- after admission --------------------------------------------------------------------------

    async def free(self, ticket: Ticket) -> None:
        """Give back a ticket's slot (once; later calls do nothing) and retry the held requests."""
        if self.tickets.pop(ticket.request_id, None) is None:
            return
        ticket.upstream.in_flight -= 1
        if not ticket.counted:
            self._uncounted[ticket.upstream.upstream.label] -= 1
        else:
            try:
                await self.meter.free_slot(ticket.upstream.upstream.label, ticket.request_id)
            except MeterUnavailable as exc:
                metrics.REDIS_ERRORS.labels(operation="slot").inc()
                log.warning("slot of %s left to expire: redis unavailable (%s)", ticket.request_id, exc)
        self._wake.set()

    async def preempt(self, priority: int, upstreams: Sequence[UpstreamState]) -> str | None:
        """Choose, over every replica's preemptible streams on `upstreams`, the one of the worst
        priority worse than `priority`, and post a notice for the replica that holds it: its
        request id, or None when there is none or Redis cannot be reached."""
        try:
            chosen = await self.meter.preempt_slot(
                [state.upstream.label for state in upstreams], priority, self.settings.slot_ttl_s
            )
        except MeterUnavailable as exc:
            metrics.REDIS_ERRORS.labels(operation="slot").inc()
            log.debug("preemption chosen locally: redis unavailable (%s)", exc)
            return None
        return None if chosen is None else chosen[1]

    async def asked_to_end(self) -> list[str]:
        """This process's preemptible streams another replica (or this one) asked to end."""
        mine = [rid for rid, ticket in self.tickets.items() if ticket.preemptible]
        if not mine:
            return []
        try:
            return await self.meter.preempted(mine)
        except MeterUnavailable as exc:
            metrics.REDIS_ERRORS.labels(operation="slot").inc()
            log.debug("preemption notices unread: redis unavailable (%s)", exc)
            return []

    def observe_ttft(self, tier_name: str, tier: Tier, ttft_s: float) -> None:
        """A request of `tier` got its first token after `ttft_s` seconds."""
        control = self.control(tier_name, tier)
        if control is None:
            return
        control.observe(ttft_s)
        if ttft_s > control.objective_s:
            metrics.TTFT_OBJECTIVE_MISSED.labels(tier=tier_name).inc()

    def adapt(self) -> None:
        """Close an interval of every headroom control; publish shares and capacities."""
        for name, control in self.controls.items():
            control.adapt()
            metrics.ADMISSION_SHARE.labels(tier=name).set(control.share)
            metrics.TTFT_OBJECTIVE_UNATTAINABLE.labels(tier=name).set(int(control.unattainable))
            if control.unattainable:
                log.warning("tier %s misses its ttft objective with lower tiers at their floor", name)
        for state in self.pool.states:
            metrics.UPSTREAM_CAPACITY.labels(upstream=state.upstream.label).set(state.capacity or math.nan)

    async def touch(self) -> None:
        """Push out the expiry of every slot this process holds in Redis."""
        by_upstream: dict[str, list[str]] = {}
        for ticket in self.tickets.values():
            if ticket.counted:
                by_upstream.setdefault(ticket.upstream.upstream.label, []).append(ticket.request_id)
        for label, request_ids in by_upstream.items():
            try:
                await self.meter.touch_slots(label, request_ids, self.settings.slot_ttl_s)
            except MeterUnavailable as exc:
                metrics.REDIS_ERRORS.labels(operation="slot").inc()
                log.warning("slots on %s not refreshed: redis unavailable (%s)", label, exc)

    def start(self) -> None:
        s = self.settings
        if s.enabled:
            self._loops = [
                background.start("admission", s.release_interval_s, self._release, wake=self._wake),
                background.start("admission_adapt", s.adapt_interval_s, self.adapt),
                background.start("slot_refresh", s.slot_ttl_s / 3, self.touch),
            ]

    async def stop(self) -> None:
        for loop in self._loops:
            await background.stop(loop)
