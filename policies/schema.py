"""The policy file's typed schema: tiers, users, keys, caps and prices.

Every model forbids unknown fields, so a typo in the YAML is an error, not a silently ignored
setting. Cross-references (a user's tier, duplicate key hashes, one currency) are checked by
`Policy` itself; the loader turns every error into a message naming the YAML path and line.
"""

import re
from collections.abc import Iterator, Sequence
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)

from policies.money import NANO, parse_amount, parse_token_price

Period = Literal["minute", "hour", "day", "week", "month"]
TokenType = Literal["prompt", "completion"]
FailMode = Literal["closed", "open"]

KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TokenPrice(BaseModel):
    """A per-token price, kept exactly as nano-units of `currency` per token.

    Written in the policy file as one string, `"<amount> <CUR>/<1K|1M>"` (e.g. `"0.80 USD/1M"`):
    an amount, a currency code and the number of tokens it buys. The fields below are what
    capgate reads from that string, not keys of the file."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    text: str
    """The price as written in the policy file."""
    nano_per_token: int
    """The price of one token in nano-units (10^-9) of the currency, an exact integer."""
    currency: str
    """The currency code, e.g. `USD`; every price and spend cap of a policy uses one currency."""


def _read_token_price(value: object) -> object:
    if isinstance(value, TokenPrice):
        return value
    nano, currency = parse_token_price(value)
    return {"text": value, "nano_per_token": nano, "currency": currency}


Price = Annotated[
    TokenPrice,
    BeforeValidator(_read_token_price),
    PlainSerializer(lambda price: price.text, return_type=str),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Amount(BaseModel):
    """A sum of money, kept exactly as nano-units of `currency`.

    Written in the policy file as one string, `"<amount> <CUR>"` (e.g. `"50 USD"`), exact to one
    nano-unit. The fields below are what capgate reads from that string, not keys of the file."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    text: str
    """The amount as written in the policy file."""
    nano: int
    """The amount in nano-units (10^-9) of the currency, an exact integer."""
    currency: str
    """The currency code, e.g. `USD`; every price and spend cap of a policy uses one currency."""


def _read_amount(value: object) -> object:
    if isinstance(value, Amount):
        return value
    amount, currency = parse_amount(value)
    nano = amount * NANO
    if nano != nano.to_integral_value():
        raise ValueError(f"amount {value!r} is finer than one nano-{currency}")
    return {"text": value, "nano": int(nano), "currency": currency}


Money = Annotated[
    Amount,
    BeforeValidator(_read_amount),
    PlainSerializer(lambda amount: amount.text, return_type=str),
]


class Window(_Strict):
    """A cap over a window of time: of `tokens`, of `spend` (money, at the request's prices), or
    both.

    `calendar` windows reset at UTC boundaries (the minute, hour, day, ISO week, month);
    `rolling` windows count the last minute/hour/day/week/30 days in 60 buckets.
    """

    per: Period
    """The window's length: a minute, hour, day, week or month (30 days when rolling)."""
    tokens: Annotated[int, Field(ge=0)] | None = None
    """The most tokens (of the types the tier's `caps.count` names) a user may use in the window."""
    spend: Money | None = None
    """The most money a user may spend in the window, at each request's model prices, e.g.
    `"50 USD"`. A reservation holds the worst case and lowers `max_tokens` to what is left."""
    mode: Literal["calendar", "rolling"] = "calendar"
    """`calendar` resets at UTC boundaries; `rolling` counts the last window length in 60 buckets."""

    @model_validator(mode="after")
    def _caps_something(self) -> "Window":
        if self.tokens is None and self.spend is None:
            raise ValueError("a window caps `tokens`, `spend` or both")
        return self

    @property
    def name(self) -> str:
        return self.per if self.mode == "calendar" else f"rolling-{self.per}"


def distinct_windows(windows: list[Window]) -> list[Window]:
    """`windows`, or a ValueError naming a window capped twice."""
    names = [window.name for window in windows]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"window {name!r} is capped twice")
    return windows


Windows = Annotated[list[Window], AfterValidator(distinct_windows)]


