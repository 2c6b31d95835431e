"""`capgate exporter` as a child process, killed and restarted at will."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from .capgate_server import REPO
from .processes import ManagedProcess, free_port


class ExporterProcess:
    """An exporter of the ledger in `redis_url` into `sink` (the `exporter.sink` settings)."""

    def __init__(
        self, workdir: Path, redis_url: str, sink: dict, *, cluster: bool = False, **exporter: object
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = free_port()
        settings = {
            "redis_url": redis_url,
            "redis_cluster": cluster,
            "timeouts": {"redis_s": 2.0},
            "log_level": "info",
            "exporter": {"sink": sink, "metrics_port": self.metrics_port, **exporter},
        }
        config = workdir / f"exporter-{self.metrics_port}.yaml"
        config.write_text(yaml.safe_dump(settings))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPGATE_")}
        argv = [sys.executable, "-m", "proxy.cli", "exporter", "--config", str(config)]
        self.process = ManagedProcess(argv, log_path=workdir / "exporter.log", env=env, cwd=REPO)

    def start(self) -> None:
        self.process.start()

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed or released."""
        self.process.kill()

    def stop(self) -> None:
        self.process.stop()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log_text(self) -> str:
        return self.process.log_path.read_text(errors="replace")
