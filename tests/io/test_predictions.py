"""What predict does to the files at ``-o``: resume only its own rows, never write over an input,
a special file or through a link, survive a full disk, keep spreadsheets from running formulas."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from pneumobatch.cli import main
from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import EXIT_FATAL, EXIT_OK, EXIT_USAGE, OutputError
from pneumobatch.io import predictions as outputs
from pneumobatch.io.atomicfile import atomic_write, temp_prefix
from pneumobatch.io.predictions import neutralise_formulas, restore_formulas
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT, one_line_error, save_tiny_model


def write_pngs(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        pixels = (np.add.outer(np.arange(64), np.arange(64)) * (i + 2) % 256).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name, format="PNG")
    return folder


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    return write_pngs(tmp_path / "in", [f"{i}.png" for i in range(5)])


def predict(inputs: Path, out: Path, weights_dir: Path, *extra: str, model: str = "tiny"):
    args = [
        "predict",
        str(inputs),
        "-o",
        str(out),
        "--weights-dir",
        str(weights_dir),
        "-m",
        model,
        "--quiet",
        "--workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]
    return CliRunner().invoke(main, args)


def csv_rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# --- item 4: --resume continues only what this run could have written -----------------


@pytest.fixture()
def other_weights(weights_dir: Path, tmp_path: Path) -> Path:
    """A model named ``tiny`` like the fixture's, with other weights (so another SHA-256)."""
    return save_tiny_model(tmp_path / "other-weights", seed=1)


def test_resume_refuses_rows_of_other_models_other_weights_or_other_tools(
    images: Path, tmp_path: Path, weights_dir: Path, other_weights: Path
):
    out = tmp_path / "p.csv"
    assert predict(images, out, weights_dir).exit_code == EXIT_OK
    before = out.read_bytes()

    result = predict(images, out, weights_dir, "--resume", model="tiny-etiology")
    one_line_error(result, EXIT_USAGE, "model 'tiny'", "this run does not use")
    result = predict(images, out, other_weights, "--resume")
    one_line_error(result, EXIT_USAGE, "other weights", "SHA-256")
    assert out.read_bytes() == before  # refused, and nothing rewritten

    other = tmp_path / "accounts.csv"
    other.write_text("invoice,amount\n1,20.5\n")
    result = predict(images, other, weights_dir, "--resume")
    one_line_error(result, EXIT_USAGE, "not a pneumobatch predictions CSV", "left as it is")
    assert other.read_text() == "invoice,amount\n1,20.5\n"
    assert not (tmp_path / "accounts.studies.csv").exists() and not (tmp_path / "accounts.csv.partial").exists()


# --- item 6: never over an input or something that is not a regular file ----------------


def test_overwrite_refuses_inputs_and_files_that_are_not_regular(images: Path, tmp_path: Path, weights_dir: Path):
    image = images / "0.png"
    original = image.read_bytes()
    result = predict(images, image, weights_dir, "--overwrite")  # -o names an input image
    one_line_error(result, EXIT_FATAL, "input file")
    assert image.read_bytes() == original

    result = predict(image, image, weights_dir, "--overwrite")  # -o names the input file given
    one_line_error(result, EXIT_FATAL, "input file")
    assert image.read_bytes() == original

    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    one_line_error(predict(images, fifo, weights_dir, "--overwrite"), EXIT_FATAL, "not a regular file")
    one_line_error(predict(images, Path(os.devnull), weights_dir, "--overwrite"), EXIT_FATAL, "not a regular file")
    (tmp_path / "d.run.json").mkdir()  # a folder where a sidecar goes
    one_line_error(predict(images, tmp_path / "d.csv", weights_dir, "--overwrite"), EXIT_FATAL, "d.run.json")


