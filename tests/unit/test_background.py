"""Supervised loops go on after a step raises, and count it."""

import asyncio

from prometheus_client import REGISTRY

from proxy import background


def errors(loop: str) -> float:
    return REGISTRY.get_sample_value("capgate_background_errors_total", {"loop": loop}) or 0.0


def test_a_step_that_raises_is_counted_and_the_loop_goes_on() -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) in (1, 3):
            raise RuntimeError("boom")

    async def run() -> None:
        task = background.start("unit-test", 0.001, step)
        while len(calls) < 5:
            await asyncio.sleep(0.001)
        await background.stop(task)
        assert task.cancelled()

    before = errors("unit-test")
    asyncio.run(run())
    assert errors("unit-test") - before == 2


def test_plain_functions_are_steps_too() -> None:
    seen: list[bool] = []

    async def run() -> None:
        task = background.start("unit-sync", 0.001, lambda: seen.append(True))
        while not seen:
            await asyncio.sleep(0.001)
        await background.stop(task)

    asyncio.run(run())
    assert seen
