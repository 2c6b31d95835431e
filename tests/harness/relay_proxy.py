"""A throttling, counting HTTP reverse proxy for putting a slow or half-blind link before vLLM."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from .loop_server import LoopServer

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


class RelayProxy(LoopServer):
    """A small HTTP reverse proxy in front of vLLM, on its own thread and event loop.

    One request per connection (it asks vLLM for `connection: close`), the requested paths are
    counted in `paths` and the `x-request-id` of each generation request in `request_ids` (an id
    counted twice is a request vLLM was sent twice). With `hide_metrics` it answers `GET /metrics`
    with a 404 itself, so vLLM serves everything but its load cannot be read. With `bytes_per_s`
    it hands generations on at that rate, as a slow link would: vLLM generates as fast as ever
    (and may deliver a whole stream at once when its API process is starved of CPU), but a stream
    stays in flight in capgate for a predictable time, and `hold()` stops the streams under way
    until its block ends (those begun meanwhile flow).
    """

    def __init__(self, target: str, *, hide_metrics: bool = False, bytes_per_s: int | None = None) -> None:
        super().__init__()
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.hide_metrics = hide_metrics
        self.bytes_per_s = bytes_per_s
        self.paths: Counter[str] = Counter()
        self.request_ids: Counter[str] = Counter()
        self._gates: set[asyncio.Event] = set()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Stop handing on the throttled streams now under way until the block ends."""
        held: list[asyncio.Event] = []

        def close_gates() -> None:
            held.extend(self._gates)
            for gate in held:
                gate.clear()

        self.in_loop(close_gates)
        try:
            yield
        finally:
            self.in_loop(lambda: [gate.set() for gate in held])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        request_line, *headers = head[:-4].split(b"\r\n")
        path = request_line.split(b" ")[1].decode()
        self.paths[path] += 1
        if path in GENERATION_PATHS:
            for line in headers:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"x-request-id":
                    self.request_ids[value.strip().decode()] += 1
        if self.hide_metrics and path == "/metrics":
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        kept = [line for line in headers if not line.lower().startswith(b"connection:")]
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        upstream_writer.write(b"\r\n".join([request_line, *kept, b"connection: close"]) + b"\r\n\r\n")
        rate = self.bytes_per_s if path in GENERATION_PATHS else None
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer, rate))

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, rate: int | None = None
    ) -> None:
        """Copy until `source` ends (at most `rate` bytes/s, waiting while held), then close `sink`
        (a hang-up on one side closes the other)."""
        size = 65536 if rate is None else 1024
        gate = asyncio.Event()
        gate.set()
        if rate is not None:
            self._gates.add(gate)
        try:
            while data := await source.read(size):
                await gate.wait()
                sink.write(data)
                await sink.drain()
                if rate is not None:
                    await asyncio.sleep(len(data) / rate)
        except ConnectionError:
            pass
        finally:
            self._gates.discard(gate)
            sink.close()
