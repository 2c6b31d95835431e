"""No dead code: `vulture` (configured in pyproject.toml, its known false positives listed with
their users in tests/vulture_whitelist.py) finds nothing unused in the code, the bench or the tests."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_vulture_finds_no_unused_code() -> None:
    found = subprocess.run(
        [sys.executable, "-m", "vulture"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert found.returncode == 0, found.stdout + found.stderr
