"""Capacity-aware admission as logic: who waits, in which order they are let through, how many
slots each tier may fill, and what happens when vLLM's load is unknown or Redis is down. The
upstream pool is a stub holding real `UpstreamState`s whose load the tests set by hand; the meter
is an in-memory stand-in for the slot scripts (those are tested against a real Redis in
`tests/integration/test_meter_scripts.py`); `_release` is the pump's one step, called directly
so that no timing is involved."""

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from metering.meter import MeterUnavailable, SlotTurn
from policies.schema import Tier
from proxy.admission import UNLIMITED, Admission, Ticket
from proxy.errors import APIError
from proxy.settings import AdmissionSettings, UpstreamSettings
from proxy.upstream import Load, UpstreamState

MODEL = "tiny"
TIERS = {
    "top": Tier(priority=0),
    "pro": Tier(priority=5, ttft_objective_s=0.5),
    "mid": Tier(priority=10),
    "low": Tier(priority=20, preemptible=True),
}


@dataclass
class StubPool:
    """What `Admission` reads of an `UpstreamPool`: its upstream states."""

    states: list[UpstreamState] = field(default_factory=list)

    def read(self, waiting: float, kv_cache_usage: float = 0.0, upstream: int = 0) -> None:
        """A fresh reading of one upstream's `/metrics`."""
        self.states[upstream].load = Load(waiting, 1.0, kv_cache_usage, time.monotonic())

    def candidates(self, model: str, url: str | None = None) -> list[UpstreamState]:
        serving = [state for state in self.states if state.healthy and model in state.models]
        return [state for state in serving if url is None or state.upstream.url == url]


@dataclass
class SlotMeter:
    """The slot scripts' contract in memory, for one replica (turns between replicas are tested
    on Redis): take the upstream with the most room under its limit (idempotent per request id),
    free once. `down` makes every call fail as Redis being away."""

    slots: dict[str, set[str]] = field(default_factory=dict)
    victims: dict[str, dict[str, int]] = field(default_factory=dict)
    notices: set[str] = field(default_factory=set)
    down: bool = False

    def _check(self) -> None:
        if self.down:
            raise MeterUnavailable("connection refused")

    async def take_slot(
        self,
        request_id: str,
        limits: Sequence[tuple[str, int]],
        ttl_s: float,
        turn: SlotTurn,
        preemptible: bool = False,
    ) -> tuple[int | None, list[int]]:
        self._check()
        sizes = [len(self.slots.setdefault(label, set())) for label, _ in limits]
        for i, (label, _) in enumerate(limits):
            if request_id in self.slots[label]:
                return i, [sizes[i]]
        rooms = [limit - size for (_, limit), size in zip(limits, sizes, strict=True)]
        best = max(range(len(limits)), key=rooms.__getitem__)
        if rooms[best] <= 0:
            return None, sizes
        self.slots[limits[best][0]].add(request_id)
        if preemptible:
            self.victims.setdefault(limits[best][0], {})[request_id] = turn.priority
        return best, [sizes[best] + 1]

    async def free_slot(self, upstream: str, request_id: str) -> None:
        self._check()
        self.slots.get(upstream, set()).discard(request_id)
        self.victims.get(upstream, {}).pop(request_id, None)
        self.notices.discard(request_id)

    async def preempt_slot(
        self, upstreams: Sequence[str], priority: int, ttl_s: float
    ) -> tuple[str, str] | None:
        self._check()
        worse = [
            (rank, upstream, rid)
            for upstream in upstreams
            for rid, rank in self.victims.get(upstream, {}).items()
            if rank > priority
        ]
        if not worse:
            return None
        _, upstream, rid = max(worse)
        del self.victims[upstream][rid]
        self.notices.add(rid)
        return upstream, rid

    async def preempted(self, request_ids: Sequence[str]) -> list[str]:
        self._check()
        asked = [rid for rid in request_ids if rid in self.notices]
        self.notices.difference_update(asked)
        return asked

    async def touch_slots(self, upstream: str, request_ids: Sequence[str], ttl_s: float) -> int:
        self._check()
        return len(self.slots.get(upstream, set()) & set(request_ids))


def pool_of(upstreams: int = 1, slots: int | None = None) -> StubPool:
    states = [
        UpstreamState(
            UpstreamSettings(url=f"http://127.0.0.1:{9000 + i}", slots=slots),
            models={MODEL: 1024},
            healthy=True,
        )
        for i in range(upstreams)
    ]
    pool = StubPool(states)
    for i in range(upstreams):
        pool.read(waiting=0, upstream=i)
    return pool


