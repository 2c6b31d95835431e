"""The validated generation request every API turns its body into, and the checks they share
(pure: no I/O).

Each API's `protocol.parse_request` builds one immutable `GenerationRequest` before any Redis
call; a hostile or malformed value is a 400 `APIError` naming its `param`, which each API
renders in its own error shape.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import orjson

from proxy.errors import APIError

MAX_INT = 2**31 - 1
MAX_N = 128
MAX_PROMPTS = 1024
MAX_DEPTH = 64
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions

Api = Literal["chat", "completions", "messages", "responses", "embeddings"]


class UsageMode(Enum):
    """What the client asked for in `stream_options`."""

    NONE = "none"
    FINAL = "final"
    CONTINUOUS = "continuous"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation request, validated.

    `limit` is the client's completion limit per output (chat: `max_completion_tokens` wins over
    `max_tokens`; completions default to 16), None when the client set none; `limit_fields` the
    names the client sent it under. `outputs` is how many sequences vLLM generates: `n` (or
    `best_of`) times the number of prompts. `body` is the client's body, read-only. `media`
    names the first content part that is not text: a short URL may stand for thousands of prompt
    tokens, so the byte bound of `metering.prompt` does not hold for such a request.
    """

    api: Api
    model: str
    stream: bool
    usage: UsageMode
    outputs: int
    limit: int | None
    limit_fields: tuple[str, ...]
    min_tokens: int | None
    body: Mapping[str, Any]
    media: str | None = None  # the param of the first non-text content part (image, audio, ...)
    previous_response_id: str | None = None  # a stored response this one continues (Responses API)

    @property
    def chat(self) -> bool:
        """A list of messages (chat completions, Anthropic messages), not a raw prompt."""
        return self.api in ("chat", "messages", "responses")


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def loads_object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def check_depth(body: dict[str, Any]) -> None:
    """Raise a 400 naming the top-level field nested deeper than `MAX_DEPTH`."""
    for name, value in body.items():
        stack: list[tuple[object, int]] = [(value, 2)]
        while stack:
            node, depth = stack.pop()
            if isinstance(node, dict):
                children: Any = node.values()
            elif isinstance(node, list):
                children = node
            else:
                continue
            if depth > MAX_DEPTH:
                raise invalid(name, f"'{name}' is nested more than {MAX_DEPTH} levels deep")
            stack.extend((child, depth + 1) for child in children)


def integer(body: Mapping[str, Any], name: str, low: int, high: int = MAX_INT) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"'{name}' must be an integer")
    if not low <= value <= high:
        raise invalid(name, f"'{name}' must be between {low} and {high}, got {value}")
    return value


def boolean(body: Mapping[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(param or name, f"'{param or name}' must be a boolean")
    return value
