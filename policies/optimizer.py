"""The cap-menu optimizer: the profit-maximising menu of (token cap, price) plans (pure, no I/O).

Model. A user of type i (probability p_i) values a cap of q tokens at
v_i(q) = w_i (1 - exp(-r_i q)) / r_i: w_i per token at first, discounted at urgency r_i per token,
so patient types (small r) value long caps most. Serving q tokens costs c q. Each type takes the
plan that maximises v_i(q) - price, or none (utility 0). The optimal menu maximises the expected
profit sum_i p_i (P_i - c q_i) subject to incentive compatibility (IC: each type prefers its own
plan) and participation (IR: utility >= 0). An excluded type has q_i = P_i = 0.

Methods.

* Single-crossing types (`is_single_crossing`: from least to most patient, w never decreases, so
  the marginal values v_i'(q) = w_i exp(-r_i q) are ordered at every q) are solved exactly by
  discrete screening. IR of the lowest type and downward-adjacent IC bind, so
  P_k = P_{k-1} + v_k(q_k) - v_k(q_{k-1}), and the profit is the sum, over the pools [a, b] of
  consecutive types that share a cap, of the virtual surplus
  M_a v_a(q) - M_{b+1} v_{b+1}(q) - c (M_a - M_{b+1}) q, where M_k is the mass of types k and up.
  Its derivative changes sign once, so each pool's best cap is found by bisection (the top pool's
  in closed form: no distortion at the top). Ironing is exact: at the optimum every pool sits at
  its own best cap, so a dynamic programme over partitions into pools with nondecreasing caps
  finds the optimum.
* Other types (w and r both vary, no single crossing) are solved exactly over a grid of caps by
  branch and bound over the assignment of types to caps. For an assignment, the profit-maximising
  prices are the largest satisfying the IC/IR difference constraints P_a - P_b <= v_i(a) - v_i(b):
  the shortest-path distances from the outside option (cap 0, price 0), found by Bellman-Ford; a
  negative cycle means that no prices implement the assignment. The grid holds the efficient caps
  and the benchmarks' caps, so the menu is never worse than the benchmarks. The search is
  exponential in the number of types at worst: up to five types it typically takes well under a
  second (a few seconds for the hardest cases seen), six or more can take minutes.
* A limit K on the expected tokens per user, sum_i p_i q_i <= K: for single-crossing types,
  Lagrangian relaxation, bisecting on the shadow price added to c; the menu respects K and the
  dual bound says how far from the constrained optimum it can be (in practice, rounding). The
  grid search only keeps assignments within K.

Benchmarks, both exact: the best single plan (for a given marginal buyer and a range of caps over
which the set of buyers is fixed, the profit is concave in the cap) and the best per-token price
(the profit is concave in the price between consecutive w_i).
"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import Literal

_BISECTION_STEPS = 200
_RELATIVE_TOLERANCE = 1e-9
_SLACK = 1 + _RELATIVE_TOLERANCE


@dataclass(frozen=True, slots=True)
class UserType:
    """A kind of user: how likely it is, what its first tokens are worth and how fast that decays."""

    name: str
    probability: float
    value_per_token: float
    urgency: float

    def value(self, cap: float) -> float:
        """v(q) = w (1 - exp(-r q)) / r: what a cap of `cap` tokens is worth to this type."""
        return self.value_per_token * -math.expm1(-self.urgency * cap) / self.urgency

    def marginal_value(self, cap: float) -> float:
        """v'(q) = w exp(-r q): what one more token is worth at a cap of `cap` tokens."""
        return self.value_per_token * math.exp(-self.urgency * cap)

    def efficient_cap(self, cost_per_token: float) -> float:
        """The cap where the marginal value falls to the cost: ln(w / c) / r, or 0 if w <= c."""
        if self.value_per_token <= cost_per_token:
            return 0.0
        return math.log(self.value_per_token / cost_per_token) / self.urgency


