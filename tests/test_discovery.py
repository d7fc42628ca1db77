"""Every name under an input folder gets a row: links, special files, unreadable folders."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pneumobatch import discovery
from pneumobatch.cli import main
from pneumobatch.discovery import walk
from pneumobatch.errors import Reason


def problems(roots, **kw) -> dict[str, object]:
    return {e.relpath: (e.problem[0] if e.problem else None) for _, e in walk(roots, **kw)}


def test_dangling_link_fifo_and_external_link_each_get_an_entry(tmp_path: Path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    root = tmp_path / "export"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.dcm").write_bytes(b"abc")
    (root / "dangling").symlink_to(root / "missing")
    (root / "ext_file").symlink_to(outside / "secret.png")
    (root / "ext_dir").symlink_to(outside)
    (root / "inner").symlink_to(root / "sub" / "ok.dcm")  # a link inside the root is followed
    os.mkfifo(root / "pipe")
    assert problems([root]) == {
        "dangling": Reason.BROKEN_LINK, "ext_dir": Reason.EXTERNAL_LINK, "ext_file": Reason.EXTERNAL_LINK,
        "inner": None, "pipe": Reason.SPECIAL_FILE, "sub/ok.dcm": None,
    }
    followed = problems([root], follow_external_links=True)
    assert followed["ext_file"] is None and followed["ext_dir/secret.png"] is None


def test_a_fifo_given_as_input_is_a_row_not_a_hang(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe")
    assert problems([tmp_path / "pipe"]) == {"pipe": Reason.SPECIAL_FILE}


def test_an_unlistable_folder_is_an_unreadable_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "export"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "a.dcm").write_bytes(b"x")
    (root / "b.dcm").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):  # root bypasses permission bits, so deny like a share would
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(discovery.os, "scandir", scandir)
    entries = {e.relpath: e.problem for _, e in walk([root])}
    assert entries == {"b.dcm": None, "locked/": (Reason.UNREADABLE, "folder: permission denied")}


def test_predict_writes_rows_for_them_and_exits_1_for_the_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "export"
    (root / "locked").mkdir(parents=True)
    (root / "dangling").symlink_to(root / "missing")
    os.mkfifo(root / "pipe")
    real_scandir = os.scandir
    monkeypatch.setattr(
        discovery.os, "scandir",
        lambda p: (_ for _ in ()).throw(PermissionError(13, "denied")) if Path(p).name == "locked" else real_scandir(p),
    )
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(main, ["predict", str(root), "-o", str(out), "--quiet", "--workers", "0"])
    assert result.exit_code == 1, result.output
    rows = {r["path"]: (r["status"], r["reason"]) for r in csv.DictReader(out.open())}
    assert rows == {
        "dangling": ("skipped", "broken-link"), "locked/": ("error", "unreadable"), "pipe": ("skipped", "special-file"),
    }
