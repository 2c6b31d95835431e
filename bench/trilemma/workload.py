"""The same concurrent, capped workload per lease size, and what it shows about the trilemma.

Each of `users` users has a cap of `cap` completion tokens (one monthly window) and `slots`
clients that send their requests one after another. Every request asks `max_tokens`, but the
model stops by itself after the tokens the request really needs (see `bench.trilemma.client`),
as real answers end well before the limit their client set: that is what makes whole-request
reservations hold tokens that are never used. The lengths and pauses are drawn once from a seed,
so every lease size gets the very same requests; the cap is `cap_fraction` of the mean user's
demand, so some requests must be refused whatever the lease size.

Measured per lease size:
- real-time cost: Redis round trips per request (Redis's own EVALSHA count), time to first
  token and inter-token gaps seen by the clients, capgate's added latency, gateway CPU;
- optimality: every `sample_s` each user's live reservations are read from Redis, and for each
  the tokens it holds beyond what its client had received by then (an upper bound of what was
  held but unused: it includes the client's own lag) and beyond what the request was billed in
  the end (a lower bound: held and never used), as token-seconds and as the mean per user, a
  share of the cap; and the requests refused or cut short whose tokens would still have fit
  under the cap at the end;
- exactness: tokens billed (ledger) against vLLM's own generated-token count, and any use over
  the cap.
"""

import asyncio
import contextlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from redis.asyncio import Redis

from bench.common.quantiles import quantile
from bench.trilemma.client import CHAT_PATH, StreamResult, chat_body, stream_chat
from bench.trilemma.probe import (
    counter_delta,
    histogram_delta,
    histogram_quantile,
    read,
    vllm_counters,
    wait_ledgered,
    wait_vllm_idle,
)
from bench.trilemma.stack import Account, Lease, lease_label
from metering.keys import UserKeys

SHORTEST = 8
FULL_SHARE = 0.25
LONGEST_SHORT = 0.75
THINK_S = 0.15


@dataclass(frozen=True)
class Ask:
    """One request of a client: the completion tokens its answer has (all of `max_tokens`: it
    runs to the limit) and its pause before sending."""

    wants: int
    think_s: float


@dataclass(frozen=True)
class WorkloadPlan:
    """Who sends what. `asks[user][slot]` is one client's requests, in order; each lease size
    runs it `rounds` times, with fresh users (so fresh caps) each time."""

    users: int
    slots: int
    per_slot: int
    max_tokens: int
    cap_fraction: float
    rounds: int = 1
    seed: int = 7
    sample_s: float = 0.05

    def asks(self) -> list[list[list[Ask]]]:
        """A quarter run to `max_tokens`; the rest end after a log-uniform 8..0.75 x max_tokens."""
        rng = random.Random(self.seed)
        top = max(SHORTEST, int(self.max_tokens * LONGEST_SHORT))

        def one() -> Ask:
            if rng.random() < FULL_SHARE:
                wants = self.max_tokens
            else:
                wants = int(math.exp(rng.uniform(math.log(SHORTEST), math.log(top))))
            return Ask(wants, rng.uniform(0.0, THINK_S))

        return [[[one() for _ in range(self.per_slot)] for _ in range(self.slots)] for _ in range(self.users)]

    @property
    def cap(self) -> int:
        """The cap of every user: `cap_fraction` of the mean user's demand."""
        demands = [sum(a.wants for slot in user for a in slot) for user in self.asks()]
        return max(1, round(self.cap_fraction * sum(demands) / len(demands)))


@dataclass(frozen=True)
class Hold:
    """One live reservation at one sample: its request, what it held, what its client had."""

    request_id: str
    held: int
    received: int


@dataclass(frozen=True)
class Tick:
    """One sample of every live reservation of the run's users, and the time it stands for."""

    seconds: float
    holds: list[Hold]