def test_report_and_predict_share_the_refusal(images: Path, tmp_path: Path, weights_dir: Path):
    out = tmp_path / "p.csv"
    assert predict(images, out, weights_dir).exit_code == EXIT_OK
    labels = tmp_path / "labels.pdf"  # a labels file that happens to be named like the report
    labels.write_text("path,label\n0.png,normal\n")
    result = CliRunner().invoke(
        main, ["report", str(out), "--labels", str(labels), "-o", str(labels), "-q", "--bootstrap", "0"]
    )
    one_line_error(result, EXIT_FATAL, "would overwrite an input file")
    assert labels.read_text() == "path,label\n0.png,normal\n"


# --- item 9: no file is written through a planted symbolic link -------------------------


def test_planted_links_at_the_lock_journal_and_temporary_names_are_not_followed(
    images: Path, tmp_path: Path, weights_dir: Path
):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "p.csv"
    lock = tmp_path / ".p.csv.lock"
    lock.symlink_to(victim)
    one_line_error(predict(images, out, weights_dir), EXIT_FATAL, "symbolic link")
    lock.unlink()
    journal = tmp_path / "p.csv.partial"
    journal.symlink_to(victim)
    one_line_error(predict(images, out, weights_dir, "--overwrite"), EXIT_FATAL, "symbolic link")
    journal.unlink()
    assert victim.read_text() == "precious\n"

    # the temporary names of the atomic writer are not predictable: links planted at the
    # names an attacker could guess (the old .NAME.tmp-PID scheme) are never written to
    for pid in range(os.getpid() - 5, os.getpid() + 6):
        (tmp_path / f"{temp_prefix(out)}{pid}").symlink_to(victim)
    assert predict(images, out, weights_dir).exit_code == EXIT_OK
    assert victim.read_text() == "precious\n"
    assert len(csv_rows(out)) == 5


# --- item 10: spreadsheet formula injection -------------------------------------------


def test_formula_cells_are_neutralised_and_read_back_exactly():
    values = [
        "=1+1",
        "+cmd|' /C calc'!A0",
        "-2+3",
        "@SUM(A1)",
        "\tx",
        "'=quoted",
        "''@",
        "-3",
        "-0.5e3",
        "plain",
        "'plain",
        "",
    ]
    frame = pd.DataFrame({"path": values})
    written = neutralise_formulas(frame)["path"].tolist()
    assert written == [
        "'=1+1",
        "'+cmd|' /C calc'!A0",
        "'-2+3",
        "'@SUM(A1)",
        "'\tx",
        "''=quoted",
        "'''@",
        "-3",
        "-0.5e3",
        "plain",
        "'plain",
        "",
    ]
    assert restore_formulas(neutralise_formulas(frame))["path"].tolist() == values


def test_formula_file_names_are_quoted_in_the_csvs_and_resume_reads_them_back(tmp_path: Path, weights_dir: Path):
    names = ["=HYPERLINK(1).png", "+cmd.png", "-2+3.png", "@SUM(A1).png", "plain.png"]
    folder = write_pngs(tmp_path / "in", names)
    pixels = (np.add.outer(np.arange(64), np.arange(64)) * 37 % 4096).astype(np.uint16)
    with pytest.warns(UserWarning, match="Invalid value for VR CS"):  # header values are untrusted input
        write_cxr(folder / "v.dcm", pixels, bits_stored=12, view_position="@SUM(1)", patient_id="-1+2")
    out = tmp_path / "p.csv"
    assert predict(folder, out, weights_dir, "--include-patient-id").exit_code == EXIT_OK
    raw = csv_rows(out)
    assert sorted(raw["path"]) == sorted(["'" + n for n in names[:4]] + ["plain.png", "v.dcm"])
    assert list(raw.loc[raw["path"] == "v.dcm", ["view_position", "patient_id"]].iloc[0]) == ["'@SUM(1)", "'-1+2"]
    assert all(not v.startswith(("=", "+", "-", "@")) for col in raw.columns for v in raw[col])
    studies = csv_rows(tmp_path / "p.studies.csv")
    assert all(not v.startswith(("=", "+", "@")) for col in ("study", "key_image") for v in studies[col])
    restored = restore_formulas(raw)
    assert sorted(restored["path"]) == sorted([*names, "v.dcm"])
    assert restored.loc[restored["path"] == "v.dcm", "view_position"].item() == "@SUM(1)"

    before = out.read_bytes()
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(folder),
            "-o",
            str(out),
            "--weights-dir",
            str(weights_dir),
            "-m",
            "tiny",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--resume",
            "--include-patient-id",
        ],
    )
    assert result.exit_code == EXIT_OK and "0 read this run" in result.output, result.output
    assert out.read_bytes() == before

    report = tmp_path / "r.pdf"
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"path": names, "label": ["normal"] * 5}).to_csv(labels, index=False)
    result = CliRunner().invoke(
        main, ["report", str(out), "--labels", str(labels), "-o", str(report), "-q", "--bootstrap", "0"]
    )
    assert result.exit_code == EXIT_OK, result.output
    doc = json.loads(report.with_suffix(".json").read_text())
    assert doc["models"][0]["join"]["n_matched"] == 5  # the report reads the names back as they are


