"""Recording a real vLLM server's answers to the benchmark's requests, for the fake upstream.

A capture holds `/v1/models`, `/metrics`, the one-token chat reply, and the streamed chat reply
for each `stream_options` a client may send (none, usage at the end, usage on every chunk), as
the exact bytes vLLM sent: one server-sent event per entry. `python -m bench.common.capture URL FILE`
records one; `bench/captures/` holds the one the benchmark uses when no vLLM runs.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common.locations import REPO
from bench.common.workloads import CHAT_PATH, ONE_TOKEN, STREAM

DEFAULT_CAPTURE = REPO / "bench" / "captures" / "tiny-vllm.json"
USAGE_OPTIONS: dict[str, dict[str, bool] | None] = {
    "none": None,
    "final": {"include_usage": True},
    "continuous": {"include_usage": True, "continuous_usage_stats": True},
}


def usage_mode(body: dict[str, Any]) -> str:
    """Which of `USAGE_OPTIONS` a request body asks for."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not options.get("include_usage"):
        return "none"
    return "continuous" if options.get("continuous_usage_stats") else "final"


def _events(client: httpx.Client, body: dict[str, Any]) -> list[str]:
    with client.stream("POST", CHAT_PATH, json=body) as response:
        response.raise_for_status()
        raw = b"".join(response.iter_raw())
    return [event.decode() for event in raw.split(b"\n\n") if event]


def capture(base_url: str) -> dict[str, Any]:
    """Record every reply the fake upstream replays from the vLLM server at `base_url`."""
    with httpx.Client(base_url=base_url, timeout=120.0) as client:
        models = client.get("/v1/models")
        models.raise_for_status()
        unary = client.post(CHAT_PATH, json=ONE_TOKEN.body)
        unary.raise_for_status()
        replies: list[dict[str, Any]] = [
            {
                "path": CHAT_PATH,
                "stream": False,
                "usage": "none",
                "max_tokens": ONE_TOKEN.max_tokens,
                "body": unary.text,
            }
        ]
        for mode, options in USAGE_OPTIONS.items():
            body = {k: v for k, v in STREAM.body.items() if k != "stream_options"}
            if options is not None:
                body["stream_options"] = options
            replies.append(
                {
                    "path": CHAT_PATH,
                    "stream": True,
                    "usage": mode,
                    "max_tokens": STREAM.max_tokens,
                    "events": _events(client, body),
                }
            )
        metrics = client.get("/metrics")
        metrics.raise_for_status()
    fingerprint = json.loads(unary.text).get("system_fingerprint")
    return {
        "source": {"server": fingerprint, "captured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "models": models.text,
        "metrics": metrics.text,
        "replies": replies,
    }


def main(argv: list[str]) -> int:
    url, path = argv
    Path(path).write_text(json.dumps(capture(url), indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
