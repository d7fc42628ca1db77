"""Small files a user names are read only when they are regular files, and only up to a size limit.

:func:`~pneumobatch.core.files.read_small_file` itself, and the commands that read such a file
(``--site``, ``--labels``, a monitor input, the PACS ``--config``): a FIFO, a device or a folder is one line,
never a hang. Each CLI call runs in a thread joined with a timeout: on a hang the test fails
(and opens the FIFO's other end so that the blocked reader ends), it never blocks the run.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pneumobatch.cli import main
from pneumobatch.core import files
from pneumobatch.core.files import FileReadError, read_small_file
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT, one_line_error

HANG_S = 15  # far longer than any of these calls takes; a blocked open() never returns


def invoke_bounded(args: list[str], *fifos: Path):
    """``CliRunner().invoke(main, args)`` that fails the test instead of hanging on ``fifos``."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", CliRunner().invoke(main, args)), daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        for fifo in fifos:  # a writer that closes at once: the blocked reader sees end of file and returns
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(HANG_S)
        pytest.fail(f"pneumobatch {args[0]} hung on a FIFO for {HANG_S} s")
    return box["result"]


def _fifo(path: Path) -> Path:
    os.mkfifo(path, 0o600)
    return path


# ------------------------------------------------------------------ the helper


def test_reads_a_regular_file_whole_up_to_its_limit(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"x" * 1000)
    assert read_small_file(path, limit=1000, what="site file") == b"x" * 1000
    with pytest.raises(FileReadError, match=r"^site file .*a\.json: is 1000 bytes, more than the 999 bytes") as e:
        read_small_file(path, limit=999, what="site file")
    assert not e.value.not_a_file
    link = tmp_path / "link.json"
    link.symlink_to(path)  # a link to a regular file is read as the file
    assert read_small_file(link, limit=1 << 20, what="site file") == b"x" * 1000


def test_a_huge_sparse_file_is_refused_without_being_read(tmp_path):
    path = tmp_path / "big.csv"
    with open(path, "wb") as f:
        f.truncate(8 << 30)  # 8 GiB, no block on disk
    with pytest.raises(FileReadError, match=r"is 8 GiB, more than the 512 MiB a labels file may hold"):
        read_small_file(path, limit=files.LABELS_FILE_LIMIT, what="labels file")


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda p: _fifo(p), "a FIFO (named pipe), not a regular file"),
        (lambda p: Path("/dev/zero"), "a character device, not a regular file"),
        (lambda p: p.mkdir() or p, "a folder, not a file"),
        (lambda p: p, "not found"),
    ],
    ids=["fifo", "dev-zero", "folder", "missing"],
)
def test_what_is_not_a_regular_file_is_one_line_never_a_hang(tmp_path, make, kind):
    path = make(tmp_path / "x")
    box: dict = {}

    def read() -> None:
        try:
            read_small_file(path, limit=1 << 20, what="site file")
        except FileReadError as e:
            box["error"] = e

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(HANG_S)
    assert not thread.is_alive(), "read_small_file blocked"
    error = box["error"]
    assert str(error) == f"site file {path}: " + (kind if kind == "not found" else f"is {kind}")
    assert error.not_a_file


def test_a_socket_is_not_a_regular_file(tmp_path):
    path = tmp_path / "s"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        with pytest.raises(FileReadError, match="is a socket, not a regular file"):
            read_small_file(path, limit=1 << 20, what="run.json")
    finally:
        server.close()


def test_a_fifo_swapped_in_after_the_check_is_refused_on_the_open_descriptor(tmp_path, monkeypatch):
    """The type is checked again on the descriptor, which O_NONBLOCK opened without waiting for a writer."""
    fifo = _fifo(tmp_path / "swapped")
    regular = os.stat(ROOT / "pyproject.toml")
    real_stat = os.stat
    monkeypatch.setattr(files.os, "stat", lambda p, *a, **k: regular if Path(p) == fifo else real_stat(p, *a, **k))
    box: dict = {}

    def read() -> None:
        try:
            read_small_file(fifo, limit=1 << 20, what="site file")
        except FileReadError as e:
            box["error"] = e

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(HANG_S)
    assert not thread.is_alive(), "opening the FIFO blocked"
    assert "is a FIFO (named pipe), not a regular file" in str(box["error"])
    assert stat.S_ISFIFO(real_stat(fifo).st_mode)