@dataclass(frozen=True, slots=True)
class MenuProblem:
    """The types to serve, the cost per token served and an optional limit on mean tokens per user."""

    types: tuple[UserType, ...]
    cost_per_token: float
    max_mean_usage: float | None = None

    def __post_init__(self) -> None:
        if not self.types:
            raise ValueError("no user types")
        if len({t.name for t in self.types}) != len(self.types):
            raise ValueError("user type names must be distinct")
        if any(min(t.probability, t.value_per_token, t.urgency) <= 0 for t in self.types):
            raise ValueError("probabilities, values and urgencies must be > 0")
        if not math.isclose(sum(t.probability for t in self.types), 1.0, abs_tol=1e-6):
            raise ValueError("probabilities must sum to 1")
        if self.cost_per_token <= 0:
            raise ValueError("cost_per_token must be > 0")
        if self.max_mean_usage is not None and self.max_mean_usage <= 0:
            raise ValueError("max_mean_usage must be > 0")


@dataclass(frozen=True, slots=True)
class MenuItem:
    """A menu item: up to `cap` tokens per period for `price`."""

    cap: float
    price: float


@dataclass(frozen=True, slots=True)
class Assignment:
    """The plan a type takes; cap 0 and price 0 mean the type is excluded."""

    user_type: UserType
    cap: float
    price: float

    @property
    def excluded(self) -> bool:
        return self.cap == 0


@dataclass(frozen=True, slots=True)
class SinglePlan:
    """The best menu of one plan: its price is the value of its marginal buyer."""

    cap: float
    price: float
    profit: float
    buyers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PerTokenPrice:
    """The best linear price: each type buys the cap ln(w / t) / r that it prefers at price t."""

    price_per_token: float
    profit: float
    caps: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class MenuProperties:
    """The shape of a menu, types ordered from least to most patient.

    `top_undistorted`: the most patient type gets its efficient cap; `distortion_only_downward`:
    no other type gets more than its efficient cap; `pooled`: types sharing a plan.
    """

    caps_monotone: bool
    prices_monotone: bool
    top_undistorted: bool
    distortion_only_downward: bool
    pooled: tuple[tuple[str, ...], ...]
    excluded: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MenuResult:
    """The optimal menu and its benchmarks.

    `assignments` run from the least to the most patient type. `profit` is the expected revenue
    minus serving cost per user. When a usage limit binds on single-crossing types, `shadow_price`
    is the price per token added to the cost and `dual_bound` bounds the profit of any menu within
    the limit; both are None otherwise.
    """

    problem: MenuProblem
    method: Literal["screening", "grid"]
    assignments: tuple[Assignment, ...]
    profit: float
    mean_usage: float
    shadow_price: float | None
    dual_bound: float | None
    single_plan: SinglePlan
    per_token: PerTokenPrice
    properties: MenuProperties

    @property
    def marginal_cost(self) -> float:
        """The cost per token plus the shadow price of the usage limit, if it binds."""
        return self.problem.cost_per_token + (self.shadow_price or 0.0)

    @property
    def revenue(self) -> float:
        """Expected payment per user."""
        return sum(a.user_type.probability * a.price for a in self.assignments)


def patience_order(types: Sequence[UserType]) -> tuple[UserType, ...]:
    """`types` from least to most patient (urgency descending), ties by value per token ascending."""
    return tuple(sorted(types, key=lambda t: (-t.urgency, t.value_per_token)))


def is_single_crossing(types: Sequence[UserType]) -> bool:
    """Whether the marginal values are ordered at every cap: w never falls as patience grows."""
    order = patience_order(types)
    return all(low.value_per_token <= high.value_per_token for low, high in pairwise(order))


def expected_profit(assignments: Sequence[Assignment], cost_per_token: float) -> float:
    """sum_i p_i (P_i - c q_i)."""
    return sum(a.user_type.probability * (a.price - cost_per_token * a.cap) for a in assignments)


def mean_usage(assignments: Sequence[Assignment]) -> float:
    """sum_i p_i q_i: the expected cap per user."""
    return sum(a.user_type.probability * a.cap for a in assignments)


def choose_plan(user_type: UserType, menu: Sequence[MenuItem], cost_per_token: float) -> MenuItem | None:
    """The plan `user_type` takes from `menu`, None for nothing.

    Utilities within a relative 1e-9 of the best count as ties, which go to the seller's most
    profitable option (nothing counts as profit 0).
    """
    tolerance = _RELATIVE_TOLERANCE * max([1.0, *(plan.price for plan in menu)])
    best_utility = max([0.0, *(user_type.value(plan.cap) - plan.price for plan in menu)])
    options: list[tuple[float, MenuItem | None]] = [(0.0, None)] if best_utility <= tolerance else []
    options += [
        (plan.price - cost_per_token * plan.cap, plan)
        for plan in menu
        if user_type.value(plan.cap) - plan.price >= best_utility - tolerance
    ]
    return max(options, key=lambda option: option[0])[1]


