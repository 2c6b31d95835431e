"""One request in flight and how it ended (pure: no I/O).

A `Flight` is created once a request is admitted and lives until it is settled. Whoever sees
something happen records it as a fact (`fail`, `hang_up`, the tally's `cut`); `outcome_of`
is the one place that turns those facts into how the request ended, and `usage_event` the one
place that turns a finished flight into its ledger event.
"""

import time
from dataclasses import dataclass, field
from enum import StrEnum

from metering.events import UsageEvent
from metering.meter import Reservation
from policies.budget import BudgetPlan
from policies.index import Principal
from policies.pricing import Rates, Usage, counted_tokens
from proxy.generation import GenerationRequest
from proxy.relay import StreamTally
from proxy.upstream import UpstreamState


class Outcome(StrEnum):
    """How a request ended: the `outcome` label of `capgate_requests_total`, and the ledger's
    finish reason for every outcome but the served ones (which record vLLM's own)."""

    OK = "ok"
    OK_FAIL_OPEN = "ok_fail_open"  # served while Redis was unreachable; usage went to the spool
    CUT_AT_BUDGET = "cut_at_budget"  # a lease extension was refused: cut mid-stream
    PREEMPTED = "preempted"  # ended mid-stream to free its slot for a protected tier
    CLIENT_DISCONNECTED = "client_disconnected"  # the client hung up before every choice ended
    UPSTREAM_ERROR = "upstream_error"  # vLLM answered an error, or its stream broke
    UPSTREAM_TIMEOUT = "upstream_timeout"  # no answer, or no next chunk, within the read timeout
    RELAY_ERROR = "relay_error"  # capgate itself failed while relaying (logged with the request id)
    SHUTDOWN = "shutdown"  # the server stopped with the request still running


SERVED = frozenset({Outcome.OK, Outcome.OK_FAIL_OPEN})
FAILURES = (Outcome.RELAY_ERROR, Outcome.UPSTREAM_TIMEOUT, Outcome.UPSTREAM_ERROR, Outcome.SHUTDOWN)


@dataclass
class Flight:
    """One request from admission to settlement."""

    request_id: str
    principal: Principal
    request: GenerationRequest
    endpoint: str
    started: float
    plan: BudgetPlan
    upstream: UpstreamState
    preemptible: bool = False  # a stream of a preemptible tier whose relay can end it early
    reservation: Reservation | None = None
    fail_open: bool = False
    tally: StreamTally = field(default_factory=lambda: StreamTally(time.monotonic()))
    failures: set[Outcome] = field(default_factory=set)
    hung_up: bool = False
    forwarded_at: float | None = None  # monotonic: handed to the API's serving code
    answered_at: float | None = None  # monotonic: vLLM's answer began

    @property
    def model(self) -> str:
        return self.request.model

    def fail(self, outcome: Outcome) -> None:
        """Record a failure (one of `FAILURES`); the gravest recorded decides the outcome."""
        assert outcome in FAILURES, outcome
        self.failures.add(outcome)

    def hang_up(self) -> None:
        """The client went away. After every choice finished (SDKs close at `[DONE]`) the request
        was served; before, it ended by the hang-up."""
        self.tally.client_gone = True
        if self.tally.open_choices:
            self.hung_up = True


def outcome_of(flight: Flight) -> Outcome:
    """How the request ended, from the facts recorded on it: a failure (the gravest first), then a
    preemption, then a budget cut, then a hang-up, else served."""
    for failure in FAILURES:
        if failure in flight.failures:
            return failure
    if flight.tally.upstream_error:
        return Outcome.UPSTREAM_ERROR
    if flight.tally.preempted:
        return Outcome.PREEMPTED
    if flight.tally.cut:
        return Outcome.CUT_AT_BUDGET
    if flight.hung_up:
        return Outcome.CLIENT_DISCONNECTED
    return Outcome.OK_FAIL_OPEN if flight.fail_open else Outcome.OK


def usage_event(flight: Flight, outcome: Outcome, now: float, wall_ms: int) -> UsageEvent:
    """The ledger event of a finished flight: vLLM's last cumulative usage, priced."""
    principal, tally = flight.principal, flight.tally
    usage = Usage(tally.prompt_tokens, tally.completion_tokens, tally.cached_tokens)
    ttft = tally.first_token_at - flight.started if tally.first_token_at else None
    served = outcome in SERVED
    return UsageEvent(
        request_id=flight.request_id,
        user=principal.user_id,
        tier=principal.tier_name,
        model=flight.model,
        prompt_tokens=usage.prompt_tokens,
        cached_tokens=usage.cached_tokens,
        completion_tokens=usage.completion_tokens,
        value_nano=Rates.of(principal.tier, flight.model).value(usage),
        counted=counted_tokens(principal.tier, usage),
        finish_reason=(tally.finish_reason or outcome.value) if served else outcome.value,
        ttft_ms=None if ttft is None else ttft * 1000,
        duration_ms=(now - flight.started) * 1000,
        ts_ms=wall_ms,
    )
