"""Quantiles of measured samples, the one definition every bench program reports."""

import math
from collections.abc import Sequence


def quantile(values: Sequence[float], q: float) -> float | None:
    """The `q`-quantile (0 to 1) of `values`, interpolated between order statistics; None when
    there are none."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
