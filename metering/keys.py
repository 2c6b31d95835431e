"""Redis key names. Every key of one user carries the hash tag `{u:<id>}`, so a script that
touches one user's keys runs unchanged on Redis Cluster."""

from dataclasses import dataclass

PREFIX = "cg"
LEDGER_PATTERN = f"{PREFIX}:{{u:*}}:ledger"
LIVE_PATTERN = f"{PREFIX}:{{u:*}}:live"
TOTALS_PATTERN = f"{PREFIX}:{{u:*}}:totals"


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


@dataclass(frozen=True, slots=True)
class UserKeys:
    """The keys of one user."""

    user_id: str

    @property
    def _base(self) -> str:
        return f"{PREFIX}:{{u:{self.user_id}}}"

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
    def settled(self) -> str:
        return f"{self._base}:settled"

    def window(self, name: str) -> str:
        return f"{self._base}:w:{name}"

    def fixed(self) -> list[str]:
        """The five keys every metering script takes first, in order."""
        return [self.res, self.live, self.totals, self.ledger, self.settled]


def user_of_key(key: str) -> str:
    """The user id inside a key's hash tag."""
    start = key.index("{u:") + 3
    return key[start : key.index("}", start)]
