"""The cap-menu optimizer against brute force, its menu properties, the TYPES file and the report."""

import dataclasses
import itertools
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from policies.loader import ConfigError
from policies.menu_report import format_menu_report, menu_to_policy_tiers
from policies.optimizer import (
    Assignment,
    MenuItem,
    MenuProblem,
    MenuResult,
    UserType,
    best_per_token_price,
    best_single_plan,
    expected_profit,
    grid_menu,
    incentive_violations,
    is_single_crossing,
    mean_usage,
    menu_profit,
    screening_menu,
    solve_menu,
)
from policies.schema import Policy
from policies.types_file import parse_types_file

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "policies" / "types.example.yaml"

MILLION = 1e6
# Ironing binds: alone, the middle type's best cap would be below the least patient type's.
IRONED = MenuProblem(
    types=(
        UserType("a", 0.2, 2.0 / MILLION, 3.0 / MILLION),
        UserType("b", 0.3, 2.0 / MILLION, 2.5 / MILLION),
        UserType("c", 0.5, 2.0 / MILLION, 0.5 / MILLION),
    ),
    cost_per_token=0.5 / MILLION,
)
# Serving the least patient type would cost more in rent left to the other than it brings.
EXCLUDING = MenuProblem(
    types=(
        UserType("low", 0.2, 1.0 / MILLION, 2.0 / MILLION),
        UserType("high", 0.8, 3.0 / MILLION, 0.5 / MILLION),
    ),
    cost_per_token=0.5 / MILLION,
)


# --- brute force, independent of the optimizer's methods -------------------------------------


def greatest_prices(types: Sequence[UserType], caps: Sequence[float]) -> dict[float, float] | None:
    """The largest price per cap such that every type prefers its cap to every other and to nothing.

    Difference constraints P_a - P_b <= v_i(a) - v_i(b) solved by Floyd-Warshall from the outside
    option (cap 0, price 0); None if a negative cycle makes the allocation impossible.
    """
    items = sorted({0.0, *caps})
    size = len(items)
    distance = [[0.0 if i == j else math.inf for j in range(size)] for i in range(size)]
    for user_type, cap in zip(types, caps, strict=True):
        target = items.index(cap)
        values = [user_type.value(item) for item in items]
        for source in range(size):
            distance[source][target] = min(distance[source][target], values[target] - values[source])
    for k in range(size):
        for row in distance:
            for j, onward in enumerate(distance[k]):
                if row[k] + onward < row[j]:
                    row[j] = row[k] + onward
    if any(distance[i][i] < 0 for i in range(size)):
        return None
    return {cap: distance[0][index] for index, cap in enumerate(items)}


def allocation_profit(problem: MenuProblem, caps: Sequence[float]) -> float:
    """The expected profit of the types taking `caps` at `greatest_prices`; -inf if impossible."""
    prices = greatest_prices(problem.types, caps)
    usage = sum(t.probability * cap for t, cap in zip(problem.types, caps, strict=True))
    if prices is None or (problem.max_mean_usage is not None and usage > problem.max_mean_usage):
        return -math.inf
    cost = problem.cost_per_token
    return sum(t.probability * (prices[cap] - cost * cap) for t, cap in zip(problem.types, caps, strict=True))


def brute_force(problem: MenuProblem, steps: int = 6) -> tuple[float, tuple[float, ...]]:
    """The best allocation (profit, caps) on a grid of caps for every type, refined by pattern search.

    The two best grid allocations are refined by moves along the directions in {-1, 0, 1}^n in
    turn, halving the step after a round without gain, until it is below 1e-6 of the largest cap.
    """
    top = max(t.efficient_cap(problem.cost_per_token) for t in problem.types)
    grid = [top * k / steps for k in range(steps + 1)]
    count = len(problem.types)
    starts = sorted(itertools.product(grid, repeat=count), key=lambda caps: -allocation_profit(problem, caps))
    directions = [d for d in itertools.product((-1, 0, 1), repeat=count) if any(d)]
    best: tuple[float, tuple[float, ...]] = (-math.inf, starts[0])
    for caps in starts[:2]:
        profit, step, failures = allocation_profit(problem, caps), top / steps, 0
        for direction in itertools.cycle(directions):
            moved = tuple(max(0.0, cap + step * d) for cap, d in zip(caps, direction, strict=True))
            if (moved_profit := allocation_profit(problem, moved)) > profit:
                profit, caps, failures = moved_profit, moved, 0
            elif (failures := failures + 1) == len(directions):
                step, failures = step / 2, 0
                if step < 1e-6 * top:
                    break
        best = max(best, (profit, caps))
    return best


