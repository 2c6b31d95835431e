"""Redis key names.

Every metering key of one user carries one hash tag, the user's *home*: `{u:<id>}` for a user in
no team, `{t:<team>}` for a member of a team, whose windows share that tag. So a script that
reserves against a user's windows and their team's runs unchanged on Redis Cluster. A user who
changes team moves home (see `metering.meter.Meter.move_home`). Ids never hold ':' or braces
(`policies.schema.NAME`), so keys parse back unambiguously.
"""

import re
from dataclasses import dataclass

PREFIX = "cg"
LEDGER_PATTERN = f"{PREFIX}:{{[ut]:*:ledger"
NOTICES_PATTERN = f"{PREFIX}:{{[ut]:*:notices"
LIVE_PATTERN = f"{PREFIX}:{{[ut]:*:live"
TOTALS_PATTERN = f"{PREFIX}:{{[ut]:*:totals"
_USER_KEY = re.compile(r"^cg:\{(?:u:(?P<solo>[^}]+)\}|t:(?P<team>[^}]+)\}:u:(?P<member>[^:]+)):")


def slots_key(upstream: str) -> str:
    """The slot count of one upstream. Every slot key carries the hash tag `{slots}`, so one
    script can choose among the upstreams on Redis Cluster too."""
    return f"{PREFIX}:{{slots}}:{upstream}"


def victims_key(upstream: str) -> str:
    """The preemptible requests holding a slot of one upstream, by priority."""
    return f"{PREFIX}:{{slots}}:{upstream}:victims"


def waiting_key(model: str) -> str:
    """Which replicas hold requests for `model` waiting for a slot, and since when."""
    return f"{PREFIX}:{{slots}}:waiting:{model}"


def response_key(response_id: str) -> str:
    """Who owns one stored response (of the Responses API), and where it is stored."""
    return f"{PREFIX}:{{r:{response_id}}}:owner"


PREEMPTED_KEY = f"{PREFIX}:{{slots}}:preempted"  # requests asked to end, for whichever replica holds them


def team_window_key(team: str, name: str, spend: bool) -> str:
    """A team's count of tokens (or spend) in one window, in the team's hash slot."""
    return f"{PREFIX}:{{t:{team}}}:{'ts' if spend else 'tw'}:{name}"


@dataclass(frozen=True, slots=True)
class UserKeys:
    """The keys of one user in one home: alone, or in `team`'s hash slot."""

    user_id: str
    team: str | None = None

    @property
    def _base(self) -> str:
        if self.team is None:
            return f"{PREFIX}:{{u:{self.user_id}}}"
        return f"{PREFIX}:{{t:{self.team}}}:u:{self.user_id}"

    @property
    def res(self) -> str:
        return f"{self._base}:res"

    @property
    def live(self) -> str:
        return f"{self._base}:live"

    @property
    def totals(self) -> str:
        return f"{self._base}:totals"

    @property
    def ledger(self) -> str:
        return f"{self._base}:ledger"

    @property
    def notices(self) -> str:
        """The user's threshold notifications waiting for delivery (a stream)."""
        return f"{self._base}:notices"

    @property
    def settled(self) -> str:
        return f"{self._base}:settled"

    def window(self, name: str, spend: bool = False) -> str:
        """The user's count of tokens (or spend) in one window."""
        return f"{self._base}:{'s' if spend else 'w'}:{name}"

    def fixed(self) -> list[str]:
        """The five keys every metering script takes first, in order."""
        return [self.res, self.live, self.totals, self.ledger, self.settled]


def user_keys_of(key: str) -> UserKeys:
    """The user (and home) one of their metering keys belongs to."""
    match = _USER_KEY.match(key)
    if match is None:
        raise ValueError(f"not a user's metering key: {key!r}")
    if match["solo"] is not None:
        return UserKeys(match["solo"])
    return UserKeys(match["member"], match["team"])
