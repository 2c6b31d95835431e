"""The HTTP/1.1 transport under the shared httpx client, against small servers on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import httpx
import pytest

from proxy.transport import Http1Transport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function in its own event loop."""

    @functools.wraps(test)
    def run(*args: object, **kwargs: object) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class Server:
    """A TCP server on 127.0.0.1 that runs `handler` per connection and counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            await self.handler(reader, writer)
        writer.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The head and body of one request with a Content-Length (or none)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def fixed(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=Http1Transport(), timeout=httpx.Timeout(2.0)) as c:
        yield c


@run_async
async def test_keep_alive_connection_is_reused_and_the_request_arrives_whole() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            seen.append((head, body))
            writer.write(fixed(b'{"ok":' + body + b"}", b"Content-Type: application/json\r\n"))

    async with Server(echo) as server, client() as c:
        for index in range(3):
            reply = await c.post(f"{server.url}/v1/echo?x=1", content=str(index).encode())
            assert reply.status_code == 200 and reply.json() == {"ok": index}
            assert reply.headers["content-type"] == "application/json"
    assert server.connections == 1
    head, body = seen[0]
    assert head.startswith(b"POST /v1/echo?x=1 HTTP/1.1\r\n") and b"\r\nHost: 127.0.0.1:" in head
    assert body == b"0"


@run_async
async def test_chunked_stream_arrives_piece_by_piece_without_framing() -> None:
    go_on = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
        await go_on.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await reader.read()

    async with (
        Server(stream) as server,
        client() as c,
        c.stream("POST", f"{server.url}/s", content=b"{}") as reply,
    ):
        pieces = reply.aiter_raw()
        assert await anext(pieces) == b"data: 1"
        go_on.set()
        assert [piece async for piece in pieces] == [b"data: 2"]


@run_async
async def test_closing_a_stream_early_closes_its_connection() -> None:
    eof = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await reader.read()
        eof.set()

    async with Server(endless) as server, client() as c:
        async with c.stream("POST", f"{server.url}/s", content=b"{}") as reply:
            assert await anext(reply.aiter_raw()) == b"hello"
        await asyncio.wait_for(eof.wait(), 2)
        assert server.connections == 1


@run_async
async def test_a_request_on_a_connection_the_server_closed_goes_out_on_a_new_one() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(fixed(b"done"))
        await writer.drain()

    async with Server(once) as server, client() as c:
        assert (await c.get(server.url)).text == "done"
        await asyncio.sleep(0.05)  # the server has closed; the client may not have noticed yet
        assert (await c.get(server.url)).text == "done"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", httpx.ReadError),
        (b"NOT HTTP AT ALL\r\n\r\n", httpx.RemoteProtocolError),
        (b"", httpx.RemoteProtocolError),
    ],
)
@run_async
async def test_broken_responses_raise_httpx_errors(response: bytes, error: type[Exception]) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response)
        await writer.drain()

    async with Server(broken) as server, client() as c:
        with pytest.raises(error):
            await c.get(server.url)


@run_async
async def test_a_silent_upstream_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    async with Server(silent) as server, httpx.AsyncClient(transport=Http1Transport(), timeout=0.2) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.get(server.url)


@run_async
async def test_nothing_listening_is_a_connect_error() -> None:
    async with Server(read_request) as server:
        url = server.url
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(url)


@run_async
async def test_a_request_the_server_read_is_never_sent_again() -> None:
    """The server answers the first request, then reads the second whole and closes without a
    word (as a vLLM killed after reading it would): the transport must not resend it on a new
    connection, where a generation would run twice."""
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            received.append(body)
            if len(received) > 1:
                return  # the connection closes, no response
            writer.write(fixed(b"ok"))
            await writer.drain()

    async with Server(handler) as server, client() as c:
        assert (await c.post(server.url, content=b"first")).text == "ok"
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post(server.url, content=b"second")
        await asyncio.sleep(0.1)
    assert received == [b"first", b"second"]
