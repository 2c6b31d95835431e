"""The spool's durability: appends fsync'd off the event loop, rewrites that fsync before they
replace, and a process killed while appending loses nothing it had acknowledged."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from metering.events import UsageEvent
from metering.spool import Spool, SpooledSettlement, read_items, rewrite
from metering.windows import Scope

REPO = Path(__file__).resolve().parents[2]


def item(rid: str) -> SpooledSettlement:
    return SpooledSettlement(UsageEvent(rid, "u", "t", "m", 1, 0, 2, 3, 3, "stop", None, 1.0, 5), Scope("u"))


def test_append_async_fsyncs_in_a_worker_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (threads.append(threading.get_ident()), real_fsync(fd)))
    spool = Spool(tmp_path, 1 << 20)

    async def run() -> int:
        await asyncio.gather(*(spool.append_async(item(f"r{i}")) for i in range(20)))
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert len(threads) == 20 and loop_thread not in threads
    [path] = tmp_path.glob("spool-*")
    assert sorted(i.event.request_id for i in read_items(path)) == sorted(f"r{i}" for i in range(20))


def test_rewrite_fsyncs_the_new_content_before_it_replaces_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b)))
    path = tmp_path / "spool-1.ready"
    path.write_bytes(item("old").to_line())
    rewrite(path, [item("kept")])
    assert order == ["fsync", "replace", "fsync"]  # the file, the rename, the directory
    assert [i.event.request_id for i in read_items(path)] == ["kept"]


CHILD = """
import sys
sys.path.insert(0, {repo!r})
from metering.events import UsageEvent
from metering.spool import Spool, SpooledSettlement
from metering.windows import Scope
spool = Spool({dir!r}, 1 << 30)
i = 0
while True:
    event = UsageEvent(f"r{{i}}", "u", "t", "m", 1, 0, 2, 3, 3, "stop", None, 1.0, 5)
    spool.append(SpooledSettlement(event, Scope("u")))
    print(i, flush=True)
    i += 1
"""


@pytest.mark.parametrize("after_s", [0.05, 0.2, 0.5])
def test_a_process_killed_while_appending_loses_nothing_it_acknowledged(
    tmp_path: Path, after_s: float
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(repo=str(REPO), dir=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        first = child.stdout.readline()  # appending has begun
        time.sleep(after_s)
        child.send_signal(signal.SIGKILL)
        acknowledged = [int(line) for line in (first + child.stdout.read()).split()]
    finally:
        child.kill()
        child.wait(10)
    ids = [i.event.request_id for path in tmp_path.glob("spool-*") for i in read_items(path)]
    assert acknowledged, "the child appended nothing before it was killed"
    assert ids[: len(acknowledged)] == [f"r{i}" for i in acknowledged]
    assert len(ids) in (len(acknowledged), len(acknowledged) + 1)  # one more may be on disk unacknowledged