@dataclass
class Outcome:
    """One request: whose, what it wanted, what its client saw."""

    user: str
    ask: Ask
    result: StreamResult


@dataclass
class Counters:
    """What Redis, capgate and vLLM counted around a run."""

    script_calls: int = 0
    gateway_cpu_s: float = 0.0
    vllm_generated: float = 0.0
    reserves: float = 0.0
    settles: float = 0.0
    extensions: float = 0.0
    added: dict[float, float] = field(default_factory=dict)
    itl: dict[float, float] = field(default_factory=dict)


@dataclass
class Run:
    """Everything one or more runs of a lease size produced."""

    outcomes: list[Outcome] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    unsettled: set[str] = field(default_factory=set)
    ledger: dict[str, list[dict]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    counters: Counters = field(default_factory=Counters)


def _add_buckets(total: dict[float, float], buckets: dict[float, float]) -> None:
    for bound, count in buckets.items():
        total[bound] = total.get(bound, 0.0) + count


def merge(runs: list[Run]) -> Run:
    """The runs of one lease size as one (their users are distinct)."""
    merged = Run()
    for run in runs:
        merged.outcomes += run.outcomes
        merged.ledger.update(run.ledger)
        merged.elapsed_s += run.elapsed_s
        merged.ticks += run.ticks
        merged.unsettled |= run.unsettled
        counters, sums = run.counters, merged.counters
        sums.script_calls += counters.script_calls
        sums.gateway_cpu_s += counters.gateway_cpu_s
        sums.vllm_generated += counters.vllm_generated
        sums.reserves += counters.reserves
        sums.settles += counters.settles
        sums.extensions += counters.extensions
        _add_buckets(sums.added, counters.added)
        _add_buckets(sums.itl, counters.itl)
    return merged


async def _sample(
    redis: Redis, users: list[str], seen: dict[str, int], stop: asyncio.Event, every_s: float
) -> list[Tick]:
    """Every `every_s`, read each user's live reservations (what each one holds) and what each
    one's client has received so far."""
    ticks: list[Tick] = []
    last = time.perf_counter()
    while not stop.is_set():
        pipe = redis.pipeline(transaction=False)
        for user in users:
            pipe.hgetall(UserKeys(user).res)
        replies = await pipe.execute()
        now = time.perf_counter()
        holds = []
        for records in replies:
            for request_id, raw in records.items():
                record = json.loads(raw)
                if record.get("state") != "reaped":
                    holds.append(Hold(request_id, int(record["held"]), seen.get(request_id, 0)))
        ticks.append(Tick(now - last, holds))
        last = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    return ticks


async def run_lease(
    http: httpx.AsyncClient,
    redis: Redis,
    gateway_url: str,
    gateway_pid: int,
    vllm_url: str,
    accounts: list[Account],
    plan: WorkloadPlan,
) -> Run:
    """Run the plan once for `accounts` (one per plan user)."""
    users = [account.user for account in accounts]
    seen: dict[str, int] = {}
    run = Run()
    await wait_vllm_idle(http, vllm_url)
    before = await read(http, gateway_url, redis, gateway_pid)
    generated_before = (await vllm_counters(http, vllm_url))["generated"]

    async def client(account: Account, requests: list[Ask]) -> None:
        for ask in requests:
            await asyncio.sleep(ask.think_s)
            body = chat_body(f"{account.user}: tell me a story.", plan.max_tokens, stop_after=ask.wants)
            result = await stream_chat(http, gateway_url + CHAT_PATH, body, key=account.key, seen=seen)
            run.outcomes.append(Outcome(account.user, ask, result))

    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(redis, users, seen, stop, plan.sample_s))
    began = time.perf_counter()
    clients = [client(a, slot) for a, slots in zip(accounts, plan.asks(), strict=True) for slot in slots]
    await asyncio.gather(*clients)
    run.elapsed_s = time.perf_counter() - began
    served: dict[str, set[str]] = {user: set() for user in users}
    for outcome in run.outcomes:
        if outcome.result.status == 200 and outcome.result.request_id:
            served[outcome.user].add(outcome.result.request_id)
    run.unsettled = await wait_ledgered(redis, served)
    stop.set()
    run.ticks = await sampler
    generated = await wait_vllm_idle(http, vllm_url) - generated_before
    after = await read(http, gateway_url, redis, gateway_pid)
    for user in users:
        run.ledger[user] = [fields for _, fields in await redis.xrange(UserKeys(user).ledger)]
    calls = "capgate_redis_call_seconds_count"
    run.counters = Counters(
        script_calls=after.script_calls - before.script_calls,
        gateway_cpu_s=after.gateway_cpu_s - before.gateway_cpu_s,
        vllm_generated=generated,
        reserves=counter_delta(before, after, calls, {"operation": "reserve"}),
        settles=counter_delta(before, after, calls, {"operation": "settle"}),
        extensions=counter_delta(before, after, "capgate_lease_extensions_total"),
        added=dict(histogram_delta(before, after, "capgate_added_latency_seconds")),
        itl=dict(histogram_delta(before, after, "capgate_inter_token_latency_seconds")),
    )
    return run