def menu_profit(types: Sequence[UserType], menu: Sequence[MenuItem], cost_per_token: float) -> float:
    """Expected profit per user when every type chooses from `menu` (see `choose_plan`)."""
    profit = 0.0
    for user_type in types:
        plan = choose_plan(user_type, menu, cost_per_token)
        if plan is not None:
            profit += user_type.probability * (plan.price - cost_per_token * plan.cap)
    return profit


def incentive_violations(assignments: Sequence[Assignment]) -> list[str]:
    """IC and IR constraints that `assignments` break by more than a relative 1e-9."""
    tolerance = _RELATIVE_TOLERANCE * max([1.0, *(a.price for a in assignments)])
    violations = []
    for own in assignments:
        utility = own.user_type.value(own.cap) - own.price
        if utility < -tolerance:
            violations.append(f"IR: {own.user_type.name} pays more than its plan is worth to it")
        for other in assignments:
            if own.user_type.value(other.cap) - other.price > utility + tolerance:
                violations.append(f"IC: {own.user_type.name} prefers the plan of {other.user_type.name}")
    return violations


def _last_positive(function: Callable[[float], float], low: float, high: float) -> float:
    """Where `function`, positive at `low` and not after its one sign change, changes sign."""
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if middle <= low or middle >= high:
            break
        if function(middle) > 0:
            low = middle
        else:
            high = middle
    return low


def _pool_optimum(
    lowest: UserType, mass_from_lowest: float, next_up: UserType | None, mass_above: float, cost: float
) -> tuple[float, float]:
    """The cap maximising a pool's virtual surplus, and that surplus.

    The pool runs from `lowest` to the type below `next_up` (None for the top); the masses are
    those of the types from `lowest` up and of the types above the pool.
    """
    pool_mass = mass_from_lowest - mass_above

    def surplus(cap: float) -> float:
        above = mass_above * next_up.value(cap) if next_up else 0.0
        return mass_from_lowest * lowest.value(cap) - above - cost * pool_mass * cap

    def slope(cap: float) -> float:
        above = mass_above * next_up.marginal_value(cap) if next_up else 0.0
        return mass_from_lowest * lowest.marginal_value(cap) - above - cost * pool_mass

    if slope(0.0) <= 0:
        return 0.0, 0.0
    if next_up is None:
        cap = lowest.efficient_cap(cost)
    else:
        past_peak = math.log(mass_from_lowest * lowest.value_per_token / (cost * pool_mass)) / lowest.urgency
        cap = _last_positive(slope, 0.0, past_peak)
    return cap, surplus(cap)


def _best_pooling(pools: dict[tuple[int, int], tuple[float, float]], count: int) -> list[float]:
    """Caps per type of the best partition of 0..count-1 into pools with nondecreasing caps.

    `pools[a, b]` is the best cap and virtual surplus of the pool of types a..b.
    """
    best: dict[tuple[int, int], tuple[float, tuple[int, int] | None]] = {}
    for last in range(count):
        for first in range(last + 1):
            cap, surplus = pools[first, last]
            if first == 0:
                best[first, last] = (surplus, None)
                continue
            below = [
                (best[pool][0], pool)
                for pool in ((start, first - 1) for start in range(first))
                if pool in best and pools[pool][0] <= cap
            ]
            if below:
                total, pool = max(below)
                best[first, last] = (surplus + total, pool)
    ends = [(best[pool][0], pool) for pool in ((start, count - 1) for start in range(count)) if pool in best]
    pool: tuple[int, int] | None = max(ends)[1]
    caps = [0.0] * count
    while pool is not None:
        first, last = pool
        caps[first : last + 1] = [pools[pool][0]] * (last - first + 1)
        pool = best[pool][1]
    return caps


