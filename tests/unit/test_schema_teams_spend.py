"""The policy schema's teams and spend caps: windows capping money (exact nano-units), teams
sharing a tier's windows or their own, their cross-references (errors naming YAML path and line),
and the policy index giving a file user their team and its windows."""

import textwrap

import pytest
from pydantic import ValidationError

from policies.index import PolicyIndex
from policies.keys import hash_key
from policies.loader import ConfigError, load_policy
from policies.schema import Team, Tier, Window, team_windows

KEY_A = "cg-alice-key"
KEY_B = "cg-bob-key"
HASH_A = hash_key(KEY_A)
HASH_B = hash_key(KEY_B)

# Line numbers matter: the tests below name them.
BASE = f"""\
tiers:
  free:
    caps:
      windows:
        - {{per: day, tokens: 1000}}
        - {{per: month, spend: "50 USD"}}
    prices:
      completion: "1.00 USD/1M"
  shared:
    caps:
      windows:
        - {{per: hour, tokens: 500}}
teams:
  - id: eng
    tier: shared
  - id: ops
    windows:
      - {{per: day, spend: "2.5 USD"}}
users:
  - id: alice
    tier: free
    team: eng
    keys: ["{HASH_A}"]
  - id: bob
    tier: free
    team: ops
    keys: ["{HASH_B}"]
  - id: carol
    tier: free
"""