def _fits(items: list[int], slack: int) -> tuple[int, int]:
    """How many of `items` (token amounts), smallest first, fit together into `slack`."""
    count = total = 0
    for size in sorted(items):
        if total + size > slack:
            break
        count += 1
        total += size
    return count, total


def _refused_for_cap(result: StreamResult) -> bool:
    return result.status == 429 and result.error == "cap_exceeded"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def row(lease: Lease, plan: WorkloadPlan, run: Run) -> dict:
    """The figures of one lease size (see the module's docstring), from its merged runs."""
    cap = plan.cap
    counters = run.counters
    users = len(run.ledger)
    outcomes = run.outcomes
    attempted = len(outcomes)
    events = [e for user_events in run.ledger.values() for e in user_events]
    finishes = {e["request_id"]: e["finish_reason"] for e in events}
    billed_by_id = {e["request_id"]: int(e["completion_tokens"]) for e in events}
    refused = [o for o in outcomes if _refused_for_cap(o.result)]
    served = [o for o in outcomes if o.result.status == 200]
    errors = [
        o
        for o in outcomes
        if not _refused_for_cap(o.result) and (not o.result.ok or o.result.request_id in run.unsettled)
    ]
    short = [o for o in served if o.result.ok and o.result.tokens < o.ask.wants]
    billed: dict[str, int] = {
        user: sum(int(e["completion_tokens"]) for e in events) for user, events in run.ledger.items()
    }
    denied_fit = denied_fit_tokens = denied_tokens = denied_within_slack = 0
    for user, used in billed.items():
        items = [o.ask.wants for o in refused if o.user == user]
        items += [o.ask.wants - o.result.tokens for o in short if o.user == user]
        slack = max(0, cap - used)
        denied_tokens += sum(items)
        denied_within_slack += min(slack, sum(items))
        count, tokens = _fits(items, slack)
        denied_fit += count
        denied_fit_tokens += tokens
    over = [max(0, used - cap) for used in billed.values()]
    billed_total = sum(billed.values())
    ttfts = [o.result.ttft for o in served if o.result.ttft is not None]
    gaps = [g for o in served for g in o.result.gaps]
    mean_gaps = [o.result.mean_gap for o in served if o.result.mean_gap is not None]
    mislabelled = [
        o
        for o in served
        if o.result.done and finishes.get(o.result.request_id or "") == "client_disconnected"
    ]
    held_s = sum(t.seconds * sum(h.held for h in t.holds) for t in run.ticks)
    unused_s = sum(t.seconds * sum(max(0, h.held - h.received) for h in t.holds) for t in run.ticks)
    never_s = sum(
        t.seconds * sum(max(0, h.held - billed_by_id.get(h.request_id, h.received)) for h in t.holds)
        for t in run.ticks
    )
    per_user_s = run.elapsed_s * plan.users
    seen_total = sum(o.result.tokens for o in served)
    return {
        "lease": lease,
        "label": lease_label(lease),
        "users": users,
        "attempted": attempted,
        "served": len(served),
        "refused": len(refused),
        "cut_short": len(short),
        "cut_at_budget": sum(1 for o in short if finishes.get(o.result.request_id) == "cut_at_budget"),
        "errors": len(errors),
        "error_samples": sorted({f"{o.result.status} {o.result.error}" for o in errors})[:5],
        "unsettled": len(run.unsettled),
        "round_trips_per_request": counters.script_calls / attempted,
        "round_trips_from_metrics": (counters.reserves + counters.settles + counters.extensions) / attempted,
        "lease_extensions_per_request": counters.extensions / attempted,
        "gateway_cpu_ms_per_request": _ms(counters.gateway_cpu_s / attempted),
        "gateway_added_median_ms": _ms(histogram_quantile(sorted(counters.added.items()), 0.5)),
        "gateway_added_p99_ms": _ms(histogram_quantile(sorted(counters.added.items()), 0.99)),
        "ttft_median_ms": _ms(quantile(ttfts, 0.5)),
        "ttft_p99_ms": _ms(quantile(ttfts, 0.99)),
        "itl_median_ms": _ms(quantile(mean_gaps, 0.5)),
        "itl_p99_ms": _ms(quantile(mean_gaps, 0.99)),
        "stall_p99_ms": _ms(quantile(gaps, 0.99)),
        "gateway_itl_median_ms": _ms(histogram_quantile(sorted(counters.itl.items()), 0.5)),
        "gateway_itl_p99_ms": _ms(histogram_quantile(sorted(counters.itl.items()), 0.99)),
        "elapsed_s": round(run.elapsed_s, 3),
        "occupancy_samples": len(run.ticks),
        "held_token_s": round(held_s, 1),
        "unused_token_s": round(unused_s, 1),
        "never_used_token_s": round(never_s, 1),
        "unused_mean_tokens_per_user": round(unused_s / per_user_s, 1),
        "unused_mean_share_of_cap": round(unused_s / per_user_s / cap, 4),
        "never_used_mean_tokens_per_user": round(never_s / per_user_s, 1),
        "never_used_mean_share_of_cap": round(never_s / per_user_s / cap, 4),
        "denied_tokens": denied_tokens,
        "denied_would_fit_requests": denied_fit,
        "denied_would_fit_tokens": denied_fit_tokens,
        "denied_tokens_within_slack": denied_within_slack,
        "cap_tokens_per_user": cap,
        "cap_use": round(billed_total / (cap * users), 4),
        "billed_completion_tokens": billed_total,
        "client_seen_tokens": seen_total,
        "billed_not_read": billed_total - seen_total,
        "vllm_generated_tokens": int(counters.vllm_generated),
        "unbilled_tokens": int(counters.vllm_generated) - billed_total,
        "over_cap_tokens_total": sum(over),
        "over_cap_tokens_max": max(over, default=0),
        "users_over_cap": sum(1 for n in over if n > 0),
        "finish_reasons": dict(Counter(finishes.values())),
        "read_to_end_but_ledger_says_disconnected": len(mislabelled),
        "requests": [_request(o, billed_by_id, finishes) for o in outcomes],
    }


def _request(outcome: Outcome, billed: dict[str, int], finishes: dict[str, str]) -> dict:
    result = outcome.result
    return {
        "user": outcome.user,
        "wants": outcome.ask.wants,
        "status": result.status,
        "error": result.error,
        "seen": result.tokens,
        "billed": billed.get(result.request_id or ""),
        "client_finish": result.finish_reason,
        "ledger_finish": finishes.get(result.request_id or ""),
        "done": result.done,
    }
