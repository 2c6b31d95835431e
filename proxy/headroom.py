"""How many of an upstream's slots the tiers below a protected tier may fill (pure: no I/O).

A protected tier is one with a `ttft_objective_s`. Tiers of lower priority never take the last
`headroom` slots of an upstream, and fill at most `share` of its capacity. `share` adapts to the
protected tier's measured time to first token, additive increase, multiplicative decrease: an
interval in which more than 1% of its requests missed the objective multiplies `share` by
`backoff` (down to `min_share`); an interval that met it adds `step` (up to 1). Missing the
objective with `share` already at `min_share` is what admission cannot fix: `unattainable`.
"""

import math
from dataclasses import dataclass

MISS_RATE = 0.01  # a p99 objective: more than 1% of an interval's first tokens later than it is a miss


@dataclass
class HeadroomControl:
    """The adaptive share of capacity left to the tiers below one protected tier."""

    objective_s: float
    min_share: float
    backoff: float
    step: float
    share: float = 1.0
    unattainable: bool = False
    _seen: int = 0
    _missed: int = 0

    def observe(self, ttft_s: float) -> None:
        """Count one of the protected tier's times to first token."""
        self._seen += 1
        self._missed += ttft_s > self.objective_s

    def adapt(self) -> None:
        """Close an interval: cut the share on a miss, give some back otherwise."""
        missed = self._seen > 0 and self._missed > MISS_RATE * self._seen
        if missed:
            self.unattainable = self.share <= self.min_share
            self.share = max(self.min_share, self.share * self.backoff)
        else:
            self.unattainable = False
            self.share = min(1.0, self.share + self.step)
        self._seen = self._missed = 0

    def limit(self, capacity: int, headroom: int) -> int:
        """The most requests of lower tiers an upstream of `capacity` slots may hold at once."""
        return max(0, min(capacity - headroom, math.floor(capacity * self.share)))
