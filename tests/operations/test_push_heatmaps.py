"""``push --heatmaps`` against a real Orthanc: a Secondary Capture per positive image, in its own study, once."""

# ruff: noqa: F811 - the Orthanc fixtures are test_pacs's, imported (pytest needs their names as arguments)

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image

from pneumobatch.cli import main
from pneumobatch.model.store import read_card
from pneumobatch.operations.pacs.heatmap_sc import SECONDARY_CAPTURE, legend_text
from tests.helpers import ROOT
from tests.operations.test_pacs import (  # noqa: F401 - fixtures
    DAY,
    _bytes_io,
    _copy,
    _env,
    orthanc,
    orthanc_server,
)

SAMPLES = ROOT / "sample_studies"


def _instances(server, query: dict) -> list[pydicom.Dataset]:
    return [
        pydicom.dcmread(_bytes_io(server._rest("GET", f"/instances/{i}/file").content))
        for i in server.find("Instance", query)
    ]


@pytest.fixture
def night(orthanc, tmp_path) -> dict:
    """Three radiographs of two patients in the archive and on disk, predicted with heatmaps."""
    source = tmp_path / "night"
    source.mkdir()
    images = [
        _copy(SAMPLES / "SAMPLE000/ST000/IM0001", source / "a.dcm", DAY),
        _copy(SAMPLES / "SAMPLE002/ST002/IM0001", source / "b.dcm", DAY, PatientID="PID-0099", PatientName="Roe^Ann"),
        _copy(SAMPLES / "SAMPLE006/ST006/IM0001.dcm", source / "c.dcm", DAY, PatientID="PID-0100"),
    ]
    for path in sorted(source.glob("*.dcm")):
        orthanc.upload(path)
    out = tmp_path / "p.csv"
    args = ["predict", str(source), "-m", "pneumonia", "-m", "etiology", "-o", str(out), "--heatmaps", "positive"]
    assert CliRunner().invoke(main, [*args, "--quiet"]).exit_code == 0
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    return {"source": source, "csv": out, "frame": frame, "images": {ds.SOPInstanceUID: ds for ds in images}}


def _push(server, night: dict, *extra: str):
    args = ["push", str(night["csv"]), "--url", server.dicomweb, "--source", str(night["source"]), *extra]
    return CliRunner().invoke(main, args, env=_env())