class Caps(_Strict):
    """Token caps: per request and per window. `count` says which token types the caps count."""

    per_request: Annotated[int, Field(gt=0)] | None = None
    """The most tokens of the counted types one request may use: a prompt whose bound is over it
    is refused, and the completion allowance (so vLLM's `max_tokens`) is lowered to what is left."""
    windows: Windows = []
    """Caps over windows of time, each window (its `per` and `mode`) at most once. A request
    reserves in all of them at once, atomically."""
    count: list[TokenType] = ["prompt", "completion"]
    """Which token types count against the token caps. Counting `prompt` refuses content that is
    not text (images, audio, files), whose tokens capgate cannot bound."""
    notify_at: list[Annotated[float, Field(gt=0, le=1)]] = []
    """Shares of a window's cap (0 < share <= 1) at which a user hears that their committed usage
    (settled, not held) crossed it: one notification per share per window period, for each of
    the tier's windows and the user's team's."""

    @model_validator(mode="after")
    def _distinct_thresholds(self) -> "Caps":
        if len(set(self.notify_at)) != len(self.notify_at):
            raise ValueError("notify_at lists a share twice")
        if self.notify_at and not self.windows:
            raise ValueError("notify_at needs windows to notify about")
        return self


class ModelPrices(_Strict):
    """One model's prices per token type; a type left out takes the tier's default (but a model
    that sets its own `prompt` price and no `cached_prompt` has its cached tokens at that price)."""

    prompt: Price | None = None
    """The price of a prompt token, e.g. `"0.20 USD/1M"`."""
    cached_prompt: Price | None = None
    """The price of a prompt token vLLM served from its prefix cache."""
    completion: Price | None = None
    """The price of a generated token."""

    def defined(self) -> Iterator[TokenPrice]:
        """The prices that are set."""
        return (p for p in (self.prompt, self.cached_prompt, self.completion) if p is not None)


class Prices(ModelPrices):
    """Prices per token type, the default for every model, and `models`: the prices of the models
    that differ. `cached_prompt` applies to prompt tokens vLLM served from cache."""

    models: dict[str, ModelPrices] = {}
    """Prices of the models that cost more (or less) to serve, by model name; a token type a
    model leaves out takes the default above."""

    def for_model(self, model: str) -> ModelPrices:
        """The prices of `model`: its own entry over the defaults."""
        own = self.models.get(model)
        if own is None:
            return self
        return ModelPrices(
            prompt=own.prompt or self.prompt,
            cached_prompt=own.cached_prompt or (None if own.prompt else self.cached_prompt),
            completion=own.completion or self.completion,
        )

    def defined(self) -> Iterator[TokenPrice]:
        """The prices that are set, the per-model ones included."""
        yield from super().defined()
        for own in self.models.values():
            yield from own.defined()


class Plan(_Strict):
    """A flat plan price (from the cap-menu optimizer); informational for value reports."""

    price: str
    """The plan's price, an amount and a currency, e.g. `"270.00 USD"`."""
    per: Period
    """The period the price pays for."""

    @model_validator(mode="after")
    def _readable(self) -> "Plan":
        parse_amount(self.price)
        return self


