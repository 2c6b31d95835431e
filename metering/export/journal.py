"""The journal of a sink that cannot deduplicate by itself (files, a webhook): what its last
batch was, written durably after the batch and before the exporter acknowledges it in Redis."""

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class JournalState:
    """The keys of the last batch a sink took, and where a file sink's data ends (`file`,
    `size`): bytes past it were written by a batch that never committed."""

    keys: frozenset[str] = frozenset()
    file: str | None = None
    size: int = 0


class Journal:
    """One JSON file, replaced atomically (written, fsync'd, renamed, its directory fsync'd)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> JournalState:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return JournalState()
        return JournalState(frozenset(data["keys"]), data.get("file"), int(data.get("size", 0)))

    def write(self, state: JournalState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = {"keys": sorted(state.keys), "file": state.file, "size": state.size}
        with open(tmp, "w") as out:
            json.dump(data, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
