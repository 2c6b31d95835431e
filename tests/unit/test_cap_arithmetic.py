"""Pure cap arithmetic: budget plans, window slots, prompt bounds, prices."""

import json
from datetime import UTC, datetime

import pytest

from metering.prompt import TemplateOverhead, chat_prompt_bound, completion_prompt_bound
from metering.windows import ROLLING_BUCKETS, slot_of
from policies.budget import PromptOverCap, plan_budget
from policies.money import PriceError, parse_token_price
from policies.pricing import Usage, counted_tokens, value_nano
from policies.schema import Tier, Window


def tier(**fields: object) -> Tier:
    return Tier.model_validate(fields)


def test_whole_request_plan_reserves_the_ceiling() -> None:
    plan = plan_budget(
        tier(caps={"per_request": 300}), prompt_bound=100, asked=None, room=1023, outputs=1, streaming=True
    )
    assert (plan.fixed, plan.ceiling, plan.first, plan.want_min, plan.leased) == (100, 200, 200, 1, False)


def test_client_limit_and_model_room_bound_the_ceiling() -> None:
    t = tier()
    assert plan_budget(t, prompt_bound=10, asked=50, room=1023, outputs=1, streaming=False).ceiling == 50
    assert plan_budget(t, prompt_bound=10, asked=5000, room=1023, outputs=1, streaming=False).ceiling == 1023


def test_leases_apply_to_streams_only() -> None:
    t = tier(lease_tokens=64)
    streamed = plan_budget(t, prompt_bound=10, asked=500, room=1023, outputs=1, streaming=True)
    unary = plan_budget(t, prompt_bound=10, asked=500, room=1023, outputs=1, streaming=False)
    assert (streamed.first, streamed.ceiling, streamed.leased) == (64, 500, True)
    assert (unary.first, unary.leased) == (500, False)


def test_lease_larger_than_ceiling_is_a_whole_reservation() -> None:
    plan = plan_budget(tier(lease_tokens=64), prompt_bound=1, asked=20, room=1023, outputs=1, streaming=True)
    assert (plan.first, plan.leased) == (20, False)


def test_prompt_not_counted_reserves_nothing_for_it() -> None:
    plan = plan_budget(
        tier(caps={"count": ["completion"]}),
        prompt_bound=900,
        asked=10,
        room=1023,
        outputs=1,
        streaming=False,
    )
    assert (plan.fixed, plan.first) == (0, 10)


def test_completion_not_counted_reserves_only_the_prompt() -> None:
    plan = plan_budget(
        tier(caps={"count": ["prompt"]}), prompt_bound=30, asked=10, room=1023, outputs=1, streaming=False
    )
    assert (plan.fixed, plan.first, plan.want_min) == (30, 0, 0)


def test_prompt_over_per_request_cap_is_refused() -> None:
    with pytest.raises(PromptOverCap):
        plan_budget(
            tier(caps={"per_request": 50}), prompt_bound=51, asked=1, room=1023, outputs=1, streaming=False
        )


def test_several_outputs_multiply_the_ceiling_and_the_least_grant() -> None:
    plan = plan_budget(tier(), prompt_bound=5, asked=10, room=1023, outputs=3, streaming=False)
    assert (plan.ceiling, plan.want_min) == (30, 3)


def test_calendar_day_slot_and_reset() -> None:
    now = datetime(2026, 11, 23, 22, 0, tzinfo=UTC).timestamp()
    slot = slot_of(Window(per="day", tokens=5), now)
    assert slot.current == slot.lo == int(now // 86400)
    assert slot.retry_after(now, None) == 2 * 3600


def test_calendar_month_resets_on_the_first_of_next_month() -> None:
    now = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp()
    slot = slot_of(Window(per="month", tokens=5), now)
    assert slot.current == 2026 * 12 + 11
    assert slot.retry_after(now, None) == 30


def test_calendar_week_starts_on_monday() -> None:
    sunday = datetime(2026, 11, 22, 12, 0, tzinfo=UTC).timestamp()
    monday = datetime(2026, 11, 23, 0, 0, 1, tzinfo=UTC).timestamp()
    window = Window(per="week", tokens=5)
    assert slot_of(window, monday).current == slot_of(window, sunday).current + 1
    assert slot_of(window, sunday).retry_after(sunday, None) == 12 * 3600


def test_rolling_minute_counts_sixty_one_second_buckets() -> None:
    slot = slot_of(Window(per="minute", tokens=5, mode="rolling"), 1000.5)
    assert (slot.current, slot.lo) == (1000, 1000 - ROLLING_BUCKETS + 1)
    assert slot.retry_after(1000.5, oldest=990) == 50


def test_chat_prompt_bound_is_at_least_the_content_bytes_plus_overhead() -> None:
    body = {"messages": [{"role": "user", "content": "héllo wörld"}], "tools": [{"type": "function"}]}
    overhead = TemplateOverhead(fixed=7, per_message=3)
    expected = 7 + 3 + len(json.dumps(body["messages"], ensure_ascii=False, separators=(",", ":")).encode())
    expected += len(json.dumps(body["tools"], separators=(",", ":")).encode())
    assert chat_prompt_bound(body, overhead) == expected


def test_completion_prompt_bound_token_ids_are_exact_and_lists_add_up() -> None:
    overhead = TemplateOverhead(fixed=2, per_message=0)
    assert completion_prompt_bound({"prompt": [1, 2, 3]}, overhead) == 3
    assert completion_prompt_bound({"prompt": "ab"}, overhead) == 4
    assert completion_prompt_bound({"prompt": ["ab", "cde"]}, overhead) == 4 + 5


def test_prices_are_exact_nano_units() -> None:
    assert parse_token_price("0.50 USD/1M") == (500, "USD")
    assert parse_token_price("0.002 USD/1K") == (2000, "USD")
    for bad in (0.5, "0.5", "1 usd/1M", "0.0000001 USD/1M"):
        with pytest.raises(PriceError):
            parse_token_price(bad)


def test_value_prices_cached_prompt_separately() -> None:
    t = tier(prices={"prompt": "1 USD/1M", "cached_prompt": "0.1 USD/1M", "completion": "2 USD/1M"})
    usage = Usage(prompt_tokens=100, completion_tokens=10, cached_tokens=40)
    assert value_nano(t, "tiny", usage) == 60 * 1000 + 40 * 100 + 10 * 2000


def test_a_model_with_its_own_prices_takes_them_over_the_tiers_defaults() -> None:
    t = tier(
        prices={
            "prompt": "1 USD/1M",
            "cached_prompt": "0.1 USD/1M",
            "completion": "2 USD/1M",
            "models": {
                "big": {"prompt": "5 USD/1M", "completion": "20 USD/1M"},
                "mid": {"completion": "4 USD/1M"},
            },
        }
    )
    usage = Usage(prompt_tokens=100, completion_tokens=10, cached_tokens=40)
    assert value_nano(t, "tiny", usage) == 60 * 1000 + 40 * 100 + 10 * 2000
    # "big" sets its own prompt price, so its cached tokens cost that, not the default cached price
    assert value_nano(t, "big", usage) == 100 * 5000 + 10 * 20000
    assert value_nano(t, "mid", usage) == 60 * 1000 + 40 * 100 + 10 * 4000


def test_counted_tokens_follow_the_tier() -> None:
    usage = Usage(prompt_tokens=7, completion_tokens=5)
    assert counted_tokens(tier(), usage) == 12
    assert counted_tokens(tier(caps={"count": ["completion"]}), usage) == 5