def screening_menu(types: Sequence[UserType], cost_per_token: float) -> tuple[Assignment, ...]:
    """The exact optimal menu for single-crossing `types`, least patient first.

    Raises ValueError if the types are not single crossing.
    """
    if not is_single_crossing(types):
        raise ValueError("screening needs single-crossing types")
    order = patience_order(types)
    count = len(order)
    mass_from = [sum(t.probability for t in order[k:]) for k in range(count)] + [0.0]
    pools = {
        (first, last): _pool_optimum(
            order[first],
            mass_from[first],
            order[last + 1] if last + 1 < count else None,
            mass_from[last + 1],
            cost_per_token,
        )
        for first in range(count)
        for last in range(first, count)
    }
    assignments = []
    price = previous_cap = 0.0
    for user_type, cap in zip(order, _best_pooling(pools, count), strict=True):
        price += user_type.value(cap) - user_type.value(previous_cap)
        previous_cap = cap
        assignments.append(Assignment(user_type, cap, price))
    return tuple(assignments)


def _greatest_prices(values: Sequence[Sequence[float]], chosen: dict[int, int]) -> dict[int, float] | None:
    """The largest prices per cap index making the assignment `chosen` (type -> cap index) IC and IR.

    `values[i][k]` is type i's value of cap index k, and index 0 is the outside option (price 0).
    None if no prices do (a negative cycle in the constraint graph).
    """
    items = sorted({0, *chosen.values()})
    price = {item: math.inf for item in items}
    price[0] = 0.0
    edges = [
        (other, item, values[i][item] - values[i][other])
        for i, item in chosen.items()
        for other in items
        if other != item
    ]
    for _ in range(len(items)):
        changed = False
        for source, target, weight in edges:
            if price[source] + weight < price[target]:
                price[target] = price[source] + weight
                changed = True
        if not changed:
            return price
    return None


def grid_menu(
    types: Sequence[UserType],
    cost_per_token: float,
    caps: Sequence[float],
    *,
    max_mean_usage: float | None = None,
) -> tuple[Assignment, ...]:
    """The exact optimal menu among those whose caps lie in `caps` (exclusion is always allowed).

    Branch and bound over assignments of types to caps, with prices from `_greatest_prices`. A
    type still unassigned can add at most its surplus at a cap minus the rent that the plans
    already assigned leave it; branches whose bound cannot beat the best menu found are cut, and
    so are those over `max_mean_usage`. Returned least patient first.
    """
    grid = sorted({0.0, *caps})
    limit = math.inf if max_mean_usage is None else max_mean_usage * _SLACK
    values = [[t.value(cap) for cap in grid] for t in types]
    surpluses = [[v - cost_per_token * cap for v, cap in zip(row, grid, strict=True)] for row in values]
    best_surplus = [max(row) for row in surpluses]
    order = sorted(range(len(types)), key=best_surplus.__getitem__)  # low types first: tighter bounds
    tries = [sorted(range(len(grid)), key=row.__getitem__, reverse=True) for row in surpluses]
    best_profit, best_prices, best_chosen = 0.0, {0: 0.0}, dict.fromkeys(range(len(types)), 0)
    chosen: dict[int, int] = {}

    def search(depth: int, usage: float) -> None:
        nonlocal best_profit, best_prices, best_chosen
        prices = _greatest_prices(values, chosen)
        if prices is None:
            return
        profit = sum(types[i].probability * (prices[k] - cost_per_token * grid[k]) for i, k in chosen.items())
        if depth == len(types):
            if profit > best_profit:
                best_profit, best_prices, best_chosen = profit, prices, dict(chosen)
            return
        rent = {j: max(values[j][k] - prices[k] for k in prices) for j in order[depth:]}
        i, later = order[depth], order[depth + 1 :]
        bound = profit + sum(types[j].probability * (best_surplus[j] - rent[j]) for j in later)
        for k in tries[i]:
            if bound + types[i].probability * (surpluses[i][k] - rent[i]) <= best_profit * _SLACK:
                break
            if usage + types[i].probability * grid[k] <= limit:
                chosen[i] = k
                search(depth + 1, usage + types[i].probability * grid[k])
        chosen.pop(i, None)

    search(0, 0.0)
    assignments = (
        Assignment(t, grid[best_chosen[i]], best_prices[best_chosen[i]]) for i, t in enumerate(types)
    )
    rank = {t.name: position for position, t in enumerate(patience_order(types))}
    return tuple(sorted(assignments, key=lambda a: rank[a.user_type.name]))


