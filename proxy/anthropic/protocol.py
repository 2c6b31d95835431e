"""The typed, validated request of Anthropic's Messages API, and its error shape (pure: no I/O).

`parse_request` turns a `/v1/messages` body into one immutable `GenerationRequest`, once, before
any Redis call; a hostile or malformed value is a 400 naming its parameter. Fields capgate does
not read are left for vLLM to judge.

Limits:
- the body is a JSON object nested at most `MAX_DEPTH` levels;
- `model` a non-empty string; `max_tokens` required, an integer in [1, `MAX_INT`];
- `messages` a non-empty list of objects, each with a string `role` and a `content` that is a
  string or a list of content blocks (objects with a string `type`);
- `system` a string or a list of content blocks; `stream` a boolean.

Errors are Anthropic's `{"type": "error", "error": {"type", "message"}}`, the type following
the status as Anthropic's own API does (`invalid_request_error`, `authentication_error`, ...).
"""

from types import MappingProxyType
from typing import Any

import orjson
from starlette.responses import Response

from proxy.errors import APIError
from proxy.generation import (
    MAX_INT,
    GenerationRequest,
    UsageMode,
    boolean,
    check_depth,
    integer,
    invalid,
    loads_object,
)

# Blocks that carry text (or a tool call or result made of text): anything else (`image`,
# `document`, ...) stands for prompt tokens its bytes do not bound.
TEXT_BLOCKS = frozenset({"text", "thinking", "redacted_thinking", "tool_use", "tool_result"})

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def _blocks(blocks: object, param: str) -> str | None:
    """Check a list of content blocks; the param of the first one that is not text, if any."""
    if not isinstance(blocks, list):
        raise invalid(param, f"'{param}' must be a string or a list of content blocks")
    media = None
    for j, block in enumerate(blocks):
        where = f"{param}[{j}]"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(where, f"'{where}' must be an object with a string 'type'")
        inner = block.get("content")
        if block["type"] == "tool_result" and isinstance(inner, list):
            media = media or _blocks(inner, f"{where}.content")
        elif block["type"] not in TEXT_BLOCKS:
            media = media or where
    return media


def _content(value: object, param: str) -> str | None:
    return None if isinstance(value, str) else _blocks(value, param)


def parse_request(raw: bytes) -> GenerationRequest:
    """The validated request of a `/v1/messages` body, or a 400 `APIError`."""
    body: dict[str, Any] = loads_object(raw)
    check_depth(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model", code="missing_model")
    if body.get("max_tokens") is None:
        raise invalid("max_tokens", "'max_tokens' is required", code="missing_max_tokens")
    limit = integer(body, "max_tokens", 1, MAX_INT)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of message objects")
    media = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(where, f"'{where}' must be an object with a string 'role'")
        if "content" not in message:
            raise invalid(f"{where}.content", f"'{where}.content' is required")
        media = media or _content(message["content"], f"{where}.content")
    if body.get("system") is not None:
        media = media or _content(body["system"], "system")
    return GenerationRequest(
        api="messages",
        model=model,
        stream=boolean(body, "stream"),
        usage=UsageMode.NONE,
        outputs=1,
        limit=limit,
        limit_fields=("max_tokens",),
        min_tokens=None,
        body=MappingProxyType(body),
        media=media,
    )


def parse_count_request(raw: bytes) -> str:
    """The model of a `/v1/messages/count_tokens` body (checked as a messages request without
    `max_tokens`), or a 400 `APIError`."""
    body = loads_object(raw)
    body.setdefault("max_tokens", 1)
    return parse_request(orjson.dumps(body)).model


def error_body(error: APIError) -> dict[str, Any]:
    """`error` in Anthropic's shape; the parameter is named in the message."""
    kind = ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    message = error.message
    if error.param is not None and error.param not in message:
        message = f"{error.param}: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(error: APIError) -> Response:
    """The response of an error capgate answers itself on an Anthropic route."""
    return Response(
        orjson.dumps(error_body(error)),
        status_code=error.status,
        media_type="application/json",
        headers=error.headers,
    )


def error_event(error: APIError) -> bytes:
    """A stream's last event after a failure once the stream has started, as Anthropic sends it."""
    return b"event: error\ndata: " + orjson.dumps(error_body(error)) + b"\n\n"
