"""Child processes for tests: own process group, log file, guaranteed clean-up."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Self

import httpx

_live_processes: set[ManagedProcess] = set()


class ProcessExitedError(RuntimeError):
    """The process exited while it was expected to keep running."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a TCP listener could bind ``port`` on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Service:
    """A thing the tests start and always shut down: `with` starts it and calls `shutdown()`,
    which is `stop()` unless the service has more to clean up (data directories, say)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()


def answers_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether `GET url` answers 200 now (any connection error: no)."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class ManagedProcess(Service):
    """A command run in its own process group, its output appended to ``log_path``.

    ``stop()`` signals the whole group (the command and everything it spawned),
    escalates from SIGTERM to SIGKILL and always reaps the child. Processes still
    running when the interpreter exits are stopped by an ``atexit`` hook.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id), or ``None`` before ``start()``."""
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited, else ``None``."""
        return self._popen.poll() if self._popen is not None else None

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        """Start the command; a no-op if it is already running."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        _live_processes.add(self)

    def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float,
        *,
        interval: float = 0.1,
        what: str = "condition",
    ) -> None:
        """Poll ``predicate`` until it returns true.

        Raises ``ProcessExitedError`` as soon as the process exits and ``TimeoutError``
        after ``timeout`` seconds, both carrying the tail of the log.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise ProcessExitedError(
                    f"{self.argv[0]} exited with {self.returncode} while waiting for {what}\n"
                    f"{self.log_tail()}"
                )
            if predicate() and self.running:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} not reached within {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(interval)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` seconds, reap the child."""
        self._end(graceful_timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash, no clean shutdown) and reap the child."""
        self._end(graceful_timeout=None)

    def _end(self, graceful_timeout: float | None) -> None:
        popen = self._popen
        if popen is None:
            return
        try:
            if graceful_timeout is not None and popen.poll() is None:
                _signal_group(popen.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(graceful_timeout)
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait()
            _wait_group_gone(popen.pid, timeout=5.0)
        finally:
            _live_processes.discard(self)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send ``signum`` to a process group that may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait up to ``timeout`` seconds until no process is left in group ``pgid``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def stop_all_on_sigterm() -> None:
    """On SIGTERM, stop every live process, then die of the signal as before.

    ``atexit`` hooks do not run when the interpreter is killed by a signal, so a test
    run ended by a CI timeout would otherwise leave its servers behind. Does nothing if
    a SIGTERM handler is already installed.
    """
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        _stop_live_processes()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handle)


@atexit.register
def _stop_live_processes() -> None:
    """Last-resort clean-up for processes whose owners never stopped them."""
    for process in list(_live_processes):
        process.stop(timeout=5.0)
