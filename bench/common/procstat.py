"""What a process tree costs, read from `/proc`: CPU seconds and peak resident memory; and pinning
processes to cores with `taskset`."""

import os
import subprocess
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """The fields of `/proc/<pid>/stat` after the command name (field 3 onwards)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of `pid`'s tree: every live process, and the reaped children
    of each (utime + stime + cutime + cstime)."""
    total = 0
    for member in tree(pid):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])
    return total / _TICKS


def peak_rss_mib(pid: int) -> float:
    """The summed peak resident memory (VmHWM) of `pid`'s tree, in MiB."""
    total_kib = 0
    for member in tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def pin(pid: int, cores: str) -> None:
    """Pin every thread of `pid`'s tree to `cores` (a taskset list such as "1" or "0,1")."""
    for member in tree(pid):
        subprocess.run(
            ["taskset", "--all-tasks", "--cpu-list", "--pid", cores, str(member)],
            check=False,
            capture_output=True,
        )
