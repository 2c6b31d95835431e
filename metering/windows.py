"""Window arithmetic (pure): which slot of a window's hash a moment falls in, when it frees, and
which counters (user's and team's, tokens and spend) a request of a scope counts against.

Calendar windows use the UTC period's index as their one live slot (minutes, hours and days
since the epoch; ISO weeks since the epoch's week; months as year * 12 + month - 1). Rolling
windows split their length into 60 buckets and count the last 60.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from metering.keys import UserKeys, team_window_key
from policies.index import Principal
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


_SLOTS_KEPT = 4096
_slots: dict[tuple[int, bool], tuple[Window, float, float, WindowSlot]] = {}


def slot_of(window: Window, now: float, spend: bool = False) -> WindowSlot:
    """The slot `now` (seconds since the epoch, UTC) falls in for `window`; its cap is the
    window's tokens, or with `spend` its money in nano-units. A slot is computed once per window
    and period (kept for the window object it was computed for, at most `_SLOTS_KEPT` of them)."""
    key = (id(window), spend)
    kept = _slots.get(key)
    if kept is not None and kept[0] is window and kept[1] <= now < kept[2]:
        return kept[3]
    slot = _slot_at(window, now, spend)
    if slot.bucket_s is not None:
        begins, ends = slot.current * slot.bucket_s, (slot.current + 1) * slot.bucket_s
    else:
        assert slot.resets_at is not None
        # a month's length varies: its slot is kept from the first moment it was asked for
        begins = now if window.per == "month" else slot.resets_at - _LENGTH_S[window.per]
        ends = slot.resets_at
    if len(_slots) >= _SLOTS_KEPT:
        _slots.clear()
    _slots[key] = (window, begins, ends, slot)
    return slot


def _slot_at(window: Window, now: float, spend: bool) -> WindowSlot:
    cap = _cap(window, spend)
    length = _LENGTH_S[window.per]
    ttl = 2 * length + 60
    if window.mode == "rolling":
        bucket = length / ROLLING_BUCKETS
        current = int(now // bucket)
        return WindowSlot(window.name, cap, current, current - ROLLING_BUCKETS + 1, ttl, None, bucket)
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
    return WindowSlot(window.name, cap, current, current, ttl, resets, None)


def _cap(window: Window, spend: bool) -> int:
    if spend:
        assert window.spend is not None
        return window.spend.nano
    assert window.tokens is not None
    return window.tokens


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose windows a request counts against: a user's (in their team's hash slot when they
    are in a team) and their team's."""

    user_id: str
    windows: tuple[Window, ...] = ()
    team: str | None = None
    team_windows: tuple[Window, ...] = ()
    notify_at: tuple[int, ...] = ()  # the tier's `notify_at` shares, in thousandths

    @classmethod
    def of(cls, principal: Principal) -> "Scope":
        """The scope of a principal's requests: their tier's windows and their team's."""
        caps = principal.tier.caps
        notify = tuple(sorted(round(share * 1000) for share in caps.notify_at))
        return cls(principal.user_id, tuple(caps.windows), principal.team, principal.team_windows, notify)

    @property
    def keys(self) -> UserKeys:
        return UserKeys(self.user_id, self.team)

    @property
    def spends(self) -> bool:
        """Whether any of the scope's windows caps money."""
        return any(w.spend is not None for w in (*self.windows, *self.team_windows))


@dataclass(frozen=True, slots=True)
class Counter:
    """One capped quantity a request counts against: a window's tokens or its spend (nano-units),
    the user's or their team's."""

    key: str
    slot: WindowSlot
    spend: bool
    team: bool

    @property
    def label(self) -> str:
        """How an error or a usage report names it: `day`, `team day`."""
        return f"team {self.slot.name}" if self.team else self.slot.name


def _window_counters(
    windows: Sequence[Window], now: float, key_of: Callable[[str, bool], str], team: bool
) -> list[Counter]:
    counters = []
    for window in windows:
        for spend in (False, True):
            if (window.spend if spend else window.tokens) is not None:
                counters.append(Counter(key_of(window.name, spend), slot_of(window, now, spend), spend, team))
    return counters


def counters_of(scope: Scope, now: float) -> list[Counter]:
    """Every counter of `scope` at `now`: the user's windows, then the team's."""
    counters = _window_counters(scope.windows, now, scope.keys.window, False)
    if scope.team is not None:
        team = scope.team
        counters += _window_counters(
            scope.team_windows, now, lambda name, spend: team_window_key(team, name, spend), True
        )
    return counters
