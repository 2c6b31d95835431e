"""Reading what a running capgate billed, and what vLLM generated, for audits in tests."""

from __future__ import annotations

import json
import time

import httpx

from .capgate_server import CapgateServer
from .policies import ADMIN_KEY, key_of
from .prom import sample_sum
from .vllm_server import VllmServer


def ledger(server: CapgateServer, user: str | None = None) -> list[dict]:
    """Every ledger event (of `user`), through the admin export."""
    reply = httpx.get(
        f"{server.base_url}/admin/ledger",
        params={"format": "jsonl"},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    reply.raise_for_status()
    events = [json.loads(line) for line in reply.text.splitlines()]
    return [e for e in events if user is None or e["user"] == user]


def wait_for_events(server: CapgateServer, user: str, count: int, timeout: float = 30.0) -> list[dict]:
    """The user's ledger once it holds `count` events (settlement follows the response)."""
    deadline = time.monotonic() + timeout
    while True:
        events = ledger(server, user)
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def usage_left(server: CapgateServer, user: str) -> dict[str, int]:
    """Tokens left per window, as the user reads them at `/v1/usage`."""
    reply = httpx.get(
        f"{server.base_url}/v1/usage", headers={"authorization": f"Bearer {key_of(user)}"}, timeout=10
    )
    reply.raise_for_status()
    return {w["window"]: w["left"] for w in reply.json()["windows"]}


def generated(vllm: VllmServer) -> tuple[float, float]:
    """vLLM's own counters: (generation tokens, prompt tokens) so far."""
    samples = vllm.metrics()
    return sample_sum(samples, "vllm:generation_tokens_total"), sample_sum(
        samples, "vllm:prompt_tokens_total"
    )
