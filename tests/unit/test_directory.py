"""The directory of API keys: the policy file's first, then accounts from a store through bounded
caches kept coherent by the store's changes (an in-memory fake of `AccountStore` stands for Redis:
the directory's logic is pure given the store)."""

import asyncio
from collections import Counter as Tally

import pytest

from metering.accounts import Change, KeyRecord, TeamRecord, UserRecord
from metering.meter import MeterUnavailable
from policies.index import PolicyIndex, Principal
from policies.keys import hash_key
from policies.loader import load_policy
from policies.schema import Window
from proxy.directory import _ABSENT, LRU, TOUCH_BATCH, AccountUnusable, Directory
from proxy.settings import AccountSettings

FILE_KEY = "cg-file-alice"
POLICY = f"""\
default_tier: free
tiers:
  free:
    caps:
      windows: [{{per: day, tokens: 1000}}]
  pro:
    caps:
      windows: [{{per: day, tokens: 9000}}, {{per: month, spend: "50 USD"}}]
  shared:
    caps:
      windows: [{{per: hour, tokens: 500}}]
teams:
  - id: fileteam
    tier: shared
users:
  - id: alice
    tier: pro
    keys: ["{hash_key(FILE_KEY)}"]
"""
INDEX = PolicyIndex(load_policy(POLICY))
T0 = 1_700_000_000.0


def hexdigest(key: str) -> str:
    return hash_key(key)[len("sha256:") :]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


class FakeStore:
    """The part of `AccountStore` the directory uses, in memory, counting calls."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyRecord] = {}
        self.users: dict[str, UserRecord] = {}
        self.teams: dict[str, TeamRecord] = {}
        self.log: list[Change] = []
        self.calls: Tally[str] = Tally()
        self.touched: list[dict[str, int]] = []
        self.touch_error: Exception | None = None
        self.gate: asyncio.Event | None = None  # when set, key lookups wait for it

    # helpers
    def add_user(self, user_id: str, tier: str | None = "free", team: str | None = None) -> None:
        self.users[user_id] = UserRecord(user_id, tier, team, 0)

    def add_key(self, key: str, user: str, expires_ms: int = 0) -> str:
        digest = hexdigest(key)
        self.keys[digest] = KeyRecord("key_" + digest[:6], user, "", 0, expires_ms, 0)
        return digest

    def change(self, kind: str, item: str, seq: int | None = None) -> None:
        seq = (self.log[-1].seq + 1 if self.log else 1) if seq is None else seq
        self.log.append(Change(f"{seq}-0", seq, kind, item))

    # the AccountStore interface
    async def key(self, digest: str) -> KeyRecord | None:
        self.calls["key"] += 1
        record = self.keys.get(digest)  # read now; with a gate, the answer is held back
        if self.gate is not None:
            await self.gate.wait()
        return record

    async def user(self, user_id: str) -> UserRecord | None:
        self.calls["user"] += 1
        return self.users.get(user_id)

    async def team(self, team_id: str) -> TeamRecord | None:
        self.calls["team"] += 1
        return self.teams.get(team_id)

    async def changes(self, after: str, count: int = 1000) -> list[Change]:
        self.calls["changes"] += 1
        seq = int(after.split("-")[0])
        return [c for c in self.log if int(c.entry.split("-")[0]) > seq][:count]

    async def last_change(self) -> Change | None:
        self.calls["last_change"] += 1
        return self.log[-1] if self.log else None

    async def touch_keys(self, last_used: dict[str, int]) -> None:
        self.calls["touch_keys"] += 1
        self.touched.append(dict(last_used))
        if self.touch_error is not None:
            raise self.touch_error


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def directory(store: FakeStore, cache_size: int = 100, clock: Clock | None = None) -> Directory:
    """A directory following the store's changes, as the app starts it before serving."""
    made = Directory(store, lambda: INDEX, AccountSettings(cache_size=cache_size), clock or Clock())  # type: ignore[arg-type]
    run(made.start())
    return made


def windows(*specs: dict[str, object]) -> tuple[Window, ...]:
    return tuple(Window.model_validate(spec) for spec in specs)


# --- LRU ------------------------------------------------------------------------------------------


def test_lru_is_bounded_and_drops_the_least_recently_used() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    lru.put("c", 3)
    assert len(lru) == 2
    assert lru.get("a") is _ABSENT
    assert (lru.get("b"), lru.get("c")) == (2, 3)


def test_lru_get_refreshes() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3)
    assert lru.get("b") is _ABSENT
    assert (lru.get("a"), lru.get("c")) == (1, 3)


