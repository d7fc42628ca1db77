"""Body-part gating: a knee, a hand or a dental panoramic is skipped ``not-chest``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pneumobatch.cli import main
from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.io.readers import Image, ReadOptions
from pneumobatch.io.readers.bodyparts import BodyPartVocabulary, examined_part
from pneumobatch.io.readers.dicom import read_dicom
from pneumobatch.testing.synthetic import write_cxr

PIXELS = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 7 % 4096).astype(np.uint16)


def write(path: Path, **headers) -> Path:
    body_part = headers.pop("BodyPartExamined", "CHEST")
    write_cxr(
        path,
        PIXELS,
        modality=headers.pop("modality", "CR"),
        bits_stored=12,
        extra={"BodyPartExamined": body_part, **headers},
    )
    return path


def outcome(path: Path, options: ReadOptions | None = None) -> str:
    try:
        read_dicom(path, options or ReadOptions())
    except FileRejected as exc:
        return f"{exc.reason.value}: {exc.detail}"
    return "ok"


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"BodyPartExamined": "EXTREMITY"}, "not-chest: BodyPartExamined names EXTREMITY, not the chest"),
        (
            {"BodyPartExamined": "", "StudyDescription": "OPG Panoramic", "SeriesDescription": "Dental"},
            "not-chest: StudyDescription names OPG, not the chest",
        ),
        ({"BodyPartExamined": "TEETH"}, "not-chest: BodyPartExamined names TEETH, not the chest"),
        ({"BodyPartExamined": "l-spine"}, "not-chest: BodyPartExamined names SPINE, not the chest"),
        (
            {"BodyPartExamined": "", "ProtocolName": "KNIE li. 2 Eb."},
            "not-chest: ProtocolName names KNIE, not the chest",
        ),
        # the body part decides over descriptions
        (
            {"BodyPartExamined": "KNEE", "StudyDescription": "CHEST PA"},
            "not-chest: BodyPartExamined names KNEE, not the chest",
        ),
        ({"BodyPartExamined": "CHEST", "StudyDescription": "Chest and abdomen"}, "ok"),
        ({"BodyPartExamined": "Thorax"}, "ok"),
        ({"BodyPartExamined": "", "StudyDescription": "Rx Tórax PA", "SpecificCharacterSet": "ISO_IR 100"}, "ok"),
        ({"BodyPartExamined": ""}, "ok"),  # nothing known: goes on to the image
        ({"BodyPartExamined": "XYZ", "StudyDescription": "routine"}, "ok"),
        ({"BodyPartExamined": "", "StudyDescription": "THORAX/ABDOMEN"}, "ok"),
    ],
)
def test_header_body_part_gate(tmp_path: Path, headers, expected):
    assert outcome(write(tmp_path / "x.dcm", **headers)) == expected


def test_not_chest_is_a_skip_not_an_error():
    assert Reason.NOT_CHEST.status.value == "skipped"


def test_site_terms_extend_the_vocabulary(tmp_path: Path):
    bein = write(tmp_path / "bein.dcm", BodyPartExamined="", StudyDescription="BEIN GANZ")
    tx = write(tmp_path / "tx.dcm", BodyPartExamined="TX", StudyDescription="HAND")
    assert outcome(bein) == "ok"
    site = ReadOptions(body_parts=BodyPartVocabulary.with_site_terms(chest=["tx"], not_chest=["Bein"]))
    assert outcome(bein, site) == "not-chest: StudyDescription names BEIN, not the chest"
    assert outcome(tx, site) == "ok"  # a site's chest word wins over the description's HAND


def test_examined_part_never_returns_header_text():
    part, keyword = examined_part({"BodyPartExamined": '=HYPERLINK("x") KNEE'})
    assert (part, keyword) == ("KNEE", "BodyPartExamined")


def test_predict_skips_a_leg_and_a_dental_panoramic(tmp_path: Path):
    studies = tmp_path / "studies"
    studies.mkdir()
    write(studies / "leg.dcm", BodyPartExamined="EXTREMITY", StudyDescription="XR LEG")
    write(studies / "pano.dcm", BodyPartExamined="", StudyDescription="DENTAL PANORAMIC")
    write(studies / "chest.dcm")
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(main, ["predict", str(studies), "-o", str(out), "--quiet", "--workers", "0"])
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert (rows["leg.dcm"]["status"], rows["leg.dcm"]["reason"]) == ("skipped", "not-chest")
    assert (rows["pano.dcm"]["status"], rows["pano.dcm"]["reason"]) == ("skipped", "not-chest")
    assert rows["chest.dcm"]["status"] == "ok"
    assert isinstance(read_dicom(studies / "chest.dcm", ReadOptions()), Image)


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
@pytest.mark.parametrize(
    "age, band", [("045Y", "adult"), ("017Y", "child"), ("006M", "child"), ("", "unknown"), ("abc", "unknown")]
)
def test_patient_age_becomes_an_age_band(tmp_path: Path, age: str, band: str):
    image = read_dicom(write(tmp_path / "a.dcm", PatientAge=age), ReadOptions())
    assert image.meta["age_band"] == band
