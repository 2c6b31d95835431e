"""Cap arithmetic (pure): how much a request may reserve up front and generate at most."""

from dataclasses import dataclass

from policies.schema import Tier


class PromptOverCap(ValueError):
    """The prompt alone is over the tier's per-request cap."""


class OutputsOverCap(ValueError):
    """The tier's per-request cap leaves less than one completion token per output."""


@dataclass(frozen=True, slots=True)
class BudgetPlan:
    """What to reserve for one request.

    `fixed` is reserved for the prompt (its bound, when prompts count against caps). `ceiling`
    is the most completion tokens the request may ever get, from the client's own limit, the
    tier's per-request cap and the model's room. `first` is the completion allowance reserved
    up front: all of `ceiling`, or one lease of it. `want_min` is the least grant worth serving.
    When completions count against no cap (no token cap counts them, no spend cap applies),
    nothing is reserved for them. `prompt_bound` is the prompt's bound whether or not it counts
    against token caps (spend caps hold it at its price).
    """

    fixed: int
    ceiling: int
    first: int
    want_min: int
    leased: bool
    prompt_bound: int = 0


def plan_budget(
    tier: Tier,
    *,
    prompt_bound: int,
    asked: int | None,
    room: int,
    outputs: int,
    streaming: bool,
    generates: bool = True,
    spends: bool = False,
) -> BudgetPlan:
    """Plan the reservation of a request with `outputs` sequences (n x prompts).

    `asked` is the client's max_tokens (None when absent), `room` the model context left for a
    completion. Leases apply to streams only: a non-streamed response cannot be cut mid-way.
    A request that `generates` nothing (an embedding) reserves its prompt only. `spends`: a
    spend cap applies, so the completion is reserved (at its price) whether or not it counts
    against token caps.
    Every number of the plan is at least 0 (a negative one would lend budget to other requests):
    `asked`, `room` and `outputs` below 1, or a negative `prompt_bound`, are a caller's bug.
    """
    if prompt_bound < 0 or room < 1 or outputs < 1 or (asked is not None and asked < 1):
        raise ValueError(f"plan_budget: out of range ({prompt_bound=}, {asked=}, {room=}, {outputs=})")
    fixed = prompt_bound if tier.counts("prompt") else 0
    per_request = tier.caps.per_request
    if per_request is not None and fixed > per_request:
        raise PromptOverCap(
            f"the prompt may use up to {prompt_bound} tokens, over the tier's per-request cap of "
            f"{per_request}"
        )
    if not generates:
        return BudgetPlan(fixed, 0, 0, 0, False, prompt_bound)
    per_output = room if asked is None else min(asked, room)
    ceiling = per_output * outputs
    if per_request is not None and tier.counts("completion"):
        ceiling = min(ceiling, per_request - fixed)
    if not (tier.counts("completion") or spends):
        return BudgetPlan(fixed, ceiling, 0, 0, False, prompt_bound)
    if ceiling < outputs:
        raise OutputsOverCap(
            f"{outputs} outputs need at least one completion token each; the tier's per-request cap "
            f"leaves {max(ceiling, 0)} after the prompt"
        )
    leased = streaming and tier.lease_tokens is not None and tier.lease_tokens < ceiling
    first = min(tier.lease_tokens, ceiling) if leased and tier.lease_tokens else ceiling
    return BudgetPlan(fixed, ceiling, first, min(outputs, first), leased, prompt_bound)


def per_output_limit(allowance: int, outputs: int) -> int:
    """The `max_tokens` of each of `outputs` sequences sharing a completion `allowance`."""
    return allowance // outputs
