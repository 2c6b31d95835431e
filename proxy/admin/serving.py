"""Account management: users, teams and API keys, for the admin API and the CLI alike.

Each operation checks its references against the policy (a tier must exist; a user id or team id
must not be the policy file's), changes Redis in one atomic script, and answers a JSON-ready
mapping, or raises an `APIError` (404 unknown, 409 conflict, 400 invalid, 503 Redis
unavailable). A team change moves the user's own counters to the new team's hash slot
(`Meter.start_move` / `finish_move`) before the user's record names the new team, so their caps
carry over exactly: until the record changes, the old home refuses the user's holds (a 503 to
retry). One change of a user's team runs at a time (another is a 409 while it runs), and a
change that fails midway is finished by running it again (after 30 s, when its hold lapses).
"""

import secrets
import time
from collections.abc import Callable
from typing import Any

from metering.accounts import AccountConflict, AccountStore, KeyRecord, TeamRecord, UserRecord
from metering.meter import Meter, MeterUnavailable
from metering.windows import Scope
from policies.index import PolicyIndex
from policies.keys import hash_key, mint_key
from policies.schema import Window
from proxy.admin.protocol import CreateKey, CreateTeam, CreateUser, UpdateTeam, UpdateUser, check_id
from proxy.directory import AccountUnusable
from proxy.errors import APIError

MAX_PAGE = 1000


def _seconds(ms: int) -> int | None:
    return ms // 1000 if ms else None


def _conflict(message: str, code: str) -> APIError:
    return APIError(409, message, type="conflict_error", code=code)


def _not_found(what: str, item: str) -> APIError:
    return APIError(404, f"no {what} {item!r}", code=f"{what}_not_found")


def user_json(user: UserRecord, source: str = "api") -> dict[str, Any]:
    return {
        "object": "user",
        "id": user.id,
        "tier": user.tier,
        "team": user.team,
        "created_at": _seconds(user.created_ms),
        "source": source,
    }


def team_json(team: TeamRecord, members: int | None = None, source: str = "api") -> dict[str, Any]:
    windows = (
        None if team.windows is None else [w.model_dump(mode="json", exclude_none=True) for w in team.windows]
    )
    return {
        "object": "team",
        "id": team.id,
        "tier": team.tier,
        "windows": windows,
        "members": members,
        "created_at": _seconds(team.created_ms),
        "source": source,
    }


def key_json(key: KeyRecord) -> dict[str, Any]:
    return {
        "object": "api_key",
        "id": key.id,
        "user": key.user,
        "name": key.name,
        "created_at": _seconds(key.created_ms),
        "last_used_at": _seconds(key.last_used_ms),
        "expires_at": _seconds(key.expires_ms),
    }


def _page(kind: str, after: str | None, limit: int) -> tuple[str, int]:
    if not 1 <= limit <= MAX_PAGE:
        raise APIError(400, f"'limit' must be between 1 and {MAX_PAGE}", param="limit", code="invalid_value")
    return (check_id(after, kind) if after else ""), limit


