"""A vLLM-compatible upstream whose own cost is negligible, so that a gateway is what is measured.

A raw asyncio HTTP/1.1 server (keep-alive, no framework) that replays a capture of a real vLLM
(`bench.common.capture`): the same JSON and server-sent event bytes, one event per HTTP chunk as vLLM
sends them, chosen by path, `stream`, `stream_options` and `max_tokens`. Token events after the
first are spaced by `--token-interval-ms` (0: one event per event-loop turn). It also
serves `/v1/models`, `/metrics` (vLLM's text with `vllm:num_requests_running` set to the requests
in flight and nothing waiting), `/tokenize` (a count of one token per prompt byte plus a small
template overhead per message) and `/health`.

Run: `python -m bench.common.fake_upstream --capture FILE --port PORT [--token-interval-ms MS]`.
"""

import argparse
import asyncio
import json
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench.common.capture import DEFAULT_CAPTURE, usage_mode

_GAUGE = re.compile(r"^(vllm:num_requests_(?:running|waiting))(\{[^}]*\})? \S+$", re.MULTILINE)
_MESSAGE_OVERHEAD = 7
_PROMPT_OVERHEAD = 1
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


@dataclass(frozen=True)
class Stream:
    """A captured stream as ready-made HTTP chunks, and which of them wait a token interval."""

    chunks: list[bytes]
    paced: list[bool]


def _chunk(event: bytes) -> bytes:
    data = event + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _stream(events: list[str]) -> Stream:
    raw = [event.encode() for event in events]
    content = [not (e.endswith(b"[DONE]") or b'"choices":[]' in e) for e in raw]
    first = content.index(True)
    paced = [is_content and i > first + 1 for i, is_content in enumerate(content)]
    return Stream([_chunk(e) for e in raw], paced)


def _response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        _REASONS.get(status, b"Error"),
        content_type,
        len(body),
        body,
    )


def _error(status: int, message: str) -> bytes:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return _response(status, json.dumps(body).encode())


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
)


class FakeUpstream:
    """Replays one capture; `serve` answers every connection until cancelled."""

    def __init__(self, capture: dict[str, Any], token_interval_s: float) -> None:
        self.token_interval_s = token_interval_s
        self.models = _response(200, capture["models"].encode())
        self.max_model_len = json.loads(capture["models"])["data"][0].get("max_model_len") or 0
        self.metrics_text: str = capture["metrics"]
        self.unary: dict[tuple[str, int], bytes] = {}
        self.streams: dict[tuple[str, str, int], Stream] = {}
        for reply in capture["replies"]:
            if reply["stream"]:
                key = (reply["path"], reply["usage"], reply["max_tokens"])
                self.streams[key] = _stream(reply["events"])
            else:
                self.unary[(reply["path"], reply["max_tokens"])] = _response(200, reply["body"].encode())
        self.in_flight = 0

    def metrics(self) -> bytes:
        running = str(float(self.in_flight))

        def gauge(match: re.Match[str]) -> str:
            value = running if match[1].endswith("running") else "0.0"
            return f"{match[1]}{match[2] or ''} {value}"

        text = _GAUGE.sub(gauge, self.metrics_text).encode()
        return _response(200, text, b"text/plain; version=0.0.4; charset=utf-8")

    def tokenize(self, body: dict[str, Any]) -> bytes:
        if "messages" in body:
            messages = body["messages"] or []
            text = "".join(str(m.get("content") or "") for m in messages)
            count = _PROMPT_OVERHEAD + _MESSAGE_OVERHEAD * len(messages) + len(text.encode())
        else:
            count = _PROMPT_OVERHEAD + len(str(body.get("prompt", "")).encode())
        reply = {
            "count": count,
            "max_model_len": self.max_model_len,
            "tokens": [0] * count,
            "token_strs": None,
        }
        return _response(200, json.dumps(reply).encode())

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, _, header_block = head.partition(b"\r\n")
                method, path, _ = request_line.split(b" ", 2)
                length = 0
                close = False
                for line in header_block.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection":
                        close = value.strip().lower() == b"close"
                body = await reader.readexactly(length) if length else b""
                await self.answer(method, path.decode(), body, writer)
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(self, method: bytes, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if method == b"GET":
            if path == "/v1/models":
                writer.write(self.models)
            elif path == "/metrics":
                writer.write(self.metrics())
            elif path == "/health":
                writer.write(_response(200, b""))
            else:
                writer.write(_error(404, f"no route {path}"))
            return
        data = json.loads(body) if body else {}
        if path == "/tokenize":
            writer.write(self.tokenize(data))
            return
        limit = data.get("max_completion_tokens") or data.get("max_tokens")
        self.in_flight += 1
        try:
            if data.get("stream"):
                stream = self.streams.get((path, usage_mode(data), limit))
                if stream is None:
                    writer.write(_error(400, f"no captured stream for {path} max_tokens={limit}"))
                    return
                await self.replay(stream, writer)
            else:
                reply = self.unary.get((path, limit))
                writer.write(reply or _error(400, f"no captured reply for {path} max_tokens={limit}"))
        finally:
            self.in_flight -= 1

    async def replay(self, stream: Stream, writer: asyncio.StreamWriter) -> None:
        """Send the stream, token `k` due `k` intervals after the first (so timer granularity
        shifts single events but not the rate)."""
        loop = asyncio.get_running_loop()
        writer.write(_STREAM_HEAD)
        due = loop.time()
        for chunk, paced in zip(stream.chunks, stream.paced, strict=True):
            if paced:
                await writer.drain()
                due += self.token_interval_s
                await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(chunk)
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _serve(capture: Path, host: str, port: int, token_interval_s: float) -> None:
    upstream = FakeUpstream(json.loads(capture.read_text()), token_interval_s)
    server = await asyncio.start_server(upstream.serve, host, port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.common.fake_upstream", description=__doc__)
    parser.add_argument("--capture", type=Path, default=DEFAULT_CAPTURE)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-interval-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    uvloop.run(_serve(args.capture, args.host, args.port, args.token_interval_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
