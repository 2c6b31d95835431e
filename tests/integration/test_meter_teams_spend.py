"""Teams, spend caps and team changes in the metering scripts, against a real redis-server (and
the 3-master Redis Cluster): a member's reservation holds in their windows and their team's at
once, a spend window holds the worst-case value and charges the exact one, and a user who changes
team takes their counts along with no hold in between."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as AsyncCluster

from metering.accounts import AccountConflict, AccountStore
from metering.events import UsageEvent
from metering.meter import AccountMoving, CapExceeded, Meter, ReserveRequest
from metering.windows import Scope, counters_of
from policies.pricing import Rates, Usage
from policies.schema import Tier, Window
from tests.harness import RedisCluster, RedisServer

pytestmark = pytest.mark.integration
T = TypeVar("T")

PRICES = {"prompt": "1 USD/1M", "completion": "2 USD/1M", "models": {"big": {"completion": "6 USD/1M"}}}
MEMBER = Tier.model_validate({"caps": {"windows": [{"per": "day", "tokens": 800}]}, "prices": PRICES})
TEAM_WINDOWS = (Window(per="day", tokens=1000),)
SPENDER = Tier.model_validate(
    {"caps": {"windows": [{"per": "month", "spend": "0.001 USD"}], "count": ["prompt"]}, "prices": PRICES}
)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis_server.client()
    client.flushall()
    yield redis_server.url
    client.flushall()


def run(make: Callable[[Redis], Awaitable[T]], url: str, cluster: bool = False) -> T:
    async def main() -> T:
        redis = AsyncCluster.from_url(url) if cluster else Redis.from_url(url)
        try:
            return await make(redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


def member(user: str, team: str | None = "acme") -> Scope:
    return Scope(user, tuple(MEMBER.caps.windows), team, TEAM_WINDOWS if team else ())


def hold(rid: str, scope: Scope, want: int, fixed: int = 10, tier: Tier = MEMBER, model: str = "tiny",
         bound: int = 10) -> ReserveRequest:  # fmt: skip
    return ReserveRequest(rid, scope, "t", tier, model, fixed, 1, want, bound)


def usage_event(rid: str, scope: Scope, prompt: int, completion: int, tier: Tier = MEMBER,
                model: str = "tiny") -> UsageEvent:  # fmt: skip
    value = Rates.of(tier, model).value(Usage(prompt, completion))
    counted = prompt * tier.counts("prompt") + completion * tier.counts("completion")
    now_ms = int(time.time() * 1000)
    return UsageEvent(
        rid, scope.user_id, "t", model, prompt, 0, completion, value, counted, "stop", None, 1.0, now_ms
    )


async def used(redis: Redis, scope: Scope) -> dict[str, int]:
    """What each counter of `scope` holds now, by label (spend counters prefixed `$`)."""
    out = {}
    for counter in counters_of(scope, time.time()):
        values = await redis.hgetall(counter.key)
        out[("$" if counter.spend else "") + counter.label] = sum(int(v) for v in values.values())
    return out


def test_a_member_holds_in_their_windows_and_the_teams_at_once(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        alice, bob = member("alice"), member("bob")
        first = await meter.reserve(hold("a1", alice, 700))
        assert (first.granted, first.left) == (700, 90)
        second = await meter.reserve(hold("b1", bob, 700))
        assert second.granted == 1000 - 710 - 10, "the team's window binds bob"
        assert await used(redis, alice) == {"day": 710, "team day": 1000}
        with pytest.raises(CapExceeded) as refused:
            await meter.reserve(hold("b2", bob, 5))
        assert refused.value.window == "team day" and not refused.value.spend
        assert await meter.settle(usage_event("a1", alice, 10, 100), alice) == "ok"
        assert await used(redis, alice) == {"day": 110, "team day": 1000 - 600}
        assert await used(redis, bob) == {"day": 290, "team day": 400}

    run(scenario, redis_url)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(["alice", "bob", "carol"]), st.integers(1, 400),
                                st.integers(0, 400)), min_size=1, max_size=30))  # fmt: skip
def test_no_interleaving_of_members_passes_a_user_or_team_cap(
    redis_url: str, steps: list[tuple[str, int, int]]
) -> None:
    """Invariant: every counter's sum stays within its cap; what settles is what was used."""

    async def scenario(redis: Redis) -> None:
        await redis.flushall()
        meter = Meter(redis)
        scopes = {u: member(u) for u in ("alice", "bob", "carol")}
        open_holds: list[tuple[str, str, int]] = []
        rng = random.Random(len(steps))
        for i, (user, want, use) in enumerate(steps):
            try:
                held = await meter.reserve(hold(f"r{i}", scopes[user], want))
                open_holds.append((f"r{i}", user, min(use, held.granted)))
            except CapExceeded:
                pass
            if open_holds and rng.random() < 0.5:
                rid, owner, completion = open_holds.pop(rng.randrange(len(open_holds)))
                await meter.settle(usage_event(rid, scopes[owner], 10, completion), scopes[owner])
            counts = {u: await used(redis, s) for u, s in scopes.items()}
            assert all(c["day"] <= 800 for c in counts.values()), counts
            assert counts["alice"]["team day"] <= 1000, counts
        for rid, owner, completion in open_holds:
            await meter.settle(usage_event(rid, scopes[owner], 10, completion), scopes[owner])
        totals = [await redis.hgetall(s.keys.totals) for s in scopes.values()]
        billed = sum(int(t.get(b"prompt_tokens", 0)) + int(t.get(b"completion_tokens", 0)) for t in totals)
        assert (await used(redis, scopes["alice"]))["team day"] == billed

    run(scenario, redis_url)


