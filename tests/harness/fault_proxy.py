"""A fault-injecting TCP proxy for tests: put it between capgate and Redis, or capgate and vLLM,
and break the link on demand.

Faults (each applies to the connections open now and, until `heal()`, to new ones):
- `delay(s)`: every piece of data waits `s` seconds before it is passed on;
- `blackhole()`: nothing is passed on and nothing is closed, as when a peer vanishes without a
  reset; the data is dropped, so a blackholed connection stays dead after `heal()` (as a TCP
  connection to a host that came back would), while new connections work again;
- `reset()`: every open connection is closed with a TCP reset (SO_LINGER 0), now;
- `refuse()`: new connections are closed as soon as they are accepted;
- `half_close()`: the proxy sends FIN to the client side of every open connection and stops
  passing the server's data, but keeps reading what the client sends.
`heal()` ends `delay`, `blackhole`, `refuse` for what comes next. The proxy runs on its own
thread and event loop and binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

from .loop_server import LoopServer


@dataclass(eq=False)
class _Link:
    """One client connection and its connection to the target."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    dead: bool = False
    half_closed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy(LoopServer):
    """A TCP proxy to `host:port` that injects faults; see the module docstring."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.target = (host, port)
        self.connections = 0
        self._delay = 0.0
        self._blackhole = False
        self._refuse = False
        self._links: set[_Link] = set()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    # faults

    def delay(self, seconds: float) -> None:
        self._delay = seconds

    def blackhole(self) -> None:
        def act() -> None:
            self._blackhole = True
            for link in self._links:
                link.dead = True

        self.in_loop(act)

    def reset(self) -> None:
        def act() -> None:
            for link in list(self._links):
                for writer in (link.client, link.server):
                    _abort_with_reset(writer)

        self.in_loop(act)

    def refuse(self) -> None:
        self._refuse = True

    def half_close(self) -> None:
        def act() -> None:
            for link in self._links:
                link.half_closed = True
                with contextlib.suppress(OSError, RuntimeError):
                    link.client.write_eof()

        self.in_loop(act)

    def heal(self) -> None:
        self._delay, self._blackhole, self._refuse = 0.0, False, False

    # plumbing

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._refuse:
            writer.close()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort_with_reset(writer)
            return
        link = _Link(writer, server_writer, dead=self._blackhole)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, server_writer, to_client=False)),
            asyncio.create_task(self._pump(link, server_reader, writer, to_client=True)),
        ]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.discard(link)

    async def _pump(
        self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, to_client: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if self._delay:
                    await asyncio.sleep(self._delay)
                if link.dead or (to_client and link.half_closed):
                    continue
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not link.dead:
                with contextlib.suppress(OSError, RuntimeError):
                    sink.close()


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
