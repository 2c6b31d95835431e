"""The policy file: schema, cross-references, and errors naming YAML path and line."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from policies.loader import ConfigError, load_policy

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "policies" / "example.yaml"
HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64

BASE = f"""\
tiers:
  free:
    priority: 10
    caps:
      per_request: 100
      windows:
        - {{per: day, tokens: 1000}}
    prices:
      completion: "1.00 USD/1M"
users:
  - id: alice
    tier: free
    keys: ["{HASH_A}"]
"""


def problems(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as caught:
        load_policy(textwrap.dedent(text), "p.yaml")
    return [(p.path, p.line, p.message) for p in caught.value.problems]


def test_base_policy_loads() -> None:
    policy = load_policy(BASE)
    assert policy.tiers["free"].caps.windows[0].tokens == 1000
    assert policy.tiers["free"].prices.completion is not None
    assert policy.tiers["free"].prices.completion.nano_per_token == 1000


BROKEN = [
    pytest.param(
        BASE.replace("    priority: 10\n", "    priority: 10\n    prioritty: 3\n"),
        ("tiers.free.prioritty", 4, "unknown field"),
        id="unknown-field",
    ),
    pytest.param(
        BASE.replace("priority: 10", "priority: high"),
        ("tiers.free.priority", 3, "Input should be a valid integer"),
        id="wrong-type",
    ),
    pytest.param(
        BASE.replace("tokens: 1000", "tokens: -5"),
        ("tiers.free.caps.windows[0].tokens", 7, "greater than or equal to 0"),
        id="negative-window-cap",
    ),
    pytest.param(
        BASE.replace("per_request: 100", "per_request: -1"),
        ("tiers.free.caps.per_request", 5, "greater than 0"),
        id="negative-request-cap",
    ),
    pytest.param(
        BASE.replace("tier: free", "tier: gold"),
        ("users[0].tier", 12, "unknown tier 'gold'"),
        id="unknown-tier",
    ),
    pytest.param(
        BASE + f'  - id: bob\n    tier: free\n    keys: ["{HASH_A}"]\n',
        ("users[1].keys[0]", 16, "duplicate key hash (also at users.0.keys.0)"),
        id="duplicate-key-hash",
    ),
    pytest.param(
        BASE.replace('completion: "1.00 USD/1M"', "completion: 1.0"),
        ("tiers.free.prices.completion", 9, "price without unit"),
        id="price-without-unit",
    ),
    pytest.param(
        BASE.replace('"1.00 USD/1M"', '"1.00 dollars"'),
        ("tiers.free.prices.completion", 9, "cannot read price"),
        id="unreadable-price",
    ),
    pytest.param(
        BASE.replace("per: day", "per: fortnight"),
        ("tiers.free.caps.windows[0].per", 7, "Input should be"),
        id="unknown-period",
    ),
    pytest.param(
        BASE.replace(f'keys: ["{HASH_A}"]', 'keys: ["plaintext-key"]'),
        ("users[0].keys[0]", 13, "should match pattern"),
        id="key-not-a-hash",
    ),
    pytest.param(
        BASE + "  - id: alice\n    tier: free\n",
        ("users[1].id", 14, "duplicate user id 'alice'"),
        id="duplicate-user",
    ),
    pytest.param(
        BASE.replace("  - id: alice\n    tier: free\n", "  - id: alice\n"),
        ("users[0].tier", 11, "no tier and no default_tier"),
        id="user-without-tier",
    ),
    pytest.param(
        "default_tier: gold\n" + BASE,
        ("default_tier", 1, "unknown tier 'gold'"),
        id="unknown-default-tier",
    ),
    pytest.param(
        BASE.replace("    priority: 10\n", "    priority: 10\n    priority: 11\n"),
        ("tiers.free.priority", 4, "duplicate key"),
        id="duplicate-yaml-key",
    ),
    pytest.param(
        BASE.replace('completion: "1.00 USD/1M"', 'completion: "1.00 USD/1M"\n      prompt: "1.00 EUR/1M"'),
        ("tiers", 1, "prices mix currencies ['EUR', 'USD']"),
        id="mixed-currency",
    ),
    pytest.param(
        BASE.replace('"1.00 USD/1M"', '"0.0001 USD/1M"'),
        ("tiers.free.prices.completion", 9, "finer than one nano-USD per token"),
        id="price-too-fine",
    ),
    pytest.param(
        BASE.replace(
            "        - {per: day, tokens: 1000}\n",
            "        - {per: day, tokens: 1000}\n        - {per: day, tokens: 9}\n",
        ),
        ("tiers.free.caps.windows", 6, "window 'day' is capped twice"),
        id="window-twice",
    ),
    pytest.param(
        BASE.replace("    priority: 10\n", "    priority: 10\n    models: [tiny]\n").replace(
            'completion: "1.00 USD/1M"',
            'completion: "1.00 USD/1M"\n      models:\n        big: {completion: "9 USD/1M"}',
        ),
        ("tiers.free.prices.models.big", 12, "a price for model 'big', which the tier may not use"),
        id="price-for-a-model-not-allowed",
    ),
    pytest.param(
        BASE.replace(
            'completion: "1.00 USD/1M"',
            'completion: "1.00 USD/1M"\n      models:\n        big: {compleshun: "9 USD/1M"}',
        ),
        ("tiers.free.prices.models.big.compleshun", 11, "unknown field"),
        id="per-model-price-typo",
    ),
    pytest.param("tiers: [\n", ("", 2, "invalid YAML"), id="invalid-yaml"),
]


@pytest.mark.parametrize(("text", "expected"), BROKEN)
def test_broken_policy_is_rejected_with_path_and_line(text: str, expected: tuple[str, int, str]) -> None:
    found = problems(text)
    path, line, fragment = expected
    assert any(p == path and ln == line and fragment in msg for p, ln, msg in found), found


def test_every_problem_is_reported_not_just_the_first() -> None:
    text = BASE.replace("priority: 10", "priority: x").replace("tokens: 1000", "tokens: -1")
    paths = {path for path, _, _ in problems(text)}
    assert {"tiers.free.priority", "tiers.free.caps.windows[0].tokens"} <= paths


def test_example_policy_passes() -> None:
    policy = load_policy(EXAMPLE.read_text(), str(EXAMPLE))
    assert set(policy.tiers) == {"free", "pro", "enterprise"}


def run_check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


def test_check_config_command_accepts_example() -> None:
    result = run_check_config(EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "ok (3 tiers, 0 teams, 3 users)" in result.stdout


def test_check_config_command_prints_every_problem_and_fails(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(BASE.replace("priority: 10", "priority: x").replace("tier: free", "tier: gold"))
    result = run_check_config(broken)
    assert result.returncode == 1
    assert f"{broken}:3: tiers.free.priority:" in result.stderr
    assert result.stderr.count(str(broken)) >= 1
