"""The metering scripts against a real redis-server: reservations across windows, leases,
exactly-once settlement, the reaper, and the spool that carries usage through an outage."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.crc import key_slot

from metering.events import UsageEvent
from metering.meter import (
    CapExceeded,
    ConcurrencyExceeded,
    Meter,
    MeterRefused,
    MeterUnavailable,
    ReserveRequest,
    SlotTurn,
    StoredResponse,
)
from metering.pipeline import ScriptConnection
from metering.settler import Settler
from metering.spool import Spool
from metering.windows import Scope
from policies.pricing import Usage, value_nano
from policies.schema import Tier
from tests.harness import RedisServer, free_port

pytestmark = pytest.mark.integration
T = TypeVar("T")

TIER = Tier.model_validate(
    {
        "max_concurrent": 3,
        "caps": {
            "windows": [{"per": "day", "tokens": 1000}, {"per": "minute", "tokens": 600, "mode": "rolling"}]
        },
        "prices": {"prompt": "1 USD/1M", "completion": "2 USD/1M"},
    }
)


class Clock:
    """A settable clock, so that leases expire without waiting."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis_server.client()
    client.flushall()
    yield redis_server.url
    client.flushall()


def run(make: Callable[[Redis], Awaitable[T]], url: str) -> T:
    async def main() -> T:
        redis = Redis.from_url(url)
        try:
            return await make(redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


def request(rid: str, fixed: int = 10, want_max: int = 400, user: str = "alice") -> ReserveRequest:
    return ReserveRequest(rid, scope(user), "pro", TIER, "tiny", fixed, 1, want_max)


def scope(user: str = "alice", tier: Tier = TIER) -> Scope:
    return Scope(user, tuple(tier.caps.windows))


def event(
    rid: str, prompt: int, completion: int, user: str = "alice", ts_ms: int | None = None
) -> UsageEvent:
    return UsageEvent(
        rid, user, "pro", "tiny", prompt, 0, completion, prompt * 1000 + completion * 2000,
        prompt + completion, "stop", 5.0, 50.0, ts_ms if ts_ms is not None else int(time.time() * 1000),
    )  # fmt: skip


async def window_used(redis: Redis, name: str, user: str = "alice") -> int:
    return sum(int(v) for v in (await redis.hgetall(f"cg:{{u:{user}}}:w:{name}")).values())


def test_reserve_holds_in_every_window_and_settle_returns_the_rest(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        held = await meter.reserve(request("r1"))
        assert (held.granted, held.left) == (400, 600 - 410)
        assert await window_used(redis, "day") == await window_used(redis, "rolling-minute") == 410
        assert await meter.settle(event("r1", 8, 100), scope()) == "ok"
        assert await window_used(redis, "day") == await window_used(redis, "rolling-minute") == 108
        assert await redis.zcard("cg:{u:alice}:live") == 0
        totals = await redis.hgetall("cg:{u:alice}:totals")
        assert int(totals[b"completion_tokens"]) == 100 and int(totals[b"tier:pro:value_nano"]) == 208000
        assert await redis.xlen("cg:{u:alice}:ledger") == 1

    run(scenario, redis_url)


def test_grant_is_limited_by_the_tightest_window_then_refused_with_retry_after(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        first = await meter.reserve(request("r1", want_max=1000))
        assert first.granted == 590
        with pytest.raises(CapExceeded) as refused:
            await meter.reserve(request("r2"))
        assert refused.value.window == "rolling-minute"
        assert 1 <= refused.value.retry_after <= 60

    run(scenario, redis_url)


def test_concurrency_limit_counts_live_reservations(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        for i in range(3):
            await meter.reserve(request(f"r{i}", want_max=10))
        with pytest.raises(ConcurrencyExceeded):
            await meter.reserve(request("r3", want_max=10))
        await meter.settle(event("r0", 1, 1), scope())
        await meter.reserve(request("r3", want_max=10))

    run(scenario, redis_url)


def test_settle_is_exactly_once(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        await meter.reserve(request("r1"))
        assert await meter.settle(event("r1", 5, 5), scope()) == "ok"
        assert await meter.settle(event("r1", 5, 5), scope()) == "duplicate"
        assert await window_used(redis, "day") == 10
        assert await redis.xlen("cg:{u:alice}:ledger") == 1

    run(scenario, redis_url)


def test_leases_extend_within_the_cap_and_then_refuse(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        held = await meter.reserve(request("r1", fixed=0, want_max=250))
        first = await meter.extend(held, want_min=1, want_max=250, prompt_tokens=3, completion_tokens=200)
        assert (first.granted, first.gone) == (250, False)
        second = await meter.extend(held, want_min=1, want_max=250, prompt_tokens=3, completion_tokens=450)
        assert second.granted == 100
        third = await meter.extend(held, want_min=1, want_max=250, prompt_tokens=3, completion_tokens=600)
        assert third.granted == 0
        assert await window_used(redis, "rolling-minute") == 600
        await meter.settle(event("r1", 0, 580), scope())
        assert await window_used(redis, "rolling-minute") == 580

    run(scenario, redis_url)


def test_reaper_returns_an_expired_reservation_and_a_late_settle_replaces_its_event(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        clock = Clock()
        meter = Meter(redis, lease_ttl_s=10, clock=clock)
        held = await meter.reserve(request("r1", fixed=10, want_max=400))
        await meter.extend(held, want_min=0, want_max=0, prompt_tokens=10, completion_tokens=30)
        clock.now += 11
        assert await meter.reap_all() == 1
        assert await window_used(redis, "day") == 40
        assert await redis.zcard("cg:{u:alice}:live") == 0
        assert await meter.settle(event("r1", 10, 50), scope()) == "late"
        assert await window_used(redis, "day") == 60
        entries = await redis.xrange("cg:{u:alice}:ledger")
        assert len(entries) == 1  # one row per request: the reaper's, replaced by the real one
        assert entries[0][1][b"completion_tokens"] == b"50" and entries[0][1][b"finish_reason"] == b"stop"
        totals = await redis.hgetall("cg:{u:alice}:totals")
        assert int(totals[b"completion_tokens"]) == 50 and int(totals[b"requests"]) == 1
        assert await meter.settle(event("r1", 10, 50), scope()) == "duplicate"

    run(scenario, redis_url)


def test_next_reserve_reaps_the_users_expired_reservations(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        clock = Clock()
        meter = Meter(redis, lease_ttl_s=5, clock=clock)
        await meter.reserve(request("dead", want_max=590))
        clock.now += 6
        assert (await meter.reserve(request("next", want_max=500))).granted == 500

    run(scenario, redis_url)


def test_settle_without_reservation_charges_current_windows_once(redis_url: str) -> None:
    """Fail-open usage replayed from the spool has no reservation."""

    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        assert await meter.settle(event("open-1", 4, 6), scope()) == "ok"
        assert await meter.settle(event("open-1", 4, 6), scope()) == "duplicate"
        assert await window_used(redis, "day") == 10

    run(scenario, redis_url)


def test_keys_of_one_user_share_a_hash_slot(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        await meter.reserve(request("r1"))
        await meter.settle(event("r1", 1, 1), scope())
        keys = [k.decode() async for k in redis.scan_iter(match="cg:*")]
        slots = {key_slot(k.encode()) for k in keys}
        assert len(keys) >= 5 and len(slots) == 1

    run(scenario, redis_url)


def test_spool_carries_settlements_through_an_outage(redis_server: RedisServer, tmp_path: Path) -> None:
    server = RedisServer(appendonly=True)
    server.start()
    try:

        async def scenario() -> None:
            redis = Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
            settler = Settler(Meter(redis), Spool(tmp_path / "spool", 1 << 20))
            server.kill()
            outcomes = [await settler.settle(event(f"o{i}", 2, 3), scope()) for i in range(5)]
            assert outcomes == ["spooled"] * 5
            with pytest.raises(MeterUnavailable):
                await settler.meter.ping()
            assert await settler.replay() == 0
            server.restart()
            assert await settler.replay() == 5
            assert await settler.replay() == 0
            assert settler.spool.size() == 0
            assert await redis.xlen("cg:{u:alice}:ledger") == 5
            assert await window_used(redis, "day") == 25
            await redis.aclose()

        asyncio.run(scenario())
    finally:
        server.close()


@pytest.mark.parametrize(
    ("fixed", "want_min", "want_max"),
    [(-100000, 1, 400), (10, -5, 400), (10, 1, -100000), (10, 5, 4), (10, 1, 0.5)],
    ids=["negative-fixed", "negative-min", "negative-grant", "max-below-min", "fraction"],
)
def test_reserve_refuses_arguments_that_would_lend_budget(
    redis_url: str, fixed: int, want_min: int, want_max: int
) -> None:
    """The scripts are the last line: a caller bug cannot make a hold negative."""

    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        with pytest.raises(MeterRefused):
            await meter.reserve(
                ReserveRequest("bad", scope(), "pro", TIER, "tiny", fixed, want_min, want_max)
            )  # type: ignore[arg-type]
        assert [k async for k in redis.scan_iter(match="cg:*")] == []

    run(scenario, redis_url)


def test_extend_and_settle_refuse_negative_usage(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        held = await meter.reserve(request("r1"))
        with pytest.raises(MeterRefused):
            await meter.extend(held, want_min=0, want_max=-50, prompt_tokens=1, completion_tokens=1)
        with pytest.raises(MeterRefused):
            await meter.extend(held, want_min=0, want_max=0, prompt_tokens=-1, completion_tokens=1)
        with pytest.raises(MeterRefused):
            await meter.settle(event("r1", -10, 5), scope())
        assert await window_used(redis, "day") == 410
        assert await redis.xlen("cg:{u:alice}:ledger") == 0

    run(scenario, redis_url)


def test_reaper_prices_cached_prompt_tokens_like_settlement(redis_url: str) -> None:
    """Prices are derived in one place (policies/pricing.py); the reaper applies the same rates."""
    tier = Tier.model_validate(
        {"prices": {"prompt": "1 USD/1M", "cached_prompt": "0.25 USD/1M", "completion": "2 USD/1M"}}
    )

    async def scenario(redis: Redis) -> None:
        clock = Clock()
        meter = Meter(redis, lease_ttl_s=10, clock=clock)
        carol = scope("carol", tier)
        held = await meter.reserve(ReserveRequest("c1", carol, "cached", tier, "tiny", 0, 1, 100))
        await meter.extend(
            held, want_min=0, want_max=0, prompt_tokens=512, cached_tokens=384, completion_tokens=7
        )
        clock.now += 11
        assert await meter.reap_all() == 1
        [(_, fields)] = await redis.xrange("cg:{u:carol}:ledger")
        expected = value_nano(tier, "tiny", Usage(prompt_tokens=512, completion_tokens=7, cached_tokens=384))
        assert int(fields[b"value_nano"]) == expected and fields[b"cached_tokens"] == b"384"

    run(scenario, redis_url)


def turn(priority: int = 7, replica: str = "r1", wait_ttl_s: float = 1.0) -> SlotTurn:
    return SlotTurn(replica, "tiny", priority, wait_ttl_s)


TURN = turn()


def test_slots_go_to_the_upstream_with_most_room_and_never_past_a_limit(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        taken = [await meter.take_slot(f"r{i}", [("a", 2), ("b", 3)], 10, TURN) for i in range(5)]
        assert taken == [(1, [1]), (0, [1]), (1, [2]), (0, [2]), (1, [3])]
        assert await meter.take_slot("r5", [("a", 2), ("b", 3)], 10, TURN) == (None, [2, 3])
        assert await meter.take_slot("r0", [("a", 2), ("b", 3)], 10, TURN) == (1, [3]), "a retry counts once"
        await meter.free_slot("b", "r0")
        await meter.free_slot("b", "r0")
        assert await redis.zcard("cg:{slots}:b") == 2
        assert await meter.take_slot("r5", [("a", 2), ("b", 3)], 10, TURN) == (1, [3])
        assert await meter.take_slot("r6", [("a", 0), ("b", 0)], 10, TURN) == (None, [2, 3])

    run(scenario, redis_url)


def test_a_slot_not_touched_expires_and_one_touched_stays(redis_url: str) -> None:
    """The slots of a replica that died (stopped touching them) are dropped; freed ones stay freed."""

    async def scenario(redis: Redis) -> None:
        clock = Clock()
        meter = Meter(redis, clock=clock)
        for rid in ("alive", "dead", "freed"):
            await meter.take_slot(rid, [("a", 10)], 10, TURN)
        await meter.free_slot("a", "freed")
        clock.now += 8
        assert await meter.touch_slots("a", ["alive", "freed"], 10) == 1
        clock.now += 8
        assert await meter.take_slot("next", [("a", 10)], 10, TURN) == (0, [2])
        assert {m.decode() for m in await redis.zrange("cg:{slots}:a", 0, -1)} == {"alive", "next"}

    run(scenario, redis_url)


def test_preemption_chooses_the_worst_live_preemptible_request_once(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        clock = Clock()
        meter = Meter(redis, clock=clock)
        limits = [("a", 10), ("b", 10)]
        await meter.take_slot("unary", limits, 10, TURN)
        await meter.take_slot("mid", limits, 10, turn(10), preemptible=True)
        await meter.take_slot("low", limits, 10, turn(20), preemptible=True)
        await meter.take_slot("gone", limits, 10, turn(30), preemptible=True)
        await meter.take_slot("dead", limits, 1, turn(40), preemptible=True)
        await meter.free_slot("b", "gone")
        clock.now += 2
        assert await meter.preempt_slot(["a", "b"], 5, 10) == ("a", "low"), "freed and expired skipped"
        assert await meter.preempt_slot(["a", "b"], 5, 10) == ("b", "mid")
        assert await meter.preempt_slot(["a", "b"], 5, 10) is None
        assert await meter.preempted(["unary", "mid", "low"]) == ["mid", "low"]
        assert await meter.preempted(["mid", "low"]) == [], "each notice is handed out once"
        await meter.take_slot("top", limits, 10, turn(0), preemptible=True)
        assert await meter.preempt_slot(["a", "b"], 0, 10) is None, "never an equal priority"
        assert await meter.preempt_slot(["a", "b"], -1, 10) == ("b", "top")
        await meter.free_slot("b", "top")
        assert await meter.preempted(["top"]) == [], "freeing withdraws the notice"

    run(scenario, redis_url)


def test_replicas_waiting_for_slots_take_turns_by_priority_then_waiting_time(redis_url: str) -> None:
    """A replica that frees a slot cannot keep it for its own queue while another replica waits
    at the same priority (or a better one) for longer; a waiting record that is not renewed lapses."""

    async def scenario(redis: Redis) -> None:
        clock = Clock()
        meter = Meter(redis, clock=clock)
        one = [("a", 1)]
        assert await meter.take_slot("a1", one, 10, turn(7, "A")) == (0, [1])
        assert await meter.take_slot("b1", one, 10, turn(7, "B")) == (None, [1])
        clock.now += 0.1
        assert await meter.take_slot("a2", one, 10, turn(7, "A")) == (None, [1])
        await meter.free_slot("a", "a1")
        assert await meter.take_slot("a2", one, 10, turn(7, "A")) == (None, [0]), "B waited longer"
        assert await meter.take_slot("b1", one, 10, turn(7, "B")) == (0, [1])
        await meter.free_slot("a", "b1")
        assert await meter.take_slot("c1", one, 10, turn(3, "C")) == (0, [1]), "a better priority first"
        await meter.free_slot("a", "c1")
        clock.now += 0.1
        assert await meter.take_slot("b2", one, 10, turn(7, "B")) == (None, [0]), "A's turn now"
        clock.now += 1.5
        assert await meter.take_slot("b2", one, 10, turn(7, "B")) == (0, [1]), "A stopped asking"

    run(scenario, redis_url)


def test_slot_scripts_refuse_bad_arguments(redis_url: str) -> None:
    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        with pytest.raises(MeterRefused):
            await meter.take_slot("r", [("a", -1)], 10, TURN)
        with pytest.raises(MeterRefused):
            await meter.take_slot("r", [("a", 1), ("b", 0.5)], 10, TURN)  # type: ignore[list-item]
        assert [k async for k in redis.scan_iter(match="cg:*")] == []

    run(scenario, redis_url)


def test_a_stored_response_keeps_its_first_owner(redis_url: str) -> None:
    """The owner record is written, completed with its tokens, never taken by another user, and
    kept for the time asked; bad counts are refused with nothing written."""

    async def scenario(redis: Redis) -> None:
        meter = Meter(redis)
        started = StoredResponse("alice", "http://127.0.0.1:9000", -1, -1)
        assert await meter.own_response("resp_1", started, 60)
        assert await meter.response_owner("resp_1") == started
        done = StoredResponse("alice", "http://127.0.0.1:9000", 40, 120)
        assert await meter.own_response("resp_1", done, 60)
        assert not await meter.own_response("resp_1", StoredResponse("mallory", "http://evil", 1, 1), 60)
        assert await meter.response_owner("resp_1") == done
        assert 0 < await redis.ttl("cg:{r:resp_1}:owner") <= 60
        assert await meter.response_owner("resp_2") is None
        with pytest.raises(MeterRefused):
            await meter.own_response("resp_3", StoredResponse("alice", "u", -2, 0), 60)
        with pytest.raises(MeterRefused):
            await meter.own_response("resp_3", StoredResponse("alice", "u", 0, 0), 0)
        assert await meter.response_owner("resp_3") is None

    run(scenario, redis_url)


@pytest.mark.parametrize("transport", ["pipelined", "redis-py"])
@pytest.mark.parametrize("fault", ["oom", "readonly", "busy"])
def test_redis_error_replies_are_an_outage_for_every_call(transport: str, fault: str, tmp_path: Path) -> None:
    """Out of memory under noeviction, a read-only replica, a busy script: each is
    `MeterUnavailable` (the tier's fail mode applies) and settlement spools the usage."""
    server = RedisServer()
    server.start()
    admin = server.client()
    try:
        if fault == "oom":
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
        elif fault == "readonly":
            admin.replicaof("127.0.0.1", free_port())  # a primary that is not there: reads only
        else:
            admin.config_set("busy-reply-threshold", 50)
            threading.Thread(target=busy_script, args=(server.url,), daemon=True).start()
            time.sleep(0.3)

        async def scenario() -> None:
            redis = Redis.from_url(server.url, socket_timeout=2)
            scripts = ScriptConnection(server.url, 2.0) if transport == "pipelined" else None
            meter = Meter(redis, scripts=scripts)
            with pytest.raises(MeterUnavailable):
                await meter.reserve(request("r1"))
            settler = Settler(meter, Spool(tmp_path / "spool", 1 << 20))
            assert await settler.settle(event("r1", 3, 4), scope()) == "spooled"
            assert settler.spool.size() > 0
            if scripts is not None:
                await scripts.aclose()
            await redis.aclose()

        asyncio.run(scenario())
    finally:
        server.close()


def busy_script(url: str) -> None:
    """Keep Redis busy in a script for about 3 s (other clients get BUSY meanwhile)."""
    with contextlib.suppress(Exception):
        SyncRedis.from_url(url).eval(
            "local t = redis.call('TIME') local e = t[1] + 3 "
            "while tonumber(redis.call('TIME')[1]) < e do end return 1",
            0,
        )
