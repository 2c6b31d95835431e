"""Accounts in Redis: users, teams and API keys created at run time, shared by every replica.

Every account key carries the hash tag `{acct}`, so each change is one atomic script on a single
Redis or a Redis Cluster alike (accounts then live on one cluster node; requests do not touch
them while their key is cached, see `proxy.directory`). Keys are stored by SHA-256 only. Every
change is appended to a stream that replicas read to evict their caches (`changes`).
Redis failing surfaces as `MeterUnavailable`.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import TypeAdapter
from redis.exceptions import RedisError

from metering.keys import PREFIX
from metering.meter import MeterUnavailable, RedisClient, decoded, load_script
from policies.schema import Window, Windows

ACCOUNT_PREFIX = f"{PREFIX}:{{acct}}:"
CHANGES_KEY = ACCOUNT_PREFIX + "changes"
_WINDOWS = TypeAdapter(Windows)


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user account: its tier (None: the policy's default) and team."""

    id: str
    tier: str | None
    team: str | None
    created_ms: int


@dataclass(frozen=True, slots=True)
class TeamRecord:
    """A team account: windows from a tier, or its own."""

    id: str
    tier: str | None
    windows: tuple[Window, ...] | None
    created_ms: int


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key of a user account (the key itself is never stored). `expires_ms` 0: never."""

    id: str
    user: str
    name: str
    created_ms: int
    expires_ms: int
    last_used_ms: int

    def expired(self, now_ms: int) -> bool:
        return 0 < self.expires_ms <= now_ms


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the changes stream: what changed (`user`, `team` or `key` by its hash)."""

    entry: str
    seq: int
    kind: str
    id: str


