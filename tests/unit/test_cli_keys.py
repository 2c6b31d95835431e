"""`capgate keys new USER`: the key is printed once with the policy line that authenticates it."""

import hashlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from policies.index import PolicyIndex
from policies.loader import load_policy
from proxy.cli import main

REPO = Path(__file__).resolve().parents[2]
KEY_LINE = re.compile(r"^API key for (?P<user>\S+) \(shown once, store it now\): (?P<key>\S+)$", re.MULTILINE)
HASH_LINE = re.compile(r'^(?P<line>\s+- "sha256:(?P<hex>[0-9a-f]{64})")$', re.MULTILINE)


def minted(output: str) -> tuple[str, str, str]:
    """The user, the key and the policy line (as printed) from the command's output."""
    key_match = KEY_LINE.search(output)
    hash_match = HASH_LINE.search(output)
    assert key_match is not None and hash_match is not None, output
    return key_match["user"], key_match["key"], hash_match["line"]


def test_printed_hash_is_the_sha256_of_the_printed_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "alice", "--policy-file"]) == 0
    output = capsys.readouterr().out
    user, key, line = minted(output)
    assert user == "alice"
    assert key.startswith("cg-") and len(key) > 40
    assert line.strip() == f'- "sha256:{hashlib.sha256(key.encode()).hexdigest()}"'
    assert output.count(key) == 1, "the key is shown exactly once"


def test_every_call_mints_a_new_key(capsys: pytest.CaptureFixture[str]) -> None:
    keys = set()
    for _ in range(3):
        main(["keys", "new", "alice", "--policy-file"])
        keys.add(minted(capsys.readouterr().out)[1])
    assert len(keys) == 3


def test_the_printed_line_pasted_under_keys_authenticates_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    main(["keys", "new", "alice", "--policy-file"])
    _, key, line = minted(capsys.readouterr().out)
    text = (
        textwrap.dedent(
            """\
        tiers:
          free: {priority: 20}
        users:
          - id: alice
            tier: free
            keys:
        """
        )
        + line
        + "\n"
    )
    index = PolicyIndex(load_policy(text))
    principal = index.principal_for_key(key)
    assert principal is not None and principal.user_id == "alice" and principal.tier_name == "free"
    assert index.principal_for_key(key + "x") is None


def test_installed_command_prints_the_same_shape() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "keys", "new", "bob", "--policy-file"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    user, key, line = minted(result.stdout)
    assert user == "bob"
    assert line.strip() == f'- "sha256:{hashlib.sha256(key.encode()).hexdigest()}"'