def admission(pool: StubPool, meter: SlotMeter | None = None, **settings: object) -> Admission:
    base: dict[str, object] = {"max_waiting": 2, "queue_timeout_s": 30.0, "stale_after_s": 30.0}
    return Admission(
        AdmissionSettings.model_validate({**base, **settings}),
        pool,  # type: ignore[arg-type]
        meter or SlotMeter(),  # type: ignore[arg-type]
    )


class Requests:
    """Requests sent through one `Admission`, named, with the tickets they got."""

    def __init__(self, gate: Admission) -> None:
        self.gate = gate
        self.tasks: dict[str, asyncio.Task[Ticket | None]] = {}

    def send(self, name: str, tier: str, *, user: str | None = None, cost: int = 100, **kw: object) -> None:
        self.tasks[name] = asyncio.create_task(
            self.gate.admit(name, tier, TIERS[tier], TIERS, model=MODEL, user=user or name, cost=cost, **kw)  # type: ignore[arg-type]
        )

    def admitted(self) -> list[str]:
        """The requests holding a slot now (admitted and not freed), in the order sent."""
        return [name for name in self.tasks if name in self.gate.tickets]

    def ticket(self, name: str) -> Ticket:
        found = self.tasks[name].result()
        assert found is not None
        return found

    async def end(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_top_tier_is_never_held_even_past_capacity_and_saturated() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=2)
        pool.read(waiting=50, kv_cache_usage=1.0)
        gate = admission(pool)
        sent = Requests(gate)
        for i in range(4):
            sent.send(f"top-{i}", "top")
        await settle()
        assert len(sent.admitted()) == 4 and len(gate._queue) == 0
        assert [sent.ticket(f"top-{i}").over_capacity for i in range(4)] == [False, False, True, True]

    run(scenario)


def test_lower_tiers_never_take_the_headroom_slots() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=4)
        meter = SlotMeter()
        gate = admission(pool, meter, headroom=1)
        sent = Requests(gate)
        for i in range(10):
            sent.send(f"low-{i}", "low")
        await settle()
        assert sent.admitted() == ["low-0", "low-1", "low-2"], "a burst between polls stops at 4 - 1"
        assert len(meter.slots[pool.states[0].upstream.label]) == 3
        sent.send("top", "top")
        await settle()
        assert "top" in sent.admitted() and not sent.ticket("top").over_capacity
        await gate.free(sent.ticket("low-0"))
        await gate.free(sent.ticket("low-0"))  # freeing twice gives back one slot
        await gate._release()
        await settle()
        assert sent.admitted() == ["low-1", "low-2", "top"], "the headroom is a free slot, kept free"
        await gate.free(sent.ticket("top"))
        await gate._release()
        await settle()
        assert sent.admitted() == ["low-1", "low-2", "low-3"]
        await sent.end()

    run(scenario)


def test_a_protected_tier_shrinks_what_lower_tiers_may_fill_when_it_misses() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=8)
        gate = admission(pool, headroom=1, min_share=0.25, backoff=0.5)
        low, mid, pro = TIERS["low"], TIERS["mid"], TIERS["pro"]
        assert gate.limit(low, TIERS, 0, 8) == 7
        assert gate.limit(pro, TIERS, 0, 8) == 7, "below the best priority: the headroom holds"
        assert gate.limit(TIERS["top"], TIERS, 0, 8) == UNLIMITED
        assert gate.limit(low, TIERS, 0, None) == UNLIMITED, "unknown capacity holds nobody"
        gate.observe_ttft("pro", pro, 2.0)
        gate.adapt()
        assert gate.limit(low, TIERS, 0, 8) == 4 and gate.limit(mid, TIERS, 0, 8) == 4
        assert gate.limit(pro, TIERS, 0, 8) == 7, "a tier's own control never limits it"
        for _ in range(3):
            gate.observe_ttft("pro", pro, 2.0)
            gate.adapt()
        assert gate.limit(low, TIERS, 0, 8) == 2, "never below min_share"
        assert sample("capgate_ttft_objective_unattainable", {"tier": "pro"}) == 1
        gate.observe_ttft("pro", pro, 0.1)
        gate.adapt()
        assert gate.limit(low, TIERS, 0, 8) == 2 and gate.controls["pro"].share == pytest.approx(0.35)
        assert sample("capgate_ttft_objective_unattainable", {"tier": "pro"}) == 0

    run(scenario)


def test_saturation_by_kv_cache_alone_holds_lower_tiers() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.read(waiting=0, kv_cache_usage=0.99)
        gate = admission(pool)
        sent = Requests(gate)
        sent.send("low", "low")
        await settle()
        await gate._release()
        await settle()
        assert sent.admitted() == [], "a full KV cache has no room, whatever the slot count says"
        pool.read(waiting=0, kv_cache_usage=0.5)
        await gate._release()
        await settle()
        assert sent.admitted() == ["low"]

    run(scenario)


