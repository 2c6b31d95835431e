"""The JSON Lines sink: one line per event in files of one exporter instance, rotated by size or
by the hour, fsync'd and journaled before the exporter acknowledges a batch.

Files are named `ledger-<instance>-<UTC time>-<n>.jsonl` (`n` orders them). At start, bytes past
the journaled end of the journaled file, and files of the instance opened after it, were written
by a batch that never committed: the tail is cut and such files are renamed `*.uncommitted`, and
the exporter writes that batch again.
"""

import os
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from metering.export.journal import Journal, JournalState, fsync_dir
from metering.ledger import LedgerEntry


def event_line(entry: LedgerEntry) -> bytes:
    return orjson.dumps(entry.record()) + b"\n"


class JsonlSink:
    def __init__(self, directory: Path, instance: str, rotate_bytes: int, rotate_hourly: bool = True) -> None:
        self.directory = directory
        self.instance = instance
        self.rotate_bytes = rotate_bytes
        self.rotate_hourly = rotate_hourly
        self.journal = Journal(directory / f".journal-{instance}.json")
        self.recent: frozenset[str] = frozenset()
        self._file: Path | None = None
        self._size = 0
        self._opened_hour = 0
        self._seq = 0

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob(f"ledger-{self.instance}-*.jsonl"), key=_seq_of)

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = self.journal.read()
        committed = self.directory / state.file if state.file else None
        for path in self._files():
            if committed is None or _seq_of(path) > _seq_of(committed):
                path.rename(path.with_suffix(".uncommitted"))
        if committed is not None and committed.exists():
            with open(committed, "r+b") as out:
                out.truncate(state.size)
                os.fsync(out.fileno())
            self._file, self._size, self._seq = committed, state.size, _seq_of(committed)
            self._opened_hour = int(committed.stat().st_mtime // 3600)
        self.recent = state.keys

    def _rotate_due(self, now: float) -> bool:
        if self._file is None or self._size >= self.rotate_bytes:
            return True
        return self.rotate_hourly and int(now // 3600) != self._opened_hour

    async def write(self, entries: Sequence[LedgerEntry]) -> None:
        if not entries:
            return
        now = time.time()
        if self._rotate_due(now):
            self._seq += 1
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
            self._file = self.directory / f"ledger-{self.instance}-{stamp}-{self._seq:08d}.jsonl"
            self._size, self._opened_hour = 0, int(now // 3600)
        assert self._file is not None
        data = b"".join(event_line(entry) for entry in entries)
        with open(self._file, "ab") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if self._size == 0:
            fsync_dir(self.directory)
        self._size += len(data)
        keys = frozenset(entry.key for entry in entries)
        self.journal.write(JournalState(keys, self._file.name, self._size))
        self.recent = keys

    async def close(self) -> None:
        return None


def _seq_of(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[-1])
