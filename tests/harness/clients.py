"""Clients as users run them: the official openai SDK."""

from __future__ import annotations

from openai import OpenAI


def openai_client(base_url: str, key: str) -> OpenAI:
    """The official SDK pointed at `base_url` (a capgate, or vLLM itself), no retries."""
    return OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)
