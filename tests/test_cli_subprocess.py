"""The real command in a subprocess: what reaches stderr and the exit code.

SIGINT and SIGTERM (real signals) stop ``predict`` cleanly: one line, exit 130/143, no
worker left, an immediate ``--resume`` finishes; with ``-q`` nothing but errors reaches stderr.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest

from pneumobatch.core.errors import EXIT_SIGINT, EXIT_SIGTERM
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT, save_tiny_model

pytestmark = pytest.mark.slow  # every test here starts pneumobatch in a real subprocess
N_FILES = 30


@pytest.fixture(scope="module")
def slow_studies(tmp_path_factory) -> Path:
    """Lossless JPEG 2000 DICOMs of noise: slow enough to decode that a signal lands mid-run."""
    folder = tmp_path_factory.mktemp("slow")
    pixels = np.random.default_rng(0).integers(0, 4096, (512, 512)).astype(np.uint16)
    write_cxr(folder / "00.dcm", pixels, bits_stored=12, encoding="j2k-lossless")
    for i in range(1, N_FILES):
        shutil.copyfile(folder / "00.dcm", folder / f"{i:02d}.dcm")
    return folder


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def command(inputs: Path, out: Path, weights_dir: Path, *extra: str, workers: Optional[str] = "2") -> list[str]:
    """``predict`` with the tiny model; ``workers=None`` leaves ``--workers`` out (Ray scales its read tasks itself)."""
    return [
        sys.executable,
        "-m",
        "pneumobatch",
        "predict",
        str(inputs),
        "-o",
        str(out),
        "--weights-dir",
        str(weights_dir),
        "-m",
        "tiny",
        "--device",
        "cpu",
        *(["--workers", workers] if workers is not None else []),
        "--batch-size",
        "2",
        "--quiet",
        *extra,
    ]


def subprocess_env() -> dict[str, str]:
    """This checkout on the path; no ``RAY_ADDRESS``, so a Ray run starts its own local instance."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    return env


