"""The report's cases to look at (pneumobatch.evaluation.report.cases, .thumbnails): which images, their
thumbnails (heatmap, image or placeholder), and what never appears on or under them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image
from pypdf import PdfReader

from pneumobatch.cli import main
from pneumobatch.core.card import ModelCard
from pneumobatch.evaluation.report import write_report
from pneumobatch.evaluation.report.cases import pick_cases
from pneumobatch.evaluation.report.options import ReportOptions
from pneumobatch.testing.synthetic import write_cxr

MODEL = "pneumonia-densenet121"
#: label and P(pneumonia) per image; threshold 0.5. FN: 0, 1, 2 (lowest P first); FP: 8, 9, 7 (highest first).
CASES = [
    ("pneumonia", 0.10),
    ("pneumonia", 0.30),
    ("pneumonia", 0.44),
    ("pneumonia", 0.80),
    ("pneumonia", 0.95),
    ("normal", 0.05),
    ("normal", 0.20),
    ("normal", 0.53),
    ("normal", 0.90),
    ("normal", 0.70),
    ("normal", 0.41),
    ("pneumonia", 0.62),
]
SECRET = "SECRET^NAME"


def rel(i: int) -> str:
    return f"study{i}/img{i}.dcm" if i % 2 == 0 else f"study{i}/img{i}.png"


def make_cases_run(folder: Path, heatmaps: dict[int, str] | None = None, roots: list[str] | None = None) -> dict:
    """Images on disk (DICOM for even i, PNG for odd; image 0 has PatientName SECRET^NAME), predictions.csv
    for them, run.json naming their folder, labels.csv."""
    root = folder / "images"
    rng = np.random.default_rng(0)
    for i in range(len(CASES)):
        path = root / rel(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (np.linspace(0, 1, 96)[None, :] * np.linspace(0.3, 1, 80)[:, None] * 3000).astype(np.uint16)
        pixels += rng.integers(0, 200, pixels.shape, dtype=np.uint16)
        if i % 2 == 0:
            extra = {"PatientName": SECRET, "PatientBirthDate": "19700101"} if i == 0 else {}
            write_cxr(path, pixels, patient_id="SECRETID" if i == 0 else "ANON", extra=extra)
        else:
            Image.fromarray((pixels // 16).astype(np.uint8)).save(path)
    p = np.array([c[1] for c in CASES])
    preds = pd.DataFrame(
        {
            "path": [rel(i) for i in range(len(CASES))],
            "status": "ok",
            "reason": "",
            "task": "pneumonia",
            "model": MODEL,
            "pred_label": np.where(p >= 0.5, "pneumonia", "normal"),
            "prob_normal": np.round(1 - p, 6),
            "prob_pneumonia": p,
            "threshold": 0.5,
        }
    )
    if heatmaps is not None:
        preds["heatmap"] = [heatmaps.get(i, "") for i in range(len(CASES))]
    paths = {"root": root, "predictions": folder / "predictions.csv", "labels": folder / "labels.csv"}
    preds.to_csv(paths["predictions"], index=False)
    model = {"name": MODEL, "task": "pneumonia", "classes": ["normal", "pneumonia"], "positive": "pneumonia"}
    run = {"roots": roots if roots is not None else [str(root.resolve())], "models": [{**model, "threshold": 0.5}]}
    (folder / "predictions.run.json").write_text(json.dumps(run))
    pd.DataFrame({"path": preds["path"], "label": [c[0] for c in CASES]}).to_csv(paths["labels"], index=False)
    return paths


def report(paths: dict, out: Path, labelled: bool = True, **options) -> tuple[dict, Path]:
    labels = paths["labels"] if labelled else None
    result = write_report(ReportOptions(paths["predictions"], out, labels, n_bootstrap=0, **options))
    return json.loads(result.metrics_json.read_text()), result.pdf


def pages(pdf: Path) -> list[str]:
    return [" ".join((page.extract_text() or "").split()) for page in PdfReader(str(pdf)).pages]


def kinds(doc: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for case in doc["models"][0]["cases"]["cases"]:
        out.setdefault(case["kind"], []).append(case["path"])
    return out


def test_false_negatives_and_positives_in_order_and_the_page_they_are_on(tmp_path):
    paths = make_cases_run(tmp_path)
    doc, pdf = report(paths, tmp_path / "r.pdf")
    assert kinds(doc) == {"false-negative": [rel(0), rel(1), rel(2)], "false-positive": [rel(8), rel(9), rel(7)]}
    cases = doc["models"][0]["cases"]["cases"]
    first = cases[0]
    assert first["probability"] == 0.1 and first["probability_of"] == "pneumonia"
    assert (first["label"], first["pred_label"], first["heatmap"]) == ("pneumonia", "normal", None)
    assert {c["thumbnail"] for c in cases} == {"image"}  # DICOM and PNG read from the run's root
    text = pages(pdf)
    assert "Cases to look at" in text[-1] and "Cases to look at" not in " ".join(text[:-1])
    assert "False negatives (3)" in text[-1] and "False positives (3)" in text[-1]
    assert all(p in text[-1] for p in (rel(0), rel(9)))
    assert len(PdfReader(str(pdf)).pages[-1].images) == 6

    few, _ = report(paths, tmp_path / "few.pdf", cases=2)
    assert kinds(few) == {"false-negative": [rel(0), rel(1)], "false-positive": [rel(8), rel(9)]}

    none, pdf0 = report(paths, tmp_path / "none.pdf", cases=0)
    assert none["models"][0]["cases"] is None
    assert len(pages(pdf0)) == len(text) - 1
    assert "Cases to look at" not in " ".join(pages(pdf0))


def test_without_labels_highest_and_nearest_the_threshold(tmp_path):
    paths = make_cases_run(tmp_path)
    doc, pdf = report(paths, tmp_path / "r.pdf", labelled=False, cases=3)
    assert kinds(doc) == {"highest": [rel(4), rel(8), rel(3)], "near-threshold": [rel(7), rel(2), rel(10)]}
    near = [c for c in doc["models"][0]["cases"]["cases"] if c["kind"] == "near-threshold"]
    assert {c["threshold"] for c in near} == {0.5} and {c["label"] for c in near} == {None}
    text = pages(pdf)[-1]
    assert "Highest probability (3)" in text and "Closest to the operating point (3)" in text


def test_multiclass_mistakes_by_the_probability_of_the_predicted_class():
    card = ModelCard("eti", "etiology", ["normal", "bacterial", "viral"], "", 0, [], [])
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.4, 0.35, 0.25], [0.3, 0.3, 0.4]])
    rows = pd.DataFrame({"path": list("abcde"), **{f"prob_{c}": proba[:, j] for j, c in enumerate(card.classes)}})
    rows["y_pred"] = np.asarray(card.classes)[proba.argmax(1)]
    labelled = pick_cases(rows.assign(y_true=["normal", "viral", "bacterial", "normal", "normal"]), card, 8)
    assert [(c["path"], c["probability"], c["probability_of"]) for c in labelled] == [
        ("c", 0.8, "viral"),
        ("b", 0.5, "bacterial"),
        ("e", 0.4, "viral"),
    ]
    unlabelled = pick_cases(rows, card, 2)
    assert [(c["kind"], c["path"]) for c in unlabelled] == [
        ("highest", "c"),
        ("highest", "a"),
        ("near-threshold", "d"),  # margin 0.05
        ("near-threshold", "e"),  # margin 0.10
    ]


def red_share(image: Image.Image) -> float:
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return float(((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).mean())


def test_the_heatmap_is_used_and_hostile_cells_are_not_read(tmp_path):
    folder = tmp_path / "run"
    overlays = folder / "predictions.heatmaps"
    overlays.mkdir(parents=True)
    red = np.zeros((100, 120, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(overlays / "img8-pneumonia.png")
    Image.fromarray(red).save(tmp_path / "outside.png")  # red too: read by mistake, it would show
    os.symlink(tmp_path / "outside.png", overlays / "link-out.png")
    heatmaps = {
        8: "predictions.heatmaps/img8-pneumonia.png",
        9: "../outside.png",
        7: str(tmp_path / "outside.png"),
        0: "predictions.heatmaps/link-out.png",
        1: "predictions.heatmaps",  # a folder
        2: "predictions.heatmaps/missing.png",
    }
    paths = make_cases_run(folder, heatmaps=heatmaps)
    doc, pdf = report(paths, folder / "r.pdf")
    by_path = {c["path"]: c for c in doc["models"][0]["cases"]["cases"]}
    assert by_path[rel(8)]["heatmap"] == heatmaps[8] and by_path[rel(8)]["thumbnail"] == "heatmap"
    for i in (9, 7, 0, 1, 2):
        assert by_path[rel(i)]["heatmap"] is None, i
        assert by_path[rel(i)]["thumbnail"] == "image", i  # fell back to the image
    assert any("5 heatmap cells" in w for w in doc["warnings"])
    images = [im.image for im in PdfReader(str(pdf)).pages[-1].images]
    assert len(images) == 6
    assert sum(red_share(im) > 0.9 for im in images) == 1  # only the accepted heatmap is red
    assert max(im.size[0] for im in images) <= 256


def test_missing_image_root_gives_placeholders_and_the_same_exit_code(tmp_path):
    paths = make_cases_run(tmp_path, roots=[str(tmp_path / "gone")])
    args = ["report", str(paths["predictions"]), "--labels", str(paths["labels"]), "--bootstrap", "0"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "r.pdf")])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "not found under the run's input folders" in result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {c["thumbnail"] for c in doc["models"][0]["cases"]["cases"]} == {"image not found"}
    text = pages(tmp_path / "r.pdf")[-1]
    assert text.count("image not found") == 6
    assert not PdfReader(str(tmp_path / "r.pdf")).pages[-1].images
    given = CliRunner().invoke(main, [*args, "--images", str(paths["root"]), "-o", str(tmp_path / "i.pdf")])
    assert given.exit_code == 0, given.output
    doc = json.loads((tmp_path / "i.json").read_text())
    assert {c["thumbnail"] for c in doc["models"][0]["cases"]["cases"]} == {"image"}


def test_a_path_cell_naming_no_file_is_a_placeholder(tmp_path):
    from pneumobatch.evaluation.report.thumbnails import case_thumbnail

    (tmp_path / "x.png").write_bytes(b"not read")
    for cell in ("bad\\xZZ", "nul\x00.png", "../x.png", str(tmp_path / "x.png"), ""):
        case = {"path": cell, "heatmap": None}
        assert case_thumbnail(case, tmp_path, [tmp_path / "root"], None) == (None, "image not found"), cell
        assert case_thumbnail(case, tmp_path, [], tmp_path / "root") == (None, "image not found"), cell


def test_nothing_from_the_dicom_header_reaches_the_report(tmp_path):
    paths = make_cases_run(tmp_path)
    assert str(pydicom.dcmread(paths["root"] / rel(0)).PatientName) == SECRET  # the header has it
    doc, pdf = report(paths, tmp_path / "r.pdf")
    case = next(c for c in doc["models"][0]["cases"]["cases"] if c["path"] == rel(0))
    assert case["thumbnail"] == "image"  # the DICOM was read for its thumbnail
    texts = [pdf.with_suffix(".json").read_text(), "\n".join(pages(pdf))]
    if shutil.which("pdftotext"):
        texts.append(subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout)
    for text in texts:
        for secret in ("SECRET", "NAME", "19700101"):
            assert secret not in text


@pytest.mark.parametrize("key", ["study_instance_uid"])
def test_labels_by_study_give_a_note_not_a_page(tmp_path, key):
    paths = make_cases_run(tmp_path)
    preds = pd.read_csv(paths["predictions"])
    preds["study_instance_uid"] = [f"1.2.3.{i}" for i in range(len(preds))]
    preds.to_csv(paths["predictions"], index=False)
    pd.DataFrame({key: preds["study_instance_uid"], "label": [c[0] for c in CASES]}).to_csv(
        paths["labels"], index=False
    )
    doc, pdf = report(paths, tmp_path / "r.pdf", key=key)
    assert doc["models"][0]["cases"]["cases"] == []
    assert "Cases to look at" not in " ".join(pages(pdf))
    assert "no cases to look at" in " ".join(pages(pdf))
