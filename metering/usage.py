"""Reading usage back: a user's budget left per window and running totals, and the ledger
export for billing (CSV or JSON Lines, merged over all users by time)."""

import csv
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from metering.events import LEDGER_FIELDS
from metering.keys import TOTALS_PATTERN, user_keys_of
from metering.ledger import merged_entries
from metering.meter import RedisClient, decoded
from metering.windows import Counter, Scope, counters_of
from policies.index import Principal
from policies.money import nano_to_decimal


@dataclass(frozen=True, slots=True)
class WindowUsage:
    """One window of a user or their team: its cap, what is used or held in it, what is left, and
    when it frees (seconds). Token windows count tokens; spend windows money, as decimal text."""

    window: str
    cap: int | str
    used: int | str
    left: int | str
    resets_in_s: int


async def _counter_usage(redis: RedisClient, counter: Counter, now: float) -> WindowUsage:
    slot = counter.slot
    fields = await redis.hgetall(counter.key)
    live = {int(decoded(k)): int(decoded(v)) for k, v in fields.items() if int(decoded(k)) >= slot.lo}
    used = sum(live.values())
    oldest = min((k for k, v in live.items() if v > 0), default=None)
    left = max(0, slot.cap - used)
    resets = slot.retry_after(now, oldest)
    if counter.spend:
        cap, spent, rest = (str(nano_to_decimal(n)) for n in (slot.cap, used, left))
        return WindowUsage(slot.name, cap, spent, rest, resets)
    return WindowUsage(slot.name, slot.cap, used, left, resets)


async def user_usage(redis: RedisClient, principal: Principal, currency: str) -> dict:
    """A user's windows (tokens and spend) and their team's, in-flight requests and totals, as a
    JSON-ready mapping."""
    now = time.time()
    scope = Scope.of(principal)
    keys = scope.keys
    parts: dict[tuple[bool, bool], list[dict]] = {(t, s): [] for t in (False, True) for s in (False, True)}
    for counter in counters_of(scope, now):
        parts[(counter.team, counter.spend)].append(asdict(await _counter_usage(redis, counter, now)))
    totals = {decoded(k): int(decoded(v)) for k, v in (await redis.hgetall(keys.totals)).items()}
    in_flight = await redis.zcard(keys.live)
    overall = {k: v for k, v in totals.items() if not k.startswith("tier:")}
    report = {
        "user": principal.user_id,
        "tier": principal.tier_name,
        "per_request_cap": principal.tier.caps.per_request,
        "windows": parts[(False, False)],
        "spend": parts[(False, True)],
        "in_flight": in_flight,
        "totals": overall,
        "value": str(nano_to_decimal(overall.get("value_nano", 0))),
        "currency": currency,
        "team": None,
    }
    if principal.team is not None:
        report["team"] = {"id": principal.team, "windows": parts[(True, False)], "spend": parts[(True, True)]}
    return report


async def tier_totals(redis: RedisClient) -> dict[str, dict[str, int]]:
    """Running totals per tier, summed over every user's `totals` hash (which keeps them per tier
    atomically with each settlement)."""
    tiers: dict[str, dict[str, int]] = {}
    async for key in redis.scan_iter(match=TOTALS_PATTERN, count=500):
        for field, value in (await redis.hgetall(decoded(key))).items():
            name = decoded(field)
            if name.startswith("tier:"):
                tier, metric = name[5:].rsplit(":", 1)
                totals = tiers.setdefault(tier, {})
                totals[metric] = totals.get(metric, 0) + int(decoded(value))
    return tiers


async def export_lines(
    redis: RedisClient, fmt: str, since_ms: int = 0, until_ms: int | None = None
) -> AsyncIterator[str]:
    """The ledger events appended in [since_ms, until_ms], all users merged, oldest first, as CSV
    (a header first) or JSON Lines, a line at a time (memory bounded: see `merged_entries`)."""
    columns = [*LEDGER_FIELDS, "entry_id"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    if fmt == "csv":
        writer.writeheader()
        yield out.getvalue()
    async for entry in merged_entries(redis, since_ms, until_ms):
        event = {**entry.fields, "entry_id": entry.entry_id}
        event.setdefault("user", user_keys_of(entry.stream).user_id)
        if fmt == "jsonl":
            yield json.dumps({c: event.get(c, "") for c in columns}) + "\n"
            continue
        out.seek(0)
        out.truncate()
        writer.writerow(event)
        yield out.getvalue()