def _crossing_cap(a: UserType, b: UserType) -> float | None:
    """The cap q > 0 where v_a(q) = v_b(q), if any (there is at most one)."""
    if a.urgency == b.urgency or a.value_per_token == b.value_per_token:
        return None
    peak = math.log(a.value_per_token / b.value_per_token) / (a.urgency - b.urgency)
    start_sign = a.value_per_token > b.value_per_token
    end_sign = a.value_per_token / a.urgency > b.value_per_token / b.urgency
    if peak <= 0 or start_sign == end_sign:
        return None
    sign = 1.0 if start_sign else -1.0

    def gap(cap: float) -> float:
        return sign * (a.value(cap) - b.value(cap))

    beyond = 2.0 * peak
    while gap(beyond) > 0:
        beyond *= 2.0
    return _last_positive(gap, peak, beyond)


def best_single_plan(problem: MenuProblem) -> SinglePlan:
    """The most profitable one-plan menu within the usage limit (exact).

    For each marginal buyer m (price v_m(q)) and each range of caps between crossings of v_m with
    another type's value, the buyers are fixed and the profit is concave in q: it peaks at m's
    efficient cap clamped to the range (and to the usage limit).
    """
    cost, limit = problem.cost_per_token, problem.max_mean_usage
    best = SinglePlan(0.0, 0.0, 0.0, ())
    for marginal in problem.types:
        crossings = {_crossing_cap(marginal, other) for other in problem.types} - {None}
        cuts = sorted({0.0, *crossings})
        for low, high in zip(cuts, [*cuts[1:], math.inf], strict=True):
            probe = 0.5 * (low + high) if high < math.inf else low + 1.0 / marginal.urgency
            buyers = [t for t in problem.types if t.value(probe) >= marginal.value(probe)]
            mass = sum(t.probability for t in buyers)
            top = high if limit is None else min(high, limit / mass)
            if top < low:
                continue
            cap = min(max(marginal.efficient_cap(cost), low), top)
            price = marginal.value(cap)
            profit = mass * (price - cost * cap)
            if profit > best.profit:
                best = SinglePlan(cap, price, profit, tuple(t.name for t in buyers))
    return best


def _per_token_caps(types: Sequence[UserType], price: float) -> tuple[float, ...]:
    return tuple(t.efficient_cap(price) for t in types)


def best_per_token_price(problem: MenuProblem) -> PerTokenPrice:
    """The most profitable price per token within the usage limit (exact).

    Between consecutive values per token the buyers are fixed and the profit
    (t - c) sum p_i ln(w_i / t) / r_i is concave in t.
    """
    types, cost, limit = problem.types, problem.cost_per_token, problem.max_mean_usage

    def usage(price: float) -> float:
        return sum(t.probability * cap for t, cap in zip(types, _per_token_caps(types, price), strict=True))

    def profit(price: float) -> float:
        return (price - cost) * usage(price)

    def slope(price: float, buyers: Sequence[UserType]) -> float:
        return usage(price) - (price - cost) * sum(t.probability / t.urgency for t in buyers) / price

    highest = max(t.value_per_token for t in types)
    floor = cost
    if limit is not None and usage(cost) > limit:
        floor = math.nextafter(_last_positive(lambda price: usage(price) - limit, cost, highest), math.inf)
    best = PerTokenPrice(highest, 0.0, _per_token_caps(types, highest))
    cuts = sorted({floor, *(t.value_per_token for t in types if floor < t.value_per_token)})
    for low, high in pairwise(cuts):
        buyers = [t for t in types if t.value_per_token >= high]
        if slope(low, buyers) <= 0:
            price = low
        elif slope(high, buyers) >= 0:
            price = high
        else:
            price = _last_positive(partial(slope, buyers=buyers), low, high)
        if profit(price) > best.profit:
            best = PerTokenPrice(price, profit(price), _per_token_caps(types, price))
    return best