def wait_for_rows(proc: subprocess.Popen, journal: Path, timeout: float) -> None:
    """Until the journal holds a row after its header; the run must still be going."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_bytes().splitlines()) > 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"


def is_ray_core_actor_line(line: str) -> bool:
    """The line Ray's C++ core prints for every Ray Data actor pool (ray-project/ray#57733)."""
    return "core_worker.cc" in line and "constructor arguments in the object store" in line


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads worker processes from /proc")
@pytest.mark.parametrize("workers", ["2", "0"])  # 0: a single core's default, decoding in the main process
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)])
def test_a_signal_stops_the_run_cleanly_and_resume_finishes(
    slow_studies: Path, weights_dir: Path, tmp_path: Path, signum, code, workers: str
):
    out = tmp_path / "p.csv"
    journal = tmp_path / "p.csv.partial"
    env = subprocess_env()
    args = command(slow_studies, out, weights_dir, workers=workers)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    wait_for_rows(proc, journal, 120)
    worker_pids = children(proc.pid)
    if (
        workers != "0" and Path(f"/proc/{proc.pid}/task/{proc.pid}/children").exists()
    ):  # a kernel without it: not checked
        assert worker_pids, "no decoding workers found"
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C in a terminal reaches the whole process group
    else:
        proc.send_signal(signum)  # kill PID, a scheduler's timeout: the main process only
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr.decode()
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: interrupted by") and "--resume" in lines[0], stderr.decode()
    assert not (tmp_path / ".p.csv.lock").exists() and journal.exists() and not out.exists()
    time.sleep(0.5)
    assert not [w for w in worker_pids if alive(w)], "decoding workers outlived the run"

    done = subprocess.run([*args, "--resume"], capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(frame["path"]) == [f"{i:02d}.dcm" for i in range(N_FILES)] and (frame["status"] == "ok").all()


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_quiet_keeps_warnings_about_file_contents_off_stderr(tmp_path: Path, weights_dir: Path):
    """A rescale slope of 1e308 overflows in numpy and a 'nan' window upsets pydicom: rows, not stderr noise."""
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = (np.add.outer(np.arange(64), np.arange(64)) * 37 % 4096).astype(np.uint16)
    write_cxr(
        folder / "slope.dcm", pixels, bits_stored=12, extra={"RescaleSlope": "1e308", "RescaleIntercept": "1e308"}
    )
    write_cxr(folder / "window.dcm", pixels, bits_stored=12, extra={"WindowCenter": "nan", "WindowWidth": "0"})
    env = subprocess_env()
    for workers in ("0", "1"):
        out = tmp_path / f"p{workers}.csv"
        args = command(folder, out, weights_dir, workers=workers)
        done = subprocess.run(args, capture_output=True, env=env, timeout=300)
        assert done.returncode == 1 and done.stderr == b"", done.stderr.decode()  # slope.dcm is an error row
        rows = pd.read_csv(out, dtype=str, keep_default_na=False)
        assert dict(zip(rows["path"], rows["status"])) == {"slope.dcm": "error", "window.dcm": "ok"}


def test_quiet_ray_run_leaves_stderr_to_errors(tmp_path: Path, weights_dir: Path):
    """A cron job mails whatever reaches stderr: Ray's notices (the local instance's token, the
    progress bars predict turned off) stay off it. Ray core's own line about actor restarts
    (ray-project/ray#57733, printed by its C++ core for every Ray Data actor pool) is the one
    line pneumobatch cannot reach. A fresh process, so this starts its own local Ray instance."""
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = (np.add.outer(np.arange(64), np.arange(64)) * 37 % 4096).astype(np.uint16)
    for i in range(3):
        write_cxr(folder / f"{i}.dcm", pixels + i, bits_stored=12)
    args = command(folder, tmp_path / "p.csv", weights_dir, "--engine", "ray", workers=None)
    done = subprocess.run(args, capture_output=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    stderr = done.stderr.decode()
    assert "Token authentication" not in stderr and "Progress bars disabled" not in stderr, stderr
    assert "Traceback" not in stderr and "pneumobatch" not in stderr, stderr
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if (
        shutil.disk_usage("/dev/shm").free > 0.31 * memory
    ):  # else Ray warns that its object store (30% of memory) uses /tmp
        foreign = [line for line in stderr.splitlines() if line.strip() and not is_ray_core_actor_line(line)]
        assert foreign == [], stderr
    rows = pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False)
    assert sorted(rows["path"]) == ["0.dcm", "1.dcm", "2.dcm"] and (rows["status"] == "ok").all()


def test_sigterm_stops_a_ray_run_cleanly_and_resume_finishes(tmp_path: Path, weights_dir: Path):
    """ray.init sets its own SIGTERM handler (sys.exit(15), and Ray's C++ core a crash
    reporter that prints a stack): predict puts its own back, so a scheduler's timeout ends a
    Ray run as it ends a local one: one line, exit 143, rows kept, ``--resume`` finishes."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = (np.add.outer(np.arange(1024), np.arange(1024)) + rng.integers(0, 64, (1024, 1024))).astype(np.uint16)
    write_cxr(folder / "000.dcm", pixels, bits_stored=12, encoding="jpegls")  # no reduced decode for JPEG-LS
    for i in range(1, 100):
        shutil.copyfile(folder / "000.dcm", folder / f"{i:03d}.dcm")
    out, journal = tmp_path / "p.csv", tmp_path / "p.csv.partial"
    env = subprocess_env()
    args = command(folder, out, weights_dir, "--engine", "ray", workers=None)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    wait_for_rows(proc, journal, 180)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    text = stderr.decode()
    lines = [line for line in text.splitlines() if line.strip() and not is_ray_core_actor_line(line)]
    assert proc.returncode == EXIT_SIGTERM, text
    assert len(lines) == 1 and lines[0].startswith("Error: interrupted by SIGTERM") and "--resume" in lines[0], text
    assert journal.exists() and not out.exists() and not (tmp_path / ".p.csv.lock").exists()

    done = subprocess.run([*command(folder, out, weights_dir), "--resume"], capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(frame["path"]) == [f"{i:03d}.dcm" for i in range(100)] and (frame["status"] == "ok").all()


def without_write_permission_override(args: list[str]) -> list[str]:
    """``args`` run so that a folder's missing write permission holds (root would override it)."""
    if os.geteuid() != 0:
        return args
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.skip("running as root without capsh: permissions cannot be enforced")
    import shlex

    return [capsh, "--drop=cap_dac_override", "--", "-c", shlex.join(args)]


@pytest.mark.parametrize("command_name", ["predict", "report"])
def test_an_unwritable_output_folder_is_one_line_exit_3(tmp_path: Path, weights_dir: Path, command_name: str):
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = (np.add.outer(np.arange(64), np.arange(64)) * 37 % 4096).astype(np.uint16)
    write_cxr(folder / "a.dcm", pixels, bits_stored=12)
    env = subprocess_env()
    predictions = tmp_path / "p.csv"
    assert subprocess.run(command(folder, predictions, weights_dir), env=env, capture_output=True).returncode == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if command_name == "predict":
        args = command(folder, locked / "p.csv", weights_dir)
    else:
        args = [sys.executable, "-m", "pneumobatch", "report", str(predictions), "-o", str(locked / "r.pdf"), "-q"]
    done = subprocess.run(without_write_permission_override(args), env=env, capture_output=True, timeout=300)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 3 and len(lines) == 1 and lines[0].startswith("Error: cannot write"), done.stderr.decode()
    assert list(locked.iterdir()) == []


# --- kill -9 of the main process (the OOM killer, a scheduler's timeout, KillMode=process) ----


@pytest.fixture(scope="module")
def wide_weights(weights_dir: Path, tmp_path_factory) -> Path:
    """The tiny models plus ``wide``: a 256-pixel input, so that a decoded chunk (4 files,
    256 KB) is more than a pipe holds and a worker whose parent died blocks writing it."""
    folder = tmp_path_factory.mktemp("wide-weights")
    shutil.copytree(weights_dir, folder, dirs_exist_ok=True)
    save_tiny_model(folder, name="wide", input_size=256, seed=1)
    return folder


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every process below ``pid`` (children, theirs...), each with its start time (PIDs are reused)."""
    found = []
    for child in children(pid):
        try:
            found.append((child, Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[19]))
        except OSError:
            continue
        found += descendants(child)
    return found


def still_running(processes: list[tuple[int, str]]) -> list[int]:
    """Those of ``processes`` alive now (same PID and start time, not a zombie)."""
    left = []
    for pid, started in processes:
        try:
            now = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except OSError:
            continue
        if now == started and alive(pid):
            left.append(pid)
    return left


def kill_9_then_resume(
    args: list[str], out: Path, timeout: float, resume_args: Optional[list[str]] = None
) -> tuple[list[tuple[int, str]], list[int], subprocess.CompletedProcess]:
    """Start ``args``; ``kill -9`` its main process once rows are in the journal; wait up to
    3 s for every process it started to end; then run ``--resume`` (``resume_args``, default
    ``args``). Returns the processes the run had, those still running after the 3 s, and the
    resumed run. Whatever is left is killed afterwards."""
    env = subprocess_env()
    journal = out.with_name(out.name + ".partial")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    tree: list[tuple[int, str]] = []
    try:
        wait_for_rows(proc, journal, timeout)
        tree = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer does
        proc.communicate(timeout=10)
        deadline = time.monotonic() + 3
        while still_running(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = still_running(tree)
        done = subprocess.run([*(resume_args or args), "--resume"], capture_output=True, env=env, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in still_running(tree):
            os.kill(pid, signal.SIGKILL)
    return tree, left, done


N_KILLED = 40


@pytest.fixture(scope="module")
def kill_studies(slow_studies: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kill")
    for i in range(N_KILLED):
        shutil.copyfile(slow_studies / "00.dcm", folder / f"{i:03d}.dcm")
    return folder


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads worker processes from /proc")
@pytest.mark.parametrize("workers", ["0", "2", None])  # None: the default split of this machine's cores
def test_kill_9_of_the_main_process_leaves_no_worker_and_resume_finishes(
    kill_studies: Path, wide_weights: Path, tmp_path: Path, workers: Optional[str]
):
    """The decoding workers end with their parent (not minutes later, still holding the
    output's lock), so the next ``--resume`` finishes the night: one row per file, exit 0."""
    out = tmp_path / "p.csv"
    args = [*command(kill_studies, out, wide_weights, workers=workers), "-m", "wide"]
    tree, left, done = kill_9_then_resume(args, out, 120)
    if workers == "2":
        assert tree, "no decoding workers found"
    assert left == [], f"processes of the killed run still running 3 s after its kill -9: {left}"
    assert done.returncode == 0, done.stderr.decode()
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(frame["path"]) == sorted(f"{i:03d}.dcm" for i in range(N_KILLED) for _ in range(2))
    assert (frame["status"] == "ok").all() and len(frame) == 2 * N_KILLED  # one row per file and model
    assert not (tmp_path / ".p.csv.lock").exists() and not (tmp_path / "p.csv.partial").exists()


def test_kill_9_of_a_ray_driver_leaves_the_output_unlocked_and_resume_finishes(
    kill_studies: Path, weights_dir: Path, tmp_path: Path
):
    """The driver is the main process: after its ``kill -9`` the local Ray instance it started
    (Ray's own processes, which may take a while to notice) must not keep the output locked;
    a ``--resume`` 3 s later finishes with one row per file."""
    out = tmp_path / "p.csv"
    args = command(kill_studies, out, weights_dir, "--engine", "ray", workers=None)
    tree, _, done = kill_9_then_resume(args, out, 180, resume_args=command(kill_studies, out, weights_dir))
    assert tree, "no Ray processes found below the driver"
    assert done.returncode == 0, done.stderr.decode()
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(frame["path"]) == [f"{i:03d}.dcm" for i in range(N_KILLED)] and (frame["status"] == "ok").all()


def test_a_second_predict_on_a_live_runs_output_is_told_another_run_is_writing(
    slow_studies: Path, wide_weights: Path, tmp_path: Path
):
    """Not "an interrupted run" (the first is alive and writing its journal): one line, exit 3,
    with or without --resume or --overwrite, and the first run's journal is left alone."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(400):  # more than the first run can do while the others try (it is stopped then)
        os.link(slow_studies / "00.dcm", folder / f"{i:03d}.dcm")
    out = tmp_path / "p.csv"
    env = subprocess_env()
    args = [*command(folder, out, wide_weights, workers="0"), "-m", "wide"]  # a core for the first, one for the others
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        wait_for_rows(first, out.with_name("p.csv.partial"), 120)
        others = {
            extra: subprocess.Popen([*args, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            for extra in ((), ("--resume",), ("--overwrite",))
        }
        for extra, second in others.items():
            _, stderr = second.communicate(timeout=120)
            lines = stderr.decode().strip().splitlines()
            assert second.returncode == 3 and len(lines) == 1, (extra, stderr.decode())
            assert "another pneumobatch run" in lines[0] and "is writing" in lines[0] and "interrupted" not in lines[0]
        assert first.poll() is None, "the first run ended before the others had tried"
        assert out.with_name("p.csv.partial").exists() and not out.exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == EXIT_SIGTERM
