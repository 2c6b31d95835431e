"""A bounded, durable local spool of usage events that could not reach Redis.

Each process appends to its own file (`<dir>/spool-<pid>-<id>.jsonl`), one JSON line per event,
fsync'd before the append returns, and holds an exclusive lock on it while it lives. Replay
takes every file it can lock: its own rotated files and those of dead processes. Settlement is
idempotent by request id in Redis, so a line replayed twice is charged once.

Crash safety: an append is one `write` then `fsync`; a crash mid-write leaves a torn last line,
which reading skips (that event's append had not returned, so its settlement had not either). A
rewrite goes to a temporary file that is fsync'd before it replaces the original, and the
directory is fsync'd after, so a crash leaves either the old content or the new, never less.
Events the meter refused (a bug, not an outage) are set aside in `rejected-*.jsonl` for the
operator, not retried forever. The blocking calls run in a worker thread (`append_async`).
"""

import asyncio
import fcntl
import json
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from metering.events import UsageEvent
from metering.windows import Scope
from policies.schema import Window


def _windows(data: list[dict]) -> tuple[Window, ...]:
    return tuple(Window.model_validate(w) for w in data)


@dataclass(frozen=True, slots=True)
class SpooledSettlement:
    """A settlement waiting for Redis: the event and the scope (the user's home, their windows
    and their team's) it counts against."""

    event: UsageEvent
    scope: Scope

    def to_line(self) -> bytes:
        scope = self.scope
        data = {
            "event": json.loads(self.event.to_json()),
            "windows": [w.model_dump(mode="json") for w in scope.windows],
            "team": scope.team,
            "team_windows": [w.model_dump(mode="json") for w in scope.team_windows],
            "notify_at": list(scope.notify_at),
        }
        return (json.dumps(data, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> "SpooledSettlement":
        """Read a line back (lines spooled before teams existed have no `team`)."""
        data = json.loads(line)
        event = UsageEvent(**data["event"])
        scope = Scope(
            event.user,
            _windows(data["windows"]),
            data.get("team"),
            _windows(data.get("team_windows", [])),
            tuple(data.get("notify_at", [])),
        )
        return cls(event, scope)


class Spool:
    """The local spool of one process."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._path: Path | None = None
        self._lock = threading.Lock()

    def _open(self) -> int:
        if self._fd is None:
            self._path = self.directory / f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return self._fd

    def size(self) -> int:
        """Bytes spooled and not yet replayed, over all files in the directory."""
        return sum(path.stat().st_size for path in self.directory.glob("spool-*"))

    def full(self) -> bool:
        """Whether the spool reached `max_bytes`: no new request may then be served without
        Redis. Settlements of requests already served are always written (losing them is worse)."""
        return self.size() >= self.max_bytes

    def append(self, item: SpooledSettlement) -> None:
        """Write `item` durably (blocking: fsync)."""
        line = item.to_line()
        with self._lock:
            fd = self._open()
            _write_all(fd, line)
            os.fsync(fd)

    async def append_async(self, item: SpooledSettlement) -> None:
        """`append` in a worker thread, off the event loop."""
        await asyncio.to_thread(self.append, item)

    def set_aside(self, items: list[SpooledSettlement]) -> Path:
        """Keep events the meter refused in a file of their own, for the operator."""
        path = self.directory / f"rejected-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        _write_durably(path, b"".join(item.to_line() for item in items))
        return path

    def _rotate(self) -> None:
        with self._lock:
            if self._fd is not None and self._path is not None:
                self._path.rename(self._path.with_suffix(".ready"))
                os.close(self._fd)
                self._fd = None
                self._path = None

    @contextmanager
    def claim(self) -> Iterator[list[Path]]:
        """Rotate this process's file and yield every spool file no live process holds,
        locked for the caller; files left empty by the caller are removed."""
        self._rotate()
        claimed: list[tuple[Path, int]] = []
        for path in sorted(self.directory.glob("spool-*")):
            fd = os.open(path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            claimed.append((path, fd))
        try:
            yield [path for path, _ in claimed]
        finally:
            for path, fd in claimed:
                if path.exists() and path.stat().st_size == 0:
                    path.unlink()
                os.close(fd)


def read_items(path: Path) -> list[SpooledSettlement]:
    """The settlements in a spool file; a torn last line (crash mid-write) is skipped."""
    items = []
    for line in path.read_bytes().splitlines():
        try:
            items.append(SpooledSettlement.from_line(line))
        except ValueError:
            continue
    return items


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_durably(path: Path, content: bytes) -> None:
    """Make `path` hold `content` after any crash: the old content or the new, never less."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def rewrite(path: Path, items: list[SpooledSettlement]) -> None:
    """Replace a claimed spool file's content with `items` (the ones not yet replayed)."""
    _write_durably(path, b"".join(item.to_line() for item in items))
