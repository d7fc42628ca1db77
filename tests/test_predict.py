"""``pneumobatch predict`` end to end through the Click interface, on real file formats."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pydicom.uid import generate_uid

from pneumobatch.cli import main
from pneumobatch.testing.synthetic import write_cxr

SPEC_COLUMNS = [
    "path",
    "status",
    "reason",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "view_position",
    "model",
    "weights_sha256",
    "pred_label",
    "prob_normal",
    "prob_pneumonia",
    "threshold",
]


def write_dicom(
    path: Path, *, modality="DX", view="PA", study=None, name="Doe^Jane", patient_id="PID123", seed=0, pixels=True
):
    """A 12-bit DX image (or, with ``pixels=False``, an image-less object) with a patient name."""
    image = np.random.default_rng(seed).integers(0, 4096, (48, 40), dtype=np.uint16)
    ds = write_cxr(
        path,
        image,
        bits_stored=12,
        modality=modality,
        view_position=view,
        study_instance_uid=study,
        patient_id=patient_id,
        extra={"PatientName": name},
    )
    if not pixels:
        for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
            delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture()
def studies(tmp_path: Path) -> Path:
    """A small PACS-like export: nested studies, extension-less DICOM, exports and junk."""
    root = tmp_path / "studies"
    study = generate_uid()
    (root / "patient1" / "study1").mkdir(parents=True)
    write_dicom(root / "patient1" / "study1" / "IM0001", study=study, seed=1)
    write_dicom(root / "patient1" / "study1" / "IM0002", study=study, seed=2)
    write_dicom(root / "patient1" / "study1" / "IM0003", study=study, view="LL", seed=3)
    (root / "patient2").mkdir()
    write_dicom(root / "patient2" / "ct.dcm", modality="CT", seed=4)
    write_dicom(root / "patient2" / "sr.dcm", modality="DX", pixels=False)
    (root / "exports").mkdir()
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (50, 60), dtype=np.uint8)).save(root / "exports" / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(root / "exports" / "b.jpg", quality=90)
    (root / "exports" / "notes.txt").write_text("reported by Dr X\n")
    (root / "exports" / "empty.dcm").write_bytes(b"")
    good = (root / "exports" / "b.jpg").read_bytes()
    (root / "exports" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def run(args: list[str], **kwargs):
    result = CliRunner().invoke(main, args, catch_exceptions=False, **kwargs)
    return result


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_every_file_gets_a_row_with_reason(studies: Path, weights_dir: Path, tmp_path: Path):
    out = tmp_path / "out" / "predictions.csv"
    result = run(
        ["predict", str(studies), "-o", str(out), "--weights-dir", str(weights_dir), "-m", "tiny", "--workers", "0"]
    )
    assert result.exit_code == 1, result.output  # some files could not be read
    frame = read_csv(out)
    for column in SPEC_COLUMNS:
        assert column in frame.columns
    assert "patient_id" not in frame.columns
    by_path = frame.set_index("path")
    expected = {
        "patient1/study1/IM0001": ("ok", ""),
        "patient1/study1/IM0002": ("ok", ""),
        "patient1/study1/IM0003": ("skipped", "lateral"),
        "patient2/ct.dcm": ("skipped", "not-cxr"),
        "patient2/sr.dcm": ("skipped", "no-pixels"),
        "exports/a.png": ("ok", ""),
        "exports/b.jpg": ("ok", ""),
        "exports/notes.txt": ("skipped", "not-image"),
        "exports/empty.dcm": ("error", "empty"),
        "exports/truncated.jpg": ("error", "corrupt"),
    }
    assert sorted(by_path.index) == sorted(expected)
    for path, (status, reason) in expected.items():
        assert (by_path.loc[path, "status"], by_path.loc[path, "reason"]) == (status, reason), path
    ok = frame[frame.status == "ok"]
    probs = ok[["prob_normal", "prob_pneumonia"]].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert set(ok.pred_label) <= {"normal", "pneumonia"}
    assert (ok.pred_label == np.where(probs[:, 1] >= 0.5, "pneumonia", "normal")).all()
    assert ok.weights_sha256.str.len().eq(64).all()
    assert "exports/a.png" in result.output or "10 files" in result.output
    # studies: the two frontal DICOMs of study1 form one study; each PNG/JPEG its own study
    studies_csv = read_csv(out.with_name("predictions.studies.csv"))
    study1 = studies_csv[studies_csv.study == by_path.loc["patient1/study1/IM0001", "study_instance_uid"]]
    assert len(study1) == 1 and study1.n_images.iloc[0] == "2" and study1.n_files.iloc[0] == "3"
    rows = ok[ok.study == study1.study.iloc[0]]
    assert float(study1.prob_pneumonia.iloc[0]) == pytest.approx(rows.prob_pneumonia.astype(float).max())
    assert {"exports/a.png", "exports/b.jpg"} <= set(studies_csv.study)


def test_patient_names_never_written(studies: Path, weights_dir: Path, tmp_path: Path):
    out = tmp_path / "p.csv"
    run(
        [
            "predict",
            str(studies),
            "-o",
            str(out),
            "--weights-dir",
            str(weights_dir),
            "-m",
            "tiny",
            "--workers",
            "0",
            "--include-patient-id",
            "--quiet",
        ]
    )
    assert "PID123" in set(read_csv(out).patient_id)
    for written in tmp_path.glob("p*"):
        assert "Doe" not in written.read_text(), written


def test_clean_run_exits_zero_and_multi_model_rows(tmp_path: Path, weights_dir: Path):
    root = tmp_path / "in"
    root.mkdir()
    write_dicom(root / "x1", seed=1)
    (root / "readme.txt").write_text("x")
    out = tmp_path / "p.csv"
    result = run(
        ["predict", str(root), "-o", str(out), "--weights-dir", str(weights_dir), "-m", "tiny", "-m", "tiny-etiology"]
    )
    assert result.exit_code == 0, result.output
    frame = read_csv(out)
    assert len(frame) == 4  # 2 files x 2 models
    ety = frame[(frame.model == "tiny-etiology") & (frame.status == "ok")].iloc[0]
    assert ety.pred_label in {"normal", "bacterial", "viral", "covid-19"}
    assert ety["prob_covid-19"] != "" and ety.threshold == ""


def test_existing_output_needs_resume_or_overwrite(tmp_path: Path, weights_dir: Path, studies: Path):
    out = tmp_path / "p.csv"
    out.write_text("precious\n")
    result = CliRunner().invoke(
        main, ["predict", str(studies), "-o", str(out), "--weights-dir", str(weights_dir), "-m", "tiny"]
    )
    assert result.exit_code == 2
    assert "--resume" in result.output and "Traceback" not in result.output
    assert out.read_text() == "precious\n"


def test_fatal_errors_are_one_line_exit_3(tmp_path: Path, weights_dir: Path, studies: Path):
    result = CliRunner().invoke(
        main, ["predict", str(studies), "-o", str(tmp_path / "p.csv"), "--weights-dir", str(weights_dir), "-m", "nope"]
    )
    assert result.exit_code == 3
    assert "not found" in result.output and "tiny" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(
        main, ["predict", str(studies), "-o", str(blocker / "p.csv"), "--weights-dir", str(weights_dir), "-m", "tiny"]
    )
    assert result.exit_code == 3 and "cannot write" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_corrupted_weights_refused(tmp_path: Path, weights_dir: Path, studies: Path):
    copy = tmp_path / "w"
    copy.mkdir()
    for f in weights_dir.glob("tiny.*"):
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "tiny.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "tiny.safetensors").write_bytes(bytes(data))
    result = CliRunner().invoke(
        main, ["predict", str(studies), "-o", str(tmp_path / "p.csv"), "--weights-dir", str(copy), "-m", "tiny"]
    )
    assert result.exit_code == 3 and "SHA-256" in result.output


def _probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[["prob_normal", "prob_pneumonia"]].replace("", "nan").astype(float).to_numpy()


def test_defaults_split_this_machines_cores_and_the_options_override_them(
    tmp_path: Path, weights_dir: Path, monkeypatch
):
    import json

    from pneumobatch.model.device import default_split

    root = tmp_path / "in"
    root.mkdir()
    write_dicom(root / "x1", seed=1)
    split = default_split(torch.device("cpu"))
    threads_before = torch.get_num_threads()
    during: list[int] = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: during.append(n) or real_set(n))
    try:
        for extra, expected in [
            ([], (split.workers, split.threads, split.batch_size)),
            (["--workers", "0", "--threads", "1", "--batch-size", "3"], (0, 1, 3)),
        ]:
            out = tmp_path / "p.csv"
            result = run(
                [
                    "predict",
                    str(root),
                    "-o",
                    str(out),
                    "--weights-dir",
                    str(weights_dir),
                    "-m",
                    "tiny",
                    "--device",
                    "cpu",
                    "--overwrite",
                    "--quiet",
                    *extra,
                ]
            )
            assert result.exit_code == 0, result.output
            info = json.loads(out.with_suffix(".run.json").read_text())
            assert (info["workers"], info["threads"], info["batch_size"]) == expected
            assert during[0] == expected[1] and torch.get_num_threads() == threads_before  # used, then given back
            during.clear()
    finally:
        real_set(threads_before)


def test_results_do_not_depend_on_batch_size_or_workers(studies: Path, weights_dir: Path, tmp_path: Path):
    frames = []
    for i, (batch, workers) in enumerate([(1, 0), (3, 2), (16, 1)]):
        out = tmp_path / f"p{i}.csv"
        run(
            [
                "predict",
                str(studies),
                "-o",
                str(out),
                "--weights-dir",
                str(weights_dir),
                "-m",
                "tiny",
                "--batch-size",
                str(batch),
                "--workers",
                str(workers),
                "--quiet",
            ]
        )
        frames.append(read_csv(out))
    for other in frames[1:]:
        assert list(other.path) == list(frames[0].path)
        assert list(other.status) == list(frames[0].status)
        assert list(other.pred_label) == list(frames[0].pred_label)
        np.testing.assert_allclose(_probs(other), _probs(frames[0]), atol=1e-5, equal_nan=True)


def test_resume_after_kill_gives_one_row_per_file(studies: Path, weights_dir: Path, tmp_path: Path):
    args = ["--weights-dir", str(weights_dir), "-m", "tiny", "--workers", "0", "--quiet"]
    full = tmp_path / "full.csv"
    run(["predict", str(studies), "-o", str(full), *args])
    reference = read_csv(full)

    # A run killed mid-batch: its journal holds 4 complete rows and half of the fifth.
    out = tmp_path / "killed.csv"
    journal = tmp_path / "killed.csv.partial"
    lines = full.read_text().splitlines(keepends=True)
    journaled = reference.iloc[:4].copy()
    journaled.loc[2, "detail"] = "from-journal"  # a resume that re-read this file would lose it
    journal.write_text(journaled.to_csv(index=False, lineterminator="\n") + lines[5][:20])
    result = CliRunner().invoke(main, ["predict", str(studies), "-o", str(out), *args])
    assert result.exit_code == 2 and "--resume" in result.output  # refuses to clobber the journal

    result = run(["predict", str(studies), "-o", str(out), "--resume", *args])
    assert result.exit_code == 1
    resumed = read_csv(out)
    assert not journal.exists()
    assert list(resumed.path) == list(reference.path)  # exactly one row per file, same order
    assert resumed.path.is_unique
    np.testing.assert_allclose(_probs(resumed), _probs(reference), atol=1e-5, equal_nan=True)
    assert resumed.loc[2, "detail"] == "from-journal"  # journaled rows were kept, not re-read
    assert list(resumed.drop(index=2).detail) == list(reference.drop(index=2).detail)

    # Resuming a finished job re-reads nothing; a changed file is predicted again.
    target = studies / "exports" / "a.png"
    Image.fromarray(np.full((50, 60), 200, dtype=np.uint8)).save(target)
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    new_file = studies / "exports" / "c.png"
    Image.fromarray(np.full((30, 30), 10, dtype=np.uint8)).save(new_file)
    run(["predict", str(studies), "-o", str(out), "--resume", *args])
    again = read_csv(out)
    assert again.path.is_unique and len(again) == len(reference) + 1
    assert again.set_index("path").loc["exports/a.png", "file_mtime_ns"] == "1000000000"


def test_output_inside_input_tree_is_not_an_input(tmp_path: Path, weights_dir: Path):
    root = tmp_path / "in"
    root.mkdir()
    write_dicom(root / "x", seed=1)
    out = root / "predictions.csv"
    run(["predict", str(root), "-o", str(out), "--weights-dir", str(weights_dir), "-m", "tiny", "--quiet"])
    run(["predict", str(root), "-o", str(out), "--weights-dir", str(weights_dir), "-m", "tiny", "--quiet", "--resume"])
    with open(out) as fh:
        assert [row["path"] for row in csv.DictReader(fh)] == ["x"]


def test_models_command_and_version(weights_dir: Path):
    result = run(["models", "--weights-dir", str(weights_dir)])
    assert result.exit_code == 0 and "tiny: task pneumonia" in result.output
    result = run(["--version"])
    assert "pneumobatch" in result.output and result.exit_code == 0


def test_bad_arguments_are_one_line_usage_errors(tmp_path: Path):
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(main, ["predict", str(tmp_path), "--batch-size", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    result = (
        CliRunner().invoke(main, ["predict", str(tmp_path), "--device", "cuda:7"])
        if not torch.cuda.is_available()
        else None
    )
    if result is not None:
        assert result.exit_code == 2 and "no CUDA GPU" in result.output


def test_report_command_end_to_end(studies: Path, weights_dir: Path, tmp_path: Path):
    out = tmp_path / "p.csv"
    run(
        [
            "predict",
            str(studies),
            "-o",
            str(out),
            "--weights-dir",
            str(weights_dir),
            "-m",
            "tiny",
            "--quiet",
            "--workers",
            "0",
        ]
    )
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "path,label,view\n"
        "patient1/study1/IM0001,Pneumonia/Viral/COVID-19,PA\n"
        "patient1/study1/IM0002,No Finding,PA\n"
        "exports/a.png,normal,AP\n"
        "exports/b.jpg,PNEUMONIA,AP\n"
        "exports/gone.png,normal,AP\n"
    )
    pdf = tmp_path / "r" / "report.pdf"
    result = run(["report", str(out), "--labels", str(labels), "-o", str(pdf), "--by", "view", "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert pdf.stat().st_size > 0 and pdf.with_suffix(".json").exists()
    from pypdf import PdfReader

    text = " ".join(page.extract_text() for page in PdfReader(pdf).pages)
    assert "tiny" in text and "pneumonia" in text

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("path,label\nnot/there.dcm,normal\n")
    result = CliRunner().invoke(main, ["report", str(out), "--labels", str(wrong), "-o", str(tmp_path / "w.pdf")])
    assert result.exit_code == 3 and "path" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_no_lock_or_journal_left_behind(tmp_path: Path, weights_dir: Path):
    root = tmp_path / "in"
    root.mkdir()
    write_dicom(root / "x", seed=1)
    out = tmp_path / "o" / "p.csv"
    run(["predict", str(root), "-o", str(out), "--weights-dir", str(weights_dir), "-m", "tiny", "--quiet"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.csv", "p.run.json", "p.studies.csv"]
