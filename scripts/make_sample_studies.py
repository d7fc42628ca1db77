"""Build sample_studies/ from the test split of the cxr data set (never seen in training).

A small but realistic PACS export: DICOM studies in several encodings (some files
without extension), PNG/JPEG exports, the junk a real export contains, and
labels.csv. Deterministic: the same data set gives the same files and UIDs.

    python scripts/make_sample_studies.py ../shared/datasets/cxr sample_studies
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.uid import generate_uid

from pneumobatch.testing.synthetic import write_cxr

# (finding coarse class, how many) from the test split; adults and children both.
PICKS = {"normal": 10, "bacterial": 8, "viral": 7, "covid-19": 8}
# Encodings in turn; each tuple: (encoding, monochrome1, keep extension)
DICOM_STYLES = [
    ("explicit", False, False),
    ("j2k-lossless", False, True),
    ("jpegls", False, False),
    ("rle", False, True),
    ("explicit", True, True),
    ("jpeg-baseline", False, False),
    ("deflate", False, True),
    ("j2k", False, False),
]


def uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["pneumobatch-sample", *parts])


def pick(manifest: pd.DataFrame) -> pd.DataFrame:
    test = manifest[(manifest["split"] == "test")]
    chosen = []
    for coarse, n in PICKS.items():
        rows = test[test["coarse"] == coarse]
        adult = rows[rows["source"].str.startswith(("ieee", "Actualmed"))]
        child = rows[~rows.index.isin(adult.index)]
        n_adult = min(len(adult), n // 2 if coarse != "covid-19" else n - 1)
        chosen += [adult.sample(n_adult, random_state=0), child.sample(min(len(child), n - n_adult), random_state=0)]
    return pd.concat(chosen).sort_values("path").reset_index(drop=True)


def build(data: Path, out: Path) -> None:
    manifest = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    picked = pick(manifest)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    labels = []
    for i, row in picked.iterrows():
        gray = np.asarray(Image.open(data / row["path"]).convert("L"))
        name = Path(row["path"]).stem
        study, series, sop = uid(name, "study"), uid(name, "series"), uid(name, "sop")
        patient = f"SAMPLE{i:03d}"
        label = {"finding": row["finding"], "source": row["source"].split(" ")[0], "view": row["view"]}
        if i % 6 == 5:  # PNG/JPEG exports, as research groups receive them
            if i % 12 == 5:
                rel = f"exports/{patient}.png"
                (out / "exports").mkdir(exist_ok=True)
                Image.fromarray(gray.astype(np.uint16) * 16).save(out / rel)  # 16-bit (12-bit range) PNG
            else:
                rel = f"exports/{patient}.jpg"
                (out / "exports").mkdir(exist_ok=True)
                shutil.copyfile(data / row["path"], out / rel)
            labels.append({"path": rel, "study_instance_uid": "", "sop_instance_uid": "", **label})
            continue
        encoding, mono1, ext = DICOM_STYLES[i % len(DICOM_STYLES)]
        folder = out / patient / f"ST{i:03d}"
        folder.mkdir(parents=True)
        rel_path = f"{patient}/ST{i:03d}/IM0001" + (".dcm" if ext else "")
        pixels = gray if encoding == "jpeg-baseline" else gray.astype(np.uint16) * 16 + 8
        write_cxr(
            out / rel_path,
            pixels,
            encoding,
            bits_stored=None if encoding == "jpeg-baseline" else 12,
            monochrome1=mono1,
            modality="CR" if i % 2 else "DX",
            view_position=row["view"].split(" ")[0] or "PA",
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=sop,
            patient_id=patient,
        )
        labels.append({"path": rel_path, "study_instance_uid": study, "sop_instance_uid": sop, **label})
        if i == 2:  # a lateral view in the same study: skipped by rule
            write_cxr(
                folder / "IM0002",
                pixels.T.copy(),
                "explicit",
                bits_stored=12,
                view_position="LL",
                study_instance_uid=study,
                series_instance_uid=uid(name, "lat"),
                sop_instance_uid=uid(name, "lat-sop"),
                patient_id=patient,
            )
    _junk(out, picked)
    frame = pd.DataFrame(labels)
    from pneumobatch.core.tasks import get_task

    frame["label"] = [get_task("pneumonia").map_label(f) or "" for f in frame["finding"]]
    frame["etiology"] = [get_task("etiology").map_label(f) or "" for f in frame["finding"]]
    columns = ["path", "study_instance_uid", "sop_instance_uid", "label", "etiology", "finding", "source", "view"]
    frame[columns].to_csv(out / "labels.csv", index=False)


def _junk(out: Path, picked: pd.DataFrame) -> None:
    """What a real export holds besides images."""
    rng = np.random.default_rng(0)
    scan = out / "SAMPLE900" / "CT_CHEST"
    scan.mkdir(parents=True)
    write_cxr(
        scan / "CT000001",
        rng.integers(0, 4096, (64, 64)).astype(np.uint16),
        "explicit",
        bits_stored=12,
        series_instance_uid=uid("ct-series"),
        modality="CT",
        study_instance_uid=uid("ct"),
        sop_instance_uid=uid("ct-sop"),
        patient_id="SAMPLE900",
    )
    knee = out / "SAMPLE901" / "XR_KNEE"  # a CR study of another body part: skipped not-chest
    knee.mkdir(parents=True)
    write_cxr(
        knee / "IM0001",
        (np.random.default_rng(1).integers(0, 4096, (96, 80)) // 16 * 16).astype(np.uint16),
        "explicit",
        bits_stored=12,
        modality="CR",
        study_instance_uid=uid("knee"),
        series_instance_uid=uid("knee-series"),
        sop_instance_uid=uid("knee-sop"),
        patient_id="SAMPLE901",
        extra={"BodyPartExamined": "KNEE", "StudyDescription": "XR KNEE 2 VIEWS"},
    )
    _ct_slice_png(out / "exports" / "CT_slice_export.png")
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR: a report, no pixels
    meta.MediaStorageSOPInstanceUID = uid("sr")
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    sr = Dataset()
    sr.file_meta, sr.SOPClassUID, sr.SOPInstanceUID = (
        meta,
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    sr.Modality, sr.StudyInstanceUID, sr.PatientID = "SR", uid("ct"), "SAMPLE900"
    sr.save_as(scan / "SR000001", enforce_file_format=True)
    dicomdir_meta = FileMetaDataset()
    dicomdir_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory
    dicomdir_meta.MediaStorageSOPInstanceUID = uid("dicomdir")
    dicomdir_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    dicomdir = Dataset()
    dicomdir.file_meta = dicomdir_meta
    dicomdir.FileSetID = "PNEUMOBATCH"
    dicomdir.DirectoryRecordSequence = []
    dicomdir.save_as(out / "DICOMDIR", enforce_file_format=True)
    (out / "README.TXT").write_text("Exported by PACS. Do not edit.\n")
    (out / ".DS_Store").write_bytes(bytes(rng.integers(0, 255, 64, dtype=np.uint8)))
    (out / "exports" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(60))
    (out / "exports" / "upload_failed.jpg").write_bytes(b"")
    first = next(out.rglob("IM0001.dcm"))
    (out / "SAMPLE900" / "TRUNCATED.dcm").write_bytes(first.read_bytes()[:2000])


def _ct_slice_png(path: Path) -> None:
    """A CT slice saved as PNG (pydicom's bundled CT_small.dcm): no header to gate on, so the
    applicability flag is what marks it (the demo's out-of-distribution example)."""
    import pydicom

    ds = pydicom.dcmread(Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    window = np.clip((hu + 160) / 400, 0, 1)  # soft-tissue window, centre 40 HU, width 400
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((window * 255).round().astype(np.uint8)).save(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the cxr data set folder (with manifest.csv)")
    parser.add_argument("out", type=Path, help="folder to (re)create")
    args = parser.parse_args()
    build(args.data, args.out)
