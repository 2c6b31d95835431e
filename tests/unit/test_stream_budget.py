"""StreamBudget's lease logic, with a stand-in meter (the Redis side is tested against Redis)."""

import asyncio

from metering.meter import Extension, MeterUnavailable
from metering.stream_budget import StreamBudget


class Meter:
    """Answers extensions from a budget of `room` tokens, or fails like an unreachable Redis."""

    lease_ttl_s = 120.0

    def __init__(self, room: int, reachable: bool = True) -> None:
        self.room = room
        self.reachable = reachable
        self.asked: list[int] = []

    async def extend(self, reservation: object, *, want_min: int, want_max: int, **_: int) -> Extension:
        self.asked.append(want_max)
        if not self.reachable:
            raise MeterUnavailable("down")
        granted = min(want_max, self.room)
        self.room -= granted
        return Extension(granted if granted >= want_min else 0, self.room, False)


def stream(budget: StreamBudget, tokens: int) -> int:
    """Deliver tokens one by one as a stream would; the count delivered before a cut."""

    async def run() -> int:
        for count in range(1, tokens + 1):
            budget.observe(5, 0, count)
            if not await budget.admit(count):
                return count - 1
            await asyncio.sleep(0)
        await budget.close()
        return tokens

    return asyncio.run(run())


def budget(meter: Meter, *, fail_open: bool = False) -> StreamBudget:
    return StreamBudget(
        meter,
        object(),
        limit=32,
        ceiling=400,
        lease=32,
        counts_completion=True,
        fail_open=fail_open,  # type: ignore[arg-type]
    )


def test_leases_are_asked_ahead_and_granted_until_the_ceiling() -> None:
    meter = Meter(room=1000)
    held = budget(meter)
    assert stream(held, 400) == 400
    assert held.limit == 400 and held.granted_leases == len(meter.asked) and not held.refused


def test_a_refused_lease_cuts_the_stream_within_what_it_held() -> None:
    meter = Meter(room=40)
    held = budget(meter)
    delivered = stream(held, 400)
    assert held.refused and delivered <= held.limit == 72


def test_redis_down_cuts_a_closed_tier_and_not_an_open_one() -> None:
    closed, opened = (
        budget(Meter(room=0, reachable=False)),
        budget(Meter(room=0, reachable=False), fail_open=True),
    )
    assert stream(closed, 100) < 32 and closed.refused
    assert stream(opened, 100) == 100 and not opened.refused
