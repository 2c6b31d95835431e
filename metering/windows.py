"""Window arithmetic (pure): which slot of a window's hash a moment falls in, and when it frees.

Calendar windows use the UTC period's index as their one live slot (minutes, hours and days
since the epoch; ISO weeks since the epoch's week; months as year * 12 + month - 1). Rolling
windows split their length into 60 buckets and count the last 60.
"""

from dataclasses import dataclass
from datetime import UTC, datetime

from policies.schema import Window

ROLLING_BUCKETS = 60
_LENGTH_S = {"minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400, "month": 30 * 86400}
_EPOCH_WEEK_SHIFT_DAYS = 3  # 1970-01-01 was a Thursday; ISO weeks start on Monday


@dataclass(frozen=True, slots=True)
class WindowSlot:
    """Where a window stands at one moment: its live slots are [lo, current]."""

    name: str
    cap: int
    current: int
    lo: int
    ttl_s: int
    resets_at: float | None
    bucket_s: float | None

    def retry_after(self, now: float, oldest: int | None) -> int:
        """Whole seconds until tokens come back: the calendar reset, or the oldest bucket's exit."""
        if self.resets_at is not None:
            return max(1, int(self.resets_at - now + 0.999))
        assert self.bucket_s is not None
        exit_slot = (oldest if oldest is not None else self.lo) + ROLLING_BUCKETS
        return max(1, int(exit_slot * self.bucket_s - now + 0.999))


def _month_index(moment: datetime) -> int:
    return moment.year * 12 + moment.month - 1


def slot_of(window: Window, now: float) -> WindowSlot:
    """The slot `now` (seconds since the epoch, UTC) falls in for `window`."""
    length = _LENGTH_S[window.per]
    ttl = 2 * length + 60
    if window.mode == "rolling":
        bucket = length / ROLLING_BUCKETS
        current = int(now // bucket)
        return WindowSlot(
            window.name, window.tokens, current, current - ROLLING_BUCKETS + 1, ttl, None, bucket
        )
    if window.per == "month":
        moment = datetime.fromtimestamp(now, UTC)
        current = _month_index(moment)
        year, month = divmod(current + 1, 12)
        resets = datetime(year, month + 1, 1, tzinfo=UTC).timestamp()
    elif window.per == "week":
        days = int(now // 86400) + _EPOCH_WEEK_SHIFT_DAYS
        current = days // 7
        resets = ((current + 1) * 7 - _EPOCH_WEEK_SHIFT_DAYS) * 86400.0
    else:
        current = int(now // length)
        resets = (current + 1) * float(length)
    return WindowSlot(window.name, window.tokens, current, current, ttl, resets, None)
