"""predict: per-age-band operating points, applicability flags, --skip-ood, same-named inputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pneumobatch.cli import main
from pneumobatch.model.applicability.features import attach, fit_features
from pneumobatch.model.registry import load_model
from pneumobatch.testing.synthetic import write_cxr

PIXELS = (np.add.outer(np.arange(96), np.arange(80)) * 23 % 4096).astype(np.uint16)


def rows_of(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open(encoding="utf-8", newline="")))


@pytest.fixture
def banded_weights(weights_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with operating points that put every child negative and every adult positive."""
    folder = tmp_path / "w"
    shutil.copytree(weights_dir, folder)
    card_path = folder / "tiny.json"
    card = json.loads(card_path.read_text())
    card["thresholds"]["by_age_band"] = {"child": {"recall_target": 1.0}, "adult": {"recall_target": 0.0}}
    card["data"]["age_range_years"] = [18.0, 90.0]
    card_path.write_text(json.dumps(card))
    return folder


def test_the_age_band_picks_the_operating_point(banded_weights: Path, tmp_path: Path):
    studies = tmp_path / "s"
    studies.mkdir()
    for name, age in (("child.dcm", "006Y"), ("adult.dcm", "054Y"), ("unknown.dcm", ""), ("old.dcm", "095Y")):
        write_cxr(studies / name, PIXELS, bits_stored=12, extra={"PatientAge": age})
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(
        main, ["predict", str(studies), "-o", str(out), "--weights-dir", str(banded_weights), "-m", "tiny", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in rows_of(out)}
    assert {p: (r["age_band"], r["operating_point"], r["pred_label"]) for p, r in rows.items()} == {
        "child.dcm": ("child", "child", "normal"),
        "adult.dcm": ("adult", "adult", "pneumonia"),
        "unknown.dcm": ("unknown", "pooled", rows["unknown.dcm"]["pred_label"]),
        "old.dcm": ("adult", "adult", "pneumonia"),
    }
    assert rows["child.dcm"]["threshold"] == "1.000000" and rows["adult.dcm"]["threshold"] == "0.000000"
    assert rows["old.dcm"]["warnings"] == "age-outside-training" and rows["adult.dcm"]["warnings"] == ""
    studies_rows = {r["study_instance_uid"]: r for r in rows_of(out.with_suffix(".studies.csv"))}
    by_key = {r["key_image"]: r["pred_label"] for r in studies_rows.values()}
    assert by_key["child.dcm"] == "normal" and by_key["adult.dcm"] == "pneumonia"


def test_applicability_flags_and_skip_ood(weights_dir: Path, tmp_path: Path):
    import torch

    folder = tmp_path / "w"
    shutil.copytree(weights_dir, folder)
    loaded = load_model("tiny", folder)
    # "training" images: smooth ramps; a checkerboard is unlike them all
    rng = np.random.default_rng(0)
    ramps = np.stack(
        [
            np.clip(np.add.outer(np.arange(32), np.arange(32)) * rng.uniform(2, 4) + rng.normal(0, 3, (32, 32)), 0, 255)
            for _ in range(120)
        ]
    ).astype(np.uint8)
    images = torch.from_numpy(ramps[:, None])
    stats = fit_features(loaded, images[:80], images[80:], 99.0)
    assert len(stats.layer_names) > 1  # intermediate stages as well as the head
    attach(loaded, stats, {"method": "test"})
    assert json.loads((folder / "tiny.json").read_text())["applicability"]["file"] == "tiny.applicability.safetensors"

    studies = tmp_path / "s"
    studies.mkdir()
    from PIL import Image

    Image.fromarray(ramps[0]).resize((64, 64)).save(studies / "ramp.png")
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(checker).save(studies / "checker.png")
    args = ["predict", str(studies), "--weights-dir", str(folder), "-m", "tiny", "--quiet"]
    out = tmp_path / "p.csv"
    assert CliRunner().invoke(main, [*args, "-o", str(out)]).exit_code == 0
    rows = {r["path"]: r for r in rows_of(out)}
    assert rows["checker.png"]["applicable"] == "false" and rows["checker.png"]["status"] == "ok"
    assert rows["ramp.png"]["applicable"] == "true"
    assert float(rows["checker.png"]["ood_score"]) > float(rows["ramp.png"]["ood_score"])
    # the report counts the flagged images apart (JSON and PDF)
    report = tmp_path / "r.pdf"
    assert CliRunner().invoke(main, ["report", str(out), "-o", str(report), "--quiet"]).exit_code == 0
    flagged = sum(r["applicable"] == "false" for r in rows.values())
    section = json.loads(report.with_suffix(".json").read_text())["models"][0]
    assert section["applicability"] == {"scored": len(rows), "not_applicable": flagged} and flagged >= 1
    from pypdf import PdfReader

    text = " ".join(page.extract_text() for page in PdfReader(report).pages)
    assert f"{flagged} of {len(rows)} predicted images are flagged not applicable" in " ".join(text.split())
    skipped = tmp_path / "q.csv"
    assert CliRunner().invoke(main, [*args, "-o", str(skipped), "--skip-ood"]).exit_code == 0
    rows = {r["path"]: r for r in rows_of(skipped)}
    assert (rows["checker.png"]["status"], rows["checker.png"]["reason"], rows["checker.png"]["pred_label"]) == (
        "skipped",
        "out-of-distribution",
        "",
    )
    assert rows["ramp.png"]["status"] == "ok"

    # tampered statistics are refused like tampered weights
    stats_path = folder / "tiny.applicability.safetensors"
    stats_path.write_bytes(stats_path.read_bytes()[:-4] + b"\0\0\0\0")
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "r.csv")])
    assert result.exit_code == 3 and "SHA-256" in result.output


def test_two_inputs_with_the_same_name_keep_distinct_paths(weights_dir: Path, tmp_path: Path):
    for parent in ("a", "b"):
        (tmp_path / parent / "studies").mkdir(parents=True)
        write_cxr(tmp_path / parent / "studies" / "x.dcm", PIXELS, bits_stored=12)
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(tmp_path / "a" / "studies"),
            str(tmp_path / "b" / "studies"),
            "-o",
            str(out),
            "--weights-dir",
            str(weights_dir),
            "-m",
            "tiny",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(r["path"] for r in rows_of(out)) == ["a/studies/x.dcm", "b/studies/x.dcm"]


def test_an_uppercase_sha256_in_the_card_is_accepted(weights_dir: Path, tmp_path: Path):
    folder = tmp_path / "w"
    shutil.copytree(weights_dir, folder)
    card_path = folder / "tiny.json"
    card = json.loads(card_path.read_text())
    card["weights_sha256"] = card["weights_sha256"].upper()
    card_path.write_text(json.dumps(card))
    assert load_model("tiny", folder).card.name == "tiny"
    card["weights_sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    from pneumobatch.core.errors import ModelError

    with pytest.raises(ModelError, match="SHA-256"):
        load_model("tiny", folder)
