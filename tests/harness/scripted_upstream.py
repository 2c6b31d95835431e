"""A scripted stand-in for vLLM, for faults a real vLLM cannot be made to show (a malformed
chunk, garbage from `/v1/models`). It speaks just enough of vLLM's API for capgate to serve
through it: `/v1/models`, `/metrics`, `/health`, `/tokenize`, and the generation routes, which
answer with the events (or the body) the test set. Runs on its own thread, binds 127.0.0.1."""

from __future__ import annotations

import asyncio
import json

from .loop_server import LoopServer

METRICS = b"vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n"


def _response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (
        status,
        content_type,
        len(body),
    )
    return head + body


class ScriptedUpstream(LoopServer):
    """`events` are the SSE `data:` payloads of every stream; `models` the `/v1/models` body."""

    def __init__(self, events: list[bytes], models: bytes | None = None) -> None:
        super().__init__()
        self.events = events
        self.models = models or json.dumps({"data": [{"id": "tiny", "max_model_len": 1024}]}).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line, _, headers = head.partition(b"\r\n")
            path = line.split(b" ")[1].decode()
            length = 0
            for header in headers.split(b"\r\n"):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            writer.write(self._answer(path, body))
            await writer.drain()

    def _answer(self, path: str, body: bytes) -> bytes:
        if path == "/v1/models":
            return _response(200, self.models)
        if path == "/metrics":
            return _response(200, METRICS, b"text/plain")
        if path == "/health":
            return _response(200, b"")
        if path == "/tokenize":
            return _response(200, json.dumps({"count": len(body)}).encode())
        stream = b"".join(b"data: " + event + b"\n\n" for event in self.events)
        return _response(200, stream, b"text/event-stream")
