"""A real vLLM OpenAI-compatible server on the CPU, serving the generated tiny model.

Paths come from the environment: ``CAPGATE_VLLM_VENV`` (default ``<repo>/.venv-vllm``,
see ``scripts/setup-vllm.sh``) and ``CAPGATE_MODEL_DIR`` (default
``<repo>/.models/tiny-llama``). A model directory without its completion marker is
(re)generated with ``deploy/tiny_model.py``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from .processes import ManagedProcess, Service, answers_ok, free_port
from .prom import Samples, parse, sample_sum

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_MARKER = ".complete-v2"  # written last by deploy/tiny_model.py (its MARKER)
MAX_MODEL_LEN = 8192
SERVED_MODEL_NAME = "tiny"
HOST = "127.0.0.1"


def vllm_venv() -> Path:
    """The virtual environment that has vLLM installed."""
    return Path(os.environ.get("CAPGATE_VLLM_VENV", REPO_ROOT / ".venv-vllm"))


def model_dir() -> Path:
    """The directory of the tiny test model."""
    return Path(os.environ.get("CAPGATE_MODEL_DIR", REPO_ROOT / ".models" / "tiny-llama"))


def ensure_tiny_model(directory: Path, python: Path) -> None:
    """Generate the tiny model into ``directory`` unless it is already complete."""
    if (directory / MODEL_MARKER).exists():
        return
    subprocess.run(
        [str(python), str(REPO_ROOT / "deploy" / "tiny_model.py"), str(directory)],
        check=True,
        timeout=300,
    )


class VllmServer(Service):
    """``vllm.entrypoints.openai.api_server`` on 127.0.0.1 with priority scheduling.

    ``start()`` returns once ``GET /health`` answers 200, and fails early with the log
    tail if the server exits first. The model is served as ``tiny`` with an 8192-token
    context, float32, eager mode and 1 GiB of KV cache; ``extra_args`` are appended to
    the command line (e.g. ``["--max-num-seqs", "2"]``).
    """

    def __init__(
        self,
        *,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        venv: Path | None = None,
        model: Path | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 240.0,
        served_name: str = SERVED_MODEL_NAME,
        aliases: Sequence[str] = (),
    ) -> None:
        self.port = port if port is not None else free_port()
        self.venv = venv if venv is not None else vllm_venv()
        self.model_dir = model if model is not None else model_dir()
        self.startup_timeout = startup_timeout
        self.served_name = served_name
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="capgate-vllm-")) / "vllm.log"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_ENABLE_RESPONSES_API_STORE": "1",  # stored responses and previous_response_id
            "DO_NOT_TRACK": "1",
        }
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        command = [
            str(self.python),
            "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", served_name, *aliases,
            "--host", HOST,
            "--port", str(self.port),
            "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN),
            "--scheduling-policy", "priority",
            "--enforce-eager",
            *extra_args,
        ]  # fmt: skip
        self._process = ManagedProcess(command, log_path=log_path, env=env)

    @property
    def python(self) -> Path:
        """The vLLM environment's interpreter."""
        return self.venv / "bin" / "python"

    @property
    def model_name(self) -> str:
        """The name requests must use in their ``model`` field."""
        return self.served_name

    @property
    def base_url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:8000`` (the API is under ``/v1``)."""
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The server's combined stdout/stderr log."""
        return self._process.log_path

    @property
    def pid(self) -> int | None:
        """The server's process id, also its process group's (engine processes included)."""
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process.running

    def start(self) -> None:
        """Generate the model if needed, start the server and wait until it is healthy."""
        if not self.python.exists():
            raise FileNotFoundError(
                f"no vLLM environment at {self.venv}: run scripts/setup-vllm.sh or set CAPGATE_VLLM_VENV"
            )
        ensure_tiny_model(self.model_dir, self.python)
        self._process.start()
        try:
            self._process.wait_until(
                self._is_healthy, self.startup_timeout, interval=0.5, what="vLLM GET /health 200"
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Shut the server and its engine processes down (SIGTERM, then SIGKILL)."""
        self._process.stop(timeout=30.0)

    def kill(self) -> None:
        """SIGKILL the server and its engine processes at once (a crash)."""
        self._process.kill()

    def metrics(self) -> Samples:
        """Fetch ``/metrics`` and return the parsed samples."""
        response = httpx.get(f"{self.base_url}/metrics", timeout=10)
        response.raise_for_status()
        return parse(response.text)

    def wait_quiet(self, timeout: float = 30.0) -> None:
        """Wait until vLLM runs and queues nothing and its generation counter stands still (an
        aborted stream of an earlier test can run on for a moment after the gauges are read)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            samples = self.metrics()
            made = sample_sum(samples, "vllm:generation_tokens_total")
            busy = sample_sum(samples, "vllm:num_requests_running") + sample_sum(
                samples, "vllm:num_requests_waiting"
            )
            if made == last and busy == 0:
                return
            assert time.monotonic() < deadline, f"vLLM did not go quiet within {timeout} s"
            last = made
            time.sleep(0.3)

    def _is_healthy(self) -> bool:
        return answers_ok(f"{self.base_url}/health")
