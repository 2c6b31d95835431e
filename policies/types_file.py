"""The TYPES file: the user types the cap-menu optimizer serves, as a typed model.

Amounts are per `period` of the plans, token amounts in millions: `cost_per_million` and each
type's `value_per_million` are in `currency` per 1M tokens, `urgency` is per 1M tokens and
`max_mean_usage_million` is in millions of tokens. `parse_types_file(text)` raises
`ConfigError` naming the YAML path and line of every problem, e.g. `types[2].urgency: must be > 0`.
"""

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from policies.loader import ConfigError, Path, Problem, dotted, parse_yaml, validate
from policies.optimizer import MenuProblem, UserType
from policies.schema import NAME, Period

TOKENS_PER_MILLION = 1_000_000


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    return value


def _positive(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _at_most_one(value: float) -> float:
    if value > 1:
        raise ValueError("must be <= 1")
    return value


Positive = Annotated[float, BeforeValidator(_not_bool), AfterValidator(_positive)]
Probability = Annotated[Positive, AfterValidator(_at_most_one)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserTypeSpec(_Strict):
    """One user type: its share of users, the value of its first 1M tokens and its urgency."""

    name: Annotated[str, Field(pattern=NAME.pattern)]
    probability: Probability
    value_per_million: Positive
    urgency: Positive


class TypesFile(_Strict):
    """The whole TYPES file."""

    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    period: Period = "month"
    cost_per_million: Positive
    max_mean_usage_million: Positive | None = None
    types: Annotated[list[UserTypeSpec], Field(min_length=1)]

    def to_problem(self) -> MenuProblem:
        """The optimizer's problem, in tokens and currency per token."""
        limit = self.max_mean_usage_million
        return MenuProblem(
            types=tuple(
                UserType(
                    name=spec.name,
                    probability=spec.probability,
                    value_per_token=spec.value_per_million / TOKENS_PER_MILLION,
                    urgency=spec.urgency / TOKENS_PER_MILLION,
                )
                for spec in self.types
            ),
            cost_per_token=self.cost_per_million / TOKENS_PER_MILLION,
            max_mean_usage=None if limit is None else limit * TOKENS_PER_MILLION,
        )


def types_problems(types_file: TypesFile) -> list[tuple[Path, str]]:
    """Problems that span fields: duplicate names, probabilities that do not sum to 1."""
    problems: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for index, spec in enumerate(types_file.types):
        if spec.name in seen:
            problems.append((("types", index, "name"), f"duplicate name {spec.name!r}"))
        seen.add(spec.name)
    total = sum(spec.probability for spec in types_file.types)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        problems.append((("types",), f"probabilities sum to {total:g}, must sum to 1"))
    return problems


def parse_types_file(text: str, source: str = "<types>") -> TypesFile:
    """Parse and validate a TYPES file's text; raise `ConfigError` naming paths and lines."""
    data, lines = parse_yaml(text, source)
    types_file = validate(data, TypesFile, source, lines)
    problems = [
        Problem(dotted(path), lines.get(path), message) for path, message in types_problems(types_file)
    ]
    if problems:
        raise ConfigError(source, problems)
    return types_file