# --- item 11: disk full ---------------------------------------------------------------


def test_disk_full_is_one_line_exit_3_lock_removed_and_resume_finishes(
    images: Path, tmp_path: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    real_fsync = os.fsync
    calls = []

    def full(fd: int) -> None:
        calls.append(fd)
        if len(calls) > 1:  # the first batch reaches the disk, then it is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(outputs.os, "fsync", full)
    out = tmp_path / "p.csv"
    result = predict(images, out, weights_dir, "--batch-size", "2")
    one_line_error(result, EXIT_FATAL, "No space left on device", "--resume")
    assert not (tmp_path / ".p.csv.lock").exists() and not out.exists()
    monkeypatch.setattr(outputs.os, "fsync", real_fsync)  # space freed
    assert predict(images, out, weights_dir, "--resume").exit_code == EXIT_OK
    assert sorted(csv_rows(out)["path"]) == [f"{i}.png" for i in range(5)]


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=False)  # lazy: even while a failed run holds a file


def test_a_really_full_file_system(tmp_path: Path, weights_dir: Path):
    folder = write_pngs(tmp_path / "in", [f"{i:03d}.png" for i in range(40)])
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 1024)
        os.truncate(filler, filler.stat().st_size - 6 * 1024)  # a few KB left: a few rows fit
        out = disk / "p.csv"
        result = predict(folder, out, weights_dir, "--batch-size", "4")
        one_line_error(result, EXIT_FATAL, "No space left on device")
        assert not (disk / ".p.csv.lock").exists()
        filler.unlink()
        result = predict(folder, out, weights_dir, "--batch-size", "4", "--resume")
        assert result.exit_code == EXIT_OK, result.output
        frame = csv_rows(out)
        assert sorted(frame["path"]) == [f"{i:03d}.png" for i in range(40)] and (frame["status"] == "ok").all()


# --- item 15: resuming from an edited CSV, deleted inputs, patient ids, sidecars --------


def test_resume_repredicts_rows_a_spreadsheet_spoilt(images: Path, tmp_path: Path, weights_dir: Path):
    out = tmp_path / "p.csv"
    assert predict(images, out, weights_dir).exit_code == EXIT_OK
    frame = csv_rows(out)
    original = dict(zip(frame["path"], frame["prob_pneumonia"]))
    frame.loc[0, "prob_pneumonia"] = frame.loc[0, "prob_pneumonia"].replace(".", ",")  # decimal comma
    frame.loc[1, "prob_normal"] = "#VALUE!"
    frame.to_csv(out, index=False)
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(images),
            "-o",
            str(out),
            "--weights-dir",
            str(weights_dir),
            "-m",
            "tiny",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--resume",
        ],
    )
    assert result.exit_code == EXIT_OK, result.output
    assert "2 read this run" in result.output
    again = csv_rows(out)
    assert dict(zip(again["path"], again["prob_pneumonia"])) == original
    assert csv_rows(tmp_path / "p.studies.csv")["prob_pneumonia"].astype(float).between(0, 1).all()


