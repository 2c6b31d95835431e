"""The two upstreams: the fast replaying fake (pinned to the load core) and the real vLLM server.

The real vLLM is the harness's `VllmServer` (the tiny model), or a server already running at a
given URL; either way the benchmark records a fresh capture from it for the fake upstream.
"""

import sys
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from bench.common.locations import REPO
from tests.harness.processes import ManagedProcess, answers_ok, free_port
from tests.harness.vllm_server import VllmServer

HOST = "127.0.0.1"


class FakeUpstreamProcess:
    """`python -m bench.common.fake_upstream` replaying `capture` (default: its own, 256-token streams),
    pinned to `core` when one is given."""

    def __init__(
        self, workdir: Path, token_interval_ms: float, capture: Path | None = None, core: str | None = None
    ) -> None:
        self.port = free_port()
        argv = ["taskset", "--cpu-list", core] if core is not None else []
        argv += [sys.executable, "-m", "bench.common.fake_upstream", "--port", str(self.port)]
        argv += ["--token-interval-ms", str(token_interval_ms)]
        if capture is not None:
            argv += ["--capture", str(capture)]
        self.process = ManagedProcess(argv, log_path=workdir / "fake-upstream.log", cwd=REPO)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> Self:
        self.process.start()
        try:
            self.process.wait_until(
                lambda: answers_ok(f"{self.url}/health"), 20.0, what="fake upstream /health"
            )
        except BaseException:
            self.process.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.process.stop()


class RealVllm:
    """A vLLM server: started with the test harness, or the one at `url` (left running)."""

    def __init__(self, workdir: Path, url: str | None) -> None:
        self.given_url = url.rstrip("/") if url else None
        self.server = None if url else VllmServer(log_path=workdir / "vllm.log")

    @property
    def url(self) -> str:
        if self.given_url is not None:
            return self.given_url
        assert self.server is not None
        return self.server.base_url

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or HOST, parts.port or 80

    def __enter__(self) -> Self:
        if self.server is not None:
            self.server.start()
        elif not answers_ok(f"{self.url}/health"):
            raise RuntimeError(f"no healthy vLLM at {self.url}")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.server is not None:
            self.server.stop()
