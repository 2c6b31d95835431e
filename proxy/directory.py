"""Who is calling: API keys resolved against the policy file, then against the accounts in Redis,
through a bounded local cache that every replica keeps coherent by reading the accounts' changes.

A key in the policy file is found in memory. Any other key is looked up by its SHA-256 in
Redis once, then served from the cache with no Redis round trip, its expiry checked locally on
every request. Each account change (a key added or revoked, a user or team changed or deleted)
is appended to a Redis stream with a sequence number; every `sync_interval_s` each replica reads
the entries after the last it saw and evicts what they name, so a revoked key is refused within
`sync_interval_s` plus one Redis round trip. A gap in the numbers (the stream was trimmed past
what this replica read, or Redis lost its data) drops the whole cache. Unknown keys are cached
too, apart, so that a flood of made-up keys cannot evict the real ones. Memory is bounded by
`cache_size` entries per kind whatever the number of accounts, and nothing is loaded at start.
"""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from metering.accounts import AccountStore, KeyRecord, TeamRecord, UserRecord
from policies.index import PolicyIndex, Principal
from policies.keys import hash_key
from proxy.settings import AccountSettings

log = logging.getLogger("capgate.accounts")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_ABSENT = object()
TOUCH_BATCH = 500  # keys per last-used write: about 3 ms of Redis time


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a fetch's failure as seen (its waiters, if any are left, get it too)."""
    if not task.cancelled():
        task.exception()


class AccountUnusable(Exception):
    """An account whose tier or team the policy no longer has: it cannot be served."""


