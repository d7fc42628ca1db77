"""Inputs built to hurt the night: folders that cannot be entered, links nobody may read,
a FIFO put where a file was, a DICOM or PNG whose lengths claim gigabytes (issue 23).

Each ends as rows (and exit 1 or 0), never exit 4, never a hang, never gigabytes of memory.
Permission tests run the real command in a subprocess: as root they first drop the
capabilities that bypass permission bits (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH,
CAP_SYS_PTRACE) from the child's bounding set, so that the bits count as for any user.
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

from pneumobatch.cli import main
from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.io import discovery
from pneumobatch.io.discovery import PNG_SIGNATURE, FileKind, sniff
from pneumobatch.io.predictions import OutputPaths
from pneumobatch.io.readers import ReadOptions, read_image
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT

_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_SYS_PTRACE = 1, 2, 19
_PR_CAPBSET_DROP = 24
NOBODY = 65534


def _drop_bypass_capabilities() -> None:
    """In the child before exec: a root process loses what lets it ignore permission bits."""
    if os.getuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_SYS_PTRACE):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _predict(inputs: Path, out: Path, weights_dir: Path) -> subprocess.CompletedProcess:
    """``pneumobatch predict`` in a subprocess that permission bits apply to, bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "pneumobatch", "predict", str(inputs), "-o", str(out), "--weights-dir",
         str(weights_dir), "-m", "tiny", "--device", "cpu", "--workers", "0", "--quiet"],
        env=_env(), capture_output=True, text=True, timeout=60, preexec_fn=_drop_bypass_capabilities,
    )  # fmt: skip


def _rows(path: Path) -> dict[str, tuple[str, str, str]]:
    with path.open(newline="") as fh:
        return {r["path"]: (r["status"], r["reason"], r["detail"]) for r in csv.DictReader(fh)}


def _png(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64)).astype(np.uint8)
    PILImage.fromarray(pixels).save(path)
    return path


# --- section 2: a folder that can be listed but not entered; links nobody may read ------


@pytest.mark.slow
def test_a_folder_that_can_be_listed_but_not_entered_gives_rows_not_a_crash(tmp_path: Path, weights_dir: Path):
    root = tmp_path / "export"
    (root / "locked" / "inner").mkdir(parents=True)
    _png(root / "a.png")
    _png(root / "locked" / "b.png", 1)
    _png(root / "locked" / "inner" / "c.png", 2)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (root / "locked").chmod(0o644)  # read (list), no execute (enter)
    try:
        result = _predict(root, out_dir / "p.csv", weights_dir)
    finally:
        (root / "locked").chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    rows = _rows(out_dir / "p.csv")
    assert rows["a.png"][:2] == ("ok", "")
    assert rows["locked/b.png"] == ("error", "unreadable", "permission denied")
    assert rows["locked/inner/"] == ("error", "unreadable", "folder: permission denied")
    assert len(rows) == 3


@pytest.mark.slow
def test_predict_on_a_proc_folder_it_may_not_inspect_gives_rows_not_a_crash(tmp_path: Path, weights_dir: Path):
    """``/proc/PID`` of another user's process: ``cwd``, ``exe``, ``root`` cannot be read
    (the ``PermissionError`` ``predict /proc`` met on ``/proc/1/cwd``)."""
    if os.getuid() == 0:

        def as_nobody() -> None:
            os.setgid(NOBODY)
            os.setuid(NOBODY)

        other = subprocess.Popen(["sleep", "60"], cwd="/", preexec_fn=as_nobody)  # fmt: skip
        pid = other.pid
    else:
        other, pid = None, 1  # init belongs to root
    try:
        result = _predict(Path(f"/proc/{pid}"), tmp_path / "p.csv", weights_dir)
    finally:
        if other is not None:
            other.kill()
            other.wait(timeout=10)
    assert result.returncode == 1, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    rows = _rows(tmp_path / "p.csv")
    assert rows["cwd"] == ("error", "unreadable", "permission denied")
    assert rows["fd/"] == ("error", "unreadable", "folder: permission denied")