def test_release_goes_by_priority_and_fills_only_the_room_freed() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=3)
        gate = admission(pool, headroom=1)
        sent = Requests(gate)
        sent.send("first", "low")
        sent.send("second", "low")
        await settle()
        for name, tier in [("low-1", "low"), ("mid-1", "mid"), ("low-2", "low"), ("mid-2", "mid")]:
            sent.send(name, tier)
            await settle()
        assert sent.admitted() == ["first", "second"] and len(gate._queue) == 4
        await gate.free(sent.ticket("first"))
        await gate._release()
        await settle()
        assert sent.admitted() == ["second", "mid-1"], "one slot freed: the best priority goes"
        await gate.free(sent.ticket("second"))
        await gate.free(sent.ticket("mid-1"))
        await gate._release()
        await settle()
        assert sent.admitted() == ["low-1", "mid-2"]
        await sent.end()

    run(scenario)


def test_the_users_of_one_tier_take_turns_weighted_by_tokens_asked() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=2)
        gate = admission(pool, headroom=1)
        sent = Requests(gate)
        sent.send("running", "low", user="busy")
        await settle()
        for i in range(20):
            sent.send(f"busy-{i}", "low", user="busy", cost=400)
        await settle()
        sent.send("single", "low", user="quiet", cost=400)
        await settle()
        order = ["running"]
        for _ in range(4):
            await gate.free(sent.ticket(order[-1]))
            await gate._release()
            await settle()
            order += sent.admitted()
        assert order.index("single") <= 2, order
        await sent.end()

    run(scenario)


def test_a_request_still_waiting_at_the_timeout_is_shed_with_429() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=1)
        gate = admission(pool, headroom=1, queue_timeout_s=0.05, retry_after_s=7)
        before = sample("capgate_admission_shed_total", {"tier": "low"})
        with pytest.raises(APIError) as caught:
            await gate.admit("low", "low", TIERS["low"], TIERS, model=MODEL, user="u", cost=1)
        error = caught.value
        assert error.status == 429 and error.code == "server_overloaded"
        assert error.headers["Retry-After"] == "7"
        assert sample("capgate_admission_shed_total", {"tier": "low"}) == before + 1
        assert len(gate._queue) == 0 and gate.tickets == {}

    run(scenario)


def test_a_cancelled_waiter_leaves_the_queue_and_takes_no_slot() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=2)
        meter = SlotMeter()
        gate = admission(pool, meter, headroom=1)
        sent = Requests(gate)
        sent.send("running", "low")
        await settle()
        sent.send("gone", "mid")
        sent.send("staying", "low")
        await settle()
        sent.tasks.pop("gone").cancel()
        await settle()
        assert len(gate._queue) == 1
        await gate.free(sent.ticket("running"))
        await gate._release()
        await settle()
        assert sent.admitted() == ["staying"]
        assert meter.slots[pool.states[0].upstream.label] == {"staying"}

    run(scenario)


def test_a_starved_protected_request_asks_for_a_preemption_once() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=2)
        gate = admission(pool, headroom=0, preempt_after=0.2)
        sent = Requests(gate)
        sent.send("low-0", "low")
        sent.send("low-1", "low")
        await settle()
        calls: list[int] = []

        async def starved(priority: int, upstreams: Sequence[UpstreamState]) -> bool:
            calls.append(priority)
            assert list(upstreams) == pool.states
            return True

        sent.send("pro", "pro", starved=starved)
        await asyncio.sleep(0.15)
        assert calls == [5], "called after preempt_after x the 0.5 s objective"
        await gate.free(sent.ticket("low-0"))
        await gate._release()
        await settle()
        assert "pro" in sent.admitted() and calls == [5]
        await sent.end()

    run(scenario)


def test_redis_down_counts_slots_in_this_process_and_says_so() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=3)
        meter = SlotMeter(down=True)
        gate = admission(pool, meter, headroom=1, local_count_after_s=0)
        before = sample("capgate_redis_errors_total", {"operation": "slot"})
        sent = Requests(gate)
        for i in range(4):
            sent.send(f"low-{i}", "low")
        await settle()
        assert sent.admitted() == ["low-0", "low-1"], "the headroom holds on this process's count"
        assert not any(sent.ticket(name).counted for name in sent.admitted())
        assert sample("capgate_redis_errors_total", {"operation": "slot"}) == before + 3
        meter.down = False
        await gate.free(sent.ticket("low-0"))
        await gate._release()
        await settle()
        assert sent.admitted() == ["low-1", "low-2"] and sent.ticket("low-2").counted
        await sent.end()

    run(scenario)