def test_lru_put_refreshes_and_overwrites() -> None:
    lru: LRU[str, int | None] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    lru.put("a", 10)
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), len(lru)) == (10, _ABSENT, 2)
    lru.put("n", None)  # None is a value, not absence
    assert lru.get("n") is None


def test_lru_pop_and_clear() -> None:
    lru: LRU[str, int] = LRU(3)
    lru.put("a", 1)
    lru.put("b", 2)
    lru.pop("a")
    lru.pop("missing")
    assert (lru.get("a"), len(lru)) == (_ABSENT, 1)
    lru.clear()
    assert (lru.get("b"), len(lru)) == (_ABSENT, 0)


# --- resolving keys -------------------------------------------------------------------------------


def test_file_key_is_found_without_the_store() -> None:
    store = FakeStore()
    made = directory(store)
    asked = dict(store.calls)
    principal = run(made.principal_for_key(FILE_KEY))
    assert principal == INDEX.principal_for_key(FILE_KEY)
    assert store.calls == asked


def test_account_key_resolves_to_its_tier_and_team_windows() -> None:
    store = FakeStore()
    store.teams["eng"] = TeamRecord("eng", None, windows({"per": "week", "spend": "3 USD"}), 0)
    store.teams["viatier"] = TeamRecord("viatier", "shared", None, 0)
    store.add_user("bob", "pro", "eng")
    store.add_user("carol", None, "viatier")  # the policy's default tier
    store.add_user("dave", "free", "fileteam")  # a team of the policy file
    store.add_user("erin", "free")
    for user in ("bob", "carol", "dave", "erin"):
        store.add_key("cg-" + user, user)
    d = directory(store)
    pro, shared = INDEX.policy.tiers["pro"], INDEX.policy.tiers["shared"]
    bob = run(d.principal_for_key("cg-bob"))
    assert bob == Principal("bob", "pro", pro, "eng", windows({"per": "week", "spend": "3 USD"}))
    carol = run(d.principal_for_key("cg-carol"))
    assert carol == Principal(
        "carol", "free", INDEX.policy.tiers["free"], "viatier", tuple(shared.caps.windows)
    )
    dave = run(d.principal_for_key("cg-dave"))
    assert dave is not None and (dave.team, dave.team_windows) == ("fileteam", tuple(shared.caps.windows))
    erin = run(d.principal_for_key("cg-erin"))
    assert erin == Principal("erin", "free", INDEX.policy.tiers["free"])
    assert store.calls["team"] == 2  # the file's team is not asked of the store


def test_unknown_key_is_none() -> None:
    assert run(directory(FakeStore()).principal_for_key("cg-nobody")) is None


def test_cached_lookups_do_not_ask_the_store_again() -> None:
    store = FakeStore()
    store.teams["eng"] = TeamRecord("eng", "shared", None, 0)
    store.add_user("bob", "pro", "eng")
    store.add_key("cg-bob", "bob")
    d = directory(store)

    async def scenario() -> list[Principal | None]:
        return [await d.principal_for_key("cg-bob") for _ in range(5)]

    found = run(scenario())
    assert found[0] is not None and all(p == found[0] for p in found)
    assert (store.calls["key"], store.calls["user"], store.calls["team"]) == (1, 1, 1)
    run(d.principal_for_key("cg-nobody"))
    run(d.principal_for_key("cg-nobody"))
    assert store.calls["key"] == 2  # unknown keys are cached too


def test_expired_key_is_refused_by_the_clock() -> None:
    store = FakeStore()
    store.add_user("bob")
    store.add_key("cg-bob", "bob", expires_ms=int(T0 * 1000) + 5_000)
    store.add_key("cg-old", "bob", expires_ms=int(T0 * 1000) - 1)
    clock = Clock()
    d = directory(store, clock=clock)
    assert run(d.principal_for_key("cg-old")) is None
    assert run(d.principal_for_key("cg-bob")) is not None
    clock.now = T0 + 5.0  # expiry is inclusive: expired at expires_ms
    assert run(d.principal_for_key("cg-bob")) is None
    assert store.calls["key"] == 2  # checked locally against the cached record
    assert hexdigest("cg-bob") in d._used and hexdigest("cg-old") not in d._used


def test_sync_evicts_a_revoked_key() -> None:
    store = FakeStore()
    store.add_user("bob")
    digest = store.add_key("cg-bob", "bob")
    d = directory(store)
    run(d.sync())  # first call: start after the newest change
    assert run(d.principal_for_key("cg-bob")) is not None
    del store.keys[digest]
    assert run(d.principal_for_key("cg-bob")) is not None  # still cached: not synced yet
    store.change("key", digest)
    run(d.sync())
    assert run(d.principal_for_key("cg-bob")) is None
    assert store.calls["key"] == 2


