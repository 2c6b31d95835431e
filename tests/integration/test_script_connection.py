"""The pipelined script connection against a real redis-server: script loading, replies matched to
their calls under concurrency, timeouts, a restarted server, and a password with a database."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis
import uvloop
from redis.asyncio import Redis as AsyncRedis

from metering.meter import Meter, MeterUnavailable, ReserveRequest
from metering.pipeline import TIMEOUTS_TO_RECONNECT, ReplyError, ScriptConnection
from metering.windows import Scope
from policies.schema import Tier
from tests.harness import RedisServer
from tests.harness.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

ECHO = "return {KEYS[1], ARGV[1]}"
ECHO_SHA = hashlib.sha1(ECHO.encode()).hexdigest()
SET = "redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])"
SET_SHA = hashlib.sha1(SET.encode()).hexdigest()
FAIL = "return redis.error_reply('ERR refused by the script')"
FAIL_SHA = hashlib.sha1(FAIL.encode()).hexdigest()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(scenario())


def test_loads_the_script_once_and_matches_every_reply_to_its_call(redis_server: RedisServer) -> None:
    redis_server.client().script_flush()

    async def scenario() -> None:
        scripts = ScriptConnection(redis_server.url, 2.0)
        try:
            replies = await asyncio.gather(
                *(scripts.evalsha(ECHO_SHA, ECHO, [f"k{i}"], [i]) for i in range(200))
            )
            assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(200)]
            with pytest.raises(ReplyError, match="refused by the script"):
                await scripts.evalsha(FAIL_SHA, FAIL, [], [])
            assert await scripts.evalsha(ECHO_SHA, ECHO, ["after"], ["error"]) == [b"after", b"error"]
        finally:
            await scripts.aclose()

    run(scenario)
    assert redis_server.client().script_exists(ECHO_SHA) == [True]


def test_a_call_that_times_out_leaves_the_next_reply_to_the_next_call(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        scripts = ScriptConnection(redis_server.url, 0.2)
        try:
            assert await scripts.evalsha(ECHO_SHA, ECHO, ["warm"], [0]) == [b"warm", b"0"]
            with redis_server.client() as admin:
                admin.execute_command("CLIENT", "PAUSE", 500, "ALL")
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                await scripts.evalsha(ECHO_SHA, ECHO, ["late"], [1])
            assert time.monotonic() - began < 0.45
            await asyncio.sleep(0.5)  # the pause is over and the late reply has come
            assert await scripts.evalsha(ECHO_SHA, ECHO, ["next"], [2]) == [b"next", b"2"]
        finally:
            await scripts.aclose()

    run(scenario)


def test_a_restarted_server_fails_the_calls_then_serves_again(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis")
    server.start()
    try:

        async def scenario() -> None:
            scripts = ScriptConnection(server.url, 1.0)
            try:
                assert await scripts.evalsha(ECHO_SHA, ECHO, ["a"], [1]) == [b"a", b"1"]
                server.kill()
                with pytest.raises(ConnectionError):
                    await scripts.evalsha(ECHO_SHA, ECHO, ["b"], [2])
                server.start()  # a new process: the script cache is empty
                assert await scripts.evalsha(ECHO_SHA, ECHO, ["c"], [3]) == [b"c", b"3"]
            finally:
                await scripts.aclose()

        run(scenario)
    finally:
        server.close()


def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis")
    server.start()
    try:
        with server.client() as admin:
            admin.config_set("requirepass", "s3cret")
        port = server.port

        async def scenario() -> None:
            good = ScriptConnection(f"redis://:s3cret@127.0.0.1:{port}/2", 1.0)
            bad = ScriptConnection(f"redis://:wrong@127.0.0.1:{port}/0", 1.0)
            try:
                assert await good.evalsha(SET_SHA, SET, ["where"], ["db2"]) == b"db2"
                with pytest.raises(ConnectionError, match="set-up"):
                    await bad.evalsha(SET_SHA, SET, ["where"], ["db0"])
            finally:
                await good.aclose()
                await bad.aclose()

        run(scenario)
        client = redis.Redis(host="127.0.0.1", port=port, password="s3cret", db=2)
        assert client.get("where") == b"db2"
        assert client.execute_command("SELECT", 0) and client.get("where") is None
        client.close()
    finally:
        server.close()


def test_the_meter_reports_an_unreachable_redis_as_unavailable(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis")
    url = server.url  # never started: nothing listens
    tier = Tier.model_validate({"caps": {"windows": [{"per": "day", "tokens": 100}]}})

    async def scenario() -> None:
        client = AsyncRedis.from_url(url)
        scripts = ScriptConnection(url, 0.5)
        meter = Meter(client, scripts=scripts)
        try:
            with pytest.raises(MeterUnavailable):
                alice = Scope("alice", tuple(tier.caps.windows))
                await meter.reserve(ReserveRequest("r1", alice, "t", tier, "tiny", 5, 1, 10))
        finally:
            await scripts.aclose()
            await client.aclose()

    run(scenario)


def test_a_vanished_redis_is_dropped_on_a_silent_timeout_and_replaced(redis_server: RedisServer) -> None:
    """Redis stops answering on the connection without closing it (a blackholed peer): a call that
    times out with nothing at all come back drops the connection, the next call opens a new one
    (each dead one is dropped the same way), and once the link works again calls succeed."""

    async def scenario(proxy: FaultProxy) -> None:
        scripts = ScriptConnection(f"redis://{proxy.url}/0", 0.2)
        try:
            assert await scripts.evalsha(ECHO_SHA, ECHO, ["warm"], [0]) == [b"warm", b"0"]
            proxy.blackhole()
            for i in range(TIMEOUTS_TO_RECONNECT):
                with pytest.raises(TimeoutError):
                    await scripts.evalsha(ECHO_SHA, ECHO, ["lost"], [i])
                assert proxy.connections == i + 1  # the call's connection, dropped after it
            proxy.heal()
            assert await scripts.evalsha(ECHO_SHA, ECHO, ["back"], [1]) == [b"back", b"1"]
            await scripts.ping()
        finally:
            await scripts.aclose()

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        run(lambda: scenario(proxy))


def test_calls_beyond_the_in_flight_bound_fail_at_once(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        scripts = ScriptConnection(redis_server.url, 2.0, max_in_flight=4)
        try:
            await scripts.evalsha(ECHO_SHA, ECHO, ["warm"], [0])
            with redis_server.client() as admin:
                admin.execute_command("CLIENT", "PAUSE", 400, "ALL")
            waiting = [asyncio.ensure_future(scripts.evalsha(ECHO_SHA, ECHO, ["k"], [i])) for i in range(4)]
            await asyncio.sleep(0.05)
            began = time.monotonic()
            with pytest.raises(ConnectionError, match="in flight"):
                await scripts.evalsha(ECHO_SHA, ECHO, ["one-more"], [9])
            assert time.monotonic() - began < 0.1
            assert len(await asyncio.gather(*waiting)) == 4
        finally:
            await scripts.aclose()

    run(scenario)
