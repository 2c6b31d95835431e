"""The three workloads: what each request asks, and whose keys send it."""

from dataclasses import dataclass
from typing import Any

MODEL = "tiny"
CHAT_PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Explain in one sentence what a token-metering gateway does."}]
STREAM_TOKENS = 256


@dataclass(frozen=True)
class Workload:
    """One kind of request. `spread` sends request `i` with the `i`-th of many users' keys (so
    Redis keys spread); otherwise one top-tier user sends every request."""

    name: str
    body: dict[str, Any]
    stream: bool
    spread: bool
    about: str

    @property
    def max_tokens(self) -> int:
        return int(self.body["max_tokens"])


ONE_TOKEN = Workload(
    "one_token",
    {"model": MODEL, "messages": MESSAGES, "max_tokens": 1},
    stream=False,
    spread=False,
    about="one-token chat completion (per-request overhead)",
)
STREAM = Workload(
    "stream_256",
    {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": STREAM_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    stream=True,
    spread=False,
    about=f"streamed chat completion of {STREAM_TOKENS} tokens (per-token overhead)",
)
MIX = Workload(
    "mix",
    ONE_TOKEN.body,
    stream=False,
    spread=True,
    about="one-token chat completions from 200 users over 3 tiers (Redis keys spread)",
)
WORKLOADS = {workload.name: workload for workload in (ONE_TOKEN, STREAM, MIX)}
