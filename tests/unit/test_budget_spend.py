"""Budget plans under spend caps: a spend cap holds the completion at its price, so it is reserved
even when the tier's token caps count prompts only; and, property-based, every plan is
non-negative and ordered (want_min <= first <= ceiling)."""

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from policies.budget import BudgetPlan, OutputsOverCap, PromptOverCap, plan_budget
from policies.schema import Tier


def tier(**fields: object) -> Tier:
    return Tier.model_validate(fields)


PROMPT_ONLY = tier(caps={"per_request": 100, "count": ["prompt"]})


def test_spend_reserves_the_completion_when_only_prompts_count() -> None:
    plan = plan_budget(
        PROMPT_ONLY, prompt_bound=30, asked=200, room=1000, outputs=3, streaming=False, spends=True
    )
    # The per-request token cap does not bound completions the tier does not count.
    assert plan == BudgetPlan(fixed=30, ceiling=600, first=600, want_min=3, leased=False, prompt_bound=30)


def test_without_spend_nothing_is_reserved_for_an_uncounted_completion() -> None:
    plan = plan_budget(PROMPT_ONLY, prompt_bound=30, asked=200, room=1000, outputs=3, streaming=False)
    assert (plan.fixed, plan.first, plan.want_min, plan.leased) == (30, 0, 0, False)
    assert plan.ceiling == 600


def test_spend_with_nothing_counted_reserves_the_completion_only() -> None:
    t = tier(caps={"count": []})
    with_spend = plan_budget(t, prompt_bound=50, asked=None, room=64, outputs=1, streaming=False, spends=True)
    without = plan_budget(t, prompt_bound=50, asked=None, room=64, outputs=1, streaming=False)
    assert (with_spend.fixed, with_spend.ceiling, with_spend.first, with_spend.want_min) == (0, 64, 64, 1)
    assert (without.fixed, without.first, without.want_min) == (0, 0, 0)
    assert with_spend.prompt_bound == without.prompt_bound == 50


def test_spend_streams_lease_the_completion() -> None:
    t = tier(caps={"count": ["prompt"]}, lease_tokens=16)
    plan = plan_budget(t, prompt_bound=5, asked=100, room=1000, outputs=1, streaming=True, spends=True)
    assert (plan.ceiling, plan.first, plan.want_min, plan.leased) == (100, 16, 1, True)


def test_spend_changes_nothing_when_completions_count() -> None:
    t = tier(caps={"per_request": 300}, lease_tokens=50)
    for streaming in (False, True):
        args = {"prompt_bound": 100, "asked": None, "room": 1023, "outputs": 2, "streaming": streaming}
        assert plan_budget(t, **args, spends=True) == plan_budget(t, **args)  # type: ignore[arg-type]


def test_embedding_reserves_its_prompt_only_even_with_spend() -> None:
    plan = plan_budget(
        PROMPT_ONLY,
        prompt_bound=40,
        asked=None,
        room=1,
        outputs=1,
        streaming=False,
        generates=False,
        spends=True,
    )
    assert plan == BudgetPlan(40, 0, 0, 0, False, 40)


def test_spend_does_not_lift_the_prompt_cap() -> None:
    with pytest.raises(PromptOverCap):
        plan_budget(PROMPT_ONLY, prompt_bound=101, asked=1, room=10, outputs=1, streaming=False, spends=True)


def test_spend_with_counted_completion_still_needs_a_token_per_output() -> None:
    t = tier(caps={"per_request": 10})
    with pytest.raises(OutputsOverCap):
        plan_budget(t, prompt_bound=8, asked=None, room=100, outputs=3, streaming=False, spends=True)


# --- Properties -----------------------------------------------------------------------------------


def _tier(count: list[str], per_request: int | None, lease: int | None) -> Tier:
    caps: dict[str, object] = {"count": count}
    if per_request is not None:
        caps["per_request"] = per_request
    fields: dict[str, object] = {"caps": caps}
    if lease is not None:
        fields["lease_tokens"] = lease
    return Tier.model_validate(fields)


# Built once: validating a Tier per example would make the properties slow.
TIERS = st.sampled_from(
    [
        _tier(count, per_request, lease)
        for count in ([], ["prompt"], ["completion"], ["prompt", "completion"])
        for per_request in (None, 1, 7, 100, 5000)
        for lease in (None, 1, 16, 3000)
    ]
)


PLAN_ARGS = {
    "prompt_bound": st.integers(0, 6000),
    "asked": st.none() | st.integers(1, 5000),
    "room": st.integers(1, 5000),
    "outputs": st.integers(1, 8),
    "streaming": st.booleans(),
    "generates": st.booleans(),
    "spends": st.booleans(),
}


def plan_or_skip(t: Tier, **args: object) -> BudgetPlan:
    try:
        return plan_budget(t, **args)  # type: ignore[arg-type]
    except (PromptOverCap, OutputsOverCap):
        assume(False)
        raise AssertionError("unreachable") from None


@settings(deadline=None)
@given(t=TIERS, **PLAN_ARGS)
def test_every_plan_is_non_negative_and_ordered(t: Tier, **args: object) -> None:
    plan = plan_or_skip(t, **args)
    assert min(plan.fixed, plan.ceiling, plan.first, plan.want_min, plan.prompt_bound) >= 0
    assert plan.want_min <= plan.first <= plan.ceiling
    assert plan.prompt_bound == args["prompt_bound"]
    assert plan.fixed in (0, args["prompt_bound"])
    if plan.leased:
        assert args["streaming"]
        assert plan.first == t.lease_tokens < plan.ceiling
    if plan.first > 0:
        assert plan.want_min == min(args["outputs"], plan.first)  # type: ignore[type-var]


@settings(deadline=None)
@given(t=TIERS, **PLAN_ARGS)
def test_a_spending_generation_always_reserves_its_completion(t: Tier, **args: object) -> None:
    args = {**args, "generates": True, "spends": True}
    plan = plan_or_skip(t, **args)
    assert plan.first > 0
    assert plan.want_min == args["outputs"] or plan.first < args["outputs"]  # type: ignore[operator]
    if not plan.leased:
        assert plan.first == plan.ceiling


@settings(deadline=None)
@given(t=TIERS, **PLAN_ARGS)
def test_spend_never_reserves_less(t: Tier, **args: object) -> None:
    """A spend cap only adds the completion to the reservation; the prompt's share is unchanged."""
    args = {**args, "spends": False}
    without = plan_or_skip(t, **args)
    with_spend = plan_or_skip(t, **{**args, "spends": True})
    assert with_spend.fixed == without.fixed
    assert with_spend.ceiling == without.ceiling
    assert with_spend.first >= without.first
    if t.counts("completion") or not args["generates"]:
        assert with_spend == without
