"""One run at a time on a ledger (issue 23, F9): two pulls sharing one would fetch every
instance twice. A second run is refused with one line (exit 3) while the first lives; the
lock dies with its holder, so after a ``kill -9`` the next run simply takes it over."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pneumobatch.core.errors import EXIT_FATAL
from pneumobatch.operations.pacs.ledger import Ledger, LedgerBusy, lock_path
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # real processes


def hold(path: str, ready, child_pid) -> None:
    """In another process: open the ledger, record an instance, fork a child that outlives us, wait."""
    import time

    ledger = Ledger(Path(path))
    ledger.mark_fetched("archive", "1.2.3", "1.2.3.4", "1.2.3.4.5", Path("/pulled/a.dcm"))
    pid = os.fork()  # a child forked while the lock is held (it must not hold it)
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    child_pid.value = pid
    ready.set()
    time.sleep(60)


@pytest.fixture()
def holder(tmp_path: Path):
    """A live process (spawned, so a real other process) holding ``tmp_path/l.sqlite``."""
    context = multiprocessing.get_context("spawn")
    ready, child = context.Event(), context.Value("i", 0)
    process = context.Process(target=hold, args=(str(tmp_path / "l.sqlite"), ready, child), daemon=True)
    process.start()
    try:
        assert ready.wait(60), "the holding process did not start"
        yield process
    finally:
        for pid in (process.pid, child.value):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        process.join(10)


def test_a_second_run_is_refused_while_the_first_lives_and_takes_over_after_its_kill_9(holder, tmp_path: Path):
    path = tmp_path / "l.sqlite"
    with pytest.raises(LedgerBusy) as refused:
        Ledger(path)
    message = str(refused.value)
    assert refused.value.exit_code == EXIT_FATAL and "\n" not in message
    assert f"another pneumobatch pull or push (PID {holder.pid}) is using ledger {path}" in message

    os.kill(holder.pid, signal.SIGKILL)  # its forked child lives on
    holder.join(10)
    with Ledger(path) as ledger:  # taken over at once
        assert ledger.fetched("archive", "1.2.3") == {"1.2.3.4.5"}  # what the killed run committed
        with pytest.raises(LedgerBusy):
            Ledger(path)  # this process holds it now: a second one here is refused too
    assert not lock_path(path).exists()


def test_a_second_pull_on_a_held_ledger_is_one_line_exit_3_and_contacts_nothing(holder, tmp_path: Path):
    """A real ``pneumobatch pull`` into another folder sharing the ledger: refused before any
    request (the archive address is a closed port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with ends: nothing listens there
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, "-m", "pneumobatch", "pull", str(tmp_path / "second"), "--url"]
    args += [f"http://127.0.0.1:{port}/dicom-web", "--ledger", str(tmp_path / "l.sqlite"), "-q"]
    done = subprocess.run(args, capture_output=True, env=env, timeout=60)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == EXIT_FATAL and len(lines) == 1, done.stderr.decode()
    assert "another pneumobatch pull or push" in lines[0] and "is using ledger" in lines[0]


def test_a_refused_pull_leaves_the_running_pulls_files_in_flight_alone(holder, tmp_path: Path):
    """A second pull into the same folder is refused before it tidies up: the temporary file of
    an instance the first pull is writing (named as atomic_write names it) stays where it is."""
    import socket

    in_flight = tmp_path / "night" / "1.2.3" / "1.2.3.4" / ".1.2.3.4.5.dcm.tmp-abc123"
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"half an instance")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, "-m", "pneumobatch", "pull", str(tmp_path / "night"), "--url"]
    args += [f"http://127.0.0.1:{port}/dicom-web", "--ledger", str(tmp_path / "l.sqlite"), "-q"]
    done = subprocess.run(args, capture_output=True, env=env, timeout=60)
    assert done.returncode == EXIT_FATAL, done.stderr.decode()
    assert in_flight.read_bytes() == b"half an instance"