# ------------------------------------------------------------- the commands


@pytest.fixture()
def predictions(tmp_path) -> Path:
    """The shipped model's predictions on sample_studies, with the run.json card predict writes."""
    csv = tmp_path / "p.csv"
    csv.write_bytes((ROOT / "tests" / "data" / "sample_studies_expected.csv").read_bytes())
    card = json.loads((ROOT / "weights" / "pneumonia.json").read_text())
    (tmp_path / "p.run.json").write_text(json.dumps({"models": [{"name": "pneumonia", "card": card}]}))
    return csv


@pytest.mark.parametrize("command", ["report", "calibrate"])
def test_labels_naming_a_fifo_is_a_usage_error(predictions, tmp_path, command):
    """(A device is refused the same way, by the same check: test_what_is_not_a_regular_file...)"""
    fifo = _fifo(tmp_path / "labels.csv")
    args = [command, str(predictions), "--labels", str(fifo), "--model", "pneumonia", "--bootstrap", "0"]
    result = invoke_bounded([*args, "-o", str(tmp_path / ("r.pdf" if command == "report" else "site.json"))], fifo)
    one_line_error(result, 2, f"labels file {fifo}: is a FIFO (named pipe), not a regular file")
    assert not (tmp_path / "site.json").exists() and not (tmp_path / "r.pdf").exists()


def test_monitor_leaves_out_a_run_json_that_is_a_fifo(tmp_path):
    fifos = [_fifo(tmp_path / f"{night}.run.json") for night in ("mon", "tue")]
    result = invoke_bounded(["monitor", *map(str, fifos), "-o", str(tmp_path / "m.pdf")], *fifos)
    one_line_error(result, 3, "at least two runs", f"run.json {fifos[0]}: is a FIFO (named pipe)", "left out")


def test_pacs_config_naming_a_fifo_is_a_usage_error(tmp_path):
    fifo = _fifo(tmp_path / "pacs.ini")
    result = invoke_bounded(["pull", str(tmp_path / "in"), "--config", str(fifo), "--quiet"], fifo)
    one_line_error(result, 2, f"PACS config {fifo}: is a FIFO (named pipe), not a regular file")
    assert not (tmp_path / "in").exists()


def test_site_naming_a_fifo_is_one_line_never_a_hang(predictions, weights_dir, tmp_path):
    """S5: report --site and predict --site naming a FIFO: exit 2, one line, at once."""
    fifo = _fifo(tmp_path / "site.json")
    report = ["report", str(predictions), "--labels", str(ROOT / "sample_studies" / "labels.csv"), "-m", "pneumonia"]
    result = invoke_bounded([*report, "--site", str(fifo), "-o", str(tmp_path / "r.pdf")], fifo)
    one_line_error(result, 2, f"site file {fifo}: is a FIFO (named pipe), not a regular file")
    (tmp_path / "in").mkdir()
    write_cxr(tmp_path / "in" / "0.dcm", np.zeros((64, 64), np.uint16) + 7, bits_stored=12)
    predict = ["predict", str(tmp_path / "in"), "-m", "tiny", "--weights-dir", str(weights_dir), "--quiet"]
    result = invoke_bounded([*predict, "--site", str(fifo), "-o", str(tmp_path / "out.csv")], fifo)
    one_line_error(result, 2, f"site file {fifo}: is a FIFO (named pipe), not a regular file")
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "r.pdf").exists()


@pytest.mark.slow
def test_site_dev_zero_is_refused_without_reading_it(predictions, tmp_path):
    """S5: --site /dev/zero was read until MemoryError (exit 4). A real process under a 3 GiB
    address-space limit, so that a regression ends in a MemoryError, not in the machine's memory."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    args = ["report", str(predictions), "--labels", str(ROOT / "sample_studies" / "labels.csv"), "-m", "pneumonia"]
    args += ["--site", "/dev/zero", "-o", str(tmp_path / "r.pdf")]
    done = subprocess.run(
        [sys.executable, "-m", "pneumobatch", *args], capture_output=True, text=True, timeout=60, preexec_fn=limit
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "Error: site file /dev/zero: is a character device, not a regular file"
