"""What the benchmark ran on: CPU, cores, memory, load, Python, and the versions under test."""

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024**2, 1)
    return 0.0


def _redis_version() -> str | None:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((part[2:] for part in out.split() if part.startswith("v=")), out.strip())


def describe() -> dict[str, Any]:
    """The machine and the software versions that do not depend on the run."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "capgate": importlib.metadata.version("capgate"),
        "redis_server": _redis_version(),
        "load_average_at_start": list(os.getloadavg()),
    }
