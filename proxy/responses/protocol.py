"""The typed, validated request of the OpenAI Responses API (pure: no I/O).

`parse_request` turns a `POST /v1/responses` body into one immutable `GenerationRequest`, once,
before any Redis call; a hostile or malformed value is a 400 in OpenAI's error shape naming its
`param`. Fields capgate does not read are left for vLLM to judge.

Limits:
- the body is a JSON object nested at most `MAX_DEPTH` levels; `model` a non-empty string;
- `input` a string or a non-empty list of objects (items); `instructions` a string;
- `max_output_tokens` an integer in [1, `MAX_INT`]; `stream`, `store`, `background` booleans;
- `previous_response_id` an id as vLLM makes them (`RESPONSE_ID`);
- refused: `request_id` (vLLM's own field, which names the stored response: capgate sets it, so
  that no one can write over another user's response); `background: true` (a background
  response outlives its request, so nothing would end its reservation nor settle it when it
  ends: capgate serves responses in the foreground only); `prompt` (a stored prompt template
  stands for text capgate cannot see, so cannot bound).
"""

import re
from types import MappingProxyType
from typing import Any

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

RESPONSE_ID = re.compile(r"resp_[A-Za-z0-9_-]{1,128}")
# Content parts of text; any other (`input_image`, `input_file`, `input_audio`, ...) stands for
# prompt tokens its bytes do not bound.
TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"})


def response_id(value: object, param: str) -> str:
    """A response id as vLLM makes them, or a 400 naming `param`."""
    if not isinstance(value, str) or not RESPONSE_ID.fullmatch(value):
        raise invalid(param, f"'{param}' must be a response id ('resp_' and up to 128 letters or digits)")
    return value


def _media(items: list[Any]) -> str | None:
    """Check `input` items; the param of the first content part that is not text, if any."""
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(where, f"'{where}' must be an object")
        content = item.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
                    return f"{where}.content[{j}]"
    return None


def parse_request(raw: bytes) -> GenerationRequest:
    """The validated request of a `/v1/responses` body, or a 400 `APIError`."""
    body: dict[str, Any] = loads_object(raw)
    check_depth(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model", code="missing_model")
    given = body.get("input")
    if isinstance(given, list) and given:
        media = _media(given)
    elif isinstance(given, str):
        media = None
    else:
        raise invalid("input", "'input' must be a string or a non-empty list of items")
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise invalid("instructions", "'instructions' must be a string")
    boolean(body, "store")
    if boolean(body, "background"):
        raise invalid(
            "background",
            "'background' responses are not served: capgate meters a response while its request "
            "runs, and a background one outlives it",
            code="unsupported_parameter",
        )
    if body.get("prompt") is not None:
        raise invalid(
            "prompt",
            "'prompt' templates are not served: capgate cannot bound the tokens of text it does not see",
            code="unsupported_parameter",
        )
    if body.get("request_id") is not None:
        raise invalid(
            "request_id",
            "'request_id' is set by capgate: vLLM names the stored response after it",
            code="unsupported_parameter",
        )
    previous = body.get("previous_response_id")
    if previous is not None:
        previous = response_id(previous, "previous_response_id")
    limit = integer(body, "max_output_tokens", 1, MAX_INT)
    return GenerationRequest(
        api="responses",
        model=model,
        stream=boolean(body, "stream"),
        usage=UsageMode.NONE,
        outputs=1,
        limit=limit,
        limit_fields=("max_output_tokens",) if limit is not None else (),
        min_tokens=None,
        body=MappingProxyType(body),
        media=media,
        previous_response_id=previous,
    )
