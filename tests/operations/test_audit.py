"""``pneumobatch audit``: the header shortcut, export invariance and applicability of a predict run.

One real predict run (a tiny random model) over real DICOM files of three scanners and two
PNG exports is shared by the module. The model's calls are then set in copies of its CSV:
all positive calls on one manufacturer's images (a shortcut the header must show), or the
same manufacturers shuffled independently of the calls (no shortcut).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from pneumobatch.cli import main
from pneumobatch.core.errors import EXIT_FILE_ERRORS, EXIT_USAGE
from pneumobatch.operations.audit.header import NO_HEADER, header_auc
from pneumobatch.operations.audit.run import AuditConfig, build_audit
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import one_line_error

MANUFACTURERS = ("ACME", "Globex", "Initech")
PER_MANUFACTURER = 40
SHORTCUT = "ACME"


@pytest.fixture(scope="module")
def run(tmp_path_factory, weights_dir: Path) -> dict:
    """A source folder of 120 DICOMs (40 per manufacturer, stations and views at random) and
    2 PNGs, predicted once; its CSV and run.json in another folder."""
    root = tmp_path_factory.mktemp("audit")
    source = root / "source"
    rng = np.random.default_rng(0)
    manufacturers = {}
    for m, name in enumerate(MANUFACTURERS):
        for i in range(PER_MANUFACTURER):
            rel = f"{name}/IM{i:03d}.dcm"
            (source / name).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 4096, size=(48, 48)).astype(np.uint16)
            write_cxr(
                source / rel,
                pixels,
                bits_stored=12,
                view_position=str(rng.choice(["PA", "AP"])),
                patient_id=f"PID{m}{i:03d}",
                extra={
                    "Manufacturer": name,
                    "StationName": str(rng.choice(["ER_1", "WARD_7", "ICU_2"])),
                    "PatientName": "Doe^Jane",
                    "PixelSpacing": [0.15, 0.15],
                },
            )
            manufacturers[rel] = name
    (source / "exports").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, size=(48, 48)).astype(np.uint8)).save(source / f"exports/{i}.png")
    out = root / "run" / "p.csv"
    args = ["predict", str(source), "-o", str(out), "--weights-dir", str(weights_dir), "-m", "tiny", "-q"]
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    return {"source": source, "csv": out, "manufacturers": manufacturers, "weights_dir": weights_dir}


def with_calls(run: dict, folder: Path, positive: dict[str, bool], applicable: dict[str, str] | None = None) -> Path:
    """A copy of the run's CSV (and run.json) in ``folder`` with each row's call set from ``positive``."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.read_csv(run["csv"], dtype=str, keep_default_na=False)
    frame["pred_label"] = [
        ("pneumonia" if positive.get(p, False) else "normal") if s == "ok" else ""
        for p, s in zip(frame["path"], frame["status"])
    ]
    if applicable is not None:
        frame["applicable"] = [applicable.get(p, "") for p in frame["path"]]
    csv = folder / "p.csv"
    frame.to_csv(csv, index=False)
    shutil.copy(run["csv"].with_name("p.run.json"), folder / "p.run.json")
    return csv


def audit(run: dict, csv: Path, **options) -> dict:
    config = AuditConfig(csv, run["source"], model="tiny", invariance=False, output=csv.with_suffix(".pdf"), **options)
    return build_audit(config)


def test_the_header_auc_is_high_when_the_positive_calls_all_carry_one_manufacturer(run: dict, tmp_path: Path):
    rng = np.random.default_rng(1)
    positive = {p: m == SHORTCUT and rng.random() < 0.8 for p, m in run["manufacturers"].items()}
    doc = audit(run, with_calls(run, tmp_path, positive))
    header = doc["header"]
    assert header["auc"] > 0.9, header
    assert header["tracks_header"] is True
    assert "tracks the scanner or the protocol more than the patients: validate per group" in doc["verdicts"]["header"]
    by_value = {v["value"]: v for v in doc["values"]["manufacturer"]["values"]}
    assert by_value["Globex"]["positive"]["k"] == 0 and by_value["Globex"]["positive"]["ci"][0] == 0.0
    acme = by_value[SHORTCUT]["positive"]
    assert acme["n"] == PER_MANUFACTURER and acme["ci"][0] < acme["rate"] < acme["ci"][1]
    assert doc["values"]["format"]["values"][-1]["value"] == "png"  # a PNG's format is a feature ...
    assert {v["value"] for v in doc["values"]["manufacturer"]["values"]} >= {NO_HEADER}  # ... its header is not


def test_the_header_auc_is_about_half_when_the_manufacturers_are_shuffled_independently_of_the_calls(
    run: dict, tmp_path: Path
):
    rng = np.random.default_rng(2)
    paths = sorted(run["manufacturers"])
    calls = {p: bool(c) for p, c in zip(paths, rng.random(len(paths)) < 0.4)}
    # the same calls, on images whose manufacturer was drawn independently of them
    shuffled = dict(zip(paths, rng.permutation([calls[p] for p in paths])))
    header = audit(run, with_calls(run, tmp_path, shuffled))["header"]
    assert 0.35 <= header["auc"] <= 0.65, header
    assert header["tracks_header"] is False


def test_too_few_calls_of_one_kind_give_no_auc_but_say_why():
    features = [{"format": "dicom", "manufacturer": "A"}] * 20
    out = header_auc(features, [True] * 3 + [False] * 17)
    assert out["auc"] is None
    assert "not enough positive and negative calls to judge" in out["verdict"]


