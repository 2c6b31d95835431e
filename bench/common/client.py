"""A minimal HTTP/1.1 client over asyncio streams, cheap enough not to be what a benchmark measures.

One `Connection` sends one request at a time (keep-alive), reads a body framed by Content-Length
or chunked transfer encoding, and hands each piece of the body to a callback as it arrives, with
the `perf_counter()` time it was read.
"""

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter

OnData = Callable[[bytes, float], None]


@dataclass(slots=True)
class Reply:
    """A response: its status, whether the server keeps the connection open, its body size."""

    status: int
    keep_alive: bool
    body_bytes: int


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The bytes of a `POST path` with a JSON body."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    """A keep-alive HTTP/1.1 connection to `host:port`, reopened when the server closes it. A request
    on a reused connection that the server closed while idle (no byte of a response came back) is
    sent once more on a new connection, as HTTP clients do."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reused = False

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
            self._reused = False
        return self._reader, self._writer

    async def _send(self, raw: bytes) -> tuple[asyncio.StreamReader, bytes]:
        """Send `raw` and read the response head, once more on a new connection if a reused one
        turns out closed."""
        reader, writer = await self._open()
        try:
            writer.write(raw)
            return reader, await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            stale = self._reused and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial)
            await self.close()
            if not stale:
                raise
        reader, writer = await self._open()
        writer.write(raw)
        return reader, await reader.readuntil(b"\r\n\r\n")

    async def request(self, raw: bytes, on_data: OnData | None = None) -> Reply:
        """Send `raw` (a whole request) and read the whole response; `on_data` sees each body piece."""
        try:
            reader, head = await self._send(raw)
            status, headers = _parse_head(head)
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                size = await _read_chunked(reader, on_data)
            else:
                size = int(headers.get(b"content-length", b"0"))
                body = await reader.readexactly(size)
                if on_data is not None:
                    on_data(body, perf_counter())
        except BaseException:
            await self.close()
            raise
        keep_alive = headers.get(b"connection", b"").lower() != b"close"
        if keep_alive:
            self._reused = True
        else:
            await self.close()
        return Reply(status, keep_alive, size)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    status_line, *lines = head[:-4].split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(b" ", 2)[1]), headers


async def _read_chunked(reader: asyncio.StreamReader, on_data: OnData | None) -> int:
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return total
        data = (await reader.readexactly(size + 2))[:-2]
        total += size
        if on_data is not None:
            on_data(data, perf_counter())
