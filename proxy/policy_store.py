"""The live policy: loaded at start, reloaded on SIGHUP and when the file changes.

A reload that fails validation is logged with every problem and the previous policy stays.
Requests take the index once, at their start, so in-flight streams finish under the policy
they started with.
"""

import asyncio
import logging
import signal
from pathlib import Path

from policies.index import PolicyIndex
from policies.loader import ConfigError, load_policy
from proxy import background, metrics

log = logging.getLogger("capgate.policy")


def read_policy(path: Path) -> PolicyIndex:
    """Load and index the policy file at `path`; raise `ConfigError` if it is not valid."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), []) from exc
    return PolicyIndex(load_policy(text, str(path)))


class PolicyStore:
    """Holds the current policy index and swaps it on a valid reload."""

    def __init__(self, path: str | Path, poll_s: float) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self.index = read_policy(self.path)
        self._stamp = self._file_stamp()
        self._watcher: asyncio.Task[None] | None = None

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def reload(self) -> bool:
        """Try to load the file again; True when the new policy is in force."""
        self._stamp = self._file_stamp()
        try:
            self.index = read_policy(self.path)
        except ConfigError as exc:
            metrics.POLICY_RELOADS.labels(outcome="rejected").inc()
            detail = str(exc) or f"cannot read {self.path}: {exc.__cause__}"
            log.error("policy reload rejected, keeping the previous policy:\n%s", detail)
            return False
        metrics.POLICY_RELOADS.labels(outcome="applied").inc()
        log.info("policy reloaded from %s", self.path)
        return True

    def _check(self) -> None:
        if self._file_stamp() != self._stamp:
            self.reload()

    def start(self) -> None:
        """Watch the file and reload on SIGHUP (this process)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._watcher = background.start("policy_watch", self.poll_s, self._check)

    async def stop(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await background.stop(self._watcher)
