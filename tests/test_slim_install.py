"""``pip install pneumobatch`` without the ``torch`` extra, in its own venv: it predicts, and says what train needs.

The venv is ``.venv-slim`` at the repository root (ignored by git), made once and reused
while ``setup.cfg`` and ``pyproject.toml`` stay the same; creating it installs the
dependencies from the package index (about a minute, no PyTorch). Its Python is the one
running the tests.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.model.test_runtime import SAMPLE, _compare_with_reference

pytestmark = pytest.mark.slow

VENV = ROOT / ".venv-slim"


def _stamp() -> str:
    return hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in ("setup.cfg", "pyproject.toml"))).hexdigest()


@pytest.fixture(scope="module")
def slim() -> Path:
    """The slim venv's bin folder, installed when missing or made for other package metadata."""
    stamp = VENV / ".installed"
    if not (stamp.is_file() and stamp.read_text() == _stamp()):
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        install = subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "-e", str(ROOT)],
            capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        assert install.returncode == 0, install.stderr[-2000:]
        stamp.write_text(_stamp())
    return VENV / "bin"


def test_the_slim_install_has_no_pytorch(slim: Path):
    for package in ("torch", "torchvision"):
        run = subprocess.run([str(slim / "python"), "-c", f"import {package}"], capture_output=True, text=True)
        assert run.returncode == 1 and f"No module named '{package}'" in run.stderr


def test_the_slim_install_predicts_the_sample_studies_as_the_full_one(slim: Path, tmp_path: Path):
    out = tmp_path / "p.csv"
    run = subprocess.run(
        [str(slim / "pneumobatch"), "predict", str(SAMPLE), "-m", "pneumonia", "-m", "etiology", "-o", str(out), "-q"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 1 and run.stderr == "", run.stderr  # exit 1: the sample's unreadable files
    _compare_with_reference(out)
    report = subprocess.run(
        [str(slim / "pneumobatch"), "report", str(out), "--labels", str(SAMPLE / "labels.csv"), "--model", "pneumonia",
         "-o", str(tmp_path / "r.pdf"), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert report.returncode == 0 and (tmp_path / "r.pdf").stat().st_size > 10_000, report.stderr


def test_the_slim_install_says_in_one_line_what_train_needs(slim: Path, tmp_path: Path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n")
    run = subprocess.run(
        [str(slim / "pneumobatch"), "train", str(manifest), "-o", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 3 and run.stderr.strip().splitlines() == [
        "Error: train needs PyTorch (torch), which is not installed: pip install 'pneumobatch[torch]'"
    ]
