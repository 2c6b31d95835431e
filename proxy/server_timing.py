"""What capgate itself cost a generation request, apart from vLLM's time, as its `Server-Timing`.

Three entries, in milliseconds: `capgate-pre`, capgate's time from the request's arrival until it
was forwarded (authentication, validation, policy, admission, the reservation); `upstream`, the
wait for vLLM's answer to begin (its whole answer when not streamed); `capgate`, capgate's own
time in total until the response began, that is everything but the upstream's wait. A streamed
response's header leaves with its first byte, so the relay's per-token work is not in it (see
`capgate_request_duration_seconds`). A request refused before it was forwarded has `capgate` only.
"""

from dataclasses import dataclass
from typing import Self


def _entry(name: str, seconds: float, description: str) -> str:
    return f'{name};dur={seconds * 1000:.3f};desc="{description}"'


@dataclass(frozen=True, slots=True)
class GatewayTime:
    """Seconds: before forwarding and the upstream's wait (None when never forwarded), capgate's
    own in total. None of them is negative."""

    pre: float | None
    upstream: float | None
    total: float

    @classmethod
    def of(cls, started: float, forwarded: float | None, answered: float | None, ended: float) -> Self:
        """The times of a response that began at `ended`, of a request that arrived at `started`, was
        forwarded at `forwarded` and answered at `answered` (monotonic seconds; None when it never
        got that far)."""
        if forwarded is None:
            return cls(None, None, max(0.0, ended - started))
        waited = max(0.0, (answered if answered is not None else ended) - forwarded)
        return cls(max(0.0, forwarded - started), waited, max(0.0, ended - started - waited))

    def header(self) -> str:
        """The `Server-Timing` header's value."""
        total = _entry("capgate", self.total, "capgate in total")
        if self.pre is None or self.upstream is None:
            return total
        return ", ".join(
            [
                _entry("capgate-pre", self.pre, "capgate before the upstream"),
                _entry("upstream", self.upstream, "vLLM until its answer began"),
                total,
            ]
        )
