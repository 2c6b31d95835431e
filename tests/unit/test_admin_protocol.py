"""The admin API's request bodies: valid ones parse into frozen models; every hostile one is a 400
in the OpenAI error shape whose `param` names the bad field; malformed path ids are 404s."""

import json
from datetime import UTC, datetime

import pytest

from proxy.admin.protocol import (
    LATEST_EXPIRY_S,
    MAX_NAME,
    CreateKey,
    CreateTeam,
    CreateUser,
    UpdateTeam,
    UpdateUser,
    check_id,
    expiry_seconds,
    parse_body,
)
from proxy.errors import APIError
from proxy.generation import MAX_DEPTH

PATTERN = "String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'"


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def refused(model: type, raw: bytes) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_body(model, raw)
    error = caught.value
    assert error.status == 400
    assert error.type == "invalid_request_error"
    return error


# --- valid bodies ---------------------------------------------------------------------------------


def test_valid_bodies_parse() -> None:
    assert parse_body(CreateUser, body({"id": "alice", "tier": "pro", "team": "eng"})) == CreateUser(
        id="alice", tier="pro", team="eng"
    )
    assert parse_body(CreateUser, body({"id": "A.b-c_" + "9" * 58})).id == "A.b-c_" + "9" * 58
    key = parse_body(CreateKey, body({"name": "ci runner é ✓", "expires_at": "2030-01-01T00:00:00Z"}))
    assert (key.name, key.expires_at) == ("ci runner é ✓", 1_893_456_000)
    assert parse_body(CreateKey, body({"expires_at": 1_893_456_000})).expires_at == 1_893_456_000
    assert parse_body(CreateKey, body({"expires_at": None})).expires_at is None
    assert parse_body(CreateKey, body({"name": "n" * MAX_NAME})).name == "n" * MAX_NAME
    team = parse_body(CreateTeam, body({"id": "eng", "windows": [{"per": "month", "spend": "50 USD"}]}))
    assert team.windows is not None and team.windows[0].spend is not None
    assert team.windows[0].spend.nano == 50_000_000_000
    assert parse_body(UpdateTeam, body({"tier": "pro"})) == UpdateTeam(tier="pro")


def test_empty_bodies_are_empty_objects() -> None:
    assert parse_body(CreateKey, b"") == CreateKey()
    assert parse_body(UpdateUser, b"  \n") == UpdateUser()
    assert parse_body(UpdateTeam, b"{}") == UpdateTeam()
    error = refused(CreateUser, b"")
    assert (error.param, error.message) == ("id", "'id': Field required")


def test_bodies_are_frozen() -> None:
    user = parse_body(CreateUser, body({"id": "alice"}))
    with pytest.raises(ValueError, match="frozen"):
        user.id = "mallory"  # type: ignore[misc]


def test_update_user_tells_null_team_from_absent_team() -> None:
    leave = parse_body(UpdateUser, body({"team": None}))
    untouched = parse_body(UpdateUser, body({}))
    tier_only = parse_body(UpdateUser, body({"tier": "pro"}))
    assert leave.team is None and untouched.team is None
    assert leave.model_fields_set == {"team"}
    assert untouched.model_fields_set == set()
    assert tier_only.model_fields_set == {"tier"}
    assert parse_body(UpdateTeam, body({"windows": None})).model_fields_set == {"windows"}


# --- hostile bodies: a 400 naming the field -------------------------------------------------------