def menu_properties(assignments: Sequence[Assignment], cost_per_token: float) -> MenuProperties:
    """The shape of a menu whose `assignments` run from the least to the most patient type."""
    caps = [a.cap for a in assignments]
    prices = [a.price for a in assignments]
    efficient = [a.user_type.efficient_cap(cost_per_token) for a in assignments]
    by_cap: dict[float, list[str]] = {}
    for a in assignments:
        if not a.excluded:
            by_cap.setdefault(a.cap, []).append(a.user_type.name)
    return MenuProperties(
        caps_monotone=all(low <= high for low, high in pairwise(caps)),
        prices_monotone=all(low <= high for low, high in pairwise(prices)),
        top_undistorted=math.isclose(caps[-1], efficient[-1], rel_tol=_RELATIVE_TOLERANCE),
        distortion_only_downward=all(
            cap <= bound * _SLACK for cap, bound in zip(caps[:-1], efficient[:-1], strict=True)
        ),
        pooled=tuple(tuple(names) for names in by_cap.values() if len(names) > 1),
        excluded=tuple(a.user_type.name for a in assignments if a.excluded),
    )


def _search_caps(problem: MenuProblem, grid_size: int, benchmark_caps: Iterable[float]) -> list[float]:
    """The caps searched for types that are not single crossing.

    `grid_size` evenly spaced caps up to the largest ln(w_i / (p_i c)) / r_i (past it, a type's
    marginal value is below its share of the cost), every type's efficient cap and the caps of the
    benchmarks, so that the menu found is never worse than they are.
    """
    cost = problem.cost_per_token
    top = max(
        math.log(max(t.value_per_token / (t.probability * cost), 1.0)) / t.urgency for t in problem.types
    )
    evenly = [top * k / grid_size for k in range(1, grid_size + 1)]
    efficient = [t.efficient_cap(cost) for t in problem.types]
    return sorted({*evenly, *efficient, *benchmark_caps} - {0.0})


def limited_screening_menu(
    types: Sequence[UserType], cost_per_token: float, max_mean_usage: float
) -> tuple[tuple[Assignment, ...], float | None, float | None]:
    """`screening_menu` within a limit on the mean usage, by Lagrangian relaxation.

    Bisects on the smallest shadow price that, added to the cost, brings the usage within the
    limit. Returns the menu, the shadow price and the dual bound on the profit of any menu within
    the limit (both None if the limit does not bind).
    """
    assignments = screening_menu(types, cost_per_token)
    if mean_usage(assignments) <= max_mean_usage:
        return assignments, None, None
    low, high = 0.0, max(t.value_per_token for t in types)
    assignments = screening_menu(types, cost_per_token + high)
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if middle <= low or middle >= high:
            break
        candidate = screening_menu(types, cost_per_token + middle)
        if mean_usage(candidate) <= max_mean_usage:
            high, assignments = middle, candidate
        else:
            low = middle
    dual_bound = expected_profit(assignments, cost_per_token + high) + high * max_mean_usage
    return assignments, high, dual_bound


def solve_menu(problem: MenuProblem, *, grid_size: int = 64) -> MenuResult:
    """The profit-maximising menu for `problem`, with its benchmarks and properties.

    Exact for single-crossing types; otherwise exact over `grid_size` evenly spaced caps (see
    `_search_caps`) plus the efficient and benchmark caps.
    Raises RuntimeError if the menu found breaks IC or IR (a bug, never expected).
    """
    types, cost = problem.types, problem.cost_per_token
    single_plan, per_token = best_single_plan(problem), best_per_token_price(problem)
    shadow_price = dual_bound = None
    if not is_single_crossing(types):
        method: Literal["screening", "grid"] = "grid"
        caps = _search_caps(problem, grid_size, [single_plan.cap, *per_token.caps])
        assignments = grid_menu(types, cost, caps, max_mean_usage=problem.max_mean_usage)
    elif problem.max_mean_usage is None:
        method = "screening"
        assignments = screening_menu(types, cost)
    else:
        method = "screening"
        assignments, shadow_price, dual_bound = limited_screening_menu(types, cost, problem.max_mean_usage)
    violations = incentive_violations(assignments)
    if violations:
        raise RuntimeError(f"the {method} menu breaks incentive constraints: {violations}")
    return MenuResult(
        problem=problem,
        method=method,
        assignments=assignments,
        profit=expected_profit(assignments, cost),
        mean_usage=mean_usage(assignments),
        shadow_price=shadow_price,
        dual_bound=dual_bound,
        single_plan=single_plan,
        per_token=per_token,
        properties=menu_properties(assignments, cost + (shadow_price or 0.0)),
    )
