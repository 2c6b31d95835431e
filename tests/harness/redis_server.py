"""Real ``redis-server`` processes on loopback ports: one server, or a 3-master cluster."""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import redis
from redis.cluster import ClusterNode

from .processes import ManagedProcess, Service, port_is_free

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 10.0
CLUSTER_BUS_OFFSET = 10000  # a cluster node also listens on its port + 10000


class RedisServer(Service):
    """One ``redis-server`` bound to 127.0.0.1, without RDB snapshots.

    The port and data directory are fixed at construction, so ``kill()`` (SIGKILL, a
    crash) or ``stop()`` followed by ``start()``/``restart()`` brings the same server
    back; with ``appendonly=True`` its data survives that. ``close()`` stops it and
    deletes the data directory when the server created it.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        data_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        redis_server_bin: str = "redis-server",
    ) -> None:
        self.port = port if port is not None else free_redis_port()
        self.appendonly = appendonly
        self._owns_data_dir = data_dir is None
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="capgate-redis-"))
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        command = [
            redis_server_bin,
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
            "--daemonize", "no",
            "--logfile", "",
            *extra_args,
        ]  # fmt: skip
        self._process = ManagedProcess(command, log_path=data_dir / "redis.log")

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return HOST

    @property
    def url(self) -> str:
        """A ``redis://`` URL for database 0."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process.running

    @property
    def log_path(self) -> Path:
        """The server's log file (kept across restarts)."""
        return self._process.log_path

    def client(self) -> redis.Redis:
        """Return a new synchronous client with short timeouts."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, socket_connect_timeout=1)

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self._process.start()
        try:
            self.wait_until(self._answers_ping, STARTUP_TIMEOUT, what=f"PING on {self.port}")
        except BaseException:
            self.stop()
            raise

    def wait_until(self, predicate: Callable[[], bool], timeout: float, *, what: str) -> None:
        """Poll ``predicate`` until true; fail early with the log tail if the server exits."""
        self._process.wait_until(predicate, timeout, what=what)

    def stop(self) -> None:
        """Shut the server down (SIGTERM, then SIGKILL)."""
        self._process.stop(timeout=5.0)

    def kill(self) -> None:
        """SIGKILL the server, as in a crash."""
        self._process.kill()

    def restart(self) -> None:
        """Stop the server if it runs, then start it on the same port and data directory."""
        self.stop()
        self.start()

    def shutdown(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and delete the data directory it created."""
        self.stop()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _answers_ping(self) -> bool:
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


class RedisCluster(Service):
    """A Redis Cluster of three masters and no replicas on loopback ports.

    ``start()`` launches the nodes, joins them with ``redis-cli --cluster create`` and
    waits until every node reports ``cluster_state:ok``. ``close()`` stops the nodes and
    deletes their directories.
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        redis_server_bin: str = "redis-server",
        redis_cli_bin: str = "redis-cli",
    ) -> None:
        self.redis_cli_bin = redis_cli_bin
        cluster_args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "5000",
        ]  # fmt: skip
        ports: list[int] = []
        for _ in range(masters):
            ports.append(free_redis_port(taken=ports))
        self.nodes = [
            RedisServer(port=port, extra_args=cluster_args, redis_server_bin=redis_server_bin)
            for port in ports
        ]

    @property
    def startup_nodes(self) -> list[ClusterNode]:
        """Nodes for ``redis.cluster.RedisCluster(startup_nodes=...)``."""
        return [ClusterNode(HOST, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """A ``redis://`` URL of the first node, for ``RedisCluster.from_url``."""
        return f"redis://{HOST}:{self.nodes[0].port}"

    def client(self) -> redis.RedisCluster:
        """Return a new synchronous cluster client."""
        return redis.RedisCluster(startup_nodes=self.startup_nodes, socket_timeout=5)

    def start(self) -> None:
        """Start the nodes, form the cluster and wait until it serves all slots."""
        try:
            for node in self.nodes:
                node.start()
            self._create()
            for node in self.nodes:
                node.wait_until(
                    lambda node=node: _cluster_ok(node, len(self.nodes)),
                    STARTUP_TIMEOUT,
                    what=f"cluster_state:ok on {node.port}",
                )
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        command = [
            self.redis_cli_bin,
            "--cluster", "create",
            *(f"{HOST}:{node.port}" for node in self.nodes),
            "--cluster-replicas", "0",
            "--cluster-yes",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            output = result.stdout + result.stderr
            raise RuntimeError(f"redis-cli --cluster create failed:\n{output}")

    def shutdown(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop every node and delete their directories."""
        for node in self.nodes:
            node.close()


def free_redis_port(taken: Collection[int] = ()) -> int:
    """Return a free port for a Redis server that can also be a cluster node.

    Drawn from 20000-32767, below the usual ephemeral range (32768-60999), so no
    outgoing connection takes it while a test has the server down. Its cluster bus
    port (+10000) is free too, and neither collides with ``taken`` or their bus ports.
    """
    reserved = {*taken, *(port + CLUSTER_BUS_OFFSET for port in taken)}
    for _ in range(200):
        port = random.randint(20000, 32767)
        bus_port = port + CLUSTER_BUS_OFFSET
        if reserved.isdisjoint({port, bus_port}) and port_is_free(port) and port_is_free(bus_port):
            return port
    raise RuntimeError("no free port for a Redis server in 20000-32767")


def _cluster_ok(node: RedisServer, expected_nodes: int) -> bool:
    """Whether ``node`` sees a healthy cluster with all slots and all nodes."""
    client = node.client()
    try:
        info = client.cluster("INFO")
    except redis.RedisError:
        return False
    finally:
        client.close()
    return (
        info.get("cluster_state") == "ok"
        and int(info.get("cluster_slots_assigned", 0)) == 16384
        and int(info.get("cluster_known_nodes", 0)) == expected_nodes
    )