class LRU(Generic[K, V]):
    """A mapping of at most `size` entries; the least recently used is dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | object:
        """The value of `key`, or `_ABSENT`."""
        value = self._entries.get(key, _ABSENT)
        if value is not _ABSENT:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class _Cache(Generic[V]):
    """Records of one kind by id: found ones and unknown ids apart, each bounded."""

    def __init__(self, size: int) -> None:
        self.found: LRU[str, V] = LRU(size)
        self.unknown: LRU[str, None] = LRU(max(1, size // 10))

    def get(self, key: str) -> object:
        value = self.found.get(key)
        if value is not _ABSENT:
            return value
        return None if self.unknown.get(key) is not _ABSENT else _ABSENT

    def put(self, key: str, value: V | None) -> None:
        if value is None:
            self.unknown.put(key, None)
        else:
            self.found.put(key, value)

    def pop(self, key: str) -> None:
        self.found.pop(key)
        self.unknown.pop(key)

    def clear(self) -> None:
        self.found.clear()
        self.unknown.clear()


class Directory:
    """Resolves API keys and user ids to principals: the policy file's, then the accounts'."""

    def __init__(
        self,
        store: AccountStore,
        index: Callable[[], PolicyIndex],
        settings: AccountSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.index = index
        self.settings = settings
        self.clock = clock
        self.keys: _Cache[KeyRecord] = _Cache(settings.cache_size)
        self.users: _Cache[UserRecord] = _Cache(settings.cache_size)
        self.teams: _Cache[TeamRecord] = _Cache(settings.cache_size)
        self._epoch = 0  # bumped by every eviction: a lookup that raced one does not cache
        self._pending: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._last_entry = "0-0"
        self._last_seq: int | None = None
        self._used: dict[str, int] = {}

    async def _lookup(
        self, kind: str, cache: _Cache[V], key: str, fetch: Callable[[str], Awaitable[V | None]]
    ) -> V | None:
        """The record of `key` from `cache`, or fetched once however many requests ask at once.
        The fetch runs as a task of its own: a caller that is cancelled (its client hung up)
        cancels neither the fetch nor the others waiting on it."""
        cached = cache.get(key)
        if cached is not _ABSENT:
            return cached  # type: ignore[return-value]
        task = self._pending.get((kind, key))
        if task is None:
            task = asyncio.ensure_future(self._fetch(kind, cache, key, fetch))
            task.add_done_callback(_retrieved)
            self._pending[(kind, key)] = task
        return await asyncio.shield(task)  # type: ignore[return-value]

    async def _fetch(
        self, kind: str, cache: _Cache[V], key: str, fetch: Callable[[str], Awaitable[V | None]]
    ) -> V | None:
        epoch = self._epoch
        try:
            value = await fetch(key)
        finally:
            del self._pending[(kind, key)]
        if epoch == self._epoch and self._last_seq is not None:
            cache.put(key, value)
        return value

    async def principal_for_key(self, key: str) -> Principal | None:
        """The principal of `key`, or None when no user has it (or it expired). Raises
        `MeterUnavailable` when Redis must be asked and cannot answer, `AccountUnusable` when the
        account's tier or team is gone."""
        index = self.index()
        digest = hash_key(key)
        found = index.principal_for_digest(digest)
        if found is not None:
            return found
        hexdigest = digest[7:]
        record = await self._lookup("key", self.keys, hexdigest, self.store.key)
        if record is None:
            return None
        now_ms = int(self.clock() * 1000)
        if record.expired(now_ms):
            return None
        principal = await self._resolve(record.user, index)
        if principal is not None:
            self._note_use(hexdigest, now_ms)
        return principal

    async def principal_for_user(self, user_id: str) -> Principal | None:
        """The principal of a user id (the policy file's, else an account), or None."""
        index = self.index()
        return index.principal_for_user(user_id) or await self._resolve(user_id, index)

    async def user(self, user_id: str) -> UserRecord | None:
        return await self._lookup("user", self.users, user_id, self.store.user)

    async def team(self, team_id: str) -> TeamRecord | None:
        return await self._lookup("team", self.teams, team_id, self.store.team)

    async def _resolve(self, user_id: str, index: PolicyIndex) -> Principal | None:
        user = await self.user(user_id)
        if user is None:
            return None
        policy = index.policy
        tier_name = user.tier or policy.default_tier
        tier = policy.tiers.get(tier_name or "")
        if tier_name is None or tier is None:
            raise AccountUnusable(
                f"user {user_id!r} has tier {tier_name!r}, which the policy does not define"
            )
        if user.team is None:
            return Principal(user_id, tier_name, tier)
        team = index.teams.get(user.team) or await self.team(user.team)
        if team is None:
            raise AccountUnusable(f"user {user_id!r} is in team {user.team!r}, which does not exist")
        if team.windows is None and team.tier is not None and team.tier not in policy.tiers:
            raise AccountUnusable(
                f"team {user.team!r} has tier {team.tier!r}, which the policy does not define"
            )
        windows = tuple(team.windows) if team.windows is not None else ()
        if team.windows is None and team.tier is not None:
            windows = tuple(policy.tiers[team.tier].caps.windows)
        return Principal(user_id, tier_name, tier, user.team, windows)

    def forget(self, kind: str, item: str) -> None:
        """Evict one record (`user`, `team`, or `key` by its hex digest)."""
        self._epoch += 1
        cache = {"user": self.users, "team": self.teams, "key": self.keys}.get(kind)
        if cache is not None:
            cache.pop(item)

    def forget_all(self) -> None:
        self._epoch += 1
        for cache in (self.keys, self.users, self.teams):
            cache.clear()

    async def start(self) -> None:
        """Start following the changes after the newest one. Until this has run nothing is cached
        (a change made before it would go unseen), and what was being fetched meanwhile is not."""
        last = await self.store.last_change()
        self.forget_all()
        if last is not None:
            self._last_entry, self._last_seq = last.entry, last.seq
        else:
            self._last_seq = 0

    async def sync(self) -> None:
        """Evict what the accounts' changes since the last call name (a background step)."""
        if self._last_seq is None:
            await self.start()
            return
        while True:
            changes = await self.store.changes(self._last_entry)
            if not changes:
                await self._check_not_lost()
                return
            for change in changes:
                if change.seq != self._last_seq + 1:
                    log.warning(
                        "account changes %s..%s not read: dropping the cache", self._last_seq, change.seq
                    )
                    self.forget_all()
                else:
                    self.forget(change.kind, change.id)
                self._last_entry, self._last_seq = change.entry, change.seq
            if len(changes) < 1000:
                return

    async def _check_not_lost(self) -> None:
        """Drop the cache when the changes went back (Redis lost its data, so the accounts cached
        may be gone too), and follow them from where they stand."""
        last = await self.store.last_change()
        if (last.seq if last is not None else 0) < (self._last_seq or 0):
            log.warning("account changes went back (redis lost its data?): dropping the cache")
            self.forget_all()
            self._last_entry, self._last_seq = (last.entry, last.seq) if last is not None else ("0-0", 0)

    def _note_use(self, digest: str, now_ms: int) -> None:
        """Remember that a key served now, for `flush_last_used`; at most `cache_size` keys wait
        (past that a key's use is recorded at a later flush, when it is used again)."""
        if digest in self._used or len(self._used) < self.settings.cache_size:
            self._used[digest] = now_ms

    async def flush_last_used(self) -> None:
        """Write when keys were last used, `TOUCH_BATCH` keys per Redis call so that no call
        holds Redis long (a background step; what a failure left unwritten waits for the next)."""
        pending = list(self._used.items())
        self._used = {}
        for start in range(0, len(pending), TOUCH_BATCH):
            try:
                await self.store.touch_keys(dict(pending[start : start + TOUCH_BATCH]))
            except Exception:
                for digest, ms in pending[start:]:
                    self._note_use(digest, max(ms, self._used.get(digest, 0)))
                raise