def brute_force_menu(problem: MenuProblem) -> list[MenuItem]:
    """The plans of the `brute_force` allocation, priced by `greatest_prices`."""
    caps = brute_force(problem)[1]
    prices = greatest_prices(problem.types, caps)
    assert prices is not None
    return [MenuItem(cap, prices[cap]) for cap in set(caps) - {0.0}]


def plans(assignments: Sequence[Assignment]) -> list[MenuItem]:
    return [MenuItem(a.cap, a.price) for a in assignments if not a.excluded]


def single_crossing_problem(rng: random.Random, count: int, limit_share: float | None = None) -> MenuProblem:
    shares = [rng.uniform(0.05, 1.0) for _ in range(count)]
    urgencies = sorted((rng.uniform(0.2, 3.0) for _ in range(count)), reverse=True)
    values = [2.0] * count if rng.random() < 0.5 else sorted(rng.uniform(1.0, 4.0) for _ in range(count))
    types = tuple(
        UserType(f"t{i}", share / sum(shares), value, urgency)
        for i, (share, value, urgency) in enumerate(zip(shares, values, urgencies, strict=True))
    )
    problem = MenuProblem(types, cost_per_token=rng.uniform(0.05, 0.9) * min(values))
    if limit_share is None:
        return problem
    free_usage = mean_usage(screening_menu(problem.types, problem.cost_per_token))
    return dataclasses.replace(problem, max_mean_usage=limit_share * free_usage)


def crossing_problem(rng: random.Random, count: int) -> MenuProblem:
    """Types whose values and urgencies both vary, so that they are not single crossing."""
    while True:
        shares = [rng.uniform(0.05, 1.0) for _ in range(count)]
        types = tuple(
            UserType(f"t{i}", share / sum(shares), rng.uniform(1.0, 4.0), rng.uniform(0.2, 3.0))
            for i, share in enumerate(shares)
        )
        if not is_single_crossing(types):
            return MenuProblem(
                types, cost_per_token=rng.uniform(0.05, 0.9) * min(t.value_per_token for t in types)
            )


def assert_at_least(value: float, floor: float, relative: float = 1e-9) -> None:
    assert value >= floor - relative * max(abs(floor), 1e-12), (value, floor)


# --- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(200))
def test_screening_agrees_with_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    problem = single_crossing_problem(rng, count=rng.choice((2, 3)))
    cost = problem.cost_per_token
    assignments = screening_menu(problem.types, cost)
    solver = menu_profit(problem.types, plans(assignments), cost)
    brute = menu_profit(problem.types, brute_force_menu(problem), cost)
    assert solver == pytest.approx(expected_profit(assignments, cost), rel=1e-12)
    assert_at_least(solver, brute)  # nothing beats the exact solution...
    assert_at_least(brute, solver, relative=1e-6)  # ...and a fine enough search gets as far


@pytest.mark.parametrize("seed", range(40))
def test_capacity_menu_agrees_with_brute_force(seed: int) -> None:
    rng = random.Random(1000 + seed)
    problem = single_crossing_problem(rng, count=rng.choice((2, 3)), limit_share=rng.uniform(0.2, 0.9))
    assert problem.max_mean_usage is not None
    result = solve_menu(problem)
    assert problem.max_mean_usage * (1 - 1e-9) <= result.mean_usage <= problem.max_mean_usage
    assert_at_least(result.profit, brute_force(problem)[0])
    assert result.dual_bound is not None
    assert_at_least(result.dual_bound, result.profit)
    assert_at_least(result.profit, result.dual_bound)  # no menu within the limit does better


