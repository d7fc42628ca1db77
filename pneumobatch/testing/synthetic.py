"""Write chest X-ray DICOM files in every encoding pneumobatch reads.

Used to build ``sample_studies/``, the throughput benchmark and the tests, so that
all three exercise the same real encodings. pydicom encodes RLE, JPEG-LS (pyjpegls)
and JPEG 2000 (pylibjpeg-openjpeg) itself; JPEG baseline frames are encoded with
Pillow and encapsulated; deflate is a transfer syntax of the whole data set.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage

#: Encodings by a short name (used in file names, the benchmark and the tests).
ENCODINGS: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "j2k-lossless": JPEG2000Lossless,
    "j2k": JPEG2000,
    "jpeg-baseline": JPEGBaseline8Bit,
}


def write_cxr(
    path: Path,
    pixels: np.ndarray,
    encoding: str = "explicit",
    *,
    bits_stored: Optional[int] = None,
    monochrome1: bool = False,
    modality: str = "DX",
    view_position: str = "PA",
    study_instance_uid: Optional[str] = None,
    series_instance_uid: Optional[str] = None,
    sop_instance_uid: Optional[str] = None,
    patient_id: str = "ANON",
    window: Optional[tuple[float, float]] = None,
    extra: Optional[dict] = None,
    preamble: bool = True,
) -> Dataset:
    """Write a 2-D uint8/uint16 image as a DICOM file and return the data set.

    ``monochrome1`` stores inverted pixels with MONOCHROME1, so a correct reader shows
    the same picture. ``extra`` sets further attributes by keyword.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError("pixels must be a 2-D uint8 or uint16 array")
    if encoding == "jpeg-baseline" and pixels.dtype != np.uint8:
        raise ValueError("JPEG baseline holds 8-bit pixels only")
    bits_allocated = pixels.itemsize * 8
    bits_stored = bits_stored or bits_allocated
    if monochrome1:
        pixels = ((1 << bits_stored) - 1 - pixels.astype(np.int64)).astype(pixels.dtype)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS if modality == "DX" else CR_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.Modality = modality
    ds.ViewPosition = view_position
    ds.BodyPartExamined = "CHEST"
    ds.PatientID = patient_id
    ds.PatientName = "Anonymous"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    uid = ENCODINGS[encoding]
    if encoding in ("rle", "jpegls", "j2k-lossless"):
        ds.PixelData = pixels.tobytes()
        ds.compress(uid, pixels, encoding_plugin=_encoder(encoding), generate_instance_uid=False)
    elif encoding == "j2k":
        ds.PixelData = pixels.tobytes()
        ds.compress(uid, pixels, encoding_plugin="pylibjpeg", j2k_psnr=[80], generate_instance_uid=False)
    elif encoding == "jpeg-baseline":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        meta.TransferSyntaxUID = uid
    else:
        ds.PixelData = pixels.tobytes()
        meta.TransferSyntaxUID = uid
    ds.save_as(path, enforce_file_format=preamble, implicit_vr=None if preamble else (uid == ImplicitVRLittleEndian))
    return ds


def _encoder(encoding: str) -> str:
    return {"rle": "", "jpegls": "pyjpegls", "j2k-lossless": "pylibjpeg"}[encoding]
