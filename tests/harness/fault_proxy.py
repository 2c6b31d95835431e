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
import threading
from dataclasses import dataclass, field

from .processes import free_port


@dataclass(eq=False)
class _Link:
    """One client connection and its connection to the target."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    dead: bool = False
    half_closed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """A TCP proxy to `host:port` that injects faults; see the module docstring."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self.connections = 0
        self._delay = 0.0
        self._blackhole = False
        self._refuse = False
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        listen = asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self._server = asyncio.run_coroutine_threadsafe(listen, self._loop).result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, action) -> None:  # type: ignore[no-untyped-def]
        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # faults

    def delay(self, seconds: float) -> None:
        self._delay = seconds

    def blackhole(self) -> None:
        def act() -> None:
            self._blackhole = True
            for link in self._links:
                link.dead = True

        self._call(act)

    def reset(self) -> None:
        def act() -> None:
            for link in list(self._links):
                for writer in (link.client, link.server):
                    _abort_with_reset(writer)

        self._call(act)

    def refuse(self) -> None:
        self._refuse = True

    def half_close(self) -> None:
        def act() -> None:
            for link in self._links:
                link.half_closed = True
                with contextlib.suppress(OSError, RuntimeError):
                    link.client.write_eof()

        self._call(act)

    def heal(self) -> None:
        self._delay, self._blackhole, self._refuse = 0.0, False, False

    @property
    def open_links(self) -> int:
        return len(self._links)

    # plumbing

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            for writer in (link.client, link.server):
                writer.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
