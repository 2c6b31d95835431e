"""Fixtures of the integration tests: capgate in front of the session's vLLM and Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import RedisServer, VllmServer
from tests.harness.capgate_server import CapgateServer


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, vllm_server: VllmServer, redis_server: RedisServer
) -> Iterator[CapgateServer]:
    """capgate with the example policy (deploy/policies/example.yaml), shared by the session."""
    with CapgateServer(
        tmp_path_factory.mktemp("gateway"), upstreams=[vllm_server.base_url], redis_url=redis_server.url
    ) as server:
        yield server


@pytest.fixture
def start_gateway(
    tmp_path: Path, vllm_server: VllmServer, redis_server: RedisServer
) -> Iterator[Callable[..., CapgateServer]]:
    """Start extra capgate processes (own policy or settings); all are stopped after the test."""
    started: list[CapgateServer] = []

    def start(wait_ready: bool = True, **options: object) -> CapgateServer:
        options.setdefault("upstreams", [vllm_server.base_url])
        options.setdefault("redis_url", redis_server.url)
        server = CapgateServer(tmp_path / f"gw{len(started)}", **options)  # type: ignore[arg-type]
        started.append(server)
        server.start(wait_ready=wait_ready)
        return server

    yield start
    for server in started:
        server.stop()
