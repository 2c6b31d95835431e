"""Load-aware admission as pure logic: who waits, in which order they are let through, how many,
and what happens when vLLM's load is unknown. The upstream pool is a stub holding real
`UpstreamState`s whose load the tests set by hand; `_release` is the pump's one step, called
directly so that no timing is involved."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from proxy.admission import Admission
from proxy.errors import APIError
from proxy.settings import Admission as AdmissionSettings
from proxy.settings import Upstream
from proxy.upstream import Load, UpstreamState

TOP, MID, LOW = 0, 10, 20
MODEL = "tiny"


@dataclass
class StubPool:
    """What `Admission` reads of an `UpstreamPool`: its upstream states."""

    states: list[UpstreamState] = field(default_factory=list)

    def read(self, waiting: float, kv_cache_usage: float = 0.0, upstream: int = 0) -> None:
        """A fresh reading of one upstream's `/metrics`."""
        self.states[upstream].load = Load(waiting, 1.0, kv_cache_usage, time.monotonic())


def pool_of(upstreams: int = 1) -> StubPool:
    states = [
        UpstreamState(Upstream(url=f"http://127.0.0.1:{9000 + i}"), models={MODEL: 1024}, healthy=True)
        for i in range(upstreams)
    ]
    return StubPool(states)


def admission(pool: StubPool, **settings: object) -> Admission:
    base: dict[str, object] = {"max_waiting": 2, "queue_timeout_s": 30.0, "stale_after_s": 30.0}
    return Admission(AdmissionSettings.model_validate({**base, **settings}), pool)  # type: ignore[arg-type]


def shed_count(tier: str) -> float:
    return REGISTRY.get_sample_value("capgate_admission_shed_total", {"tier": tier}) or 0.0


def degraded() -> float | None:
    return REGISTRY.get_sample_value("capgate_admission_degraded")


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_top_tier_is_never_held_even_when_saturated() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.read(waiting=50, kv_cache_usage=1.0)
        gate = admission(pool)
        await asyncio.wait_for(gate.admit("top", TOP, TOP, MODEL), 1.0)
        assert gate._queue == []

    run(scenario)


def test_lower_tier_passes_at_once_when_vllm_has_room() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.read(waiting=1)
        await asyncio.wait_for(admission(pool).admit("low", LOW, TOP, MODEL), 1.0)

    run(scenario)


def test_saturation_by_kv_cache_alone_holds_lower_tiers() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.read(waiting=0, kv_cache_usage=0.99)
        gate = admission(pool)
        waiting = asyncio.create_task(gate.admit("low", LOW, TOP, MODEL))
        await settle()
        assert not waiting.done()
        gate._release()
        await settle()
        assert not waiting.done(), "a full KV cache has no room, whatever the waiting queue says"
        pool.read(waiting=0, kv_cache_usage=0.5)
        gate._release()
        await settle()
        assert waiting.done() and waiting.exception() is None

    run(scenario)


def test_release_goes_by_priority_then_arrival_and_respects_capacity() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.read(waiting=2)
        gate = admission(pool, max_waiting=2)
        order: list[str] = []

        async def request(name: str, priority: int) -> None:
            await gate.admit(name, priority, TOP, MODEL)
            order.append(name)

        arrivals = [("low-1", LOW), ("mid-1", MID), ("low-2", LOW), ("mid-2", MID), ("mid-3", MID)]
        tasks = []
        for name, priority in arrivals:
            tasks.append(asyncio.create_task(request(name, priority)))
            await settle()
        assert order == [] and len(gate._queue) == 5

        gate._release()
        await settle()
        assert order == [], "vLLM still has max_waiting requests waiting: nobody goes"

        pool.read(waiting=0)
        gate._release()
        await settle()
        assert order == ["mid-1", "mid-2"], "room for two: the best priority, oldest first"

        gate._release()
        await settle()
        assert order == ["mid-1", "mid-2"], "the same reading already gave its room away"

        pool.read(waiting=1)
        gate._release()
        await settle()
        assert order == ["mid-1", "mid-2", "mid-3"]

        pool.read(waiting=0)
        gate._release()
        await settle()
        assert order == ["mid-1", "mid-2", "mid-3", "low-1", "low-2"]
        await asyncio.gather(*tasks)

    run(scenario)


def test_a_better_tier_arriving_later_overtakes_queued_lower_ones() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.read(waiting=5)
        gate = admission(pool, max_waiting=1)
        low = asyncio.create_task(gate.admit("low", LOW, TOP, MODEL))
        await settle()
        mid = asyncio.create_task(gate.admit("mid", MID, TOP, MODEL))
        await settle()
        pool.read(waiting=0)
        gate._release()
        await settle()
        assert mid.done() and not low.done()
        low.cancel()
        await asyncio.gather(low, return_exceptions=True)

    run(scenario)


def test_a_request_still_waiting_at_the_timeout_is_shed_with_429() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.read(waiting=3)
        gate = admission(pool, max_waiting=1, queue_timeout_s=0.05, retry_after_s=7)
        before = shed_count("low")
        with pytest.raises(APIError) as caught:
            await gate.admit("low", LOW, TOP, MODEL)
        error = caught.value
        assert error.status == 429 and error.code == "server_overloaded"
        assert error.headers["Retry-After"] == "7"
        assert shed_count("low") == before + 1
        assert gate._queue == []

    run(scenario)


def test_a_cancelled_waiter_leaves_the_queue_and_takes_no_room() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.read(waiting=1)
        gate = admission(pool, max_waiting=1)
        gone = asyncio.create_task(gate.admit("mid", MID, TOP, MODEL))
        await settle()
        staying = asyncio.create_task(gate.admit("low", LOW, TOP, MODEL))
        await settle()
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert len(gate._queue) == 1
        pool.read(waiting=0)
        gate._release()
        await settle()
        assert staying.done() and staying.exception() is None

    run(scenario)


def test_unknown_load_degrades_to_forwarding_and_says_so() -> None:
    async def scenario() -> None:
        pool = pool_of(upstreams=2)
        pool.read(waiting=9, upstream=0)
        pool.read(waiting=9, upstream=1)
        gate = admission(pool, max_waiting=1)
        queued = asyncio.create_task(gate.admit("low", LOW, TOP, MODEL))
        await settle()
        assert not queued.done()

        pool.states[1].load = None
        gate._release()
        await settle()
        assert queued.done() and queued.exception() is None, "unknown load: the queue is let through"
        assert degraded() == 1
        await asyncio.wait_for(gate.admit("low", LOW, TOP, MODEL), 1.0)

        pool.read(waiting=0, upstream=1)
        gate._release()
        assert degraded() == 0

    run(scenario)


def test_stale_load_counts_as_unknown() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.states[0].load = Load(9, 1, 0.0, time.monotonic() - 10)
        gate = admission(pool, max_waiting=1, stale_after_s=1.0)
        await asyncio.wait_for(gate.admit("low", LOW, TOP, MODEL), 1.0)
        assert degraded() == 1
        pool.read(waiting=0)
        gate._release()
        assert degraded() == 0

    run(scenario)


def test_disabled_admission_holds_nobody() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.read(waiting=50, kv_cache_usage=1.0)
        await asyncio.wait_for(admission(pool, enabled=False).admit("low", LOW, TOP, MODEL), 1.0)

    run(scenario)