@pytest.mark.parametrize("seed", range(30))
def test_grid_search_agrees_with_enumerating_every_allocation(seed: int) -> None:
    rng = random.Random(2000 + seed)
    problem = crossing_problem(rng, count=rng.choice((2, 3)))
    top = 1.5 * max(t.efficient_cap(problem.cost_per_token) for t in problem.types)
    caps = [top * k / 7 for k in range(1, 8)]
    if seed % 2:
        free_usage = mean_usage(grid_menu(problem.types, problem.cost_per_token, caps))
        problem = dataclasses.replace(problem, max_mean_usage=rng.uniform(0.2, 0.9) * free_usage)
    found = grid_menu(problem.types, problem.cost_per_token, caps, max_mean_usage=problem.max_mean_usage)
    allocations = itertools.product([0.0, *caps], repeat=len(problem.types))
    enumerated = max(allocation_profit(problem, allocation) for allocation in allocations)
    assert expected_profit(found, problem.cost_per_token) == pytest.approx(enumerated, rel=1e-9)
    assert incentive_violations(found) == []


@pytest.mark.parametrize("seed", range(30))
def test_grid_search_finds_the_screening_menu_among_its_caps(seed: int) -> None:
    rng = random.Random(3000 + seed)
    problem = single_crossing_problem(rng, count=rng.choice((2, 3, 4)))
    cost = problem.cost_per_token
    screened = screening_menu(problem.types, cost)
    caps = [a.cap for a in screened] + [rng.uniform(0.0, 2.0) * a.cap for a in screened]
    searched = grid_menu(problem.types, cost, caps)
    assert expected_profit(searched, cost) == pytest.approx(expected_profit(screened, cost), rel=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_benchmarks_agree_with_fine_searches(seed: int) -> None:
    rng = random.Random(4000 + seed)
    problem = single_crossing_problem(rng, 3) if seed % 2 else crossing_problem(rng, 3)
    if seed % 3 == 0:
        problem = dataclasses.replace(
            problem,
            max_mean_usage=rng.uniform(0.1, 0.5) * problem.types[0].efficient_cap(problem.cost_per_token),
        )
    types, cost, limit = problem.types, problem.cost_per_token, problem.max_mean_usage or math.inf
    top = 2 * max(t.efficient_cap(cost) for t in types)
    caps = [top * k / 2000 for k in range(1, 2001)]
    caps += [
        limit / sum(t.probability for t in group)
        for size in (1, 2, 3)
        for group in itertools.combinations(types, size)
    ]
    searched_plan = max(
        mass * (price - cost * cap)
        for cap in caps
        for price in (t.value(cap) for t in types)
        if (mass := sum(t.probability for t in types if t.value(cap) >= price)) * cap <= limit
    )
    single = best_single_plan(problem)
    assert_at_least(single.profit, searched_plan)
    assert_at_least(searched_plan, single.profit, relative=1e-4)
    assert single.cap * sum(t.probability for t in types if t.name in single.buyers) <= limit * (1 + 1e-12)

    def usage(price: float) -> float:
        return sum(t.probability * t.efficient_cap(price) for t in types)

    low, high = cost, max(t.value_per_token for t in types)
    prices = [low + (high - low) * k / 4000 for k in range(4001)]
    for _ in range(100):  # and the lowest price within the limit
        middle = (low + high) / 2
        low, high = (middle, high) if usage(middle) > limit else (low, middle)
    searched_price = max((price - cost) * usage(price) for price in [*prices, high] if usage(price) <= limit)
    per_token = best_per_token_price(problem)
    assert_at_least(per_token.profit, searched_price)
    assert_at_least(searched_price, per_token.profit, relative=1e-4)
    assert usage(per_token.price_per_token) <= limit


# --- properties of the optimal menu ----------------------------------------------------------


def assert_implementable(result: MenuResult) -> None:
    """IC and IR hold, and types choosing from the menu take the plans they are assigned."""
    problem = result.problem
    assert incentive_violations(result.assignments) == []
    chosen = menu_profit(problem.types, plans(result.assignments), problem.cost_per_token)
    assert_at_least(chosen, result.profit)  # ties go the seller's way...
    if problem.max_mean_usage is None:  # ...which, but for a usage limit, the optimum already does
        assert chosen == pytest.approx(result.profit, rel=1e-9, abs=1e-12)
    assert_at_least(result.profit, result.single_plan.profit)
    assert_at_least(result.profit, result.per_token.profit)


@pytest.mark.parametrize("seed", range(100))
def test_screening_menu_shape(seed: int) -> None:
    rng = random.Random(5000 + seed)
    result = solve_menu(single_crossing_problem(rng, count=rng.randint(2, 6)))
    assert result.method == "screening"
    assert_implementable(result)
    caps = [a.cap for a in result.assignments]
    prices = [a.price for a in result.assignments]
    efficient = [a.user_type.efficient_cap(result.problem.cost_per_token) for a in result.assignments]
    urgencies = [a.user_type.urgency for a in result.assignments]
    assert urgencies == sorted(urgencies, reverse=True)  # least patient first
    assert caps == sorted(caps)
    assert prices == sorted(prices)
    assert caps[-1] == pytest.approx(efficient[-1], rel=1e-12)  # no distortion at the top
    assert all(cap < bound for cap, bound in zip(caps[:-1], efficient[:-1], strict=True) if bound > 0)
    properties = result.properties
    assert properties.caps_monotone and properties.prices_monotone
    assert properties.top_undistorted and properties.distortion_only_downward


def test_ironing_pools_types_whose_own_best_caps_would_decrease() -> None:
    cost = IRONED.cost_per_token
    a, b, c = IRONED.types

    def own_best_cap(user_type: UserType, mass_above: float, next_up: UserType) -> float:
        """The cap maximising p (v(q) - c q) - (mass above) (v_next(q) - v(q)), on a fine grid."""
        caps = [10.0 * k for k in range(1, 100_000)]
        return max(
            caps,
            key=lambda q: (
                user_type.probability * (user_type.value(q) - cost * q)
                - mass_above * (next_up.value(q) - user_type.value(q))
            ),
        )

    assert own_best_cap(a, b.probability + c.probability, b) > own_best_cap(b, c.probability, c)
    result = solve_menu(IRONED)
    pooled_a, pooled_b, top = result.assignments
    assert (pooled_a.cap, pooled_a.price) == (pooled_b.cap, pooled_b.price)
    assert 0 < pooled_a.cap < top.cap
    assert result.properties.pooled == (("a", "b"),)
    assert_implementable(result)
    brute = menu_profit(IRONED.types, brute_force_menu(IRONED), cost)
    assert result.profit == pytest.approx(brute, rel=1e-9)


def test_excluded_type_gets_nothing_and_pays_nothing() -> None:
    result = solve_menu(EXCLUDING)
    low, high = result.assignments
    assert (low.cap, low.price) == (0.0, 0.0)
    assert high.cap == pytest.approx(high.user_type.efficient_cap(EXCLUDING.cost_per_token), rel=1e-12)
    assert high.price == pytest.approx(high.user_type.value(high.cap), rel=1e-12)  # no rent left
    assert result.properties.excluded == ("low",)
    assert_implementable(result)


@pytest.mark.parametrize("seed", range(12))
def test_menu_for_crossing_types_is_implementable(seed: int) -> None:
    rng = random.Random(6000 + seed)
    problem = crossing_problem(rng, count=3)
    if seed % 2:
        problem = dataclasses.replace(problem, max_mean_usage=0.5 * solve_menu(problem).mean_usage)
    result = solve_menu(problem, grid_size=32)
    assert result.method == "grid"
    assert_implementable(result)
    assert result.mean_usage <= (problem.max_mean_usage or math.inf)


def test_usage_limit_binds_and_lowers_caps() -> None:
    free = solve_menu(parse_types_file(EXAMPLE.read_text()).to_problem())
    limited = solve_menu(dataclasses.replace(free.problem, max_mean_usage=0.5 * free.mean_usage))
    assert limited.mean_usage == pytest.approx(0.5 * free.mean_usage, rel=1e-9)
    assert limited.mean_usage <= 0.5 * free.mean_usage
    assert limited.shadow_price is not None and limited.shadow_price > 0
    assert all(a.cap < b.cap for a, b in zip(limited.assignments, free.assignments, strict=True))
    assert limited.profit < free.profit
    assert limited.properties.top_undistorted  # at the cost plus the shadow price
    assert_implementable(limited)
    assert free.shadow_price is None and free.dual_bound is None


def test_problem_rejects_inconsistent_types() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        MenuProblem((UserType("a", 0.5, 1.0, 1.0),), cost_per_token=0.1)
    with pytest.raises(ValueError, match="distinct"):
        MenuProblem((UserType("a", 0.5, 1.0, 1.0), UserType("a", 0.5, 2.0, 1.0)), cost_per_token=0.1)
    with pytest.raises(ValueError, match="single-crossing"):
        screening_menu(crossing_problem(random.Random(0), 3).types, 0.1)


# --- the TYPES file --------------------------------------------------------------------------


def test_example_types_file_parses_into_per_token_problem() -> None:
    types_file = parse_types_file(EXAMPLE.read_text())
    problem = types_file.to_problem()
    assert (types_file.currency, types_file.period) == ("USD", "month")
    assert len(problem.types) == len(types_file.types) >= 3
    first, spec = problem.types[0], types_file.types[0]
    assert first.value_per_token == pytest.approx(spec.value_per_million / 1e6)
    assert first.urgency == pytest.approx(spec.urgency / 1e6)
    assert problem.cost_per_token == pytest.approx(types_file.cost_per_million / 1e6)
    assert problem.max_mean_usage is None
    assert is_single_crossing(problem.types)


TYPES_TEXT = """\
cost_per_million: 0.3
types:
  - name: casual
    probability: 0.5
    value_per_million: 2.0
    urgency: 0.8
  - name: developer
    probability: 0.3
    value_per_million: 2.5
    urgency: 0.1
  - name: agent
    probability: 0.2
    value_per_million: 3.0
    urgency: 0.01
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("urgency: 0.01", "urgency: 0", "<types>:14: types[2].urgency: must be > 0"),
        ("urgency: 0.01", "urgency: -1", "<types>:14: types[2].urgency: must be > 0"),
        ("    urgency: 0.1\n", "", "<types>:7: types[1].urgency: required field is missing"),
        ("urgency: 0.8", "urgncy: 0.8", "<types>:6: types[0].urgncy: unknown field"),
        ("probability: 0.5", "probability: 1.5", "<types>:4: types[0].probability: must be <= 1"),
        ("probability: 0.5", "probability: yes", "<types>:4: types[0].probability: must be a number"),
        ("probability: 0.5", "probability: 0.6", "<types>:2: types: probabilities sum to 1.1, must sum to 1"),
        ("name: agent", "name: casual", "<types>:11: types[2].name: duplicate name 'casual'"),
        ("cost_per_million: 0.3", "cost_per_million: cheap", "<types>:1: cost_per_million: Input should be"),
        ("cost_per_million: 0.3", "cost_per_million: .inf", "<types>:1: cost_per_million: must be a finite"),
        ("types:", "period: year\ntypes:", "<types>:2: period: Input should be"),
        ("  - name: casual", "  - name: casual\n   bad indent", "invalid YAML"),
    ],
)
def test_types_file_errors_name_the_yaml_path(old: str, new: str, expected: str) -> None:
    assert old in TYPES_TEXT
    with pytest.raises(ConfigError) as error:
        parse_types_file(TYPES_TEXT.replace(old, new, 1))
    assert expected in str(error.value)


def test_types_file_needs_at_least_one_type() -> None:
    with pytest.raises(ConfigError, match="types: "):
        parse_types_file("cost_per_million: 0.3\ntypes: []\n")


# --- the report and the policy tiers ---------------------------------------------------------


def test_policy_tiers_are_valid_policy_tiers_in_plan_order() -> None:
    result = solve_menu(parse_types_file(EXAMPLE.read_text()).to_problem())
    tiers = menu_to_policy_tiers(result, period="month", currency="USD", base_priority=5)["tiers"]
    assert list(tiers) == [f"plan-{k}" for k in range(1, len(result.assignments) + 1)]
    policy = Policy.model_validate({"tiers": tiers})
    for assignment, (name, tier) in zip(result.assignments, tiers.items(), strict=True):
        assert tier["priority"] == 5
        assert tier["caps"]["windows"] == [{"per": "month", "tokens": math.floor(assignment.cap)}]
        assert re.fullmatch(r"\d+\.\d{3} USD/1M", tier["prices"]["completion"])
        assert re.fullmatch(r"\d+\.\d{2} USD", tier["plan"]["price"])
        assert tier["plan"]["per"] == "month"
        assert float(tier["plan"]["price"].split()[0]) == pytest.approx(assignment.price, abs=0.005)
        per_million = assignment.price / math.floor(assignment.cap) * 1e6
        assert float(tier["prices"]["completion"].split()[0]) == pytest.approx(per_million, abs=0.0005)
        assert policy.tiers[name].plan is not None


def test_policy_tiers_round_exactly_and_share_pooled_plans() -> None:
    result = solve_menu(IRONED)
    a, b, c = IRONED.types
    fixed = dataclasses.replace(
        result,
        assignments=(
            Assignment(a, 1_000_000.9, 0.125),
            Assignment(b, 1_000_000.9, 0.125),
            Assignment(c, 4e6, 12.5),
        ),
    )
    assert menu_to_policy_tiers(fixed, period="day", currency="EUR", base_priority=0) == {
        "tiers": {
            "plan-1": {
                "priority": 0,
                "caps": {"windows": [{"per": "day", "tokens": 1_000_000}]},
                "prices": {"completion": "0.125 EUR/1M"},
                "plan": {"price": "0.13 EUR", "per": "day"},
            },
            "plan-2": {
                "priority": 0,
                "caps": {"windows": [{"per": "day", "tokens": 4_000_000}]},
                "prices": {"completion": "3.125 EUR/1M"},
                "plan": {"price": "12.50 EUR", "per": "day"},
            },
        }
    }


def test_excluded_types_get_no_tier() -> None:
    policy = menu_to_policy_tiers(solve_menu(EXCLUDING), period="month", currency="USD", base_priority=1)
    assert list(policy["tiers"]) == ["plan-1"]


@pytest.mark.parametrize(("period", "currency"), [("year", "USD"), ("month", "usd"), ("month", "")])
def test_policy_tiers_reject_unknown_period_or_currency(period: str, currency: str) -> None:
    with pytest.raises(ValueError):
        menu_to_policy_tiers(solve_menu(IRONED), period=period, currency=currency, base_priority=0)


def test_report_lists_plans_benchmarks_and_shape() -> None:
    result = solve_menu(dataclasses.replace(IRONED, max_mean_usage=1e6))
    report = format_menu_report(result)
    assert "Cap menu (exact screening of single-crossing types)" in report
    for assignment in result.assignments:
        assert re.search(
            rf"^{assignment.user_type.name} .* {assignment.price:.2f}  plan-\d$", report, re.MULTILINE
        )
    assert re.search(rf"optimal menu +{result.profit:.4f}", report)
    assert re.search(rf"best single plan +{result.single_plan.profit:.4f}", report)
    assert re.search(rf"best per-token price +{result.per_token.profit:.4f}", report)
    assert "Pooled: a + b" in report
    assert "Excluded: none" in report
    assert "Usage limit 1,000,000 tokens per user, used 1,000,000; shadow price" in report
