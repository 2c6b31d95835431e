"""Settlement that never loses usage: to Redis when it answers, to the local spool otherwise,
and from the spool back to Redis once it answers again."""

import asyncio
import logging
from collections.abc import Sequence

from metering.events import UsageEvent
from metering.meter import Meter, MeterUnavailable
from metering.spool import Spool, SpooledSettlement, read_items, rewrite
from policies.schema import Window

log = logging.getLogger("capgate.metering")


class Settler:
    """Settles usage events exactly once, through outages."""

    def __init__(self, meter: Meter, spool: Spool) -> None:
        self.meter = meter
        self.spool = spool
        self._replay_lock = asyncio.Lock()

    async def settle(self, event: UsageEvent, windows: Sequence[Window]) -> str:
        """'ok', 'late', 'duplicate', or 'spooled' when Redis could not be reached."""
        try:
            return await self.meter.settle(event, windows)
        except MeterUnavailable as exc:
            self.spool.append(SpooledSettlement(event, tuple(windows)))
            log.warning("redis unavailable (%s): usage of %s spooled", exc, event.request_id)
            return "spooled"

    async def replay(self) -> int:
        """Replay spooled settlements into Redis; the number replayed. Stops at the first
        failure and keeps what was not replayed."""
        replayed = 0
        async with self._replay_lock:
            with self.spool.claim() as paths:
                for path in paths:
                    items = read_items(path)
                    for done, item in enumerate(items):
                        try:
                            await self.meter.settle(item.event, item.windows)
                        except MeterUnavailable:
                            rewrite(path, items[done:])
                            return replayed
                        replayed += 1
                    rewrite(path, [])
        if replayed:
            log.info("replayed %d spooled settlements into redis", replayed)
        return replayed
