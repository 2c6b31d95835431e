"""The meter: reservations, leases and settlement in Redis, one round trip each.

Every call runs one Lua script over one user's keys and their team's (one hash slot: the user's
home), so it is atomic and works on a single Redis or a Redis Cluster alike. Redis being
unreachable surfaces as `MeterUnavailable`; what to do then is the caller's choice (the tier's fail mode).
"""

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from metering.events import UsageEvent
from metering.keys import (
    LIVE_PATTERN,
    PREEMPTED_KEY,
    UserKeys,
    response_key,
    slots_key,
    user_keys_of,
    victims_key,
    waiting_key,
)
from metering.pipeline import ReplyError, ScriptConnection
from metering.windows import ROLLING_BUCKETS, Counter, Scope, counters_of
from policies.money import nano_to_decimal
from policies.pricing import Rates
from policies.schema import Tier

RedisClient = Redis | RedisCluster
_HERE = Path(__file__).parent
_LIB = (_HERE / "lib.lua").read_text()
REFUSED = "CAPGATE_ARG"  # how a script's error reply for arguments it refuses begins


def decoded(value: object) -> str:
    """A Redis reply value as text (replies are bytes unless the client decodes them)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class SlotTurn:
    """Who takes a slot: the replica (process) asking, the model and priority of its request, and
    how long its waiting record lasts unless it asks again (slot_take.lua)."""

    replica: str
    model: str
    priority: int
    wait_ttl_s: float


class MeterUnavailable(Exception):
    """Redis could not be reached in time, or answered with an error (out of memory, read-only
    replica, busy script, loading, cluster down, ...): the tier's fail mode applies."""


class MeterRefused(ValueError):
    """A script refused its arguments (a caller's bug); nothing was written."""


class CapExceeded(Exception):
    """A counter has no room for the request; `retry_after` is in whole seconds. `window` names
    it (`day`, `team day`); `spend` says whether it caps money (`cap` and `used` in nano-units)."""

    def __init__(self, window: str, cap: int, used: int, retry_after: int, spend: bool = False) -> None:
        if spend:
            spent, most = nano_to_decimal(used), nano_to_decimal(cap)
            what = f"spend cap of window {window!r} reached ({spent} of {most} spent)"
        else:
            what = f"token cap of window {window!r} reached ({used} of {cap} tokens used)"
        super().__init__(what)
        self.window = window
        self.cap = cap
        self.used = used
        self.retry_after = retry_after
        self.spend = spend


class AccountMoving(Exception):
    """The user is moving between teams (their counters are changing hash slot): retry shortly."""


class ConcurrencyExceeded(Exception):
    """The user already has as many requests in flight as their tier allows."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} concurrent requests allowed")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """What to hold for one request of `scope`. `fixed` is the counted prompt bound; the
    completion grant is the most in [want_min, want_max] that every counter has room for, spend
    counters holding `prompt_bound` at the dearer prompt price and the grant at the completion
    price."""

    request_id: str
    scope: Scope
    tier_name: str
    tier: Tier
    model: str
    fixed: int
    want_min: int
    want_max: int
    prompt_bound: int = 0

    @property
    def user_id(self) -> str:
        return self.scope.user_id


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold in Redis. `left` is the completion tokens the counters had room for beyond it (-1:
    none bound them)."""

    request_id: str
    scope: Scope
    tier_name: str
    tier: Tier
    model: str
    fixed: int
    granted: int
    left: int

    @property
    def user_id(self) -> str:
        return self.scope.user_id


@dataclass(frozen=True, slots=True)
class Extension:
    """The answer to a lease extension: tokens granted (0: refused), room left, or gone."""

    granted: int
    left: int
    gone: bool


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """Who created a stored response, the upstream that holds it, its prompt tokens and a bound of
    the tokens its output adds to a continuation's prompt (both -1 while unknown)."""

    user_id: str
    upstream: str
    prompt_tokens: int
    output_bound: int


def load_script(name: str) -> str:
    """A metering script: the shared helpers (lib.lua), then `name`.lua."""
    return _LIB + "\n" + (_HERE / f"{name}.lua").read_text()


def _counter_args(counters: Sequence[Counter]) -> list[int]:
    args: list[int] = []
    for counter in counters:
        slot = counter.slot
        args += [slot.cap, slot.current, slot.lo, slot.ttl_s, int(counter.spend)]
    return args


