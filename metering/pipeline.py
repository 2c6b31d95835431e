"""One pipelined connection to a single Redis, for the meter's scripts on the request path.

Every reservation and settlement is one `EVALSHA`. redis-py spends most of a call in its own
machinery (pool checkout, command packing, parser plumbing), and on a core that has just been
idle that machinery runs several times slower than the round trip itself. This connection is a
plain `asyncio.Protocol`: commands are packed by hiredis, and those sent in one turn of the event
loop are written together; replies are parsed by hiredis and handed to the waiting calls in order
(Redis answers a connection's commands in the order it received them), so any number of
concurrent requests share one socket, with no pool to wait for, and wake Redis once per turn.

Contract: `evalsha` returns the script's reply, loading the script once if Redis does not know
it (`NOSCRIPT`, e.g. after a restart). A reply that is an error raises `ReplyError`; no answer
within `timeout_s` raises `TimeoutError` (the late reply is dropped when it comes); a refused or
lost connection raises `ConnectionError` in every call waiting on it, and the next call connects
again. `redis://` and `unix://` URLs, with a user, password and database.

A peer that vanishes without a reset is detected three ways: a call that times out while nothing
at all came back on the connection drops it (the next call opens a new one), so do
`TIMEOUTS_TO_RECONNECT` calls in a row that time out, and TCP keepalive (probes after
`KEEPALIVE_IDLE_S` idle) makes the kernel close a dead one. `ping` is the heartbeat that finds a
dead connection before a request does. At most
`max_in_flight` calls wait on the connection at once; one more fails at once with
`ConnectionError` rather than queue behind a stalled Redis.
"""

import asyncio
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import cast
from urllib.parse import urlsplit

import hiredis
from redis.asyncio.connection import parse_url

Arg = str | int | bytes
TIMEOUTS_TO_RECONNECT = 3
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3


def _keep_alive(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _expire(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("redis did not answer in time"))


class ReplyError(Exception):
    """Redis answered the command with an error."""


def supports(url: str) -> bool:
    """Whether `url` is one this connection speaks (plain TCP or a Unix socket)."""
    return urlsplit(url).scheme in ("redis", "unix")


class _Replies(asyncio.Protocol):
    """Parses replies off the socket and resolves the waiting calls in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[object]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: ConnectionError | None = None
        self.unsent: list[bytes] = []
        self.last_data_at = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.last_data_at = time.monotonic()
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                waiter = self.waiting.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self._fail(ConnectionError(f"redis protocol error: {exc!r}"))
            assert self.transport is not None
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"redis connection lost: {exc or 'closed by the server'}"))

    def _fail(self, error: ConnectionError) -> None:
        self.lost = error
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError(*error.args))  # one instance per raise

    def send(self, command: bytes) -> asyncio.Future[object]:
        if self.lost is not None:
            raise ConnectionError(*self.lost.args)
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiting.append(waiter)
        if not self.unsent:
            loop.call_soon(self._flush)
        self.unsent.append(command)
        return waiter

    def _flush(self) -> None:
        """Write every command sent since the last flush in one call (one wake-up of Redis)."""
        unsent, self.unsent = self.unsent, []
        if self.lost is None and self.transport is not None:
            self.transport.write(b"".join(unsent))


class ScriptConnection:
    """Runs Lua scripts on one Redis over one pipelined connection."""

    def __init__(self, url: str, timeout_s: float, max_in_flight: int = 4096) -> None:
        if not supports(url):
            raise ValueError(f"not a redis:// or unix:// URL: {url}")
        self.url = url
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self._options = parse_url(url)
        self._replies: _Replies | None = None
        self._connecting = asyncio.Lock()
        self._timeouts_in_a_row = 0

    async def _open(self) -> _Replies:
        loop = asyncio.get_running_loop()
        options = self._options
        if "path" in options:
            transport, replies = await loop.create_unix_connection(_Replies, options["path"])
        else:
            host, port = options.get("host", "127.0.0.1"), options.get("port", 6379)
            transport, replies = await loop.create_connection(_Replies, host, port)
            _keep_alive(transport)
        self._timeouts_in_a_row = 0
        greeting: list[asyncio.Future[object]] = []
        if options.get("password"):
            user = [options["username"]] if options.get("username") else []
            greeting.append(replies.send(hiredis.pack_command(("AUTH", *user, options["password"]))))
        if options.get("db"):
            greeting.append(replies.send(hiredis.pack_command(("SELECT", options["db"]))))
        for answer in greeting:
            reply = await answer
            if isinstance(reply, hiredis.ReplyError):
                assert replies.transport is not None
                replies.transport.close()
                raise ConnectionError(f"redis refused the connection set-up: {reply}")
        return replies

    async def _connection(self) -> _Replies:
        replies = self._replies
        if replies is not None and replies.lost is None:
            return replies
        async with self._connecting:
            if self._replies is None or self._replies.lost is not None:
                self._replies = await self._open()
            return self._replies

    async def _call(self, command: tuple[Arg, ...]) -> object:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        sent_at = time.monotonic()
        replies = self._replies
        if replies is None or replies.lost is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    replies = await self._connection()
            except TimeoutError:
                self._timed_out(sent_at)
                raise
        if len(replies.waiting) >= self.max_in_flight:
            raise ConnectionError(f"{self.max_in_flight} redis calls already in flight")
        sent_at = time.monotonic()
        waiter = replies.send(hiredis.pack_command(command))
        timer = loop.call_at(deadline, _expire, waiter)  # a plain timer: no task cancellation
        try:
            reply = await waiter
        except TimeoutError:
            self._timed_out(sent_at)
            raise
        finally:
            timer.cancel()
        self._timeouts_in_a_row = 0
        if isinstance(reply, hiredis.ReplyError):
            raise ReplyError(str(reply))
        return reply

    async def evalsha(self, sha: str, source: str, keys: Sequence[Arg], args: Sequence[Arg]) -> object:
        """Run the script `source` (whose SHA1 is `sha`) with `keys` and `args`."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self._call(command)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self._call(("SCRIPT", "LOAD", source))
        return await self._call(command)

    def _timed_out(self, sent_at: float) -> None:
        """Count a call sent at `sent_at` that timed out; drop the connection when nothing came
        back on it since, or after too many timeouts in a row."""
        self._timeouts_in_a_row += 1
        replies = self._replies
        if replies is None or replies.lost is not None:
            return
        silent = replies.last_data_at < sent_at
        if silent or self._timeouts_in_a_row >= TIMEOUTS_TO_RECONNECT:
            self._timeouts_in_a_row = 0
            if replies.transport is not None:
                replies.transport.abort()
            replies.connection_lost(TimeoutError("redis calls time out on this connection"))

    async def ping(self) -> None:
        """One `PING`: the heartbeat (raises as any call does)."""
        await self._call(("PING",))

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail with `ConnectionError`."""
        if self._replies is not None and self._replies.transport is not None:
            self._replies.transport.close()
