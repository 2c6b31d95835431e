"""Settlement that never loses usage: to Redis when it answers, to the local spool otherwise,
and from the spool back to Redis once it answers again."""

import asyncio
import logging

from metering.events import UsageEvent
from metering.meter import Meter, MeterRefused, MeterUnavailable
from metering.spool import Spool, SpooledSettlement, read_items, rewrite
from metering.windows import Scope

log = logging.getLogger("capgate.metering")


class Settler:
    """Settles usage events exactly once, through outages."""

    def __init__(self, meter: Meter, spool: Spool) -> None:
        self.meter = meter
        self.spool = spool
        self._replay_lock = asyncio.Lock()

    async def settle(self, event: UsageEvent, scope: Scope) -> str:
        """'ok', 'late', 'duplicate', or 'spooled' when Redis did not take it (unreachable,
        an error reply, or any other failure: the event is kept whatever went wrong)."""
        try:
            return await self.meter.settle(event, scope)
        except MeterUnavailable as exc:
            log.warning("redis unavailable (%s): usage of %s spooled", exc, event.request_id)
        except Exception as exc:
            log.error("settling %s failed (%r): usage spooled", event.request_id, exc, exc_info=exc)
        await self.spool.append_async(SpooledSettlement(event, scope))
        return "spooled"

    async def replay(self) -> int:
        """Replay spooled settlements into Redis; the number replayed. Stops at the first
        outage and keeps what was not replayed; events the meter refuses are set aside."""
        replayed = 0
        async with self._replay_lock:
            with self.spool.claim() as paths:
                for path in paths:
                    items = read_items(path)
                    refused: list[SpooledSettlement] = []
                    for done, item in enumerate(items):
                        try:
                            await self.meter.settle(item.event, item.scope)
                        except MeterUnavailable:
                            rewrite(path, items[done:])
                            self._set_aside(refused)
                            return replayed
                        except MeterRefused as exc:
                            log.error("spooled usage of %s refused by redis: %s", item.event.request_id, exc)
                            refused.append(item)
                            continue
                        replayed += 1
                    self._set_aside(refused)
                    rewrite(path, [])
        if replayed:
            log.info("replayed %d spooled settlements into redis", replayed)
        return replayed

    def _set_aside(self, refused: list[SpooledSettlement]) -> None:
        if refused:
            log.error("%d refused settlements kept in %s", len(refused), self.spool.set_aside(refused))