HOSTILE = [
    # wrong types
    pytest.param(CreateUser, {"id": 5}, "id", "Input should be a valid string", id="int-id"),
    pytest.param(CreateUser, {"id": ["alice"]}, "id", "Input should be a valid string", id="list-id"),
    pytest.param(CreateUser, {"id": None}, "id", "Input should be a valid string", id="null-id"),
    pytest.param(CreateUser, {"id": True}, "id", "Input should be a valid string", id="bool-id"),
    pytest.param(CreateUser, {"id": {"$ne": ""}}, "id", "Input should be a valid string", id="object-id"),
    pytest.param(CreateUser, {"id": "a", "tier": 3}, "tier", "valid string", id="int-tier"),
    pytest.param(UpdateUser, {"team": 5}, "team", "valid string", id="int-team"),
    pytest.param(UpdateUser, {"team": ["eng"]}, "team", "valid string", id="list-team"),
    pytest.param(CreateKey, {"name": None}, "name", "Input should be a valid string", id="null-name"),
    pytest.param(CreateKey, {"name": 5}, "name", "Input should be a valid string", id="int-name"),
    pytest.param(CreateTeam, {"id": "t", "windows": "day"}, "windows", "valid list", id="str-windows"),
    pytest.param(
        CreateTeam, {"id": "t", "windows": [{"per": "day"}]}, "windows.0", "a window caps", id="empty-window"
    ),
    pytest.param(
        UpdateTeam,
        {"windows": [{"per": "day", "spend": "1 usd"}]},
        "windows.0.spend",
        "cannot read amount '1 usd'",
        id="bad-spend",
    ),
    pytest.param(
        UpdateTeam,
        {"windows": [{"per": "day", "tokens": 1}, {"per": "day", "spend": "1 USD"}]},
        "windows",
        "window 'day' is capped twice",
        id="window-twice",
    ),
    pytest.param(
        CreateTeam,
        {"id": "t", "windows": [{"per": "day", "tokens": -1}]},
        "windows.0.tokens",
        "greater than or equal to 0",
        id="negative-tokens",
    ),
    # expires_at
    pytest.param(CreateKey, {"expires_at": True}, "expires_at", "must be Unix seconds", id="bool-expiry"),
    pytest.param(CreateKey, {"expires_at": False}, "expires_at", "must be Unix seconds", id="false-expiry"),
    pytest.param(CreateKey, {"expires_at": 1.5}, "expires_at", "must be Unix seconds", id="float-expiry"),
    pytest.param(CreateKey, {"expires_at": [1]}, "expires_at", "must be Unix seconds", id="list-expiry"),
    pytest.param(CreateKey, {"expires_at": -1}, "expires_at", "must be between 1 and", id="negative-expiry"),
    pytest.param(CreateKey, {"expires_at": 0}, "expires_at", "must be between 1 and", id="zero-expiry"),
    pytest.param(
        CreateKey, {"expires_at": LATEST_EXPIRY_S + 1}, "expires_at", "must be between 1", id="past-9999"
    ),
    pytest.param(CreateKey, {"expires_at": 2**63}, "expires_at", "", id="huge-expiry"),
    pytest.param(
        CreateKey, {"expires_at": "2030-01-01T00:00:00"}, "expires_at", "needs a time zone", id="naive-iso"
    ),
    pytest.param(CreateKey, {"expires_at": "2030-01-01"}, "expires_at", "needs a time zone", id="date-only"),
    pytest.param(CreateKey, {"expires_at": "tomorrow"}, "expires_at", "ISO 8601", id="garbage-iso"),
    pytest.param(CreateKey, {"expires_at": "1700000000"}, "expires_at", "ISO 8601", id="digits-as-text"),
    pytest.param(
        CreateKey, {"expires_at": "1969-12-31T23:59:59Z"}, "expires_at", "between 1 and", id="iso-before-1970"
    ),
    # odd names
    pytest.param(CreateKey, {"name": "a\u0000b"}, "name", "must be printable text", id="nul-in-name"),
    pytest.param(CreateKey, {"name": "line\nbreak"}, "name", "must be printable text", id="newline-in-name"),
    pytest.param(CreateKey, {"name": "\x1b[31mred"}, "name", "must be printable text", id="ansi-escape"),
    pytest.param(CreateKey, {"name": "evil\u202etxt"}, "name", "must be printable text", id="bidi-override"),
    pytest.param(CreateKey, {"name": "zero\u200bwidth"}, "name", "must be printable text", id="zero-width"),
    pytest.param(
        CreateKey, {"name": "n" * (MAX_NAME + 1)}, "name", "at most 128 characters", id="over-long-name"
    ),
    # ids
    pytest.param(CreateUser, {"id": "a:b"}, "id", PATTERN, id="colon-in-id"),
    pytest.param(CreateUser, {"id": "a{b}"}, "id", PATTERN, id="brace-in-id"),
    pytest.param(CreateUser, {"id": "a b"}, "id", PATTERN, id="space-in-id"),
    pytest.param(CreateUser, {"id": ""}, "id", PATTERN, id="empty-id"),
    pytest.param(CreateUser, {"id": "-a"}, "id", PATTERN, id="leading-dash"),
    pytest.param(CreateUser, {"id": "alice\n"}, "id", PATTERN, id="trailing-newline"),
    pytest.param(CreateUser, {"id": "é"}, "id", PATTERN, id="non-ascii-id"),
    pytest.param(CreateUser, {"id": "a" * 65}, "id", PATTERN, id="65-char-id"),
    pytest.param(CreateUser, {"id": "ok", "team": "t:x"}, "team", PATTERN, id="colon-in-team"),
    pytest.param(CreateTeam, {"id": "{t}"}, "id", PATTERN, id="brace-in-team-id"),
    pytest.param(UpdateUser, {"tier": "a" * 65}, "tier", PATTERN, id="65-char-tier"),
    pytest.param(UpdateTeam, {"tier": "p ro"}, "tier", PATTERN, id="space-in-team-tier"),
]


@pytest.mark.parametrize(("model", "value", "param", "fragment"), HOSTILE)
def test_hostile_body_is_a_400_naming_its_field(
    model: type, value: object, param: str, fragment: str
) -> None:
    error = refused(model, body(value))
    assert error.param == param
    assert error.code == "invalid_value"
    assert error.message.startswith(f"'{param}': ")
    assert fragment in error.message
    assert error.body()["error"]["param"] == param