class AccountConflict(Exception):
    """An account change refused: `reason` is the script's ('exists', 'missing', 'no_team',
    'no_user', 'members', 'conflict')."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _text(fields: dict) -> dict[str, str]:
    return {decoded(k): decoded(v) for k, v in fields.items()}


def windows_json(windows: Sequence[Window] | None) -> str:
    """Windows as stored in a team record ('' for none)."""
    if windows is None:
        return ""
    return json.dumps([w.model_dump(mode="json", exclude_none=True) for w in windows])


class AccountStore:
    """Reads and changes accounts in Redis; each change is one script call."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._user = redis.register_script(load_script("account_user"))
        self._key = redis.register_script(load_script("account_key"))
        self._team = redis.register_script(load_script("account_team"))

    async def _call(self, coro) -> object:  # type: ignore[no-untyped-def]
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise MeterUnavailable(str(exc) or type(exc).__name__) from exc

    async def _change(self, script, args: list[object]) -> None:  # type: ignore[no-untyped-def]
        reply = decoded(await self._call(script(keys=[CHANGES_KEY], args=[ACCOUNT_PREFIX, *args])))
        if reply != "ok":
            raise AccountConflict(reply)

    async def user(self, user_id: str) -> UserRecord | None:
        fields = _text(await self._call(self.redis.hgetall(ACCOUNT_PREFIX + "u:" + user_id)))
        if not fields:
            return None
        return UserRecord(
            user_id, fields.get("tier") or None, fields.get("team") or None, int(fields.get("created_ms", 0))
        )

    async def team(self, team_id: str) -> TeamRecord | None:
        fields = _text(await self._call(self.redis.hgetall(ACCOUNT_PREFIX + "t:" + team_id)))
        if not fields:
            return None
        raw = fields.get("windows") or ""
        windows = tuple(_WINDOWS.validate_json(raw)) if raw else None
        return TeamRecord(team_id, fields.get("tier") or None, windows, int(fields.get("created_ms", 0)))

    async def key(self, digest: str) -> KeyRecord | None:
        """The record of the key whose SHA-256 is `digest` (hex), or None."""
        fields = _text(await self._call(self.redis.hgetall(ACCOUNT_PREFIX + "k:" + digest)))
        if not fields:
            return None
        return KeyRecord(
            fields["id"],
            fields["user"],
            fields.get("name", ""),
            int(fields.get("created_ms", 0)),
            int(fields.get("expires_ms", 0)),
            int(fields.get("last_used_ms", 0)),
        )

    async def create_user(self, user_id: str, tier: str | None, team: str | None, now_ms: int, *,
                          static_team: bool = False) -> None:  # fmt: skip
        await self._change(
            self._user, ["create", user_id, tier or "", team or "", now_ms, int(static_team), 0, 0, ""]
        )

    async def update_user(
        self,
        user_id: str,
        *,
        tier: str | None = None,
        set_tier: bool = False,
        team: str | None = None,
        set_team: bool = False,
        was_team: str | None = None,
        static_team: bool = False,
    ) -> None:
        """Set the tier and/or the team; the team only if it still is `was_team`."""
        await self._change(
            self._user,
            ["update", user_id, tier or "", team or "", 0, int(static_team), int(set_tier), int(set_team),
             was_team or ""],
        )  # fmt: skip

    async def begin_team_change(
        self, user_id: str, was_team: str | None, team: str | None, now_ms: int, *, static_team: bool = False
    ) -> None:
        """Take the change of a user's team from `was_team` to `team` for this caller; refused
        ('busy') while another change of it runs (for 30 s at most), ('conflict') once it is no
        longer `was_team`. Setting the team (`update_user`) ends it."""
        await self._change(
            self._user,
            ["move", user_id, "", team or "", now_ms, int(static_team), 0, 0, was_team or ""],
        )

    async def delete_user(self, user_id: str) -> None:
        """Delete a user and every key of theirs."""
        await self._change(self._user, ["delete", user_id, "", "", 0, 0, 0, 0, ""])

    async def add_key(self, user_id: str, digest: str, key_id: str, name: str, created_ms: int,
                      expires_ms: int) -> None:  # fmt: skip
        await self._change(self._key, ["add", user_id, digest, key_id, name, created_ms, expires_ms])

    async def revoke_key(self, key_id: str) -> None:
        await self._change(self._key, ["revoke", key_id])

    async def touch_keys(self, last_used: dict[str, int]) -> None:
        """Record when keys (by hash) were last used; revoked keys are skipped."""
        if last_used:
            args = [item for pair in last_used.items() for item in pair]
            await self._call(self._key(keys=[CHANGES_KEY], args=[ACCOUNT_PREFIX, "touch", *args]))

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        digest = await self._call(self.redis.get(ACCOUNT_PREFIX + "kid:" + key_id))
        return None if digest is None else await self.key(decoded(digest))

    async def keys_of(self, user_id: str) -> list[KeyRecord]:
        """A user's keys, oldest first."""
        ids = await self._call(self.redis.smembers(ACCOUNT_PREFIX + "u:" + user_id + ":keys"))
        records = [await self.key_by_id(decoded(i)) for i in ids]  # type: ignore[union-attr]
        return sorted((r for r in records if r is not None), key=lambda r: (r.created_ms, r.id))

    async def create_team(self, team_id: str, tier: str | None, windows: Sequence[Window] | None,
                          now_ms: int) -> None:  # fmt: skip
        await self._change(self._team, ["create", team_id, tier or "", windows_json(windows), now_ms])

    async def update_team(self, team_id: str, tier: str | None, windows: Sequence[Window] | None) -> None:
        await self._change(self._team, ["update", team_id, tier or "", windows_json(windows), 0])

    async def delete_team(self, team_id: str) -> None:
        """Delete a team; refused ('members') while it has members."""
        await self._change(self._team, ["delete", team_id, "", "", 0])

    async def members(self, team_id: str) -> int:
        return int(await self._call(self.redis.scard(ACCOUNT_PREFIX + "t:" + team_id + ":members")))  # type: ignore[arg-type]

    async def ids(self, kind: str, after: str, limit: int) -> list[str]:
        """Ids of `kind` ('users' or 'teams') after `after`, in order, at most `limit`."""
        start = f"({after}" if after else "-"
        found = await self._call(
            self.redis.zrangebylex(ACCOUNT_PREFIX + kind, start, "+", start=0, num=limit)
        )
        return [decoded(i) for i in found]  # type: ignore[union-attr]

    async def changes(self, after: str, count: int = 1000) -> list[Change]:
        """Entries of the changes stream after entry id `after` ('0-0': from the start)."""
        entries = await self._call(self.redis.xrange(CHANGES_KEY, min=f"({after}", max="+", count=count))
        out = []
        for entry_id, fields in entries:  # type: ignore[union-attr]
            data = _text(fields)
            out.append(Change(decoded(entry_id), int(data["seq"]), data["kind"], data["id"]))
        return out

    async def last_change(self) -> Change | None:
        """The newest entry of the changes stream, None when there is none."""
        entries = await self._call(self.redis.xrevrange(CHANGES_KEY, count=1))
        if not entries:
            return None
        entry_id, fields = entries[0]  # type: ignore[index]
        data = _text(fields)
        return Change(decoded(entry_id), int(data["seq"]), data["kind"], data["id"])
