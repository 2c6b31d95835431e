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
exact length when the prompt is given as token ids. A settled request whose real prompt exceeds
its bound is counted by `capgate_prompt_bound_exceeded_total` (none has been seen).
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