def test_sync_evicts_a_changed_user_and_team() -> None:
    store = FakeStore()
    store.teams["eng"] = TeamRecord("eng", "shared", None, 0)
    store.add_user("bob", "free", "eng")
    store.add_key("cg-bob", "bob")
    d = directory(store)
    run(d.sync())
    assert run(d.principal_for_key("cg-bob")).tier_name == "free"  # type: ignore[union-attr]
    store.add_user("bob", "pro", "eng")
    store.teams["eng"] = TeamRecord("eng", None, windows({"per": "day", "tokens": 7}), 0)
    store.change("user", "bob")
    run(d.sync())
    bob = run(d.principal_for_key("cg-bob"))
    assert bob is not None and bob.tier_name == "pro"
    assert [w.name for w in bob.team_windows] == ["hour"]  # the team itself was not named yet
    store.change("team", "eng")
    run(d.sync())
    bob = run(d.principal_for_key("cg-bob"))
    assert bob is not None and [(w.name, w.tokens) for w in bob.team_windows] == [("day", 7)]
    assert store.calls["key"] == 1  # the key itself stayed cached


def test_sync_starts_after_the_newest_change() -> None:
    store = FakeStore()
    store.add_user("bob")
    digest = store.add_key("cg-bob", "bob")
    store.change("key", digest)
    store.change("user", "x")
    d = directory(store)
    assert d._last_seq == 2
    run(d.principal_for_key("cg-bob"))
    run(d.sync())  # the old entries are not replayed
    run(d.principal_for_key("cg-bob"))
    assert store.calls["key"] == 1


def test_sync_reads_every_page_of_changes() -> None:
    store = FakeStore()
    store.add_user("bob")
    digest = store.add_key("cg-bob", "bob")
    d = directory(store)
    run(d.sync())
    run(d.principal_for_key("cg-bob"))
    for i in range(1000):
        store.change("user", f"u{i}")
    store.change("key", digest)  # the 1001st: on the second page
    pages = store.calls["changes"]
    run(d.sync())
    assert store.calls["changes"] - pages == 2
    run(d.principal_for_key("cg-bob"))
    assert store.calls["key"] == 2


def test_a_gap_in_change_numbers_drops_every_cache() -> None:
    store = FakeStore()
    store.teams["eng"] = TeamRecord("eng", "shared", None, 0)
    store.add_user("bob", "free", "eng")
    store.add_key("cg-bob", "bob")
    d = directory(store)
    run(d.sync())
    run(d.principal_for_key("cg-bob"))
    run(d.principal_for_key("cg-nobody"))
    store.change("user", "somebody-else", seq=1)
    run(d.sync())
    run(d.principal_for_key("cg-bob"))
    assert (store.calls["key"], store.calls["user"]) == (2, 1)  # in sequence: nothing of bob's evicted
    store.change("user", "somebody-else", seq=5)  # 2..4 were never read
    run(d.sync())
    run(d.principal_for_key("cg-bob"))
    run(d.principal_for_key("cg-nobody"))
    assert (store.calls["key"], store.calls["user"], store.calls["team"]) == (4, 2, 2)
    store.change("user", "somebody-else")  # 6 follows 5
    run(d.sync())
    run(d.principal_for_key("cg-bob"))
    assert store.calls["key"] == 4


def test_concurrent_lookups_of_one_key_ask_the_store_once() -> None:
    store = FakeStore()
    store.add_user("bob")
    store.add_key("cg-bob", "bob")
    d = directory(store)

    async def scenario() -> list[Principal | None]:
        store.gate = asyncio.Event()
        lookups = asyncio.gather(*(d.principal_for_key("cg-bob") for _ in range(20)))
        await asyncio.sleep(0)
        store.gate.set()
        return await lookups

    found = run(scenario())
    assert len(found) == 20 and all(p is not None and p.user_id == "bob" for p in found)
    assert store.calls["key"] == 1
    assert d._pending == {}


def test_concurrent_lookups_share_a_failure() -> None:
    class Down(FakeStore):
        async def key(self, digest: str) -> KeyRecord | None:
            self.calls["key"] += 1
            await asyncio.sleep(0)
            raise MeterUnavailable("down")

    store = Down()
    d = directory(store)

    async def scenario() -> list[object]:
        return await asyncio.gather(*(d.principal_for_key("cg-x") for _ in range(5)), return_exceptions=True)

    results = run(scenario())
    assert all(isinstance(r, MeterUnavailable) for r in results)
    assert store.calls["key"] == 1
    assert d._pending == {}
    with pytest.raises(MeterUnavailable):  # a failure is not cached: the next lookup asks again
        run(d.principal_for_key("cg-x"))
    assert store.calls["key"] == 2