def test_a_failing_slot_take_holds_lower_tiers_until_redis_counts_as_down() -> None:
    """A slow or refused take is not yet an outage: counting alone then, while other replicas
    count in Redis, would overfill the upstream. The best tier is never held."""

    async def scenario() -> None:
        pool = pool_of(slots=3)
        meter = SlotMeter(down=True)
        gate = admission(pool, meter, headroom=1, local_count_after_s=0.2)
        sent = Requests(gate)
        sent.send("low-0", "low")
        sent.send("top-0", "top")
        await settle()
        assert sent.admitted() == ["top-0"]
        assert not sent.ticket("top-0").counted
        await asyncio.sleep(0.25)
        await gate._release()
        await settle()
        assert sorted(sent.admitted()) == ["low-0", "top-0"], "counted alone once takes failed 0.2 s"
        await sent.end()

    run(scenario)


def test_slots_go_to_the_upstream_with_the_most_room() -> None:
    async def scenario() -> None:
        pool = pool_of(upstreams=2, slots=3)
        gate = admission(pool, headroom=1)
        sent = Requests(gate)
        for i in range(5):
            sent.send(f"low-{i}", "low")
            await settle()
        assert sent.admitted() == ["low-0", "low-1", "low-2", "low-3"]
        assert [state.in_flight for state in pool.states] == [2, 2]
        await sent.end()

    run(scenario)


def test_unknown_load_is_said_and_leaves_only_the_slot_count() -> None:
    async def scenario() -> None:
        pool = pool_of(upstreams=2)
        pool.read(waiting=9, upstream=0)
        pool.read(waiting=9, upstream=1)
        gate = admission(pool, max_waiting=1)
        sent = Requests(gate)
        sent.send("held", "low")
        await settle()
        assert sent.admitted() == []
        pool.states[1].load = None
        await gate._release()
        await settle()
        assert sent.admitted() == ["held"], "unknown load is not saturation"
        assert sample("capgate_admission_degraded") == 1
        pool.read(waiting=0, upstream=1)
        await gate._release()
        assert sample("capgate_admission_degraded") == 0

    run(scenario)


def test_stale_load_counts_as_unknown() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.states[0].load = Load(9, 1, 0.0, time.monotonic() - 10)
        gate = admission(pool, max_waiting=1, stale_after_s=1.0)
        await asyncio.wait_for(
            gate.admit("low", "low", TIERS["low"], TIERS, model=MODEL, user="u", cost=1), 1
        )
        await gate._release()
        assert sample("capgate_admission_degraded") == 1
        pool.read(waiting=0)
        await gate._release()
        assert sample("capgate_admission_degraded") == 0

    run(scenario)


def test_disabled_admission_holds_nobody_and_counts_nothing() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=1)
        pool.read(waiting=50, kv_cache_usage=1.0)
        meter = SlotMeter()
        gate = admission(pool, meter, enabled=False)
        sent = Requests(gate)
        for i in range(3):
            sent.send(f"low-{i}", "low")
        await settle()
        assert len(sent.admitted()) == 3 and meter.slots == {}

    run(scenario)


def test_no_healthy_upstream_admits_to_none() -> None:
    async def scenario() -> None:
        pool = pool_of()
        pool.states[0].healthy = False
        gate = admission(pool)
        assert await gate.admit("low", "low", TIERS["low"], TIERS, model=MODEL, user="u", cost=1) is None

    run(scenario)


def test_preemptible_streams_are_listed_and_the_worst_is_chosen_once_for_its_replica() -> None:
    async def scenario() -> None:
        pool = pool_of(slots=8)
        meter = SlotMeter()
        replica, other = admission(pool, meter), admission(pool, meter)
        here, there = Requests(replica), Requests(other)
        here.send("mid-stream", "mid", preemptible=True)
        there.send("low-stream", "low", preemptible=True)
        here.send("low-unary", "low")
        await settle()
        assert replica.tickets["mid-stream"].preemptible and not replica.tickets["low-unary"].preemptible
        assert await replica.preempt(5, pool.states) == "low-stream", "the worst priority, any replica"
        assert await other.asked_to_end() == ["low-stream"]
        assert await other.asked_to_end() == [], "each notice is handed out once"
        assert await replica.preempt(5, pool.states) == "mid-stream"
        assert await replica.preempt(5, pool.states) is None
        assert await replica.preempt(20, pool.states) is None, "only worse priorities are preempted"
        meter.down = True
        assert await replica.preempt(5, pool.states) is None and await replica.asked_to_end() == []
        await here.end()
        await there.end()

    run(scenario)
