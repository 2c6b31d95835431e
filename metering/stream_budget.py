"""A streamed request's completion allowance: held whole, or extended in leases ahead
of use; a fail-open tier's stream goes on while Redis cannot be reached.

The stream reports vLLM's cumulative usage on every chunk. When half a lease is left, the next
lease is asked for in the background, so a stream that has budget never waits for Redis. A
refusal cuts the stream at once, with half a lease still held: that half pays for the tokens
vLLM generates before it sees the cut, so a cut stream stays within what it held as long as
vLLM's lag behind the proxy is under half a lease. The lease expiry of every request in flight
(streamed or not, queued or generating) is refreshed by the gateway's refresher, not here.
"""

import asyncio

from metering.meter import Meter, MeterUnavailable, Reservation


class StreamBudget:
    """The allowance of one streamed request.

    `limit` is the completion tokens held so far; `ceiling` the most it may reach; `lease` the
    size of each extension (None: the whole ceiling was reserved up front). When Redis cannot be
    reached for an extension, a `fail_open` tier's stream goes on (its usage settles through the
    spool) and any other is cut.
    """

    def __init__(
        self,
        meter: Meter | None,
        reservation: Reservation | None,
        *,
        limit: int,
        ceiling: int,
        lease: int | None,
        counts_completion: bool,
        fail_open: bool = False,
    ) -> None:
        self.meter = meter
        self.reservation = reservation
        self.limit = limit
        self.ceiling = ceiling
        self.lease = lease
        self.counts_completion = counts_completion
        self.fail_open = fail_open
        self.granted_leases = 0
        self.refused = False
        self._pending: asyncio.Task[None] | None = None
        self._prompt = 0
        self._cached = 0
        self._completion = 0

    @property
    def leased(self) -> bool:
        return self.lease is not None and self.counts_completion and self.meter is not None

    @property
    def allowance(self) -> int | None:
        """The completion tokens vLLM is asked for at most: the whole ceiling for a leased stream
        (capgate, not vLLM, stops it at a refused lease), else what is held; None when
        completions are not capped."""
        if not self.counts_completion:
            return None
        return self.ceiling if self.leased else self.limit

    def observe(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
        """Record vLLM's cumulative usage; start an extension when one is due."""
        self._prompt, self._cached, self._completion = prompt_tokens, cached_tokens, completion_tokens
        if not self.leased or self.refused or self._pending is not None or self.limit >= self.ceiling:
            return
        assert self.lease is not None
        if completion_tokens >= self.limit - self.lease // 2:
            self._pending = asyncio.create_task(self._extend())

    async def admit(self, completion_tokens: int) -> bool:
        """Whether a chunk bringing the stream to `completion_tokens` may be delivered.

        Once an extension is refused the stream is cut at the next chunk: vLLM keeps generating
        until it sees the cut, and those tokens come out of the half lease still held, so they
        are paid for. A stream that passes its allowance before the extension's answer waits.
        """
        if not self.leased:
            return True
        while not self.refused and completion_tokens > self.limit:
            if self._pending is None:
                self._pending = asyncio.create_task(self._extend())
            await asyncio.shield(self._pending)
        return not self.refused

    async def close(self) -> None:
        """Wait for a pending Redis call so that settlement comes after it."""
        if self._pending is not None:
            await asyncio.gather(self._pending, return_exceptions=True)

    async def _extend(self) -> None:
        assert self.meter is not None and self.reservation is not None and self.lease is not None
        try:
            want = min(self.lease, self.ceiling - self.limit)
            answer = await self.meter.extend(
                self.reservation,
                want_min=1,
                want_max=want,
                prompt_tokens=self._prompt,
                cached_tokens=self._cached,
                completion_tokens=self._completion,
            )
            if answer.gone or answer.granted == 0:
                self.refused = True
            else:
                self.limit += answer.granted
                self.granted_leases += 1
        except MeterUnavailable:
            if self.fail_open:
                self.limit += want
            else:
                self.refused = True
        finally:
            self._pending = None