def test_resume_drops_deleted_inputs_and_patient_ids_not_asked_for(tmp_path: Path, weights_dir: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = (np.add.outer(np.arange(64), np.arange(64)) * 37 % 4096).astype(np.uint16)
    for i in range(3):
        write_cxr(folder / f"{i}.dcm", pixels, bits_stored=12, patient_id=f"PID{i}")
    out = tmp_path / "p.csv"
    assert predict(folder, out, weights_dir, "--include-patient-id").exit_code == EXIT_OK
    assert list(csv_rows(out)["patient_id"]) == ["PID0", "PID1", "PID2"]
    (folder / "1.dcm").unlink()
    assert predict(folder, out, weights_dir, "--resume").exit_code == EXIT_OK
    frame = csv_rows(out)
    assert list(frame["path"]) == ["0.dcm", "2.dcm"]
    assert "patient_id" not in frame.columns and "PID" not in out.read_text()


def test_sidecars_of_another_job_are_not_replaced_without_overwrite(images: Path, tmp_path: Path, weights_dir: Path):
    out = tmp_path / "p.csv"
    studies, run_json = tmp_path / "p.studies.csv", tmp_path / "p.run.json"
    studies.write_text("kept\n")
    run_json.write_text("{}\n")
    for extra in ((), ("--resume",)):
        one_line_error(predict(images, out, weights_dir, *extra), EXIT_USAGE, "p.", "--overwrite")
        assert studies.read_text() == "kept\n" and run_json.read_text() == "{}\n" and not out.exists()
    assert predict(images, out, weights_dir, "--overwrite").exit_code == EXIT_OK
    assert studies.read_text() != "kept\n"


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "t.csv"
    target.write_text("old\n")

    def fail(path: Path) -> None:
        path.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write(target, fail)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_study_rows_take_the_most_abnormal_predicted_image_and_count_what_they_hold():
    """aggregate_studies by hand: files that failed or have no number are counted but never
    chosen; the key image's band decides; a model without a card keeps its first threshold."""
    from pneumobatch.core.card import ModelCard
    from pneumobatch.core.studies import aggregate_studies

    card = ModelCard(
        name="m",
        task="pneumonia",
        classes=["normal", "pneumonia"],
        architecture="x",
        input_size=8,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        positive="pneumonia",
        threshold=0.5,
        thresholds={"applied": "recall_target", "by_age_band": {"child": {"recall_target": 0.9}}},
    )
    rows = [  # study, status, prob_pneumonia, age_band, applicable
        ("A", "ok", "0.30", "adult", "True"),
        ("B", "ok", "0.80", "child", "False"),
        ("A", "error", "", "adult", ""),
        ("A", "ok", "0.70", "adult", "False"),
        ("B", "ok", "not a number", "child", "True"),
        ("A", "ok", "0.70", "child", "True"),  # a tie: the first in file order wins
        ("", "ok", "0.99", "adult", "True"),  # no study: not aggregated
    ]
    frame = pd.DataFrame(
        [
            {
                "path": f"f{i}",
                "study": s,
                "model": "m",
                "status": st,
                "prob_normal": "" if p == "" or not p[0].isdigit() else f"{1 - float(p):.2f}",
                "prob_pneumonia": p,
                "age_band": band,
                "applicable": ap,
                "threshold": "0.5",
            }
            for i, (s, st, p, band, ap) in enumerate(rows)
        ]
        + [
            {
                "path": "g",
                "study": "A",
                "model": "ghost",
                "status": "ok",
                "prob_normal": "0.1",
                "prob_pneumonia": "0.9",
                "age_band": "",
                "applicable": "",
                "threshold": "0.25",
            }
        ]
    )
    studies = aggregate_studies(frame, [card]).set_index(["study", "model"])
    a, b = studies.loc[("A", "m")], studies.loc[("B", "m")]
    assert (a.n_files, a.n_images, a.key_image, a.pred_label, a.threshold, a.n_not_applicable) == (
        4,
        3,
        "f3",
        "pneumonia",
        0.5,
        1,
    )
    assert a.prob_pneumonia == pytest.approx(0.70)
    assert (b.n_files, b.n_images, b.key_image, b.pred_label, b.threshold, b.n_not_applicable) == (
        2,
        1,
        "f1",
        "normal",
        0.9,
        1,
    )
    assert studies.loc[("A", "ghost")].threshold == 0.25 and studies.loc[("A", "ghost")].n_images == 0
    assert list(studies.index) == [("A", "m"), ("B", "m"), ("A", "ghost")]


def test_rows_write_the_applicability_the_model_layer_decided():
    """result_rows writes FileResult.applicable as it is: it never compares the score itself."""
    from pneumobatch.core.errors import Status
    from pneumobatch.io.discovery import FileEntry
    from pneumobatch.io.results import FileResult

    card = ModelCard(
        name="m",
        task="pneumonia",
        classes=["normal", "pneumonia"],
        architecture="x",
        input_size=8,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        positive="pneumonia",
        threshold=0.5,
        applicability={"file": "m.applicability.safetensors", "threshold": 1.0},
    )

    def row(score: float, applicable: bool, skip_ood: bool = False) -> dict:
        result = FileResult(FileEntry(Path("/x/a.png"), "a.png", 1, 2), Status.OK, probs={"m": np.array([0.3, 0.7])})
        result.ood_scores, result.applicable = {"m": score}, {"m": applicable}
        (only,) = outputs.result_rows(result, [card], "file", False, skip_ood)
        return only

    low_but_flagged = row(0.2, False)
    assert (low_but_flagged["ood_score"], low_but_flagged["applicable"]) == ("0.2000", "false")
    assert low_but_flagged["status"] == "ok" and low_but_flagged["pred_label"] == "pneumonia"
    assert row(5.0, True)["applicable"] == "true"
    skipped = row(0.2, False, skip_ood=True)
    assert (skipped["status"], skipped["reason"], skipped["prob_pneumonia"]) == ("skipped", "out-of-distribution", "")
    assert row(5.0, True, skip_ood=True)["status"] == "ok"


_HOLDER = """
import os, sys, time
from pathlib import Path
from pneumobatch.io.predictions import OutputPaths, PredictionWriter, columns_for
paths = OutputPaths(Path(sys.argv[1]))
writer = PredictionWriter(paths, columns_for([], False), resume=False, overwrite=True).__enter__()
child = os.fork()  # a decoding worker forked after the lock was taken
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_the_output_lock_dies_with_its_run_not_with_the_workers_it_forked(tmp_path: Path):
    """``kill -9`` of a run whose forked child lives on (an orphaned decoding worker): the
    child never held the lock, so the next run takes it over at once; while the run was alive
    a second writer, in another process or in this one, was told another run is writing."""
    out, columns = tmp_path / "p.csv", outputs.columns_for([], False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, env=env)
    child = None
    try:
        child = int(run.stdout.readline())
        with pytest.raises(OutputError, match=rf"another pneumobatch run \(PID {run.pid}\) is writing .*p\.csv"):
            outputs.PredictionWriter(outputs.OutputPaths(out), columns, resume=False, overwrite=True).__enter__()
        run.kill()
        run.wait(timeout=10)
        os.kill(child, 0)  # the orphan is still there ...
        with outputs.PredictionWriter(outputs.OutputPaths(out), columns, resume=True, overwrite=False):
            with pytest.raises(OutputError, match="another pneumobatch run is writing"):  # ... this process holds it
                outputs.PredictionWriter(outputs.OutputPaths(out), columns, resume=True, overwrite=False).__enter__()
        assert not (tmp_path / ".p.csv.lock").exists()
    finally:
        run.kill()
        if child:
            with contextlib.suppress(OSError):
                os.kill(child, 9)
