"""Supervised background loops: a step that raises is logged and counted, and the loop goes on."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from proxy import metrics

log = logging.getLogger("capgate.background")


async def every(
    name: str,
    interval_s: float,
    step: Callable[[], Awaitable[None] | None],
    wake: asyncio.Event | None = None,
) -> None:
    """Run `step` every `interval_s` seconds (or as soon as `wake` is set) until cancelled. An
    exception from it is logged with its traceback and counted in
    `capgate_background_errors_total{loop=name}`; the next step runs on schedule."""
    while True:
        if wake is None:
            await asyncio.sleep(interval_s)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval_s)
            wake.clear()
        try:
            result = step()
            if result is not None:
                await result
        except Exception as exc:
            metrics.BACKGROUND_ERRORS.labels(loop=name).inc()
            log.error("background loop %r: step failed: %r", name, exc, exc_info=exc)


def start(
    name: str,
    interval_s: float,
    step: Callable[[], Awaitable[None] | None],
    wake: asyncio.Event | None = None,
) -> asyncio.Task[None]:
    """`every` as a task named `name`."""
    return asyncio.create_task(every(name, interval_s, step, wake), name=f"capgate:{name}")


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel a loop and wait for it to end."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
