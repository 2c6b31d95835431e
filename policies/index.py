"""Who is calling: a validated policy indexed for per-request lookups (pure, no I/O)."""

import hmac
from dataclasses import dataclass

from policies.keys import hash_key
from policies.schema import Policy, Team, Tier, Window, team_windows


@dataclass(frozen=True, slots=True)
class Principal:
    """A user as resolved from an API key: their id, tier name and tier, and their team with the
    windows its members share."""

    user_id: str
    tier_name: str
    tier: Tier
    team: str | None = None
    team_windows: tuple[Window, ...] = ()


class PolicyIndex:
    """A policy with its key hashes indexed; immutable, so a reload swaps in a new index."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.teams: dict[str, Team] = {team.id: team for team in policy.teams}
        self._users: dict[str, Principal] = {}
        self._keys: dict[str, tuple[str, Principal]] = {}
        for user in policy.users:
            tier_name = user.tier or policy.default_tier
            assert tier_name is not None, "validated policies give every user a tier"
            team = self.teams.get(user.team or "")
            windows = () if team is None else team_windows(team.tier, team.windows, policy.tiers)
            principal = Principal(user.id, tier_name, policy.tiers[tier_name], user.team, windows)
            self._users[user.id] = principal
            for digest in user.keys:
                self._keys[digest] = (digest, principal)
        self._admin_keys = frozenset(policy.admin_keys)

    def principal_for_key(self, key: str) -> Principal | None:
        """The principal owning `key`, or None; only the key's digest is looked up."""
        return self.principal_for_digest(hash_key(key))

    def principal_for_digest(self, digest: str) -> Principal | None:
        """The principal owning the key whose stored form (`sha256:<hex>`) is `digest`, or None."""
        entry = self._keys.get(digest)
        if entry is None or not hmac.compare_digest(entry[0], digest):
            return None
        return entry[1]

    def is_admin_key(self, key: str) -> bool:
        """Whether `key` is one of the policy's admin keys."""
        digest = hash_key(key)
        return any(hmac.compare_digest(digest, stored) for stored in self._admin_keys)

    def principal_for_user(self, user_id: str) -> Principal | None:
        """The principal of a user id, or None when the policy has no such user."""
        return self._users.get(user_id)
