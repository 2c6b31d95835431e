"""A real `capgate serve` process for tests, in front of the test's vLLM and Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from .processes import ManagedProcess, Service, answers_ok, free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO / "deploy" / "policies" / "example.yaml"


class CapgateServer(Service):
    """`capgate serve` on a free loopback port, configured by a settings file in `workdir`.

    `settings` is merged over the defaults below; `policy` is the policy file's path.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        upstreams: list[str],
        redis_url: str,
        policy: Path = EXAMPLE_POLICY,
        settings: dict | None = None,
        workers: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.policy = policy
        self.settings = {
            "host": "127.0.0.1",
            "port": self.port,
            "upstreams": [{"url": url} for url in upstreams],
            "redis_url": redis_url,
            "policy_file": str(policy),
            "policy_poll_s": 0.2,
            "spool_dir": str(workdir / "spool"),
            "reap_interval_s": 1.0,
            **(settings or {}),
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"capgate-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.settings))
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("CAPGATE_")}
        child_env.update(env or {})
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        self.process = ManagedProcess(
            argv, log_path=workdir / f"capgate-{self.port}.log", env=child_env, cwd=REPO
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        return answers_ok(f"{self.base_url}/readyz")

    def _alive(self) -> bool:
        return answers_ok(f"{self.base_url}/healthz")

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> None:
        """Start and wait until ready (vLLM and Redis reachable) or, if not asked, alive."""
        self.process.start()
        if wait_ready:
            self.process.wait_until(self._ready, timeout, what="capgate /readyz")
        else:
            self.process.wait_until(self._alive, timeout, what="capgate /healthz")

    def reload(self) -> None:
        """Send SIGHUP (policy reload) to the server process."""
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGHUP)

    def stop(self) -> None:
        self.process.stop()

    def log_text(self) -> str:
        return self.process.log_path.read_text(errors="replace")


@contextlib.contextmanager
def replicas(
    workdir: Path,
    names: tuple[str, ...],
    upstreams: list[str],
    redis_url: str,
    policy: Path,
    settings: dict | None = None,
) -> Iterator[list[CapgateServer]]:
    """capgate processes (one per name, each in `workdir/<name>`) in front of `upstreams`,
    sharing one Redis and `settings`, as replicas would; all are stopped on leaving, even when
    one fails to start."""
    servers = [
        CapgateServer(
            workdir / name, upstreams=upstreams, redis_url=redis_url, policy=policy, settings=settings
        )
        for name in names
    ]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()
