"""Session-wide fixtures for real servers; the machinery lives in ``tests/harness``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import RedisCluster, RedisServer, VllmServer, stop_all_on_sigterm

ALIAS = "tiny-b"  # the session vLLM's second name for its model


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs real servers (Redis, vLLM)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    stop_all_on_sigterm()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A standalone ``redis-server`` on a loopback port, shared by the session."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster, started only if a test asks for it."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """The one vLLM server of the session (tiny model, priority scheduling), serving the model
    under a second name too (`ALIAS`), so that tests can price two models."""
    with VllmServer(log_path=tmp_path_factory.mktemp("vllm") / "vllm.log", aliases=[ALIAS]) as server:
        yield server
