"""The admin API's typed requests (pure: no I/O).

Each body is read once into a frozen model; a hostile or malformed value is a 400 naming its
parameter, in the OpenAI error shape. Ids follow the policy file's rule (`policies.schema.NAME`);
a PATCH body says what it changes by the fields it has (`"team": null` takes a user out of their
team).
"""

from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
)

from policies.schema import NAME, Windows
from proxy.errors import APIError
from proxy.generation import check_depth, loads_object

Id = Annotated[StrictStr, Field(pattern=NAME.pattern)]
MAX_NAME = 128
LATEST_EXPIRY_S = 253_402_300_799  # 9999-12-31T23:59:59Z


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


B = TypeVar("B", bound=_Body)


class CreateUser(_Body):
    id: Id
    tier: Id | None = None
    team: Id | None = None


class UpdateUser(_Body):
    tier: Id | None = None
    team: Id | None = None


def _expiry(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be Unix seconds (an integer) or ISO 8601 text")
    return expiry_seconds(value)


class CreateKey(_Body):
    name: Annotated[StrictStr, Field(max_length=MAX_NAME)] = ""
    expires_at: Annotated[int | None, BeforeValidator(_expiry)] = None

    @field_validator("name")
    @classmethod
    def _printable(cls, name: str) -> str:
        if not name.isprintable():
            raise ValueError("must be printable text")
        return name


class CreateTeam(_Body):
    id: Id
    tier: Id | None = None
    windows: Windows | None = None


class UpdateTeam(_Body):
    tier: Id | None = None
    windows: Windows | None = None


def expiry_seconds(value: int | str) -> int:
    """A moment as Unix seconds: Unix seconds already, or ISO 8601 text with a time zone."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("must be Unix seconds or an ISO 8601 time with a time zone") from None
        if moment.tzinfo is None:
            raise ValueError("an ISO 8601 time needs a time zone (e.g. 'Z' or '+00:00')")
        try:
            value = int(moment.astimezone(UTC).timestamp())
        except OverflowError:
            value = 0
    if not 0 < value <= LATEST_EXPIRY_S:
        raise ValueError(f"must be between 1 and {LATEST_EXPIRY_S} (Unix seconds)")
    return value


def _param(error: dict[str, Any]) -> str:
    parts = [
        str(part) for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-"))
    ]
    return ".".join(parts) or "body"


def parse_body(model: type[B], raw: bytes) -> B:
    """`raw` as `model`, or a 400 naming the first bad parameter."""
    data = loads_object(raw) if raw.strip() else {}
    check_depth(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param(error)
        if error["type"] == "extra_forbidden":
            message = f"unknown parameter '{param}'"
        else:
            message = f"'{param}': {error['msg'].removeprefix('Value error, ')}"
        raise APIError(400, message, param=param, code="invalid_value") from exc


def check_id(value: str, what: str) -> str:
    """A path id, or a 404: an id no account can have names none."""
    if not NAME.fullmatch(value):
        raise APIError(404, f"no {what} {value[:70]!r}", code=f"{what}_not_found")
    return value
