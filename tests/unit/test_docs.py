"""The docs build with `mkdocs build --strict` (no page outside the nav, no broken link or anchor),
and the references generated from the pydantic models leave no field out."""

import importlib.util
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

from policies.schema import Policy
from proxy.settings import Settings, env_variable, load_settings

REPO = Path(__file__).resolve().parents[2]


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("schema_reference", REPO / "docs/hooks/schema_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reachable(root: type[BaseModel]) -> set[type[BaseModel]]:
    """Every model the fields of `root` lead to, however deeply nested in their annotations."""
    found: set[type[BaseModel]] = set()

    def visit_annotation(value: object) -> None:
        if isinstance(value, type) and issubclass(value, BaseModel):
            visit_model(value)
        for arg in typing.get_args(value):
            visit_annotation(arg)

    def visit_model(model: type[BaseModel]) -> None:
        if model not in found:
            found.add(model)
            for info in model.model_fields.values():
                visit_annotation(info.annotation)
                for item in info.metadata:
                    visit_annotation(item)

    visit_model(root)
    return found


def _sections(markdown: str) -> dict[str, str]:
    """Each model's section of a generated reference, by its heading."""
    parts = re.split(r"^### (\w+)\n", markdown, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _assert_every_field_listed(root: type[BaseModel], markdown: str) -> None:
    sections = _sections(markdown)
    for model in _reachable(root):
        assert model.__name__ in sections, f"no section for {model.__name__}"
        for name, info in model.model_fields.items():
            row = f"| `{info.alias or name}`"
            assert row in sections[model.__name__], f"{model.__name__}.{name} is not in the reference"
            assert info.description, f"{model.__name__}.{name} has no docstring"


def test_the_policy_reference_lists_every_field_of_every_model() -> None:
    reachable = {model.__name__ for model in _reachable(Policy)}
    assert {"Tier", "Caps", "Window", "Prices", "ModelPrices", "Plan", "Team", "User"} <= reachable
    assert {"Amount", "TokenPrice"} <= reachable
    _assert_every_field_listed(Policy, _hook().reference_markdown(Policy, 3))


def test_the_settings_reference_lists_every_field_of_every_model() -> None:
    markdown = _hook().reference_markdown(Settings, 3, env_variable)
    _assert_every_field_listed(Settings, markdown)
    assert "`CAPGATE_TIMEOUTS__READ_S`" in markdown
    assert "`CAPGATE_EXPORTER__SINK__DSN`" in markdown


def test_the_variable_a_reference_names_is_the_one_the_settings_read() -> None:
    settings = load_settings(env={env_variable(["timeouts", "read_s"]): "7.5"})
    assert settings.timeouts.read_s == 7.5


def test_the_docs_build_strictly(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's end-of-life banner, not a warning
    )
    assert built.returncode == 0, built.stderr
    reference = (tmp_path / "configuration/policy-reference/index.html").read_text()
    assert "<!-- policy-reference -->" not in reference
    assert 'id="tokenprice"' in reference
