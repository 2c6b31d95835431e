"""A lean HTTP/1.1 transport under the shared `httpx.AsyncClient` to vLLM.

httpx's default transport (httpcore's pool, h11, anyio) was a third of the gateway's CPU time per
proxied request. This one keeps, per origin, a stack of idle keep-alive connections (most recently
used first), writes each request in one call and parses responses with `httptools` (the parser
uvicorn already uses), straight from an `asyncio.Protocol`.

Contract, as httpx expects of a transport:
- the response's stream yields the body as it arrives, without the chunked framing;
- a response read to its end returns its connection to the idle stack (when the server keeps it
  alive); a response closed early closes its connection, which makes vLLM abort the request;
- failures raise httpx's exceptions: `ConnectError`, `ConnectTimeout`, `ReadTimeout` (no answer,
  or no next piece of it, within the read timeout), `ReadError`, `RemoteProtocolError`. A request
  is handed to the socket in one write, so a stalled upstream shows as a `ReadTimeout`.
A request is never sent twice: once its bytes were handed to a socket the server may have read
them (and a generation may be running), so a connection that closes before the response begins
is a `RemoteProtocolError`, never a resend. The keep-alive race this leaves (the server closing
an idle connection as a request is written) is avoided by not reusing a connection idle longer
than `keepalive_expiry` (4 s; vLLM closes idle connections after 5 s) or one whose close has
already arrived.
"""

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

Origin = tuple[bytes, str, int]
_MAX_BUFFERED_CHUNKS = 64  # body pieces held before the socket stops being read


class _Closed(Exception):
    """The server closed the connection before the response began."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; at most one response in flight."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.lost = False
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._paused = False
        self.started = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.chunks: deque[bytes] = deque()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self.complete:
            self._fail(httpx.RemoteProtocolError("data from the server while no request is in flight"))
            return
        self.started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response: {exc}"))
            return
        if len(self.chunks) >= _MAX_BUFFERED_CHUNKS and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._parser is not None and not self.complete and self._error is None:
            if self.head_done and self._delimited_by_close():
                self.complete = True
            else:
                midway = httpx.ReadError("connection closed mid-response")
                self._error = midway if self.started else _Closed()
        self._wake()

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        self.keep_alive = self._parser.should_keep_alive()  # reset once feed_data returns
        self.complete = True

    # used by the transport

    @property
    def reusable(self) -> bool:
        transport = self.transport
        return not self.lost and transport is not None and not transport.is_closing()

    def begin(self, payload: bytes) -> None:
        """Send one request and expect its response."""
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self.started = self.head_done = self.complete = self.keep_alive = False
        self.headers, self.reason, self._error = [], b"", None
        self.chunks.clear()
        self.transport.write(payload)

    @property
    def status_code(self) -> int:
        assert self._parser is not None
        return self._parser.get_status_code()

    async def wait(self, timeout: float | None) -> None:
        """Wait for more of the response; raise what went wrong, or `ReadTimeout`."""
        if self._error is not None:
            raise self._error
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def _delimited_by_close(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def _fail(self, error: Exception) -> None:
        self._error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("timed out waiting for the upstream"))


class _ResponseStream(httpx.AsyncByteStream):
    """The body of one response, piece by piece as it arrives."""

    def __init__(
        self, transport: "Http1Transport", connection: _Connection, read_timeout: float | None
    ) -> None:
        self._transport = transport
        self._connection = connection
        self._read_timeout = read_timeout
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while True:
            if connection.chunks:
                yield connection.chunks.popleft()
            elif connection.complete:
                self._release()
                return
            else:
                await connection.wait(self._read_timeout)

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        if connection.complete and not connection.chunks and connection.keep_alive and connection.reusable:
            self._transport.park(connection)
        else:
            connection.close()


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over keep-alive connections kept per origin; see the module docstring."""

    def __init__(self, *, max_idle_per_origin: int = 256, keepalive_expiry: float = 4.0) -> None:
        self.max_idle_per_origin = max_idle_per_origin
        self.keepalive_expiry = keepalive_expiry
        self._idle: dict[Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        origin = (request.url.raw_scheme, request.url.host, request.url.port or _default_port(request.url))
        payload = _serialize(request, await _body(request))
        connection = self._reuse(origin)
        try:
            if connection is None:
                connection = await self._connect(origin, timeouts.get("connect"))
            try:
                return await self._exchange(connection, payload, request, timeouts)
            except _Closed:
                raise httpx.RemoteProtocolError("server closed the connection without a response") from None
        except BaseException:
            if connection is not None:
                connection.close()
            raise

    async def _exchange(
        self, connection: _Connection, payload: bytes, request: httpx.Request, timeouts: dict
    ) -> httpx.Response:
        connection.begin(payload)
        read_timeout = timeouts.get("read")
        while not connection.head_done:
            await connection.wait(read_timeout)
        return httpx.Response(
            connection.status_code,
            headers=connection.headers,
            stream=_ResponseStream(self, connection, read_timeout),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": connection.reason},
            request=request,
        )

    def _reuse(self, origin: Origin) -> _Connection | None:
        stack = self._idle.get(origin)
        now = time.monotonic()
        while stack:
            connection = stack.pop()
            if connection.reusable and now - connection.idle_since < self.keepalive_expiry:
                return connection
            connection.close()
        return None

    def park(self, connection: _Connection) -> None:
        """Keep a connection whose response was read to the end for the next request."""
        stack = self._idle.setdefault(connection.origin, [])
        if len(stack) >= self.max_idle_per_origin:
            stack.pop(0).close()
        connection.idle_since = time.monotonic()
        stack.append(connection)

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        tls = None
        if scheme == b"https":
            tls = self._ssl = self._ssl or ssl.create_default_context()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, connection = await loop.create_connection(
                    lambda: _Connection(origin), host, port, ssl=tls
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        connection.transport = transport  # uvloop calls connection_made only after returning
        return connection

    async def aclose(self) -> None:
        for stack in self._idle.values():
            for connection in stack:
                connection.close()
        self._idle.clear()


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


async def _body(request: httpx.Request) -> bytes:
    if isinstance(request.stream, httpx.ByteStream):
        return request.content
    return b"".join([part async for part in request.stream])


def _serialize(request: httpx.Request, body: bytes) -> bytes:
    """The request line, headers and body as one write (`Content-Length` framing only)."""
    lines = [request.method.encode() + b" " + request.url.raw_path + b" HTTP/1.1"]
    for name, value in request.headers.raw:
        lower = name.lower()
        if lower == b"transfer-encoding" or (lower == b"content-length" and not body):
            continue
        lines.append(name + b": " + value)
    if body and "content-length" not in request.headers:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