class Meter:
    """Token accounting for all users over one Redis (or Redis Cluster) client.

    With `scripts` (a single Redis), the scripts run over that pipelined connection instead of
    `redis`, which then serves only the housekeeping (reaping, readiness).
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        lease_ttl_s: float = 120.0,
        clock: Callable[[], float] = time.time,
        scripts: ScriptConnection | None = None,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.lease_ttl_s = lease_ttl_s
        self.clock = clock
        self._reserve = redis.register_script(load_script("reserve"))
        self._extend = redis.register_script(load_script("extend"))
        self._settle = redis.register_script(load_script("settle"))
        self._reap = redis.register_script(load_script("reap"))
        self._slot_take = redis.register_script(load_script("slot_take"))
        self._slot_free = redis.register_script(load_script("slot_free"))
        self._slot_touch = redis.register_script(load_script("slot_touch"))
        self._slot_preempt = redis.register_script(load_script("slot_preempt"))
        self._slot_preempted = redis.register_script(load_script("slot_preempted"))
        self._response_own = redis.register_script(load_script("response_own"))
        self._response_owner = redis.register_script(load_script("response_owner"))
        self._home_leave = redis.register_script(load_script("home_leave"))
        self._home_enter = redis.register_script(load_script("home_enter"))

    async def _run(self, script, keys: list[str], args: list) -> object:  # type: ignore[no-untyped-def]
        try:
            if self.scripts is not None:
                return await self.scripts.evalsha(script.sha, script.script, keys, args)
            return await script(keys=keys, args=args)
        except (RedisError, ReplyError, ConnectionError, TimeoutError, OSError) as exc:
            if str(exc).startswith(REFUSED):
                raise MeterRefused(str(exc)) from exc
            raise MeterUnavailable(str(exc) or type(exc).__name__) from exc

    async def reserve(self, req: ReserveRequest) -> Reservation:
        """Hold `req.fixed` plus a completion grant in every window, or raise why not."""
        now = self.clock()
        now_ms = int(now * 1000)
        keys = req.scope.keys
        counters = counters_of(req.scope, now)
        rates = Rates.of(req.tier, req.model)
        record = {
            "u": req.user_id,
            "t": req.tier_name,
            "m": req.model,
            "rp": rates.prompt,
            "rcp": rates.cached_prompt,
            "rc": rates.completion,
            "cp": int(req.tier.counts("prompt")),
            "cc": int(req.tier.counts("completion")),
        }
        reply = await self._run(
            self._reserve,
            keys.fixed() + [c.key for c in counters],
            [
                req.request_id,
                now_ms,
                now_ms + int(self.lease_ttl_s * 1000),
                req.fixed,
                req.want_min,
                req.want_max,
                req.tier.max_concurrent or 0,
                json.dumps(record, separators=(",", ":")),
                req.prompt_bound * max(rates.prompt, rates.cached_prompt),
                *_counter_args(counters),
            ],
        )
        assert isinstance(reply, list)
        if reply[0] == 1:
            return Reservation(
                req.request_id,
                req.scope,
                req.tier_name,
                req.tier,
                req.model,
                req.fixed,
                int(reply[1]),
                int(reply[2]),
            )
        reason = decoded(reply[1])
        if reason == "concurrency":
            raise ConcurrencyExceeded(req.tier.max_concurrent or 0)
        if reason in ("moved", "moving"):
            raise AccountMoving(reason)
        counter = counters[int(reply[2]) - 1]
        slot = counter.slot
        oldest = int(reply[4]) if reply[4] else None
        raise CapExceeded(
            counter.label, slot.cap, int(reply[3]), slot.retry_after(now, oldest), counter.spend
        )

    async def extend(
        self,
        reservation: Reservation,
        *,
        want_min: int,
        want_max: int,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> Extension:
        """Grant up to `want_max` more tokens (0 if fewer than `want_min` fit), record the usage
        observed so far and refresh the lease. With `want_max` 0 it only records and refreshes."""
        now = self.clock()
        now_ms = int(now * 1000)
        keys = reservation.scope.keys
        counters = counters_of(reservation.scope, now)
        reply = await self._run(
            self._extend,
            [keys.res, keys.live] + [c.key for c in counters],
            [
                reservation.request_id,
                now_ms,
                now_ms + int(self.lease_ttl_s * 1000),
                want_min,
                want_max,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                *_counter_args(counters),
            ],
        )
        assert isinstance(reply, list)
        granted, left = int(reply[0]), int(reply[1])
        return Extension(max(granted, 0), left, granted < 0)

    async def settle(self, event: UsageEvent, scope: Scope) -> str:
        """Charge `event` once, in `scope`'s home: 'ok', 'late' (after a reap; the difference was
        added) or 'duplicate' (already settled: nothing changed)."""
        now_ms = event.ts_ms
        keys = scope.keys
        counters = counters_of(scope, now_ms / 1000)
        fields = event.ledger_fields()
        slot_args: list[int] = []
        for counter in counters:
            slot = counter.slot
            spacing = 1 if slot.bucket_s is None else ROLLING_BUCKETS
            slot_args += [
                slot.current,
                slot.ttl_s,
                int(counter.spend),
                slot.lo,
                spacing,
                slot.cap,
                int(counter.team),
            ]
        reply = await self._run(
            self._settle,
            [*keys.fixed(), keys.notices, *(c.key for c in counters)],
            [
                event.request_id,
                now_ms,
                event.counted,
                event.prompt_tokens,
                event.cached_tokens,
                event.completion_tokens,
                event.value_nano,
                event.tier,
                len(fields) // 2,
                *fields,
                len(scope.notify_at),
                *scope.notify_at,
                *(c.slot.name for c in counters),
                *slot_args,
            ],
        )
        return decoded(reply)

    async def reap_user(self, keys: UserKeys) -> int:
        """Reap one user's expired reservations in one home; the number reaped."""
        reply = await self._run(self._reap, keys.fixed(), [int(self.clock() * 1000)])
        return int(reply)  # type: ignore[arg-type]

    async def reap_all(self) -> int:
        """Reap every user's expired reservations (finds users by scanning their `live` keys)."""
        now_ms = int(self.clock() * 1000)
        reaped = 0
        try:
            async for key in self.redis.scan_iter(match=LIVE_PATTERN, count=500):
                name = decoded(key)
                expired = await self.redis.zcount(name, "-inf", now_ms - 1)
                if expired:
                    reaped += await self.reap_user(user_keys_of(name))
        except (RedisError, OSError) as exc:
            raise MeterUnavailable(str(exc) or type(exc).__name__) from exc
        return reaped

    def _own_counters(self, scope: Scope, now: float) -> dict[tuple[str, bool], Counter]:
        return {(c.slot.name, c.spend): c for c in counters_of(scope, now) if not c.team}

    async def enter_home(self, scope: Scope) -> None:
        """Make `scope`'s home the user's (a new user): what an earlier move left there is dropped
        and holds are made there again."""
        await self.start_move(scope)
        await self._run(self._home_enter, [scope.keys.res], ["end", 1])

    async def start_move(self, new: Scope, enter_s: float = 10.0) -> None:
        """First step of a user's move to `new`'s home (a team change): that home holds nothing
        for them until `finish_move` (or for `enter_s` at most)."""
        now = self.clock()
        keys = [new.keys.res, *(c.key for c in self._own_counters(new, now).values())]
        await self._run(self._home_enter, keys, ["begin", int(now * 1000) + int(enter_s * 1000)])

    async def finish_move(self, old: Scope, new: Scope) -> None:
        """Move a user's own counters from `old`'s home to `new`'s: the old home holds nothing for
        them from now on, the new one counts what the old one counted (holds of requests in flight
        included, whole) and starts holding again. Running a move again (after `start_move`)
        finishes one cut short and counts nothing twice. Running totals stay where they were
        counted (the tier totals add up every home)."""
        now = self.clock()
        leaving = list(self._own_counters(old, now).values())
        entering = self._own_counters(new, now)
        reply = await self._run(
            self._home_leave, [old.keys.res, *(c.key for c in leaving)], [int(now * 1000)]
        )
        assert isinstance(reply, list)
        contents: dict[str, list] = {}
        for counter, flat in zip(leaving, reply, strict=True):
            target = entering.get((counter.slot.name, counter.spend))
            if target is not None:
                contents[target.key] = flat
        ttl = max((c.slot.ttl_s for c in entering.values()), default=1)
        args: list[object] = ["end", ttl]
        for flat in contents.values():
            args += [len(flat) // 2, *(decoded(v) for v in flat)]
        await self._run(self._home_enter, [new.keys.res, *contents], args)

    async def take_slot(
        self,
        request_id: str,
        limits: Sequence[tuple[str, int]],
        ttl_s: float,
        turn: SlotTurn,
        preemptible: bool = False,
    ) -> tuple[int | None, list[int]]:
        """Count `request_id` on the upstream of `limits` (label, most it may hold once this one is
        counted) with the most room: its index and its size after, or None and every size. None
        too while another replica waits its `turn` first. `preemptible`: list it for
        `preempt_slot` at its priority."""
        now_ms = int(self.clock() * 1000)
        keys = [slots_key(label) for label, _ in limits]
        if preemptible:
            keys += [victims_key(label) for label, _ in limits]
        keys.append(waiting_key(turn.model))
        reply = await self._run(
            self._slot_take,
            keys,
            [
                request_id,
                now_ms,
                now_ms + int(ttl_s * 1000),
                turn.priority if preemptible else "",
                turn.replica,
                turn.priority,
                now_ms + int(turn.wait_ttl_s * 1000),
                *(limit for _, limit in limits),
            ],
        )
        assert isinstance(reply, list)
        if reply[0] == 0:
            return None, [int(size) for size in reply[1:]]
        return int(reply[0]) - 1, [int(reply[1])]

    async def free_slot(self, upstream: str, request_id: str) -> None:
        """Stop counting `request_id` on `upstream` (idempotent)."""
        await self._run(
            self._slot_free, [slots_key(upstream), victims_key(upstream), PREEMPTED_KEY], [request_id]
        )

    async def preempt_slot(
        self, upstreams: Sequence[str], priority: int, ttl_s: float
    ) -> tuple[str, str] | None:
        """Choose, over `upstreams`, the preemptible request of the worst priority worse than
        `priority` and post a notice for its replica: (its upstream, its id), or None."""
        now_ms = int(self.clock() * 1000)
        keys = [*(slots_key(u) for u in upstreams), *(victims_key(u) for u in upstreams), PREEMPTED_KEY]
        reply = await self._run(self._slot_preempt, keys, [priority, now_ms, now_ms + int(ttl_s * 1000)])
        assert isinstance(reply, list)
        if reply[0] == 0:
            return None
        return upstreams[int(reply[0]) - 1], decoded(reply[1])

    async def preempted(self, request_ids: Sequence[str]) -> list[str]:
        """Those of `request_ids` a replica asked to end (each notice is handed out once)."""
        reply = await self._run(
            self._slot_preempted, [PREEMPTED_KEY], [int(self.clock() * 1000), *request_ids]
        )
        assert isinstance(reply, list)
        return [decoded(rid) for rid in reply]

    async def touch_slots(self, upstream: str, request_ids: Sequence[str], ttl_s: float) -> int:
        """Push out the slot expiry of requests still counted on `upstream`; how many were."""
        expiry = int(self.clock() * 1000) + int(ttl_s * 1000)
        reply = await self._run(self._slot_touch, [slots_key(upstream)], [expiry, *request_ids])
        return int(reply)  # type: ignore[arg-type]

    async def own_response(self, response_id: str, owner: StoredResponse, keep_s: int) -> bool:
        """Record `owner` for a stored response for `keep_s` seconds; False when the id already
        belongs to another user (nothing is written)."""
        reply = await self._run(
            self._response_own,
            [response_key(response_id)],
            [owner.user_id, owner.upstream, owner.prompt_tokens, owner.output_bound, keep_s],
        )
        return int(reply) == 1  # type: ignore[arg-type]

    async def response_owner(self, response_id: str) -> StoredResponse | None:
        """The owner record of a stored response, None when there is none."""
        reply = await self._run(self._response_owner, [response_key(response_id)], [])
        if not reply:
            return None
        user, upstream, prompt, completion = (decoded(v) for v in reply)  # type: ignore[union-attr]
        return StoredResponse(user, upstream, int(prompt), int(completion))

    async def heartbeat(self) -> None:
        """Ping over the script connection, so that a dead one is found and replaced before a
        request pays for it (a failure is expected while Redis is down and says nothing new)."""
        if self.scripts is not None:
            with contextlib.suppress(ConnectionError, TimeoutError, OSError, ReplyError):
                await self.scripts.ping()

    async def ping(self) -> None:
        """Raise `MeterUnavailable` unless Redis answers."""
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise MeterUnavailable(str(exc) or type(exc).__name__) from exc