def problems(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as caught:
        load_policy(textwrap.dedent(text), "p.yaml")
    return [(p.path, p.line, p.message) for p in caught.value.problems]


def window(**fields: object) -> Window:
    return Window.model_validate(fields)


# --- Window: tokens, spend, or both --------------------------------------------------------------


def test_base_policy_loads_with_exact_spend_caps() -> None:
    policy = load_policy(BASE)
    month = policy.tiers["free"].caps.windows[1]
    assert month.tokens is None
    assert month.spend is not None
    assert (month.spend.nano, month.spend.currency, month.spend.text) == (50_000_000_000, "USD", "50 USD")
    ops = policy.teams[1]
    assert ops.windows is not None and ops.windows[0].spend is not None
    assert ops.windows[0].spend.nano == 2_500_000_000
    assert policy.currency == "USD"


def test_window_caps_tokens_spend_or_both() -> None:
    assert window(per="day", tokens=0).tokens == 0
    both = window(per="day", tokens=10, spend="1 EUR")
    assert both.tokens == 10
    assert both.spend is not None and (both.spend.nano, both.spend.currency) == (10**9, "EUR")
    with pytest.raises(ValidationError, match="a window caps `tokens`, `spend` or both"):
        window(per="day")
    with pytest.raises(ValidationError, match="a window caps"):
        window(per="day", tokens=None, spend=None)


@pytest.mark.parametrize(
    ("text", "nano"),
    [
        ("50 USD", 50_000_000_000),
        ("0 USD", 0),
        ("0.000000001 USD", 1),
        ("12.345678901 USD", 12_345_678_901),
        ("  7.5USD ", 7_500_000_000),
        ("123456789.000000000 USD", 123_456_789 * 10**9),
    ],
)
def test_spend_is_exact_nano_units(text: str, nano: int) -> None:
    spend = window(per="month", spend=text).spend
    assert spend is not None
    assert spend.nano == nano
    assert isinstance(spend.nano, int)
    assert spend.text == text


def test_spend_serializes_back_to_its_text() -> None:
    dumped = window(per="month", spend="0.10 USD").model_dump(mode="json", exclude_none=True)
    assert dumped == {"per": "month", "spend": "0.10 USD", "mode": "calendar"}
    assert Window.model_validate(dumped).spend == window(per="month", spend="0.10 USD").spend


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0.0000000001 USD", "finer than one nano-USD"),
        ("0.0000000015 USD", "finer than one nano-USD"),
        ("50", "cannot read amount"),
        ("50 usd", "cannot read amount"),
        ("-5 USD", "cannot read amount"),
        ("5 USD/1M", "cannot read amount"),
        ("1e3 USD", "cannot read amount"),
        ("USD 5", "cannot read amount"),
        ("", "cannot read amount"),
        (50, "cannot read amount"),
        (5.5, "cannot read amount"),
        (True, "cannot read amount"),
        ([], "cannot read amount"),
    ],
)
def test_bad_spend_is_refused(value: object, fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        window(per="day", spend=value)
    errors = caught.value.errors()
    assert [e["loc"] for e in errors] == [("spend",)]
    assert fragment in errors[0]["msg"]


# --- Team -----------------------------------------------------------------------------------------


def test_team_takes_a_tier_or_windows_not_both() -> None:
    assert Team(id="eng", tier="shared").windows is None
    own = Team.model_validate({"id": "eng", "windows": [{"per": "day", "tokens": 5}]})
    assert own.tier is None and own.windows is not None and own.windows[0].tokens == 5
    with pytest.raises(ValidationError, match="from `tier` or `windows`, not both"):
        Team.model_validate({"id": "eng", "tier": "shared", "windows": [{"per": "day", "tokens": 5}]})
    # An empty list of windows is still a source of windows.
    with pytest.raises(ValidationError, match="not both"):
        Team.model_validate({"id": "eng", "tier": "shared", "windows": []})


@pytest.mark.parametrize("team_id", ["a:b", "{t}", "a b", "", "-x", "a" * 65])
def test_team_id_follows_the_name_rule(team_id: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Team(id=team_id)
    assert caught.value.errors()[0]["loc"] == ("id",)


def test_team_windows_from_own_windows_or_tier() -> None:
    shared = Tier.model_validate({"caps": {"windows": [{"per": "hour", "tokens": 500}]}})
    tiers = {"shared": shared}
    own = [window(per="day", spend="1 USD")]
    assert team_windows(None, own, tiers) == (own[0],)
    assert team_windows("shared", None, tiers) == (shared.caps.windows[0],)
    assert team_windows(None, None, tiers) == ()
    assert team_windows(None, [], tiers) == ()
    # Own windows win over the tier (a validated Team never has both).
    assert team_windows("shared", own, tiers) == (own[0],)
    assert isinstance(team_windows("shared", None, tiers), tuple)
    with pytest.raises(KeyError):
        team_windows("gone", None, tiers)


# --- The loader: problems named by YAML path and line --------------------------------------------

BROKEN = [
    pytest.param(
        BASE.replace('- {per: month, spend: "50 USD"}', "- {per: month}"),
        ("tiers.free.caps.windows[1]", 6, "a window caps `tokens`, `spend` or both"),
        id="window-caps-nothing",
    ),
    pytest.param(
        BASE.replace('spend: "50 USD"', 'spend: "0.0000000001 USD"'),
        ("tiers.free.caps.windows[1].spend", 6, "finer than one nano-USD"),
        id="spend-too-fine",
    ),
    pytest.param(
        BASE.replace('spend: "50 USD"', "spend: 50"),
        ("tiers.free.caps.windows[1].spend", 6, "cannot read amount 50"),
        id="spend-without-currency",
    ),
    pytest.param(
        BASE.replace('spend: "2.5 USD"', 'spend: "lots"'),
        ("teams[1].windows[0].spend", 18, "cannot read amount 'lots'"),
        id="team-spend-unreadable",
    ),
    pytest.param(
        BASE.replace("  - id: ops\n", "  - id: ops\n    tier: shared\n"),
        ("teams[1]", 16, "a team takes its windows from `tier` or `windows`, not both"),
        id="team-tier-and-windows",
    ),
    pytest.param(
        BASE.replace("    tier: shared\n", "    tier: gold\n"),
        ("teams[0].tier", 15, "unknown tier 'gold'"),
        id="team-unknown-tier",
    ),
    pytest.param(
        BASE.replace("  - id: ops\n", "  - id: eng\n"),
        ("teams[1].id", 16, "duplicate team id 'eng'"),
        id="duplicate-team-id",
    ),
    pytest.param(
        BASE.replace("    team: ops\n", "    team: sales\n"),
        ("users[1].team", 26, "unknown team 'sales'"),
        id="user-unknown-team",
    ),
    pytest.param(
        BASE.replace("  - id: ops\n", "  - id: o:ps\n"),
        ("teams[1].id", 16, "should match pattern"),
        id="team-id-not-a-name",
    ),
    pytest.param(
        BASE.replace("    tier: shared\n", "    tier: shared\n    members: [alice]\n"),
        ("teams[0].members", 16, "unknown field"),
        id="team-unknown-field",
    ),
    pytest.param(
        BASE.replace('spend: "50 USD"', 'spend: "50 EUR"'),
        ("tiers", 1, "prices mix currencies ['EUR', 'USD'] (spend caps included)"),
        id="tier-spend-currency-differs-from-prices",
    ),
    pytest.param(
        BASE.replace('spend: "2.5 USD"', 'spend: "2.5 GBP"'),
        ("tiers", 1, "prices mix currencies ['GBP', 'USD'] (spend caps included)"),
        id="team-spend-currency-differs-from-prices",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BROKEN)
def test_broken_policy_names_path_and_line(text: str, expected: tuple[str, int, str]) -> None:
    found = problems(text)
    path, line, fragment = expected
    assert any(p == path and ln == line and fragment in msg for p, ln, msg in found), found


def test_spend_caps_alone_fix_the_currency() -> None:
    text = """\
    tiers:
      a:
        caps:
          windows: [{per: day, spend: "3 EUR"}]
    teams:
      - id: t
        windows: [{per: week, spend: "9 EUR"}]
    """
    assert load_policy(textwrap.dedent(text)).currency == "EUR"
    assert problems(text.replace('"9 EUR"', '"9 CHF"')) == [
        ("tiers", 1, "prices mix currencies ['CHF', 'EUR'] (spend caps included)")
    ]


def test_user_may_only_name_a_team_of_the_file() -> None:
    # A user naming a team defined later in the list is fine: teams are read first.
    text = BASE.replace("  - id: ops\n", "  - id: zeta\n").replace("team: ops", "team: zeta")
    assert {t.id for t in load_policy(text).teams} == {"eng", "zeta"}


def test_every_team_problem_is_reported() -> None:
    text = (
        BASE.replace("    tier: shared\n", "    tier: gold\n")
        .replace("    team: ops\n", "    team: sales\n")
        .replace("  - id: ops\n", "  - id: eng\n")
    )
    paths = {path for path, _, _ in problems(text)}
    assert paths == {"teams[0].tier", "teams[1].id", "users[1].team"}


# --- PolicyIndex: teams of the file ---------------------------------------------------------------


def test_index_gives_file_users_their_team_and_its_windows() -> None:
    policy = load_policy(BASE)
    index = PolicyIndex(policy)
    alice = index.principal_for_key(KEY_A)
    bob = index.principal_for_key(KEY_B)
    assert alice is not None and bob is not None
    assert (alice.user_id, alice.tier_name, alice.team) == ("alice", "free", "eng")
    assert alice.tier is policy.tiers["free"]
    # eng takes the `shared` tier's windows; ops has its own.
    assert alice.team_windows == tuple(policy.tiers["shared"].caps.windows)
    assert [(w.name, w.tokens) for w in alice.team_windows] == [("hour", 500)]
    assert bob.team == "ops"
    assert [(w.name, w.spend.nano if w.spend else None) for w in bob.team_windows] == [("day", 2_500_000_000)]
    carol = index.principal_for_user("carol")
    assert carol is not None
    assert (carol.team, carol.team_windows) == (None, ())
    assert set(index.teams) == {"eng", "ops"}
    assert index.principal_for_user("alice") == alice


def test_index_team_without_windows_shares_none() -> None:
    text = BASE.replace("    tier: shared\n", "")
    alice = PolicyIndex(load_policy(text)).principal_for_user("alice")
    assert alice is not None
    assert (alice.team, alice.team_windows) == ("eng", ())


def test_principal_for_digest_matches_only_the_stored_form() -> None:
    index = PolicyIndex(load_policy(BASE))
    found = index.principal_for_digest(HASH_A)
    assert found is not None and found.user_id == "alice"
    assert index.principal_for_digest(HASH_B) == index.principal_for_key(KEY_B)
    assert index.principal_for_digest(HASH_A[len("sha256:") :]) is None  # bare hex is not the stored form
    assert index.principal_for_digest(HASH_A.upper()) is None
    assert index.principal_for_digest(hash_key("cg-nobody")) is None
    assert index.principal_for_digest("") is None
    assert index.principal_for_key(HASH_A) is None  # the digest is not itself a key


# --- Threshold notifications ----------------------------------------------------------------------


def test_notify_at_is_shares_of_a_window_each_once() -> None:
    tier = Tier.model_validate({"caps": {"windows": [{"per": "day", "tokens": 9}], "notify_at": [0.8, 1]}})
    assert tier.caps.notify_at == [0.8, 1.0]
    month = '        - {per: month, spend: "50 USD"}\n'
    text = BASE.replace(month, month + "      notify_at: [0.5, 1.5]\n", 1)
    assert problems(text) == [("tiers.free.caps.notify_at[1]", 7, "Input should be less than or equal to 1")]
    for bad, message in (([0.5, 0.5], "notify_at lists a share twice"), ([0], "greater than 0")):
        with pytest.raises(ValidationError, match=message):
            Tier.model_validate({"caps": {"windows": [{"per": "day", "tokens": 9}], "notify_at": bad}})
    with pytest.raises(ValidationError, match="needs windows"):
        Tier.model_validate({"caps": {"notify_at": [0.5]}})
