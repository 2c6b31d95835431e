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
- chat `messages`: a non-empty list of objects, each with a string `role` (content parts that
  are not text are named in `media`);
- completions `prompt`: a string, a non-empty list of token ids, or a non-empty list of
  strings or of token-id lists (token ids are integers in [0, `MAX_INT`]), at most
  `MAX_PROMPTS` prompts;
- `stream` a boolean, `stream_options` an object of booleans.
"""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from proxy.errors import APIError
from proxy.generation import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    MAX_INT,
    MAX_N,
    MAX_PROMPTS,
    GenerationRequest,
    UsageMode,
    boolean,
    check_depth,
    integer,
    invalid,
    loads_object,
)

OpenAIApi = Literal["chat", "completions"]

# Content parts of text; any other (`image_url`, `input_audio`, `video_url`, `file`, ...) stands
# for prompt tokens its bytes do not bound.
TEXT_PARTS = frozenset({"text", "input_text", "refusal", "thinking"})


def _usage_mode(body: Mapping[str, Any]) -> UsageMode:
    options = body.get("stream_options")
    if options is None:
        return UsageMode.NONE
    if not isinstance(options, dict):
        raise invalid("stream_options", "'stream_options' must be an object")
    if not boolean(options, "include_usage", "stream_options.include_usage"):
        return UsageMode.NONE
    continuous = boolean(options, "continuous_usage_stats", "stream_options.continuous_usage_stats")
    return UsageMode.CONTINUOUS if continuous else UsageMode.FINAL


def _check_messages(messages: object) -> str | None:
    """Check chat `messages`; the param of the first content part that is not text, if any."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of message objects")
    media = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}]", f"'messages[{i}]' must be an object with a string 'role'")
        content = message.get("content")
        if media is None and isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
                    media = f"messages[{i}].content[{j}]"
                    break
    return media


def _token_ids(value: list[Any], param: str) -> None:
    if not value:
        raise invalid(param, f"'{param}' must not be empty")
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= MAX_INT:
            raise invalid(param, f"'{param}' must hold token ids (integers from 0 to {MAX_INT})")


def count_prompts(prompt: object, param: str = "prompt") -> int:
    """The number of prompts in a completions `prompt` (or an embeddings `input`, named by
    `param`), or a 400 naming what is wrong."""
    if isinstance(prompt, str):
        return 1
    if not isinstance(prompt, list) or not prompt:
        raise invalid(param, f"'{param}' must be a string, a list of token ids, or a non-empty list")
    if all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
        _token_ids(prompt, param)
        return 1
    if len(prompt) > MAX_PROMPTS:
        raise invalid(param, f"'{param}' holds more than {MAX_PROMPTS} prompts")
    for i, item in enumerate(prompt):
        if isinstance(item, list):
            _token_ids(item, f"{param}[{i}]")
        elif not isinstance(item, str):
            raise invalid(f"{param}[{i}]", f"'{param}[{i}]' must be a string or a list of token ids")
    return len(prompt)


def parse_request(api: OpenAIApi, raw: bytes) -> GenerationRequest:
    """The validated request of `raw` (a chat or completions body), or a 400 `APIError`."""
    body = loads_object(raw)
    check_depth(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model", code="missing_model")
    stream = boolean(body, "stream")
    usage = _usage_mode(body)
    n = integer(body, "n", 1, MAX_N) or 1
    integer(body, "min_tokens", 0)
    media = None
    if api == "chat":
        media = _check_messages(body.get("messages"))
        fields = tuple(f for f in ("max_completion_tokens", "max_tokens") if body.get(f) is not None)
        limits = [integer(body, name, 1) for name in fields]
        limit = limits[0] if limits else None
        prompts = 1
    else:
        if "prompt" not in body:
            raise invalid("prompt", "'prompt' is required", code="missing_prompt")
        prompts = count_prompts(body["prompt"])
        best_of = integer(body, "best_of", 1, MAX_N)
        if best_of is not None and best_of < n:
            raise invalid("best_of", f"'best_of' must be at least 'n' ({n}), got {best_of}")
        n = max(n, best_of or 1)
        fields = ("max_tokens",) if body.get("max_tokens") is not None else ()
        limit = integer(body, "max_tokens", 1)
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
        media=media,
    )


ENCODINGS = frozenset({"float", "base64"})


def parse_embeddings(raw: bytes) -> GenerationRequest:
    """The validated request of a `/v1/embeddings` body (an `input` as a completions `prompt`,
    or chat `messages`), or a 400 `APIError`. Nothing is generated: `limit` is None."""
    body = loads_object(raw)
    check_depth(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model", code="missing_model")
    media = None
    if "messages" in body:
        media = _check_messages(body["messages"])
    elif "input" in body:
        try:
            count_prompts(body["input"])
        except APIError as error:
            raise invalid(
                error.param.replace("prompt", "input", 1) if error.param else "input",
                error.message.replace("'prompt", "'input"),
            ) from None
    else:
        raise invalid("input", "'input' is required", code="missing_input")
    integer(body, "dimensions", 1)
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ENCODINGS:
        raise invalid("encoding_format", "'encoding_format' must be 'float' or 'base64'")
    return GenerationRequest(
        api="embeddings",
        model=model,
        stream=False,
        usage=UsageMode.NONE,
        outputs=1,
        limit=None,
        limit_fields=(),
        min_tokens=None,
        body=MappingProxyType(body),
        media=media,
    )