def test_the_reason_for_an_entry_that_cannot_be_looked_at_never_raises(tmp_path: Path, monkeypatch):
    """Even ``lstat`` fails inside a folder without execute permission."""
    path = tmp_path / "locked" / "b.png"
    real_stat, real_lstat = os.stat, os.lstat

    def denied(real):
        def stat(p, *args, **kwargs):
            if Path(p) == path:
                raise PermissionError(13, "Permission denied", str(p))
            return real(p, *args, **kwargs)

        return stat

    monkeypatch.setattr(os, "stat", denied(real_stat))
    monkeypatch.setattr(os, "lstat", denied(real_lstat))
    assert discovery._problem_for(path, PermissionError(13, "Permission denied")) == (
        Reason.UNREADABLE,
        "permission denied",
    )
    assert discovery._problem_for(path, FileNotFoundError(2, "No such file")) == (Reason.UNREADABLE, "No such file")


def test_an_output_never_fails_to_tell_whether_it_owns_a_path(tmp_path: Path, monkeypatch):
    """``OutputPaths.owns`` resolves every input; a link it may not read must not raise."""
    unreadable = tmp_path / "proc" / "cwd"
    real_realpath = os.path.realpath

    def realpath(p, *args, **kwargs):
        if Path(p) == unreadable:
            raise PermissionError(13, "Permission denied", str(p))
        return real_realpath(p, *args, **kwargs)

    monkeypatch.setattr(os.path, "realpath", realpath)
    paths = OutputPaths(tmp_path / "p.csv")
    assert paths.owns(unreadable) is False
    assert paths.owns(tmp_path / "p.csv.partial") is True


# --- C1: a FIFO where a file was -----------------------------------------------------------


@contextmanager
def unblocking(fifo: Path, after: float = 4.0) -> Iterator[list[bool]]:
    """If a reader is still blocked on ``fifo`` after ``after`` seconds, open and close its
    write end, so that a hang fails the test instead of stopping it. Yields ``[True]`` then."""
    hung: list[bool] = []
    stop = threading.Event()

    def watch() -> None:
        if stop.wait(after):
            return
        while not stop.is_set():
            try:  # succeeds only while a reader has the FIFO open
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                hung.append(True)
            except OSError:
                pass
            stop.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield hung
    finally:
        stop.set()
        thread.join(timeout=5)


@pytest.mark.parametrize("kind", [FileKind.DICOM, FileKind.PNG])
def test_a_fifo_at_a_files_name_is_refused_by_the_readers_not_waited_on(tmp_path: Path, kind: FileKind):
    fifo = tmp_path / "image"
    os.mkfifo(fifo)
    for read in (lambda: sniff(fifo), lambda: read_image(fifo, kind, ReadOptions())):
        with unblocking(fifo) as hung:
            started = time.monotonic()
            with pytest.raises(FileRejected) as caught:
                read()
        assert not hung and time.monotonic() - started < 2
        assert caught.value.reason is Reason.SPECIAL_FILE


def test_a_file_replaced_by_a_fifo_after_discovery_is_a_special_file_row(
    tmp_path: Path, weights_dir: Path, monkeypatch
):
    import pneumobatch.predict as predict_module

    root = tmp_path / "export"
    root.mkdir()
    _png(root / "a.png")
    _png(root / "b.png", 1)
    real_entries = predict_module._entries

    def entries_then_swap(*args, **kwargs):  # between discovery and reading, b.png becomes a FIFO
        found = real_entries(*args, **kwargs)
        (root / "b.png").unlink()
        os.mkfifo(root / "b.png")
        return found

    monkeypatch.setattr(predict_module, "_entries", entries_then_swap)
    out = tmp_path / "p.csv"
    args = ["predict", str(root), "-o", str(out), "--weights-dir", str(weights_dir), "-m", "tiny"]
    with unblocking(root / "b.png", after=10) as hung:
        result = CliRunner().invoke(main, [*args, "--device", "cpu", "--workers", "0", "--quiet"])
    assert not hung, "predict waited on the FIFO"
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert rows["a.png"][:2] == ("ok", "")
    assert rows["b.png"][:2] == ("skipped", "special-file")


# --- H1 and H2: lengths that claim gigabytes -------------------------------------------------

#: Runs one read in a fresh interpreter and reports what it cost.
_MEASURE = """
import json, sys, time
from pathlib import Path
from pneumobatch.core.errors import FileRejected
from pneumobatch.io.discovery import sniff
from pneumobatch.io.readers import ReadOptions, read_image
path = Path(sys.argv[1])
started = time.monotonic()
try:
    read_image(path, sniff(path), ReadOptions(min_side=32))
    outcome = ["ok", ""]
except FileRejected as exc:
    outcome = [exc.reason.value, exc.detail]
seconds = time.monotonic() - started
# the peak of this interpreter's own memory (ru_maxrss would include the parent's, kept across exec)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps([*outcome, seconds, peak // 1024]))
"""


