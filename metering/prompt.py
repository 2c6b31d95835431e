"""A safe upper bound of a request's prompt tokens, computed without asking the tokenizer (pure).

The bound rests on one property: every token of a byte-level BPE tokenizer (the family vLLM's
models use: GPT-2/Llama-3/Qwen/Mistral-Tekken style) stands for at least one byte of the rendered
prompt, so a prompt never has more tokens than bytes. The rendered prompt is the chat template
filled with the messages; its bytes are at most:

    template overhead (measured per model at start-up with vLLM's /tokenize:
                       `fixed` + `per_message` * number of messages, in tokens)
  + the UTF-8 bytes of the request's messages and tools serialised as JSON

JSON serialisation only adds bytes (quotes, keys, escapes), so the content is never undercounted.
For /v1/completions the bound is the prompt's UTF-8 bytes plus the fixed overhead (BOS), or the
exact length when the prompt is given as token ids.

For Anthropic's /v1/messages, vLLM turns the request into a chat completion before the template:
`system` becomes one more message, a `tool_use` block becomes a tool call whose arguments are its
`input` re-serialised, a `tool_result` its own tool message. Its bound serialises the whole request
with Python's default `json.dumps` (ASCII escapes: 6 bytes for a character UTF-8 spends at most
4 on; `", "` and `": "` separators), never fewer bytes than any re-serialisation of the same
values, and counts one more message per block that becomes its own message or call.

A settled request whose real prompt exceeds its bound is counted by
`capgate_prompt_bound_exceeded_total` (none has been seen).
"""

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TemplateOverhead:
    """Tokens a model's template adds: once per prompt and per chat message."""

    fixed: int = 32
    per_message: int = 16


def _json_bytes(value: object) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def chat_prompt_bound(body: dict, overhead: TemplateOverhead) -> int:
    """Upper bound of the prompt tokens of a chat completion request."""
    messages = body.get("messages") or []
    bound = overhead.fixed + overhead.per_message * len(messages) + _json_bytes(messages)
    for extra in ("tools", "functions", "documents", "chat_template_kwargs"):
        if body.get(extra) is not None:
            bound += _json_bytes(body[extra])
    return bound


_OWN_MESSAGE_BLOCKS = frozenset({"tool_use", "tool_result"})


def messages_prompt_bound(body: dict, overhead: TemplateOverhead) -> int:
    """Upper bound of the prompt tokens of an Anthropic messages request."""
    messages = body.get("messages") or []
    count = len(messages) + 1  # the system prompt's message
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(isinstance(b, dict) and b.get("type") in _OWN_MESSAGE_BLOCKS for b in content)
    sent = {k: body[k] for k in ("messages", "system", "tools", "tool_choice") if body.get(k) is not None}
    return overhead.fixed + overhead.per_message * count + len(json.dumps(sent).encode())


def responses_prompt_bound(body: dict, overhead: TemplateOverhead) -> int:
    """Upper bound of the prompt tokens of a Responses API request, without the stored
    conversation a `previous_response_id` adds: each `input` item is a message, `instructions`
    one more, all serialised as for a messages request."""
    given = body.get("input")
    count = (len(given) if isinstance(given, list) else 1) + 1
    fields = ("input", "instructions", "tools", "tool_choice", "previous_input_messages")
    sent = {k: body[k] for k in fields if body.get(k) is not None}
    return overhead.fixed + overhead.per_message * count + len(json.dumps(sent).encode())


def _one_prompt_bound(prompt: object, overhead: TemplateOverhead) -> int:
    if isinstance(prompt, str):
        return overhead.fixed + len(prompt.encode())
    if isinstance(prompt, list):
        return len(prompt)
    return overhead.fixed + _json_bytes(prompt)


def completion_prompts(prompt: object) -> list[object]:
    """The separate prompts of a /v1/completions request (a string, token ids, or a list)."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return list(prompt)
    return [prompt]


def completion_prompt_bound(body: dict, overhead: TemplateOverhead) -> int:
    """Upper bound of the prompt tokens of a completion request (all its prompts)."""
    return sum(_one_prompt_bound(p, overhead) for p in completion_prompts(body.get("prompt", "")))