def test_a_lookup_racing_an_eviction_does_not_cache_the_stale_record() -> None:
    store = FakeStore()
    store.add_user("bob")
    digest = store.add_key("cg-bob", "bob")
    d = directory(store)

    async def scenario() -> tuple[Principal | None, Principal | None]:
        store.gate = asyncio.Event()
        racing = asyncio.ensure_future(d.principal_for_key("cg-bob"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert store.calls["key"] == 1  # the fetch is under way...
        del store.keys[digest]  # ...when the key is revoked,
        d.forget("key", digest)  # and the revocation is read
        store.gate.set()
        first = await racing
        store.gate = None
        return first, await d.principal_for_key("cg-bob")

    first, second = run(scenario())
    assert first is not None  # the racing request read before the revocation
    assert second is None
    assert store.calls["key"] == 2


def test_unknown_keys_do_not_evict_known_ones() -> None:
    store = FakeStore()
    store.add_user("bob")
    for i in range(5):
        store.add_key(f"cg-known-{i}", "bob")
    d = directory(store, cache_size=10)

    async def scenario() -> None:
        for i in range(5):
            assert await d.principal_for_key(f"cg-known-{i}") is not None
        for i in range(500):
            assert await d.principal_for_key(f"cg-made-up-{i}") is None
        for i in range(5):
            assert await d.principal_for_key(f"cg-known-{i}") is not None

    run(scenario())
    assert store.calls["key"] == 5 + 500
    assert len(d.keys.found) == 5
    assert len(d.keys.unknown) == 1  # a tenth of the cache size


def test_known_keys_are_bounded_too() -> None:
    store = FakeStore()
    store.add_user("bob")
    for i in range(4):
        store.add_key(f"cg-{i}", "bob")
    d = directory(store, cache_size=3)

    async def scenario() -> None:
        for i in range(4):
            await d.principal_for_key(f"cg-{i}")
        await d.principal_for_key("cg-0")  # dropped by cg-3

    run(scenario())
    assert len(d.keys.found) == 3
    assert store.calls["key"] == 5


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        pytest.param(lambda s: s.add_user("bob", "gold"), "has tier 'gold'", id="unknown-tier"),
        pytest.param(lambda s: s.add_user("bob", "free", "ghosts"), "team 'ghosts'", id="missing-team"),
        pytest.param(
            lambda s: (
                s.teams.__setitem__("eng", TeamRecord("eng", "gone", None, 0)),
                s.add_user("bob", "free", "eng"),
            ),
            "team 'eng' has tier 'gone'",
            id="team-with-unknown-tier",
        ),
    ],
)
def test_unusable_account(setup: object, fragment: str) -> None:
    store = FakeStore()
    setup(store)  # type: ignore[operator]
    store.add_key("cg-bob", "bob")
    d = directory(store)
    with pytest.raises(AccountUnusable, match=fragment):
        run(d.principal_for_key("cg-bob"))
    with pytest.raises(AccountUnusable, match=fragment):
        run(d.principal_for_user("bob"))
    assert d._used == {}


def test_user_without_tier_needs_a_default_tier() -> None:
    index = PolicyIndex(load_policy("tiers: {free: {}}\n"))
    store = FakeStore()
    store.add_user("bob", None)
    store.add_key("cg-bob", "bob")
    d = Directory(store, lambda: index, AccountSettings(cache_size=10), Clock())  # type: ignore[arg-type]
    with pytest.raises(AccountUnusable, match="has tier None"):
        run(d.principal_for_key("cg-bob"))


def test_key_of_a_deleted_user_is_none() -> None:
    store = FakeStore()
    store.add_key("cg-orphan", "nobody")
    assert run(directory(store).principal_for_key("cg-orphan")) is None


def test_principal_for_user_prefers_the_policy_file() -> None:
    store = FakeStore()
    store.add_user("alice", "free")  # shadowed by the file's alice
    store.add_user("bob", "pro")
    d = directory(store)
    assert run(d.principal_for_user("alice")) == INDEX.principal_for_user("alice")
    bob = run(d.principal_for_user("bob"))
    assert bob is not None and bob.tier_name == "pro"
    assert run(d.principal_for_user("nobody")) is None
    assert store.calls["user"] == 2