def _measure(path: Path) -> tuple[str, str, float, int]:
    """(reason, detail, seconds, peak RSS in MiB) of reading ``path`` in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    reason, detail, seconds, rss = json.loads(result.stdout.strip().splitlines()[-1])
    return reason, detail, seconds, rss


def _dicom_with_pixel_length(path: Path, length: int) -> None:
    """A 64x64 16-bit DX whose Pixel Data element claims ``length`` bytes; the file is
    extended (sparse: no disk used) to hold them."""
    write_cxr(path, np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16), bits_stored=12)
    data = path.read_bytes()
    at = data.rindex(b"\xe0\x7f\x10\x00OW\x00\x00")  # (7FE0,0010) OW, explicit VR little endian
    with open(path, "r+b") as fh:
        fh.seek(at + 8)
        fh.write(struct.pack("<I", length))
        if length > len(data) - at - 12:
            fh.truncate(at + 12 + length)


@pytest.mark.slow
def test_pixel_data_claiming_2_gib_for_64x64_pixels_is_refused_from_its_length(tmp_path: Path):
    path = tmp_path / "huge.dcm"
    _dicom_with_pixel_length(path, 2**31)
    reason, detail, seconds, rss = _measure(path)
    assert seconds < 2 and rss < 300, (seconds, rss)
    assert reason == "corrupt" and "Pixel Data holds 2147483648 bytes" in detail and "8192" in detail


def test_pixel_data_with_padding_or_a_spare_frame_still_decodes(tmp_path: Path):
    """Only lengths far past the declared size are refused: a stray extra frame is read as before."""
    path = tmp_path / "spare.dcm"
    pixels = np.random.default_rng(0).integers(0, 4096, (64, 128)).astype(np.uint16)
    write_cxr(path, pixels, bits_stored=12)
    spare = tmp_path / "spare2.dcm"
    data = path.read_bytes()
    at = data.rindex(b"\xe0\x7f\x10\x00OW\x00\x00")
    body = data[at + 12 :]
    spare.write_bytes(data[: at + 8] + struct.pack("<I", 2 * len(body)) + body + body)
    for file in (path, spare):
        assert read_image(file, FileKind.DICOM, ReadOptions()).pixels.shape == (64, 128)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bytes(extra: bytes = b"") -> tuple[bytes, bytes]:
    """(everything up to the image data, the image data and IEND) of a 64x64 grey PNG."""
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)
    raw = b"".join(b"\x00" + bytes(range(0, 256, 4)) for _ in range(64))
    head = PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + extra
    return head, _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


@pytest.mark.slow
def test_a_png_chunk_claiming_a_gigabyte_is_refused_without_reading_it(tmp_path: Path):
    head, tail = _png_bytes()
    claim = 10**9
    path = tmp_path / "claim.png"
    with open(path, "wb") as fh:  # a private chunk of 10^9 bytes that the (sparse) file holds
        fh.write(head + struct.pack(">I", claim) + b"prVt")
        fh.truncate(fh.tell() + claim)
        fh.seek(0, os.SEEK_END)
        fh.write(b"\0\0\0\0" + tail)
    reason, detail, seconds, rss = _measure(path)
    assert seconds < 2 and rss < 300, (seconds, rss)
    assert reason == "corrupt" and f"claims {claim} bytes" in detail


def test_pngs_with_ordinary_chunks_still_decode(tmp_path: Path):
    """Text and private chunks of ordinary size, and image data split over many chunks, read as before."""
    head, tail = _png_bytes(_chunk(b"tEXt", b"Comment\x00" + b"x" * 5000) + _chunk(b"prVt", b"\x01" * 70000))
    idat = tail[8:-16]  # the compressed image data of the single IDAT chunk
    split = b"".join(_chunk(b"IDAT", idat[i : i + 100]) for i in range(0, len(idat), 100))
    path = tmp_path / "ordinary.png"
    path.write_bytes(head + split + _chunk(b"IEND", b""))
    image = read_image(path, sniff(path), ReadOptions())
    assert image.pixels.shape == (64, 64) and image.pixels.max() > 0.9
