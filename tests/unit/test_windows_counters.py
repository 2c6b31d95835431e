"""Which counters a request counts against (the user's windows, then their team's; tokens and/or
spend), their Redis keys in the user's home hash tag, and the keys parsing back to their user:
every key one script touches lies in one Redis Cluster hash slot (property-based over ids)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from metering.keys import (
    PREEMPTED_KEY,
    UserKeys,
    response_key,
    slots_key,
    team_window_key,
    user_keys_of,
)
from metering.windows import Counter, Scope, counters_of, slot_of
from policies.index import Principal
from policies.schema import NAME, Tier, Window

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
DAY = NOW // 86400


def window(**fields: object) -> Window:
    return Window.model_validate(fields)


DAY_TOKENS = window(per="day", tokens=1000)
MONTH_SPEND = window(per="month", spend="50 USD")
HOUR_BOTH = window(per="hour", tokens=300, spend="0.5 USD", mode="rolling")
WEEK_TOKENS = window(per="week", tokens=9000)


def summary(counters: list[Counter]) -> list[tuple[str, str, int, bool, bool]]:
    return [(c.key, c.label, c.slot.cap, c.spend, c.team) for c in counters]


def test_solo_user_counts_one_counter_per_capped_quantity() -> None:
    scope = Scope("alice", (DAY_TOKENS, MONTH_SPEND, HOUR_BOTH))
    assert summary(counters_of(scope, NOW)) == [
        ("cg:{u:alice}:w:day", "day", 1000, False, False),
        ("cg:{u:alice}:s:month", "month", 50_000_000_000, True, False),
        ("cg:{u:alice}:w:rolling-hour", "rolling-hour", 300, False, False),
        ("cg:{u:alice}:s:rolling-hour", "rolling-hour", 500_000_000, True, False),
    ]


def test_team_member_counts_their_own_then_their_teams_in_the_teams_slot() -> None:
    scope = Scope("alice", (DAY_TOKENS,), "eng", (HOUR_BOTH, MONTH_SPEND))
    assert summary(counters_of(scope, NOW)) == [
        ("cg:{t:eng}:u:alice:w:day", "day", 1000, False, False),
        ("cg:{t:eng}:tw:rolling-hour", "team rolling-hour", 300, False, True),
        ("cg:{t:eng}:ts:rolling-hour", "team rolling-hour", 500_000_000, True, True),
        ("cg:{t:eng}:ts:month", "team month", 50_000_000_000, True, True),
    ]


def test_counter_slots_are_the_windows_slots() -> None:
    counters = counters_of(Scope("bob", (DAY_TOKENS, HOUR_BOTH), "ops", (WEEK_TOKENS,)), NOW)
    assert counters[0].slot == slot_of(DAY_TOKENS, NOW)
    assert counters[0].slot.current == DAY
    assert counters[1].slot == slot_of(HOUR_BOTH, NOW)
    assert counters[2].slot == slot_of(HOUR_BOTH, NOW, spend=True)
    assert counters[2].slot.cap == 500_000_000 != counters[1].slot.cap
    assert counters[3].slot == slot_of(WEEK_TOKENS, NOW)


def test_counter_label() -> None:
    slot = slot_of(DAY_TOKENS, NOW)
    assert Counter("k", slot, spend=False, team=False).label == "day"
    assert Counter("k", slot, spend=True, team=True).label == "team day"


def test_a_team_without_windows_adds_no_counter_and_no_team_ignores_team_windows() -> None:
    member = Scope("alice", (DAY_TOKENS,), "eng", ())
    assert [c.key for c in counters_of(member, NOW)] == ["cg:{t:eng}:u:alice:w:day"]
    # team_windows without a team are nobody's: no counter counts them.
    orphan = Scope("alice", (DAY_TOKENS,), None, (MONTH_SPEND,))
    assert [c.key for c in counters_of(orphan, NOW)] == ["cg:{u:alice}:w:day"]
    assert counters_of(Scope("alice"), NOW) == []


def test_scope_spends_when_any_window_caps_money() -> None:
    assert not Scope("a", (DAY_TOKENS, WEEK_TOKENS)).spends
    assert not Scope("a").spends
    assert Scope("a", (DAY_TOKENS, MONTH_SPEND)).spends
    assert Scope("a", (HOUR_BOTH,)).spends
    assert Scope("a", (DAY_TOKENS,), "eng", (MONTH_SPEND,)).spends
    assert not Scope("a", (DAY_TOKENS,), "eng", (WEEK_TOKENS,)).spends


def test_scope_of_a_principal() -> None:
    tier = Tier.model_validate({"caps": {"windows": [{"per": "day", "tokens": 1000}]}})
    solo = Scope.of(Principal("alice", "free", tier))
    assert solo == Scope("alice", (tier.caps.windows[0],), None, ())
    assert solo.keys == UserKeys("alice")
    member = Scope.of(Principal("bob", "free", tier, "eng", (MONTH_SPEND,)))
    assert member == Scope("bob", (tier.caps.windows[0],), "eng", (MONTH_SPEND,))
    assert member.keys == UserKeys("bob", "eng")
    assert member.spends and not solo.spends
    assert isinstance(member.windows, tuple)


# --- keys -----------------------------------------------------------------------------------------


def test_user_keys_in_each_home() -> None:
    assert UserKeys("alice").fixed() == [
        "cg:{u:alice}:res",
        "cg:{u:alice}:live",
        "cg:{u:alice}:totals",
        "cg:{u:alice}:ledger",
        "cg:{u:alice}:settled",
    ]
    assert UserKeys("alice", "eng").fixed()[0] == "cg:{t:eng}:u:alice:res"
    assert UserKeys("alice", "eng").window("day", spend=True) == "cg:{t:eng}:u:alice:s:day"
    assert team_window_key("eng", "week", False) == "cg:{t:eng}:tw:week"


@pytest.mark.parametrize("keys", [UserKeys("alice"), UserKeys("a.b-c_9", "x"), UserKeys("u", "t.1")])
def test_user_keys_of_round_trips(keys: UserKeys) -> None:
    for key in [*keys.fixed(), keys.window("day"), keys.window("rolling-week", True)]:
        assert user_keys_of(key) == keys


@pytest.mark.parametrize(
    "key",
    [
        team_window_key("eng", "day", False),
        team_window_key("eng", "day", True),
        slots_key("http://gpu:8000"),
        PREEMPTED_KEY,
        response_key("resp_1"),
        "cg:{u:alice}",
        "cg:{u:}:res",
        "cg:{t:eng}:u::res",
        "cg:{t:eng}:u:alice",
        "cg:{x:alice}:res",
        "other:{u:alice}:res",
        "cg:u:alice:res",
        "",
    ],
)
def test_user_keys_of_rejects_other_keys(key: str) -> None:
    with pytest.raises(ValueError, match="not a user's metering key"):
        user_keys_of(key)


# --- one hash slot per scope (property-based) -----------------------------------------------------

IDS = st.from_regex(NAME, fullmatch=True)


@st.composite
def windows(draw: st.DrawFn) -> tuple[Window, ...]:
    out = []
    for name in draw(st.lists(st.sampled_from(["minute", "hour", "day", "week", "month"]), unique=True)):
        mode = draw(st.sampled_from(["calendar", "rolling"]))
        tokens = draw(st.none() | st.integers(0, 10**6))
        spend = draw(
            st.sampled_from(["1 USD", "0.25 USD"]) if tokens is None else st.none() | st.just("1 USD")
        )
        out.append(window(per=name, mode=mode, tokens=tokens, spend=spend))
    return tuple(out)


def hash_tag(key: str) -> str:
    match = re.match(r"^[^{]*\{([^}]+)\}", key)
    assert match is not None, key
    return match[1]


@settings(deadline=None, max_examples=60)
@given(
    user=IDS,
    team=st.none() | IDS,
    own=windows(),
    shared=windows(),
    now=st.floats(0, 4_000_000_000, allow_nan=False),
)
def test_every_key_of_a_scope_shares_one_hash_slot(
    user: str, team: str | None, own: tuple[Window, ...], shared: tuple[Window, ...], now: float
) -> None:
    scope = Scope(user, own, team, shared)
    counters = counters_of(scope, now)
    # One counter per capped quantity.
    quantities = [w.tokens is not None for w in own] + [w.spend is not None for w in own]
    if team is not None:
        quantities += [w.tokens is not None for w in shared] + [w.spend is not None for w in shared]
    assert len(counters) == sum(quantities)
    assert len({c.key for c in counters}) == len(counters)
    keys = [*scope.keys.fixed(), *(c.key for c in counters)]
    home = f"u:{user}" if team is None else f"t:{team}"
    assert {hash_tag(key) for key in keys} == {home}
    assert len({key_slot(key.encode()) for key in keys}) == 1
    for counter in counters:
        if counter.team:
            assert counter.label == "team " + counter.slot.name
        else:
            assert user_keys_of(counter.key) == scope.keys
            assert counter.label == counter.slot.name
    for key in scope.keys.fixed():
        assert user_keys_of(key) == scope.keys