@pytest.mark.slow
def test_push_heatmaps_files_one_capture_per_positive_image_in_its_own_study_once(orthanc, night, tmp_path):
    frame, images = night["frame"], night["images"]
    cards = {n: read_card(ROOT / "weights" / f"{n}.json") for n in ("pneumonia", "etiology")}
    positives = frame[(frame.heatmap != "") & frame.pred_label.ne("")]
    assert len(positives) >= 2 and all(cards[r.model].is_finding(r.pred_label) for r in positives.itertuples())
    result = _push(orthanc, night, "--heatmaps")
    assert result.exit_code == 0, result.output
    assert f"heatmap SCs: {len(positives)} sent and verified" in result.output
    captures = _instances(orthanc, {"SOPClassUID": SECONDARY_CAPTURE})
    assert len(captures) == len(positives)
    srs = _instances(orthanc, {"Modality": "SR"})
    for sc in captures:
        source_uid = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        source = images[source_uid]
        row = positives[positives.sop_instance_uid == source_uid]
        model = sc.ManufacturerModelName
        assert model in set(row.model)
        # the source's study and patient, its own series, never another patient's
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
            assert str(sc.get(keyword)) == str(source.get(keyword)), keyword
        assert sc.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in images.values()}
        assert sc.SeriesInstanceUID not in {sr.SeriesInstanceUID for sr in srs}
        assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        assert sc.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
        assert legend_text(cards[model]) in sc.DerivationDescription
        overlay = np.asarray(Image.open(night["csv"].parent / row[row.model == model].heatmap.iloc[0]).convert("RGB"))
        pixels = sc.pixel_array
        assert sc.PhotometricInterpretation == "RGB" and pixels.shape[1:] == (overlay.shape[1], 3)
        assert pixels.shape[0] > overlay.shape[0]  # the legend band below the image
        assert np.array_equal(pixels[: overlay.shape[0]], overlay)
        band = pixels[overlay.shape[0] :]
        assert (band > 200).any() and (band < 30).mean() > 0.5  # white text on black
        # the study's SR of that model lists the SC among its evidence
        sr = next(s for s in srs if s.StudyInstanceUID == sc.StudyInstanceUID and model in str(s.SeriesDescription))
        evidence = {
            ref.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert sc.SOPInstanceUID in evidence and source_uid in evidence
    # pushing again sends nothing; with a lost ledger nothing is duplicated either
    count = len(orthanc.find("Instance", {}))
    again = _push(orthanc, night, "--heatmaps")  # the ledger: every SR (sent after its SCs) delivered before
    assert again.exit_code == 0 and "0 sent and verified" in again.output and "delivered before" in again.output
    lost = _push(orthanc, night, "--heatmaps", "--ledger", str(tmp_path / "lost.sqlite"))
    assert lost.exit_code == 0, lost.output
    assert f"{len(positives)} sent before" in lost.output
    assert len(orthanc.find("Instance", {})) == count


@pytest.mark.slow
def test_the_capture_and_its_sr_pass_dciodvfy(orthanc, night, tmp_path):
    if not shutil.which("dciodvfy"):
        pytest.fail("dciodvfy is not installed: run `sh scripts/install_orthanc.sh` as root (dicom3tools)")
    assert _push(orthanc, night, "--heatmaps").exit_code == 0
    sc = _instances(orthanc, {"SOPClassUID": SECONDARY_CAPTURE})[0]
    sr = _instances(orthanc, {"Modality": "SR"})[0]
    for name, ds in (("sc", sc), ("sr", sr)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path)
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (name, errors)


@pytest.mark.slow
def test_hostile_heatmap_cells_are_refused_per_image_and_the_sr_still_goes(orthanc, night, tmp_path):
    frame = night["frame"].copy()
    rows = frame.index[(frame.heatmap != "") & (frame.model == "pneumonia")].tolist()
    assert len(rows) >= 2
    outside = tmp_path.parent / "outside.png"
    Image.new("RGB", (64, 64), "red").save(outside)
    link = night["csv"].parent / "p.heatmaps" / "link.png"
    os.symlink(outside, link)
    (night["csv"].parent / "p.heatmaps" / "text.png").write_text("not a png")
    hostile = ["../outside.png", str(outside), "p.heatmaps/link.png", "p.heatmaps/text.png", "p.heatmaps/missing.png"]
    for n, cell in enumerate(hostile):
        frame.loc[rows, "heatmap"] = cell
        frame.to_csv(night["csv"], index=False)
        result = _push(orthanc, night, "--heatmaps", "-m", "pneumonia", "--ledger", str(tmp_path / f"{n}.sqlite"))
        assert result.exit_code == 1 and "Traceback" not in result.output, (cell, result.output)
        assert result.output.count("heatmap not sent") == len(rows), cell
        assert str(outside) not in result.output and "outside" not in result.output  # cells are never quoted
        assert _instances(orthanc, {"SOPClassUID": SECONDARY_CAPTURE}) == [], cell
    srs = _instances(orthanc, {"Modality": "SR"})
    # every predicted study's SR went, once, whether or not its image had a heatmap
    predicted = set(frame.loc[(frame.model == "pneumonia") & (frame.status == "ok"), "study_instance_uid"])
    assert set(frame.loc[rows, "study_instance_uid"]) <= predicted
    assert {sr.StudyInstanceUID for sr in srs} == predicted
    assert len(srs) == len(predicted)


@pytest.mark.slow
def test_without_heatmaps_push_sends_no_capture(orthanc, night):
    assert _push(orthanc, night).exit_code == 0
    assert _instances(orthanc, {"SOPClassUID": SECONDARY_CAPTURE}) == []
    assert _instances(orthanc, {"Modality": "SR"})
