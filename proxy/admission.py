"""Load-aware admission: when vLLM is saturated, lower tiers wait briefly, then are shed.

Saturation is read from vLLM's own `/metrics` (through the upstream pool): the least loaded
upstream has at least `max_waiting` requests waiting, or its KV cache is fuller than
`max_kv_cache_usage`. The tier(s) with the best (lowest) priority are never held back. Other
requests wait in one queue ordered by priority, and are let through, best priority first, as
vLLM's waiting queue drains; a request still waiting after `queue_timeout_s` is shed with a 429.
When vLLM's load is unknown (stale or missing metrics), admission forwards everything and says
so in a log line and in `capgate_admission_degraded`.
"""

import asyncio
import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field

from proxy import background, metrics
from proxy.errors import rate_limited
from proxy.settings import Admission as AdmissionSettings
from proxy.upstream import Load, UpstreamPool

log = logging.getLogger("capgate.admission")


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    tier: str = field(compare=False)
    ready: asyncio.Future[None] = field(compare=False)


class Admission:
    """Decides, per request, whether to forward now, wait, or shed."""

    def __init__(self, settings: AdmissionSettings, pool: UpstreamPool) -> None:
        self.settings = settings
        self.pool = pool
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._degraded = False
        self._released = 0
        self._reading: float | None = None
        self._pump: asyncio.Task[None] | None = None

    def _load(self, model: str | None = None) -> Load | None:
        """The load of the least loaded healthy upstream, or None when unknown."""
        now = time.monotonic()
        loads = [
            state.fresh_load(now, self.settings.stale_after_s)
            for state in self.pool.states
            if state.healthy and (model is None or model in state.models)
        ]
        known = [load for load in loads if load is not None]
        if not known or len(known) < len(loads):
            return None
        return min(known, key=lambda load: (load.waiting, load.kv_cache_usage))

    def _saturated(self, load: Load, extra: int = 0) -> bool:
        return (
            load.waiting + extra >= self.settings.max_waiting
            or load.kv_cache_usage >= self.settings.max_kv_cache_usage
        )

    def _note_degraded(self, degraded: bool) -> None:
        if degraded != self._degraded:
            self._degraded = degraded
            metrics.ADMISSION_DEGRADED.set(int(degraded))
            if degraded:
                log.warning("vLLM load unknown (metrics stale or missing): admission forwards all")
            else:
                log.info("vLLM load known again: load-aware admission resumed")

    async def admit(self, tier: str, priority: int, best_priority: int, model: str) -> None:
        """Return when the request may go to vLLM; raise a 429 `APIError` when it is shed."""
        if not self.settings.enabled or priority <= best_priority:
            return
        load = self._load(model)
        self._note_degraded(load is None)
        if load is None or (not self._saturated(load) and not self._queue):
            return
        waiter = _Waiter(priority, next(self._seq), tier, asyncio.get_running_loop().create_future())
        heapq.heappush(self._queue, waiter)
        gauge = metrics.ADMISSION_QUEUE.labels(tier=tier)
        gauge.inc()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.ready), self.settings.queue_timeout_s)
        except TimeoutError:
            metrics.ADMISSION_SHED.labels(tier=tier).inc()
            raise rate_limited(
                "the model is saturated; requests of this tier are shed until it recovers",
                "server_overloaded",
                self.settings.retry_after_s,
            ) from None
        finally:
            gauge.dec()
            if not waiter.ready.done():
                waiter.ready.cancel()
                self._queue = [w for w in self._queue if w is not waiter]
                heapq.heapify(self._queue)

    def _release(self) -> None:
        """Let queued requests through, best priority first, while the last reading of vLLM's load
        has room once those already let through on that same reading are counted."""
        load = self._load()
        self._note_degraded(load is None)
        if load is not None and load.read_at != self._reading:
            self._reading, self._released = load.read_at, 0
        while self._queue and (load is None or not self._saturated(load, self._released)):
            waiter = heapq.heappop(self._queue)
            if not waiter.ready.done():
                waiter.ready.set_result(None)
                self._released += 1

    def start(self) -> None:
        if self.settings.enabled:
            self._pump = background.start("admission", self.settings.interval_s / 2, self._release)

    async def stop(self) -> None:
        await background.stop(self._pump)
