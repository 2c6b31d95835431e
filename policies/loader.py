"""Read YAML into typed configuration, with every problem named by its YAML path and line.

`load_model(text, Model)` returns the validated model or raises `ConfigError`, whose `problems`
each carry a dotted path (`tiers.free.caps.windows[0].tokens`), the 1-based line of that path in
the file (or of its nearest parent present in the file) and a message.
"""

from dataclasses import dataclass
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from policies.schema import Policy, reference_problems

Path = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Problem:
    """One problem in a configuration file."""

    path: str
    line: int | None
    message: str

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.path or '<top>'}: {self.message}"


class ConfigError(ValueError):
    """A configuration file that cannot be used; `problems` says where and why."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(problem.render(source) for problem in problems))


def dotted(path: Path) -> str:
    """`("tiers", "free", "caps", "windows", 0)` as `tiers.free.caps.windows[0]`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _line_map(node: yaml.Node, path: Path, lines: dict[Path, int], dupes: list[Problem]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[object] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                dupes.append(Problem(dotted((*path, key)), key_node.start_mark.line + 1, "duplicate key"))
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _line_map(value_node, (*path, key), lines, dupes)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _line_map(item, (*path, index), lines, dupes)


def _line_of(path: Path, lines: dict[Path, int]) -> int | None:
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


def _message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    message: str = error["msg"]
    return message.removeprefix("Value error, ")


def parse_yaml(text: str, source: str) -> tuple[object, dict[Path, int]]:
    """YAML `text` as plain data, with the line of every path; duplicate keys are problems."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(source, [Problem("", line, f"invalid YAML: {exc}")]) from exc
    lines: dict[Path, int] = {}
    dupes: list[Problem] = []
    if root is not None:
        _line_map(root, (), lines, dupes)
    if dupes:
        raise ConfigError(source, dupes)
    return data, lines


def validate(data: object, model: type[M], source: str, lines: dict[Path, int]) -> M:
    """Validate plain `data` as `model`; raise `ConfigError` naming paths and `lines`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", _line_of((), lines), "expected a mapping at the top")])
    problems: list[Problem] = []
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            path = tuple(part for part in error["loc"] if part != "[key]")
            problems.append(Problem(dotted(path), _line_of(path, lines), _message(error)))
        raise ConfigError(source, problems) from exc
    if isinstance(value, Policy):
        for path, message in reference_problems(value):
            problems.append(Problem(dotted(path), _line_of(path, lines), message))
    if problems:
        raise ConfigError(source, problems)
    return value


def load_model(text: str, model: type[M], source: str = "<config>") -> M:
    """Parse YAML `text` and validate it as `model`; raise `ConfigError` naming paths and lines."""
    data, lines = parse_yaml(text, source)
    return validate(data, model, source, lines)


def load_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate a policy file's text."""
    return load_model(text, Policy, source)
