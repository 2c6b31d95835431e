"""The accounts benchmark's bulk load: RESP as Redis reads it, every key written once and linked to
its user, and the quantiles every bench program reports."""

import hashlib

import pytest

from bench.accounts.scale import (
    PREFIX,
    arguments,
    command,
    key_commands,
    key_of,
    key_record,
    kid_of,
    user_commands,
    user_of,
)
from bench.common.quantiles import quantile


def test_command_is_resp_bulk_strings() -> None:
    assert command(b"SET", b"k", b"") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"


def test_the_formatted_key_record_is_the_generic_encoding() -> None:
    digest, kid, uid = b"ab" * 32, b"key_00000000000000ff", b"bench-user-0000007"
    tail = arguments(b"name", b"bench", b"created_ms", b"17", b"expires_ms", b"0", b"last_used_ms", b"0")
    expected = [
        command(b"HSET", PREFIX + b"k:" + digest, b"id", kid, b"user", uid, b"name", b"bench",
                b"created_ms", b"17", b"expires_ms", b"0", b"last_used_ms", b"0"),
        command(b"SET", PREFIX + b"kid:" + kid, digest),
    ]  # fmt: skip
    assert key_record(digest, kid, uid, tail) == expected


def _commands(raw: list[bytes]) -> list[list[bytes]]:
    """Decode commands as written by `command` (bulk-string arguments without CR LF inside)."""
    decoded = []
    for item in raw:
        lines = item.split(b"\r\n")
        count = int(lines[0][1:])
        decoded.append([lines[2 + 2 * n] for n in range(count)])
    return decoded


def test_every_key_is_written_once_and_listed_by_its_user() -> None:
    keys, users = 7, 3
    written = _commands(key_commands(0, users, keys, users, 17))
    hashes = {c[1]: c for c in written if c[0] == b"HSET"}
    ids = {c[1]: c[2] for c in written if c[0] == b"SET"}
    sets = {c[1]: set(c[2:]) for c in written if c[0] == b"SADD"}
    assert len(hashes) == len(ids) == keys
    for i in range(keys):
        digest = hashlib.sha256(key_of(i).encode()).hexdigest().encode()
        kid, uid = kid_of(i).encode(), user_of(i, users).encode()
        assert hashes[PREFIX + b"k:" + digest][2:6] == [b"id", kid, b"user", uid]
        assert ids[PREFIX + b"kid:" + kid] == digest
        assert kid in sets[PREFIX + b"u:" + uid + b":keys"]
    assert sum(len(s) for s in sets.values()) == keys


def test_users_have_a_record_and_a_place_in_the_users_set() -> None:
    written = _commands(user_commands(0, 4, 17))
    assert [c[1] for c in written[:4]] == [PREFIX + b"u:" + user_of(u, 4).encode() for u in range(4)]
    assert written[4][:2] == [b"ZADD", PREFIX + b"users"]
    assert written[4][2:] == [x for u in range(4) for x in (b"0", user_of(u, 4).encode())]


def test_quantiles_interpolate() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert quantile(values, 0.5) == pytest.approx(50.5)
    assert quantile(values, 0.99) == pytest.approx(99.01)
    assert quantile([3.0], 0.99) == 3.0
    assert quantile([], 0.5) is None