class AccountService:
    """Users, teams and keys over the account store, checked against the current policy."""

    def __init__(
        self,
        store: AccountStore,
        meter: Meter,
        index: Callable[[], PolicyIndex],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.meter = meter
        self.index = index
        self.clock = clock

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _tier(self, tier: str | None, param: str = "tier") -> None:
        policy = self.index().policy
        if tier is None:
            if policy.default_tier is None:
                raise APIError(
                    400, "the policy has no default_tier: name a tier", param=param, code="invalid_value"
                )
        elif tier not in policy.tiers:
            raise APIError(400, f"no tier {tier!r} in the policy", param=param, code="tier_not_found")

    async def _team_exists(self, team: str) -> bool:
        """Whether `team` is a team, and whether it is the policy file's; a 400 when it is none."""
        if team in self.index().teams:
            return True
        if await self.store.team(team) is None:
            raise APIError(400, f"no team {team!r}", param="team", code="team_not_found")
        return False

    async def _user(self, user_id: str) -> UserRecord:
        check_id(user_id, "user")
        if self.index().principal_for_user(user_id) is not None:
            raise _conflict(
                f"user {user_id!r} is defined in the policy file: edit it there", "user_in_policy"
            )
        user = await self.store.user(user_id)
        if user is None:
            raise _not_found("user", user_id)
        return user

    def _scope(self, user_id: str, tier: str | None, team: str | None) -> Scope:
        """The scope whose own windows move with a user (their tier's) in `team`'s home."""
        policy = self.index().policy
        tier_name = tier or policy.default_tier
        windows = policy.tiers[tier_name].caps.windows if tier_name in policy.tiers else []
        return Scope(user_id, tuple(windows), team)

    async def create_user(self, body: CreateUser) -> dict[str, Any]:
        if self.index().principal_for_user(body.id) is not None:
            raise _conflict(f"user {body.id!r} is defined in the policy file", "user_exists")
        self._tier(body.tier)
        static = await self._team_exists(body.team) if body.team else False
        await self.meter.enter_home(self._scope(body.id, body.tier, body.team))
        try:
            await self.store.create_user(body.id, body.tier, body.team, self._now_ms(), static_team=static)
        except AccountConflict as exc:
            raise self._refused(exc, body.id) from exc
        created = await self.store.user(body.id)
        assert created is not None
        return user_json(created)

    async def get_user(self, user_id: str) -> dict[str, Any]:
        check_id(user_id, "user")
        index = self.index()
        static = index.principal_for_user(user_id)
        if static is not None:
            tier = next(u.tier for u in index.policy.users if u.id == user_id)
            return user_json(UserRecord(user_id, tier, static.team, 0), "policy")
        user = await self.store.user(user_id)
        if user is None:
            raise _not_found("user", user_id)
        return user_json(user)

    async def list_users(self, after: str | None = None, limit: int = 100) -> dict[str, Any]:
        start, limit = _page("user", after, limit)
        ids = await self.store.ids("users", start, limit + 1)
        users = [u for u in [await self.store.user(i) for i in ids[:limit]] if u is not None]
        return {"object": "list", "data": [user_json(u) for u in users], "has_more": len(ids) > limit}

    async def update_user(self, user_id: str, body: UpdateUser) -> dict[str, Any]:
        user = await self._user(user_id)
        fields = body.model_fields_set
        if "tier" in fields:
            self._tier(body.tier)
        tier = body.tier if "tier" in fields else user.tier
        moving = "team" in fields and body.team != user.team
        static = await self._team_exists(body.team) if moving and body.team else False
        old = self._scope(user_id, user.tier, user.team)
        new = self._scope(user_id, tier, body.team if moving else user.team)
        try:
            if moving:
                await self.store.begin_team_change(
                    user_id, user.team, body.team, self._now_ms(), static_team=static
                )
                await self.meter.start_move(new)
                await self.meter.finish_move(old, new)
            await self.store.update_user(
                user_id,
                tier=body.tier,
                set_tier="tier" in fields,
                team=body.team,
                set_team=moving,
                was_team=user.team,
                static_team=static,
            )
        except AccountConflict as exc:
            raise self._refused(exc, user_id) from exc
        return await self.get_user(user_id)

    async def delete_user(self, user_id: str) -> dict[str, Any]:
        await self._user(user_id)
        try:
            await self.store.delete_user(user_id)
        except AccountConflict as exc:
            raise self._refused(exc, user_id) from exc
        return {"object": "user.deleted", "id": user_id, "deleted": True}

    async def create_key(self, user_id: str, body: CreateKey) -> dict[str, Any]:
        await self._user(user_id)
        key = mint_key()
        key_id = "key_" + secrets.token_hex(8)
        now_ms = self._now_ms()
        expires_ms = (body.expires_at or 0) * 1000
        if expires_ms and expires_ms <= now_ms:
            raise APIError(400, "'expires_at' is in the past", param="expires_at", code="invalid_value")
        try:
            await self.store.add_key(user_id, hash_key(key)[7:], key_id, body.name, now_ms, expires_ms)
        except AccountConflict as exc:
            raise self._refused(exc, user_id) from exc
        record = KeyRecord(key_id, user_id, body.name, now_ms, expires_ms, 0)
        return {**key_json(record), "key": key}

    async def list_keys(self, user_id: str) -> dict[str, Any]:
        await self._user(user_id)
        return {"object": "list", "data": [key_json(k) for k in await self.store.keys_of(user_id)]}

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        if not key_id.startswith("key_") or len(key_id) > 64:
            raise _not_found("key", key_id[:70])
        try:
            await self.store.revoke_key(key_id)
        except AccountConflict as exc:
            raise _not_found("key", key_id) from exc
        return {"object": "api_key.deleted", "id": key_id, "deleted": True}

    def _team_source(self, tier: str | None, windows: tuple[Window, ...] | list[Window] | None) -> None:
        if tier is not None and windows is not None:
            raise APIError(
                400, "a team takes its windows from 'tier' or 'windows', not both", param="windows",
                code="invalid_value",
            )  # fmt: skip
        if tier is not None:
            self._tier(tier)
        currency = self.index().policy.currency
        for i, window in enumerate(windows or []):
            if window.spend is not None and window.spend.currency != currency:
                raise APIError(
                    400,
                    f"the policy's currency is {currency}",
                    param=f"windows.{i}.spend",
                    code="invalid_value",
                )

    async def _team(self, team_id: str) -> TeamRecord:
        check_id(team_id, "team")
        if team_id in self.index().teams:
            raise _conflict(
                f"team {team_id!r} is defined in the policy file: edit it there", "team_in_policy"
            )
        team = await self.store.team(team_id)
        if team is None:
            raise _not_found("team", team_id)
        return team

    async def create_team(self, body: CreateTeam) -> dict[str, Any]:
        if body.id in self.index().teams:
            raise _conflict(f"team {body.id!r} is defined in the policy file", "team_exists")
        self._team_source(body.tier, body.windows)
        try:
            await self.store.create_team(body.id, body.tier, body.windows, self._now_ms())
        except AccountConflict as exc:
            raise self._refused(exc, body.id, "team") from exc
        return await self.get_team(body.id)

    async def get_team(self, team_id: str) -> dict[str, Any]:
        check_id(team_id, "team")
        static = self.index().teams.get(team_id)
        members = await self.store.members(team_id)
        if static is not None:
            windows = None if static.windows is None else tuple(static.windows)
            return team_json(TeamRecord(team_id, static.tier, windows, 0), members, "policy")
        team = await self.store.team(team_id)
        if team is None:
            raise _not_found("team", team_id)
        return team_json(team, members)

    async def list_teams(self, after: str | None = None, limit: int = 100) -> dict[str, Any]:
        start, limit = _page("team", after, limit)
        ids = await self.store.ids("teams", start, limit + 1)
        teams = [t for t in [await self.store.team(i) for i in ids[:limit]] if t is not None]
        return {"object": "list", "data": [team_json(t) for t in teams], "has_more": len(ids) > limit}

    async def update_team(self, team_id: str, body: UpdateTeam) -> dict[str, Any]:
        team = await self._team(team_id)
        fields = body.model_fields_set
        tier = body.tier if "tier" in fields else (None if "windows" in fields else team.tier)
        windows = body.windows if "windows" in fields else (None if "tier" in fields else team.windows)
        self._team_source(tier, windows)
        try:
            await self.store.update_team(team_id, tier, windows)
        except AccountConflict as exc:
            raise self._refused(exc, team_id, "team") from exc
        return await self.get_team(team_id)

    async def delete_team(self, team_id: str) -> dict[str, Any]:
        await self._team(team_id)
        try:
            await self.store.delete_team(team_id)
        except AccountConflict as exc:
            raise self._refused(exc, team_id, "team") from exc
        return {"object": "team.deleted", "id": team_id, "deleted": True}

    def _refused(self, exc: AccountConflict, item: str, what: str = "user") -> APIError:
        reason = exc.reason
        if reason == "exists":
            return _conflict(f"{what} {item!r} exists already", f"{what}_exists")
        if reason in ("missing", "no_user"):
            return _not_found(what, item)
        if reason == "no_team":
            return APIError(400, "that team does not exist", param="team", code="team_not_found")
        if reason == "members":
            return _conflict(f"team {item!r} has members: move them out first", "team_has_members")
        if reason == "busy":
            return _conflict(
                f"another change of {item!r}'s team is under way: retry later", "team_change_busy"
            )
        return _conflict(f"{what} {item!r} changed meanwhile: read it again and retry", "conflict")


async def answered(call: Any) -> Any:
    """Await an operation: a Redis outage turned into a 503, an account the policy cannot serve
    into a 409."""
    try:
        return await call
    except AccountUnusable as exc:
        raise APIError(409, str(exc), type="conflict_error", code="account_unusable") from exc
    except MeterUnavailable as exc:
        raise APIError(
            503, "accounts are unavailable: Redis cannot be reached", type="service_unavailable",
            code="meter_unavailable", headers={"Retry-After": "1"},
        ) from exc  # fmt: skip
