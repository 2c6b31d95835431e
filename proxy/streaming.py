"""ASGI responses that settle their request whatever way sending them ends.

`SettledResponse` sends a complete body; `RelayResponse` streams server-sent events while
watching for the client hanging up. Both call `finish` after the last byte, after a failed send
and after cancellation, shielded, exactly once. Neither swallows an error: one raised while
streaming is handed to `on_error` (to be logged and recorded) before `finish`.
"""

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

HANG_UP_GRACE_S = 0.25

Finish = Callable[[], Awaitable[None]]


async def run_shielded(finish: Finish) -> None:
    """Run `finish` to its end even if the caller is cancelled meanwhile."""
    await asyncio.shield(asyncio.ensure_future(finish()))


class SettledResponse(Response):
    """A complete response whose `finish` runs once it is sent or sending it failed."""

    def __init__(
        self,
        content: bytes,
        status_code: int,
        headers: dict[str, str],
        media_type: str | None,
        finish: Finish,
    ) -> None:
        super().__init__(content, status_code=status_code, headers=headers, media_type=media_type)
        self.finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await run_shielded(self.finish)


class RelayResponse(StreamingResponse):
    """Streams `body` to the client while watching for the client hanging up.

    On a hang-up `on_disconnect` is called and the body gets `HANG_UP_GRACE_S` to drain and
    finish by itself before it is cancelled; an exception from the body goes to `on_error`;
    `finish` runs after the stream in every case, shielded from cancellation.
    """

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        status_code: int,
        headers: dict[str, str],
        on_disconnect: Callable[[], None],
        on_error: Callable[[BaseException], None],
        finish: Finish,
    ) -> None:
        super().__init__(body, status_code=status_code, headers=headers, media_type="text/event-stream")
        self.on_disconnect = on_disconnect
        self.on_error = on_error
        self.finish = finish
        self._gone = False

    def _hang_up(self) -> None:
        if not self._gone:
            self._gone = True
            self.on_disconnect()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streamer = asyncio.create_task(self._stream(send))

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self._hang_up()
            await asyncio.wait({streamer}, timeout=HANG_UP_GRACE_S)
            streamer.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            streamer.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            if not streamer.cancelled() and streamer.exception() is not None:
                self.on_error(streamer.exception())  # type: ignore[arg-type]
            await run_shielded(self.finish)

    async def _stream(self, send: Send) -> None:
        body = self.body_iterator
        assert isinstance(body, AsyncGenerator)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in body:
                if self._gone:
                    continue
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:
                    self._hang_up()
        finally:
            await body.aclose()
        if not self._gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
