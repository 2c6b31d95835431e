"""The typed, validated generation request of the OpenAI API (pure: no I/O).

`parse_request` turns a request body into one immutable `GenerationRequest`, once, before any
Redis call. Everything capgate's metering reads or rewrites is checked here with a range: a
hostile or malformed value is a 400 in OpenAI's error shape naming its `param`. Fields capgate
does not read are left for vLLM to judge (its own 400 passes through, after a reservation that
is returned in full).

Limits:
- the body is a JSON object (orjson: no NaN/Infinity, no lone surrogates, depth under 1024),
  nested at most `MAX_DEPTH` levels;
- `max_tokens`, `max_completion_tokens`: integers in [1, `MAX_INT`]; `min_tokens` in [0, `MAX_INT`];
- `n` in [1, `MAX_N`], `best_of` in [`n`, `MAX_N`] (completions);
- chat `messages`: a non-empty list of objects, each with a string `role`;
- completions `prompt`: a string, a non-empty list of token ids, or a non-empty list of
  strings or of token-id lists (token ids are integers in [0, `MAX_INT`]), at most
  `MAX_PROMPTS` prompts;
- `stream` a boolean, `stream_options` an object of booleans.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Literal

import orjson

from proxy.errors import APIError

MAX_INT = 2**31 - 1
MAX_N = 128
MAX_PROMPTS = 1024
MAX_DEPTH = 64
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions

Api = Literal["chat", "completions"]


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
    `best_of`) times the number of prompts. `body` is the client's body, read-only.
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

    @property
    def chat(self) -> bool:
        return self.api == "chat"


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _loads(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def _check_depth(body: dict[str, Any]) -> None:
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


def _integer(body: Mapping[str, Any], name: str, low: int, high: int = MAX_INT) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"'{name}' must be an integer")
    if not low <= value <= high:
        raise invalid(name, f"'{name}' must be between {low} and {high}, got {value}")
    return value


def _boolean(body: Mapping[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(param or name, f"'{param or name}' must be a boolean")
    return value


def _usage_mode(body: Mapping[str, Any]) -> UsageMode:
    options = body.get("stream_options")
    if options is None:
        return UsageMode.NONE
    if not isinstance(options, dict):
        raise invalid("stream_options", "'stream_options' must be an object")
    if not _boolean(options, "include_usage", "stream_options.include_usage"):
        return UsageMode.NONE
    continuous = _boolean(options, "continuous_usage_stats", "stream_options.continuous_usage_stats")
    return UsageMode.CONTINUOUS if continuous else UsageMode.FINAL


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of message objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}]", f"'messages[{i}]' must be an object with a string 'role'")


def _token_ids(value: list[Any], param: str) -> None:
    if not value:
        raise invalid(param, f"'{param}' must not be empty")
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= MAX_INT:
            raise invalid(param, f"'{param}' must hold token ids (integers from 0 to {MAX_INT})")


def count_prompts(prompt: object) -> int:
    """The number of prompts in a completions `prompt`, or a 400 naming what is wrong."""
    if isinstance(prompt, str):
        return 1
    if not isinstance(prompt, list) or not prompt:
        raise invalid("prompt", "'prompt' must be a string, a list of token ids, or a non-empty list")
    if all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
        _token_ids(prompt, "prompt")
        return 1
    if len(prompt) > MAX_PROMPTS:
        raise invalid("prompt", f"'prompt' holds more than {MAX_PROMPTS} prompts")
    for i, item in enumerate(prompt):
        if isinstance(item, list):
            _token_ids(item, f"prompt[{i}]")
        elif not isinstance(item, str):
            raise invalid(f"prompt[{i}]", f"'prompt[{i}]' must be a string or a list of token ids")
    return len(prompt)


def parse_request(api: Api, raw: bytes) -> GenerationRequest:
    """The validated request of `raw` (a chat or completions body), or a 400 `APIError`."""
    body = _loads(raw)
    _check_depth(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model", code="missing_model")
    stream = _boolean(body, "stream")
    usage = _usage_mode(body)
    n = _integer(body, "n", 1, MAX_N) or 1
    _integer(body, "min_tokens", 0)
    if api == "chat":
        _check_messages(body.get("messages"))
        fields = tuple(f for f in ("max_completion_tokens", "max_tokens") if body.get(f) is not None)
        limits = [_integer(body, name, 1) for name in fields]
        limit = limits[0] if limits else None
        prompts = 1
    else:
        if "prompt" not in body:
            raise invalid("prompt", "'prompt' is required", code="missing_prompt")
        prompts = count_prompts(body["prompt"])
        best_of = _integer(body, "best_of", 1, MAX_N)
        if best_of is not None and best_of < n:
            raise invalid("best_of", f"'best_of' must be at least 'n' ({n}), got {best_of}")
        n = max(n, best_of or 1)
        fields = ("max_tokens",) if body.get("max_tokens") is not None else ()
        limit = _integer(body, "max_tokens", 1)
        if limit is None:
            limit = COMPLETIONS_DEFAULT_MAX_TOKENS
    return GenerationRequest(
        api=api,
        model=model,
        stream=stream,
        usage=usage,
        outputs=n * prompts,
        limit=limit,
        limit_fields=fields,
        min_tokens=body.get("min_tokens"),
        body=MappingProxyType(body),
    )
