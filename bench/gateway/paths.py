"""The four ways a request reaches the upstream: directly, through a plain nginx hop, through
capgate, through LiteLLM.

Each path knows its address, the keys its clients send, and the process whose CPU and memory it
costs (none for the direct path). Gateways are pinned to the gateway core as soon as they start.
"""

import os
import secrets
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import yaml

from bench.common import procstat, tools
from bench.common.locations import REPO
from bench.common.policy import BenchUser, write_policy
from tests.harness.processes import ManagedProcess, free_port
from tests.harness.redis_server import RedisServer

HOST = "127.0.0.1"


def _wait_http(process: ManagedProcess, url: str, timeout: float, what: str) -> None:
    def answers() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    process.wait_until(answers, timeout, interval=0.2, what=what)


class GatewayPath:
    """A path through a gateway process; subclasses start it."""

    name = ""

    def __init__(self, workdir: Path, upstream_url: str, core: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.upstream_url = upstream_url
        self.core = core
        self.port = free_port()
        self.process: ManagedProcess | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def keys(self, spread: bool) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class DirectPath(GatewayPath):
    """Straight to the upstream: no gateway, nothing to start."""

    name = "direct"

    def __init__(self, upstream_host: str, upstream_port: int, users: list[BenchUser]) -> None:
        self.upstream_host = upstream_host
        self.port = upstream_port
        self.users = users
        self.process = None

    @property
    def host_port(self) -> tuple[str, int]:
        return self.upstream_host, self.port

    def keys(self, spread: bool) -> list[str]:
        return [u.key for u in self.users] if spread else [self.users[0].key]

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None


NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    upstream target {{
        server {upstream};
        keepalive 512;
    }}
    server {{
        listen {host}:{port} reuseport backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://target;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


class NginxPath(GatewayPath):
    """Debian's nginx as a plain reverse proxy (one process, keep-alive to the upstream, nothing
    buffered, no metering): the floor of one proxy hop, pinned to the gateway core."""

    name = "nginx"

    def __init__(self, workdir: Path, upstream_url: str, core: str, users: list[BenchUser]) -> None:
        super().__init__(workdir, upstream_url, core)
        self.users = users

    def keys(self, spread: bool) -> list[str]:
        return [u.key for u in self.users] if spread else [self.users[0].key]

    def start(self) -> None:
        binary = tools.ensure_nginx()
        upstream = self.upstream_url.removeprefix("http://").rstrip("/")
        conf = self.workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=self.workdir, upstream=upstream, host=HOST, port=self.port))
        self.process = ManagedProcess(
            ["taskset", "--cpu-list", self.core, str(binary), "-c", str(conf), "-p", str(self.workdir)],
            log_path=self.workdir / "nginx.log",
            cwd=self.workdir,
        )
        self.process.start()
        _wait_http(self.process, f"http://{HOST}:{self.port}/v1/models", 30.0, "nginx")


class CapgatePath(GatewayPath):
    """`capgate serve` (one uvicorn worker unless `workers` says more) with full metering over its
    own `redis-server`, all pinned to the gateway cores."""

    name = "capgate"

    def __init__(self, workdir: Path, upstream_url: str, core: str, workers: int = 1) -> None:
        super().__init__(workdir, upstream_url, core)
        self.workers = workers
        self.users = write_policy(workdir / "policy.yaml")
        self.redis = RedisServer(data_dir=workdir / "redis")
        self.redis_pid: int | None = None

    def keys(self, spread: bool) -> list[str]:
        return [u.key for u in self.users] if spread else [self.users[0].key]

    def start(self) -> None:
        self.redis.start()
        client = self.redis.client()
        try:
            self.redis_pid = int(client.info("server")["process_id"])
        finally:
            client.close()
        procstat.pin(self.redis_pid, self.core)
        settings = {
            "host": HOST,
            "port": self.port,
            "upstreams": [{"url": self.upstream_url}],
            "redis_url": self.redis.url,
            "policy_file": str(self.workdir / "policy.yaml"),
            "spool_dir": str(self.workdir / "spool"),
            "log_level": "warning",
            "workers": self.workers,
        }
        config = self.workdir / "capgate.yaml"
        config.write_text(yaml.safe_dump(settings))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPGATE_")}
        self.process = ManagedProcess(
            [
                "taskset",
                "--cpu-list",
                self.core,
                sys.executable,
                "-m",
                "proxy.cli",
                "serve",
                "--config",
                str(config),
            ],
            log_path=self.workdir / "capgate.log",
            env=env,
            cwd=REPO,
        )
        self.process.start()
        _wait_http(self.process, f"http://{HOST}:{self.port}/readyz", 60.0, "capgate /readyz")

    def stop(self) -> None:
        super().stop()
        self.redis.close()


class LitellmPath(GatewayPath):
    """The LiteLLM proxy (one worker, master key, no database), pass-through to the upstream as
    model `openai/<name>`, pinned to the gateway core."""

    name = "litellm"

    def __init__(self, workdir: Path, upstream_url: str, core: str, model: str, venv: Path) -> None:
        super().__init__(workdir, upstream_url, core)
        self.model = model
        self.venv = venv
        self.master_key = "sk-bench-" + secrets.token_hex(16)

    def keys(self, spread: bool) -> list[str]:
        return [self.master_key]

    def start(self) -> None:
        config = {
            "model_list": [
                {
                    "model_name": self.model,
                    "litellm_params": {
                        "model": f"openai/{self.model}",
                        "api_base": f"{self.upstream_url}/v1",
                        "api_key": "unused",
                    },
                }
            ],
            "general_settings": {"master_key": self.master_key},
        }
        path = self.workdir / "litellm.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "LITELLM_"))}
        env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "NO_DOCS": "True"})
        argv = [str(self.venv / "bin" / "litellm"), "--config", str(path)]
        argv += ["--host", HOST, "--port", str(self.port), "--num_workers", "1"]
        self.process = ManagedProcess(
            ["taskset", "--cpu-list", self.core, *argv],
            log_path=self.workdir / "litellm.log",
            env=env,
            cwd=self.workdir,
        )
        self.process.start()
        _wait_http(self.process, f"http://{HOST}:{self.port}/health/liveliness", 180.0, "litellm liveliness")
        time.sleep(1.0)