def test_a_spend_window_holds_the_worst_case_value_and_charges_the_exact_one(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        alice = Scope("alice", tuple(SPENDER.caps.windows))
        held = await meter.reserve(hold("s1", alice, 5000, fixed=100, tier=SPENDER, bound=100))
        # 1_000_000 nano: the prompt bound costs 100 * 1000, each completion token 2000.
        assert held.granted == (1_000_000 - 100_000) // 2000
        assert await used(redis, alice) == {"$month": 100_000 + 450 * 2000}
        with pytest.raises(CapExceeded):
            await meter.reserve(hold("s2", alice, 1, fixed=10, tier=SPENDER, model="big", bound=5))
        await meter.settle(usage_event("s1", alice, 90, 200, SPENDER), alice)
        assert await used(redis, alice) == {"$month": 90 * 1000 + 200 * 2000}
        big = await meter.reserve(hold("s2", alice, 5000, fixed=10, tier=SPENDER, model="big", bound=5))
        assert big.granted == (1_000_000 - 490_000 - 5 * 1000) // 6000, "a dearer model gets fewer tokens"
        await meter.settle(usage_event("s2", alice, 5, big.granted, SPENDER, "big"), alice)
        exact = 90 * 1000 + 200 * 2000 + 5 * 1000 + big.granted * 6000
        assert exact <= 1_000_000
        assert await used(redis, alice) == {"$month": exact}
        with pytest.raises(CapExceeded) as refused:
            await meter.reserve(hold("s3", alice, 5000, fixed=0, tier=SPENDER, bound=600))
        assert refused.value.spend and refused.value.window == "month"
        assert refused.value.cap == 1_000_000 and refused.value.used == exact

    run(scenario, redis_url)


def test_a_user_changing_team_takes_their_counts_and_holds_nowhere_in_between(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        alone, in_team = member("alice", None), member("alice", "acme")
        await meter.reserve(hold("a1", alone, 300))
        await meter.settle(usage_event("a1", alone, 10, 290), alone)
        in_flight = await meter.reserve(hold("a2", alone, 100))
        await meter.start_move(in_team)
        with pytest.raises(AccountMoving):
            await meter.reserve(hold("a3", in_team, 10))
        await meter.finish_move(alone, in_team)
        with pytest.raises(AccountMoving):
            await meter.reserve(hold("a4", alone, 10))
        assert await used(redis, in_team) == {"day": 300 + 110, "team day": 0}
        totals = await redis.hgetall(alone.keys.totals)
        assert int(totals[b"completion_tokens"]) == 290, "running totals stay where they were counted"
        extended = await meter.extend(
            in_flight, want_min=1, want_max=50, prompt_tokens=10, completion_tokens=5
        )
        assert extended.gone, "a request in flight gets no more grants in the home its user left"
        assert await meter.settle(usage_event("a2", alone, 10, 5), alone) == "ok"
        held = await meter.reserve(hold("a5", in_team, 1000))
        assert held.granted == 800 - 410 - 10
        assert await used(redis, in_team) == {"day": 800, "team day": 390}

    run(scenario, redis_url)


def test_a_move_run_again_counts_nothing_twice_and_a_move_back_drops_the_copy(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        alone, in_team = member("bob", None), member("bob", "acme")
        await meter.reserve(hold("b1", alone, 200))
        await meter.settle(usage_event("b1", alone, 10, 190), alone)
        for _ in range(3):  # a change cut short after any step is run again in full
            await meter.start_move(in_team)
            await meter.finish_move(alone, in_team)
        assert (await used(redis, in_team))["day"] == 200
        await meter.reserve(hold("b3", in_team, 50))
        await meter.start_move(alone)  # moving back: the copy left behind is dropped, not added
        await meter.finish_move(in_team, alone)
        assert (await used(redis, alone))["day"] == 260
        assert (await meter.reserve(hold("b4", alone, 10))).granted == 10
        with pytest.raises(AccountMoving):
            await meter.reserve(hold("b5", in_team, 10))
        await meter.enter_home(in_team)  # a user created anew in a home they once left
        assert (await used(redis, in_team))["day"] == 0
        assert (await meter.reserve(hold("b6", in_team, 10))).granted == 10

    run(scenario, redis_url)


def test_one_team_change_of_a_user_runs_at_a_time(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        store = AccountStore(redis)
        now_ms = int(time.time() * 1000)
        for team in ("t1", "t2"):
            await store.create_team(team, None, TEAM_WINDOWS, now_ms)
        await store.create_user("carol", None, "t1", now_ms)
        await store.begin_team_change("carol", "t1", "t2", now_ms)
        for rival in ("t2", None):
            with pytest.raises(AccountConflict) as busy:
                await store.begin_team_change("carol", "t1", rival, now_ms + 1000)
            assert busy.value.reason == "busy"
        await store.begin_team_change("carol", "t1", None, now_ms + 31_000)  # one cut short lapses
        with pytest.raises(AccountConflict) as stale:
            await store.update_user("carol", team="t2", set_team=True, was_team="t2")
        assert stale.value.reason == "conflict"
        await store.update_user("carol", team=None, set_team=True, was_team="t1")
        assert await store.members("t1") == 0
        await store.begin_team_change("carol", None, "t2", now_ms + 32_000)

    run(scenario, redis_url)


def test_teams_and_spend_on_redis_cluster(redis_cluster: RedisCluster) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        scopes = [member(f"m{i}", "cluster-team") for i in range(6)]
        granted = 0
        for i, scope in enumerate(scopes):
            try:
                granted += (await meter.reserve(hold(f"c{i}", scope, 300))).granted + 10
            except CapExceeded as exc:
                assert exc.window == "team day"
        assert granted <= 1000
        assert (await used(redis, scopes[0]))["team day"] == granted
        await meter.start_move(member("m0", "other-team"))
        await meter.finish_move(scopes[0], member("m0", "other-team"))
        assert (await used(redis, member("m0", "other-team")))["day"] == 310

    run(scenario, redis_cluster.url, cluster=True)