# --- last used ------------------------------------------------------------------------------------


def test_flush_last_used_writes_the_keys_used() -> None:
    store = FakeStore()
    store.add_user("bob")
    bob = store.add_key("cg-bob", "bob")
    carol = store.add_key("cg-carol", "bob")
    clock = Clock()
    d = directory(store, clock=clock)
    run(d.principal_for_key("cg-bob"))
    run(d.principal_for_key(FILE_KEY))  # the policy file's keys are not accounts
    clock.now = T0 + 2
    run(d.principal_for_key("cg-carol"))
    run(d.principal_for_key("cg-bob"))
    run(d.flush_last_used())
    assert store.touched == [{bob: int(T0 * 1000) + 2000, carol: int(T0 * 1000) + 2000}]
    run(d.flush_last_used())
    assert len(store.touched) == 1  # nothing used since: nothing written


def test_flush_last_used_keeps_the_keys_when_the_store_fails() -> None:
    store = FakeStore()
    store.add_user("bob")
    bob = store.add_key("cg-bob", "bob")
    carol = store.add_key("cg-carol", "bob")
    clock = Clock()
    d = directory(store, clock=clock)
    run(d.principal_for_key("cg-bob"))
    run(d.principal_for_key("cg-carol"))
    store.touch_error = MeterUnavailable("down")
    with pytest.raises(MeterUnavailable):
        run(d.flush_last_used())
    assert store.touched == [{bob: int(T0 * 1000), carol: int(T0 * 1000)}]
    clock.now = T0 + 1
    run(d.principal_for_key("cg-bob"))  # used again meanwhile: the newer time wins
    store.touch_error = None
    run(d.flush_last_used())
    assert store.touched[-1] == {bob: int(T0 * 1000) + 1000, carol: int(T0 * 1000)}
    written = len(store.touched)
    run(d.flush_last_used())
    assert len(store.touched) == written


def test_a_cancelled_lookup_does_not_cancel_the_requests_waiting_on_it() -> None:
    store = FakeStore()
    store.add_user("bob")
    store.add_key("cg-bob", "bob")
    d = directory(store)

    async def scenario() -> Principal | None:
        store.gate = asyncio.Event()
        first = asyncio.ensure_future(d.principal_for_key("cg-bob"))
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(d.principal_for_key("cg-bob"))
        await asyncio.sleep(0)
        first.cancel()  # e.g. its client hung up
        await asyncio.sleep(0)
        store.gate.set()
        return await waiter

    found = run(scenario())
    assert found is not None and found.user_id == "bob"


def test_nothing_is_cached_before_the_changes_are_followed() -> None:
    """A key looked up before `start` could be revoked by a change `start` then skips over."""
    store = FakeStore()
    store.add_user("bob")
    store.add_key("cg-bob", "bob")
    d = Directory(store, lambda: INDEX, AccountSettings(), Clock())  # type: ignore[arg-type]
    run(d.principal_for_key("cg-bob"))
    run(d.principal_for_key("cg-bob"))
    assert store.calls["key"] == 2
    run(d.start())
    run(d.principal_for_key("cg-bob"))
    run(d.principal_for_key("cg-bob"))
    assert store.calls["key"] == 3


def test_last_used_times_are_written_in_bounded_batches_and_held_in_bounded_memory() -> None:
    store = FakeStore()
    store.add_user("bob")
    digests = [store.add_key(f"cg-bob-{i}", "bob") for i in range(TOUCH_BATCH + 300)]
    d = directory(store, cache_size=TOUCH_BATCH + 200)
    for i in range(TOUCH_BATCH + 300):
        run(d.principal_for_key(f"cg-bob-{i}"))
    run(d.flush_last_used())
    assert [len(batch) for batch in store.touched] == [TOUCH_BATCH, 200]
    assert set().union(*store.touched) == set(digests[: TOUCH_BATCH + 200])


def test_changes_going_back_drop_the_cache() -> None:
    """Redis restarted empty: the accounts cached may be gone, and no change says so."""
    store = FakeStore()
    store.add_user("bob")
    digest = store.add_key("cg-bob", "bob")
    store.change("user", "x")
    d = directory(store)
    run(d.principal_for_key("cg-bob"))
    run(d.sync())
    run(d.principal_for_key("cg-bob"))
    assert store.calls["key"] == 1
    store.log.clear()
    del store.keys[digest]
    run(d.sync())
    assert run(d.principal_for_key("cg-bob")) is None
    store.change("key", "other")  # the numbers start again from 1, and are followed from there
    run(d.sync())
    assert d._last_seq == 1