class Tier(_Strict):
    """What a tier may use, how fast, and at what price."""

    priority: int = 0
    """Handed to vLLM's priority scheduler: lower is served first. Clients cannot change it."""
    max_concurrent: Annotated[int, Field(gt=0)] | None = None
    """The most requests a user of the tier has in flight at once, across all replicas."""
    models: list[str] = ["*"]
    """The models the tier may use; `*` allows every model."""
    fail_mode: FailMode = "closed"
    """What happens when Redis fails: `closed` answers 503; `open` serves within `per_request`
    and spools the usage locally, replayed exactly once when Redis returns."""
    ttft_objective_s: Annotated[float, Field(gt=0)] | None = None
    """The p99 time to first token admission keeps for this tier: the tiers below it leave it
    headroom and fill a share of capacity adapted to its measured time to first token."""
    preemptible: bool = False
    """Whether streams of this tier may be ended to free a slot for a tier with a
    `ttft_objective_s`."""
    lease_tokens: Annotated[int, Field(gt=0)] | None = None
    """Reserve streams in leases of this many tokens instead of whole. Unset (the default):
    whole-request reservations, the only mode whose caps are hard."""
    caps: Caps = Caps()
    """Token and spend caps, per request and per window."""
    prices: Prices = Prices()
    """Prices per token type (and per model), for value accounting and spend caps."""
    plan: Plan | None = None
    """A flat plan price, as the cap-menu optimizer writes it; informational."""

    def allows_model(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def counts(self, token_type: TokenType) -> bool:
        return token_type in self.caps.count


class Team(_Strict):
    """A team: windows its members share, from a tier's caps or its own `windows` (not both).
    A team window counts what each member's tier counts."""

    id: Annotated[str, Field(pattern=NAME.pattern)]
    """The team's name, referred to by users' `team`."""
    tier: str | None = None
    """A tier whose caps' windows the team shares."""
    windows: Windows | None = None
    """The team's own windows (tokens, spend or both), instead of a tier's."""

    @model_validator(mode="after")
    def _one_source(self) -> "Team":
        if self.tier is not None and self.windows is not None:
            raise ValueError("a team takes its windows from `tier` or `windows`, not both")
        return self


class User(_Strict):
    """A user: an id, a tier (or the policy's default tier), a team, and API keys as SHA-256
    hashes."""

    id: Annotated[str, Field(pattern=NAME.pattern)]
    """The user's name, as in the ledger and in `capgate usage`."""
    tier: str | None = None
    """The user's tier; unset, the policy's `default_tier`."""
    team: str | None = None
    """A team (of `teams`) whose windows the user shares."""
    keys: list[Annotated[str, Field(pattern=KEY_HASH.pattern)]] = []
    """The user's API keys as `sha256:<hex>` hashes (`capgate keys new USER --policy-file` prints
    the line to paste)."""


class Policy(_Strict):
    """The whole policy file."""

    default_tier: str | None = None
    """The tier of users that name none (accounts created without a tier included)."""
    admin_keys: list[Annotated[str, Field(pattern=KEY_HASH.pattern)]] = []
    """Hashes of the keys that may manage accounts, read any user's usage and export the ledger."""
    tiers: dict[Annotated[str, Field(pattern=NAME.pattern)], Tier]
    """The offer: tiers by name."""
    teams: list[Team] = []
    """Teams whose members share windows (most teams live in Redis, managed at run time)."""
    users: list[User] = []
    """Static users (most users live in Redis, managed at run time through the admin API)."""

    @property
    def currency(self) -> str:
        """The one currency of all prices and spend caps (USD when none is set)."""
        for currency in _currencies(self):
            return currency
        return "USD"


def _currencies(policy: Policy) -> Iterator[str]:
    for tier in policy.tiers.values():
        for price in tier.prices.defined():
            yield price.currency
        for window in tier.caps.windows:
            if window.spend is not None:
                yield window.spend.currency
    for team in policy.teams:
        for window in team.windows or []:
            if window.spend is not None:
                yield window.spend.currency


def team_windows(
    tier: str | None, windows: Sequence[Window] | None, tiers: dict[str, Tier]
) -> tuple[Window, ...]:
    """A team's windows: its own `windows`, or those of its `tier` (none when neither is set);
    a KeyError when the tier is not in `tiers`."""
    if windows is not None:
        return tuple(windows)
    return () if tier is None else tuple(tiers[tier].caps.windows)


Problem = tuple[tuple[str | int, ...], str]


def reference_problems(policy: Policy) -> list[Problem]:
    """Problems that span fields: unknown tiers, duplicate ids and key hashes, mixed currencies."""
    problems: list[Problem] = []
    if policy.default_tier is not None and policy.default_tier not in policy.tiers:
        problems.append((("default_tier",), f"unknown tier {policy.default_tier!r}"))
    seen_teams: set[str] = set()
    for i, team in enumerate(policy.teams):
        if team.id in seen_teams:
            problems.append((("teams", i, "id"), f"duplicate team id {team.id!r}"))
        seen_teams.add(team.id)
        if team.tier is not None and team.tier not in policy.tiers:
            problems.append((("teams", i, "tier"), f"unknown tier {team.tier!r}"))
    seen_users: set[str] = set()
    seen_keys: dict[str, tuple[str | int, ...]] = {
        key: ("admin_keys", i) for i, key in enumerate(policy.admin_keys)
    }
    for i, user in enumerate(policy.users):
        if user.id in seen_users:
            problems.append((("users", i, "id"), f"duplicate user id {user.id!r}"))
        seen_users.add(user.id)
        if user.tier is None and policy.default_tier is None:
            problems.append((("users", i, "tier"), "no tier and no default_tier"))
        elif user.tier is not None and user.tier not in policy.tiers:
            problems.append((("users", i, "tier"), f"unknown tier {user.tier!r}"))
        if user.team is not None and user.team not in seen_teams:
            problems.append((("users", i, "team"), f"unknown team {user.team!r}"))
        for j, key in enumerate(user.keys):
            where: tuple[str | int, ...] = ("users", i, "keys", j)
            if key in seen_keys:
                first = ".".join(map(str, seen_keys[key]))
                problems.append((where, f"duplicate key hash (also at {first})"))
            seen_keys[key] = where
    for name, tier in policy.tiers.items():
        for model in tier.prices.models:
            if not tier.allows_model(model):
                where = ("tiers", name, "prices", "models", model)
                problems.append((where, f"a price for model {model!r}, which the tier may not use"))
    currencies = sorted(set(_currencies(policy)))
    if len(currencies) > 1:
        problems.append((("tiers",), f"prices mix currencies {currencies} (spend caps included)"))
    return problems