@pytest.mark.parametrize(
    ("model", "value", "param"),
    [
        (CreateUser, {"id": "alice", "admin": True}, "admin"),
        (UpdateUser, {"team": None, "keys": []}, "keys"),
        (CreateKey, {"name": "x", "key": "cg-chosen"}, "key"),
        (CreateTeam, {"id": "t", "members": ["a"]}, "members"),
        (UpdateTeam, {"windows": [{"per": "day", "tokens": 1, "burst": 2}]}, "windows.0.burst"),
    ],
)
def test_unknown_field_is_named(model: type, value: object, param: str) -> None:
    error = refused(model, body(value))
    assert (error.param, error.message, error.code) == (
        param,
        f"unknown parameter '{param}'",
        "invalid_value",
    )


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"[]", "must be a JSON object"),
        (b'["id", "alice"]', "must be a JSON object"),
        (b'"alice"', "must be a JSON object"),
        (b"5", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"{id: alice}", "not valid JSON"),
        (b'{"id": "alice"', "not valid JSON"),
        (b'{"id": "alice"} {}', "not valid JSON"),
        (b'{"id": "\xff"}', "not valid JSON"),
        (b'{"id": NaN}', "not valid JSON"),
    ],
)
def test_not_a_json_object_is_a_400(raw: bytes, fragment: str) -> None:
    for model in (CreateUser, UpdateUser, CreateKey, CreateTeam, UpdateTeam):
        error = refused(model, raw)
        assert error.code == "invalid_json"
        assert error.param is None
        assert fragment in error.message


def test_deeply_nested_json_is_refused_by_field() -> None:
    deep = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    error = refused(CreateUser, b'{"id": "alice", "team": ' + deep + b"}")
    assert error.param == "team"
    assert f"nested more than {MAX_DEPTH} levels deep" in error.message
    windows = refused(UpdateTeam, b'{"windows": ' + b'[{"per": ' * 200 + b"1" + b"}]" * 200 + b"}")
    assert windows.param == "windows"
    # Just under the limit is an ordinary type error on that field, not a depth error.
    shallow = b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)
    error = refused(CreateUser, b'{"id": "alice", "team": ' + shallow + b"}")
    assert (error.param, error.code) == ("team", "invalid_value")
    assert "valid string" in error.message


def test_first_bad_field_is_the_one_named() -> None:
    error = refused(CreateUser, body({"id": 5, "tier": 6}))
    assert error.param == "id"


@pytest.mark.parametrize("text", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:30:00+01:00"])
def test_iso_expiry_out_of_datetime_range_is_a_400(text: str) -> None:
    error = refused(CreateKey, body({"expires_at": text}))
    assert error.param == "expires_at"


# --- expiry_seconds and check_id ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (1, 1),
        (1_893_456_000, 1_893_456_000),
        (LATEST_EXPIRY_S, LATEST_EXPIRY_S),
        ("2030-01-01T00:00:00Z", 1_893_456_000),
        ("2030-01-01T00:00:00+00:00", 1_893_456_000),
        ("2030-01-01T02:00:00+02:00", 1_893_456_000),
        ("2029-12-31T19:00:00-05:00", 1_893_456_000),
        ("2030-01-01T00:00:00.999Z", 1_893_456_000),
        ("1970-01-01T00:00:01Z", 1),
        ("9999-12-31T23:59:59Z", LATEST_EXPIRY_S),
    ],
)
def test_expiry_seconds(value: int | str, seconds: int) -> None:
    assert expiry_seconds(value) == seconds


def test_latest_expiry_is_the_end_of_9999() -> None:
    assert datetime.fromtimestamp(LATEST_EXPIRY_S, UTC) == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


@pytest.mark.parametrize(
    "value", [0, -5, LATEST_EXPIRY_S + 1, "2030-01-01T00:00:00", "soon", "1970-01-01T00:00:00Z"]
)
def test_expiry_seconds_refuses(value: int | str) -> None:
    with pytest.raises(ValueError, match=r"must be|needs a time zone"):
        expiry_seconds(value)


@pytest.mark.parametrize("good", ["alice", "A", "a.b-c_d", "9" * 64])
def test_check_id_passes_names(good: str) -> None:
    assert check_id(good, "user") == good


@pytest.mark.parametrize("bad", ["", "a:b", "{u:a}", "a b", "alice\n", "-a", "a" * 65, "../etc", "é"])
def test_check_id_is_a_404_for_malformed_ids(bad: str) -> None:
    with pytest.raises(APIError) as caught:
        check_id(bad, "team")
    error = caught.value
    assert (error.status, error.code, error.param) == (404, "team_not_found", None)
    assert error.message == f"no team {bad[:70]!r}"


def test_check_id_shortens_what_it_repeats() -> None:
    with pytest.raises(APIError) as caught:
        check_id("x" * 10_000, "user")
    assert len(caught.value.message) < 100