def test_applicability_is_reported_by_the_same_header_values(run: dict, tmp_path: Path):
    flags = {p: ("false" if m == "Globex" else "true") for p, m in run["manufacturers"].items()}
    doc = audit(run, with_calls(run, tmp_path, {}, flags))
    overall = doc["applicability"]["overall"]
    assert (overall["scored"], overall["not_applicable"]) == (120, 40)
    by_value = {v["value"]: v["not_applicable"] for v in doc["values"]["manufacturer"]["values"]}
    assert by_value["Globex"]["rate"] == 1.0 and by_value["ACME"]["k"] == 0
    assert "40 of 120" in doc["verdicts"]["applicability"] and "Globex" in doc["verdicts"]["applicability"]
    assert doc["header"]["auc"] is None  # no positive call at all


def test_gone_unreadable_and_escaping_rows_are_counted_not_fatal(run: dict, tmp_path: Path):
    source = tmp_path / "source"
    shutil.copytree(run["source"], source)
    csv = with_calls(run, tmp_path / "run", {p: m == SHORTCUT for p, m in run["manufacturers"].items()})
    (source / "ACME/IM000.dcm").unlink()
    (source / "ACME/IM001.dcm").write_bytes(b"\0" * 10)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame.loc[frame["path"] == "ACME/IM002.dcm", "path"] = "../../etc/passwd"
    frame.to_csv(csv, index=False)
    doc = build_audit(AuditConfig(csv, source, model="tiny", invariance=False))
    rows = doc["rows"]
    assert (rows["missing"]["count"], rows["unreadable"]["count"], rows["outside_source"]["count"]) == (1, 1, 1)
    assert rows["outside_source"]["examples"] == ["../../etc/passwd"]
    assert rows["audited"] == rows["predicted"] - 3 and rows["not_read"] == 3


# ---------------------------------------------------------------------------------- the CLI


def test_the_cli_writes_pdf_and_json_with_the_invariance_table_and_no_patient_text(run: dict, tmp_path: Path):
    csv = with_calls(run, tmp_path / "run", {p: m == SHORTCUT for p, m in run["manufacturers"].items()})
    out = tmp_path / "out" / "audit.pdf"
    out.parent.mkdir()
    args = ["audit", str(csv), str(run["source"]), "-m", "tiny", "-o", str(out), "--sample", "6"]
    result = CliRunner().invoke(main, [*args, "--weights-dir", str(run["weights_dir"]), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "validate per group" in result.stdout and "export invariance on 6 images" in result.stdout
    assert out.read_bytes().startswith(b"%PDF")
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["schema"] == "pneumobatch.audit/1" and doc["header"]["auc"] > 0.9
    assert len(doc["invariance"]["table"]["rows"]) >= 10 and doc["invariance"]["n_images"] == 6
    text = out.with_suffix(".json").read_text()
    assert "Doe" not in text and "PID0" not in text  # header text of people never reaches an output

    again = CliRunner().invoke(main, args[:-2] + ["--no-invariance"])
    one_line_error(again, EXIT_USAGE, "exists", "--overwrite")
    replaced = CliRunner().invoke(main, args[:-2] + ["--no-invariance", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert "not tested: --no-invariance" in replaced.stdout


def test_the_cli_refuses_to_write_inside_the_source_or_over_its_inputs(run: dict, tmp_path: Path):
    csv = with_calls(run, tmp_path / "run", {})
    before = {f.name: f.read_bytes() for f in csv.parent.iterdir()}
    base = ["audit", str(csv), str(run["source"]), "-m", "tiny", "--no-invariance", "--overwrite", "-o"]
    inside = run["source"] / "ACME" / "audit.pdf"
    one_line_error(CliRunner().invoke(main, [*base, str(inside)]), EXIT_USAGE, "inside the source folder")
    assert not inside.exists() and not inside.with_suffix(".json").exists()
    # -o p.csv: the PDF would be the CSV; -o p.run.pdf: its JSON would be the run.json
    for out in (csv, csv.with_name("p.run.pdf")):
        one_line_error(CliRunner().invoke(main, [*base, str(out)]), EXIT_USAGE, "would overwrite an input")
    assert {f.name: f.read_bytes() for f in csv.parent.iterdir()} == before


def test_the_cli_gives_one_line_errors_for_a_missing_run_json_and_a_csv_that_is_not_predictions(
    run: dict, tmp_path: Path
):
    csv = with_calls(run, tmp_path / "run", {})
    csv.with_name("p.run.json").unlink()
    args = ["-m", "tiny", "-o", str(tmp_path / "a.pdf")]
    result = CliRunner().invoke(main, ["audit", str(csv), str(run["source"]), *args])
    one_line_error(result, EXIT_USAGE, "p.run.json not found")
    other = tmp_path / "labels.csv"
    other.write_text("path,label\na.dcm,normal\n")
    result = CliRunner().invoke(main, ["audit", str(other), str(run["source"]), *args])
    one_line_error(result, EXIT_USAGE, "not a pneumobatch predictions CSV")
    assert not (tmp_path / "a.pdf").exists()


def test_the_cli_exits_1_and_counts_rows_whose_image_is_gone(run: dict, tmp_path: Path):
    source = tmp_path / "source"
    shutil.copytree(run["source"], source)
    csv = with_calls(run, tmp_path / "run", {})
    shutil.rmtree(source / "Initech")
    out = tmp_path / "a.pdf"
    result = CliRunner().invoke(main, ["audit", str(csv), str(source), "-m", "tiny", "-o", str(out), "--no-invariance"])
    assert result.exit_code == EXIT_FILE_ERRORS, result.output
    assert "Traceback" not in result.output
    assert json.loads(out.with_suffix(".json").read_text())["rows"]["missing"]["count"] == PER_MANUFACTURER
