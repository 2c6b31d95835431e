"""Reading usage back: a user's budget left per window and running totals, and the ledger
export for billing (CSV or JSON Lines, merged over all users by time)."""

import csv
import io
import json
import time
from dataclasses import asdict, dataclass

from metering.events import LEDGER_FIELDS
from metering.keys import LEDGER_PATTERN, TOTALS_PATTERN, UserKeys, user_of_key
from metering.meter import RedisClient, decoded
from metering.windows import slot_of
from policies.money import nano_to_decimal
from policies.schema import Tier


@dataclass(frozen=True, slots=True)
class WindowUsage:
    """One window of a user: its cap, what is used or held in it, what is left, and when
    tokens come back (seconds)."""

    window: str
    cap: int
    used: int
    left: int
    resets_in_s: int


async def user_usage(redis: RedisClient, user_id: str, tier_name: str, tier: Tier, currency: str) -> dict:
    """A user's windows, in-flight requests and totals, as a JSON-ready mapping."""
    now = time.time()
    keys = UserKeys(user_id)
    windows = []
    for window in tier.caps.windows:
        slot = slot_of(window, now)
        fields = await redis.hgetall(keys.window(slot.name))
        live = {int(decoded(k)): int(decoded(v)) for k, v in fields.items() if int(decoded(k)) >= slot.lo}
        used = sum(live.values())
        oldest = min((k for k, v in live.items() if v > 0), default=None)
        windows.append(
            WindowUsage(slot.name, slot.cap, used, max(0, slot.cap - used), slot.retry_after(now, oldest))
        )
    totals = {decoded(k): int(decoded(v)) for k, v in (await redis.hgetall(keys.totals)).items()}
    in_flight = await redis.zcard(keys.live)
    overall = {k: v for k, v in totals.items() if not k.startswith("tier:")}
    return {
        "user": user_id,
        "tier": tier_name,
        "per_request_cap": tier.caps.per_request,
        "windows": [asdict(w) for w in windows],
        "in_flight": in_flight,
        "totals": overall,
        "value": str(nano_to_decimal(overall.get("value_nano", 0))),
        "currency": currency,
    }


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


async def ledger_events(redis: RedisClient, since_ms: int = 0, until_ms: int | None = None) -> list[dict]:
    """Every ledger event in [since_ms, until_ms], all users merged, oldest first."""
    events: list[dict] = []
    end = "+" if until_ms is None else str(until_ms)
    async for key in redis.scan_iter(match=LEDGER_PATTERN, count=500):
        name = decoded(key)
        for entry_id, fields in await redis.xrange(name, min=str(since_ms), max=end):
            event = {decoded(k): decoded(v) for k, v in fields.items()}
            event["entry_id"] = decoded(entry_id)
            event.setdefault("user", user_of_key(name))
            events.append(event)
    events.sort(key=lambda e: (int(e["entry_id"].split("-")[0]), e["entry_id"]))
    return events


def export_text(events: list[dict], fmt: str) -> str:
    """The events as CSV (with a header) or JSON Lines text."""
    columns = [*LEDGER_FIELDS, "entry_id"]
    if fmt == "jsonl":
        return "".join(json.dumps({c: e.get(c, "") for c in columns}) + "\n" for e in events)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(events)
    return out.getvalue()
