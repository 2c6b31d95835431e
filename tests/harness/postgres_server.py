"""A private PostgreSQL server (Debian's binaries) on a loopback port, for the ledger sinks' tests."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from .processes import ManagedProcess, Service, free_port

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian package `postgresql`)")
    return Path(found[-1]).parent


class PostgresServer(Service):
    """`initdb` into a temporary directory, then `postgres` on a free port of 127.0.0.1, with a
    superuser `capgate` (trust on loopback) and a database `capgate`. PostgreSQL refuses to run
    as root: as root, it runs as the `postgres` user the Debian package creates."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="capgate-pg-"))
        self.data_dir = self.root / "data"
        self._bin = _bin_dir()
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        command = [
            *self._as, str(self._bin / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
            "-h", HOST, "-k", str(self.root), "-c", "fsync=on",
        ]  # fmt: skip
        self._process = ManagedProcess(command, log_path=self.root / "postgres.log")

    @property
    def dsn(self) -> str:
        return f"postgresql://capgate@{HOST}:{self.port}/capgate"

    def start(self) -> None:
        if not self.data_dir.exists():
            subprocess.run(
                [*self._as, str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", "capgate",
                 "--auth=trust", "-E", "UTF8", "--no-instructions"],
                check=True, capture_output=True,
            )  # fmt: skip
        self._process.start()
        try:
            self._process.wait_until(self._answers, STARTUP_TIMEOUT, interval=0.2, what="postgres")
            if not self._psql("postgres", "SELECT 1 FROM pg_database WHERE datname = 'capgate'"):
                self._psql("postgres", "CREATE DATABASE capgate")
        except BaseException:
            self.stop()
            raise

    def _psql(self, database: str, sql: str) -> str:
        out = subprocess.run(
            [str(self._bin / "psql"), "-h", HOST, "-p", str(self.port), "-U", "capgate", "-d", database,
             "-tAc", sql],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return out.stdout.strip()

    def query(self, sql: str) -> str:
        """Run `sql` in the `capgate` database; its rows as psql's unaligned text."""
        return self._psql("capgate", sql)

    def _answers(self) -> bool:
        try:
            self._psql("postgres", "SELECT 1")
        except subprocess.CalledProcessError:
            return False
        return True

    def stop(self) -> None:
        self._process.stop(timeout=10.0)

    def shutdown(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
