"""The order in which admission lets held requests through (pure: no I/O).

Best (lowest) priority first. Within one priority the users take turns, weighted by the tokens
each request asks for: start-time fair queuing, where a request's start tag is the later of the
priority's virtual time and its user's previous finish tag, and its finish tag is the start plus
its cost. One user's hundred held requests get start tags a hundred costs apart, so a second
user's single request starts at the current virtual time and goes out after at most one of them.
"""

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class _Entry(Generic[T]):
    priority: int
    start: float
    seq: int
    user: str = field(compare=False)
    item: T = field(compare=False)
    live: bool = field(default=True, compare=False)


class FairQueue(Generic[T]):
    """Held items by priority, then by start tag; `remove` is O(1) (entries are dropped lazily)."""

    def __init__(self) -> None:
        self._heap: list[_Entry[T]] = []
        self._seq = itertools.count()
        self._clock: dict[int, float] = {}
        self._finish: dict[tuple[int, str], float] = {}
        self._entries: dict[int, _Entry[T]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, item: T, *, priority: int, user: str, cost: int) -> None:
        """Hold `item` for `user` at `priority`; `cost` (tokens asked, at least 1) weighs its turn."""
        key = (priority, user)
        start = max(self._clock.get(priority, 0.0), self._finish.get(key, 0.0))
        self._finish[key] = start + max(1, cost)
        entry = _Entry(priority, start, next(self._seq), user, item)
        self._entries[id(item)] = entry
        heapq.heappush(self._heap, entry)

    def peek(self) -> T | None:
        """The item that goes next, or None when nothing is held."""
        while self._heap and not self._heap[0].live:
            heapq.heappop(self._heap)
        return self._heap[0].item if self._heap else None

    def pop(self) -> T:
        """Take the item that goes next (the queue must not be empty)."""
        self.peek()
        entry = heapq.heappop(self._heap)
        del self._entries[id(entry.item)]
        self._clock[entry.priority] = entry.start
        self._forget_idle_users()
        return entry.item

    def take(self, item: T) -> None:
        """Take a held item out of turn (it was let through): the clock moves as if popped."""
        entry = self._entries.pop(id(item), None)
        if entry is not None:
            entry.live = False
            self._clock[entry.priority] = max(self._clock.get(entry.priority, 0.0), entry.start)
            self._forget_idle_users()

    def remove(self, item: T) -> None:
        """Drop a held item (its requester gave up); unknown items are ignored."""
        entry = self._entries.pop(id(item), None)
        if entry is not None:
            entry.live = False

    def best_priority(self) -> int | None:
        """The priority of the item that goes next."""
        return self._heap[0].priority if self.peek() is not None else None

    def _forget_idle_users(self) -> None:
        """Drop finish tags no later than their priority's clock (they no longer push anyone
        back), so that the table stays as small as the set of users with a turn to come."""
        if len(self._finish) <= 2 * len(self._entries) + 64:
            return
        self._finish = {
            key: finish for key, finish in self._finish.items() if finish > self._clock.get(key[0], 0.0)
        }
