"""An optimized cap menu as a table for people and as tiers for the policy file (pure)."""

import math
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import get_args

from policies.optimizer import MenuResult
from policies.schema import Period

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_CENT = Decimal("0.01")
_MILLI = Decimal("0.001")


@dataclass(frozen=True, slots=True)
class MenuTier:
    """A plan of the menu as a tier: whole tokens per period for `price`, taken by `type_names`."""

    name: str
    cap_tokens: int
    price: float
    type_names: tuple[str, ...]


def menu_tiers(result: MenuResult) -> list[MenuTier]:
    """The plans that some type takes, cheapest first, named `plan-1` to `plan-n`.

    Pooled types share a tier; excluded types, and plans whose cap is under one token, get none.
    """
    plans: dict[tuple[float, float], list[str]] = {}
    for assignment in result.assignments:
        if assignment.cap >= 1:
            plans.setdefault((assignment.cap, assignment.price), []).append(assignment.user_type.name)
    return [
        MenuTier(f"plan-{index}", math.floor(cap), price, tuple(names))
        for index, ((cap, price), names) in enumerate(sorted(plans.items()), start=1)
    ]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(names) if names else "none"


def format_menu_report(result: MenuResult) -> str:
    """A plain-text report: each type's plan, the profit against the benchmarks, the menu's shape."""
    problem = result.problem
    tier_of = {name: tier.name for tier in menu_tiers(result) for name in tier.type_names}
    method = {
        "screening": "exact screening of single-crossing types",
        "grid": "exact search over a grid of caps (types are not single crossing)",
    }[result.method]
    lines = [
        f"Cap menu ({method}), least patient type first",
        f"{'type':<16}{'share':>7}{'cap (tokens)':>16}{'efficient cap':>16}{'price':>12}  tier",
    ]
    for a in result.assignments:
        name = a.user_type.name
        efficient_cap = math.floor(a.user_type.efficient_cap(result.marginal_cost))
        lines.append(
            f"{name:<16}{a.user_type.probability:>7.1%}{math.floor(a.cap):>16,}"
            f"{efficient_cap:>16,}{a.price:>12.2f}  {tier_of.get(name, '-')}"
        )
    single, per_token = result.single_plan, result.per_token
    lines += [
        "",
        "Profit per user and period (revenue - serving cost):",
        f"  optimal menu          {result.profit:>12.4f}  (revenue {result.revenue:.4f})",
        f"  best single plan      {single.profit:>12.4f}  ({math.floor(single.cap):,} tokens "
        f"for {single.price:.2f}, taken by {_names(single.buyers)})",
        f"  best per-token price  {per_token.profit:>12.4f}  "
        f"({per_token.price_per_token * 1e6:.3f} per 1M tokens)",
        "",
        f"Caps rise with patience: {_yes(result.properties.caps_monotone)}; "
        f"prices rise with patience: {_yes(result.properties.prices_monotone)}",
        f"Most patient type gets its efficient cap: {_yes(result.properties.top_undistorted)}; "
        f"other caps distorted only downward: {_yes(result.properties.distortion_only_downward)}",
        "Pooled: " + ("; ".join(" + ".join(pool) for pool in result.properties.pooled) or "none"),
        f"Excluded: {_names(result.properties.excluded)}",
    ]
    if problem.max_mean_usage is not None:
        limit = f"Usage limit {problem.max_mean_usage:,.0f} tokens per user, used {result.mean_usage:,.0f}"
        if result.shadow_price is not None and result.dual_bound is not None:
            limit += (
                f"; shadow price {result.shadow_price * 1e6:.3f} per 1M tokens (in the efficient caps), "
                f"no menu within the limit earns over {result.dual_bound:.4f}"
            )
        lines.append(limit)
    return "\n".join(lines)


def menu_to_policy_tiers(result: MenuResult, *, period: str, currency: str, base_priority: int) -> dict:
    """`{"tiers": {...}}` for the policy file: one tier per plan of `menu_tiers(result)`.

    Each tier caps `period` at the plan's whole tokens, prices completions at the plan's average
    price per token (per 1M, 3 decimals) and records the plan price (2 decimals). Raises
    ValueError for an unknown period or a currency that is not three capital letters.
    """
    if period not in get_args(Period):
        raise ValueError(f"unknown period {period!r}; expected one of {', '.join(get_args(Period))}")
    if not _CURRENCY.match(currency):
        raise ValueError(f"currency {currency!r} is not a three-letter code such as USD")
    tiers = {}
    for tier in menu_tiers(result):
        price = Decimal(tier.price)
        per_million = (price * 1_000_000 / tier.cap_tokens).quantize(_MILLI, rounding=ROUND_HALF_UP)
        tiers[tier.name] = {
            "priority": base_priority,
            "caps": {"windows": [{"per": period, "tokens": tier.cap_tokens}]},
            "prices": {"completion": f"{per_million} {currency}/1M"},
            "plan": {"price": f"{price.quantize(_CENT, rounding=ROUND_HALF_UP)} {currency}", "per": period},
        }
    return {"tiers": tiers}
