"""How a request ended is decided in one place, from the facts recorded on its flight."""

import pytest

from policies.budget import BudgetPlan
from policies.index import Principal
from policies.schema import Tier
from proxy.flight import Flight, Outcome, outcome_of, usage_event
from proxy.openai.protocol import parse_request
from proxy.settings import UpstreamSettings
from proxy.upstream import UpstreamState

TIER = Tier.model_validate(
    {"prices": {"prompt": "1 USD/1M", "cached_prompt": "0.5 USD/1M", "completion": "2 USD/1M"}}
)


def flight() -> Flight:
    request = parse_request("chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}]}')
    plan = BudgetPlan(10, 100, 100, 1, False)
    made = Flight("r1", Principal("u", "t", TIER), request, "/v1/chat/completions", 0.0, plan,
                  UpstreamState(UpstreamSettings(url="http://127.0.0.1:1")))  # fmt: skip
    made.tally.open_choices = {0}
    return made


def test_a_clean_end_is_ok_and_records_vllms_finish_reason() -> None:
    f = flight()
    f.tally.finish_reason = "length"
    assert outcome_of(f) is Outcome.OK
    assert usage_event(f, Outcome.OK, 1.0, 1000).finish_reason == "length"
    f.fail_open = True
    assert outcome_of(f) is Outcome.OK_FAIL_OPEN


def test_failures_outrank_cuts_and_hang_ups() -> None:
    f = flight()
    f.hang_up()
    assert outcome_of(f) is Outcome.CLIENT_DISCONNECTED
    f.tally.cut = True
    assert outcome_of(f) is Outcome.CUT_AT_BUDGET
    f.fail(Outcome.SHUTDOWN)
    assert outcome_of(f) is Outcome.SHUTDOWN
    f.fail(Outcome.UPSTREAM_ERROR)
    assert outcome_of(f) is Outcome.UPSTREAM_ERROR
    f.fail(Outcome.RELAY_ERROR)
    assert outcome_of(f) is Outcome.RELAY_ERROR
    assert usage_event(f, outcome_of(f), 1.0, 1000).finish_reason == "relay_error"


def test_a_hang_up_after_every_choice_finished_is_served() -> None:
    f = flight()
    f.tally.open_choices.clear()
    f.hang_up()
    assert outcome_of(f) is Outcome.OK


def test_an_error_event_in_the_stream_is_an_upstream_error() -> None:
    f = flight()
    f.tally.upstream_error = True
    assert outcome_of(f) is Outcome.UPSTREAM_ERROR


def test_only_failures_can_be_recorded_as_failures() -> None:
    with pytest.raises(AssertionError):
        flight().fail(Outcome.OK)


def test_the_event_prices_cached_prompt_tokens_at_their_own_rate() -> None:
    f = flight()
    f.tally.record(
        {"prompt_tokens": 1000, "completion_tokens": 10, "prompt_tokens_details": {"cached_tokens": 400}}
    )
    event = usage_event(f, Outcome.OK, 2.0, 5)
    assert event.value_nano == 600 * 1000 + 400 * 500 + 10 * 2000
    assert (event.prompt_tokens, event.cached_tokens, event.completion_tokens, event.counted) == (
        1000,
        400,
        10,
        1010,
    )


def test_usage_from_upstream_is_kept_non_negative_and_cached_within_the_prompt() -> None:
    f = flight()
    f.tally.record(
        {"prompt_tokens": -5, "completion_tokens": -9, "prompt_tokens_details": {"cached_tokens": 7}}
    )
    assert (f.tally.prompt_tokens, f.tally.completion_tokens, f.tally.cached_tokens) == (0, 0, 0)
