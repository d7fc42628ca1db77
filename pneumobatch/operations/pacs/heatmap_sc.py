"""``push --heatmaps``: each positive image's heatmap as a DICOM Secondary Capture in the image's own study.

The picture is the overlay ``predict --heatmaps`` wrote (the ``heatmap`` cell, accepted only
as a regular file inside the CSV's folder: :func:`pneumobatch.io.predictions.heatmap_file`)
with a legend burned in below it: "AI heatmap, pneumobatch <version>, model <name>, research
use only, not for diagnosis". The SC (highdicom) takes its patient and study modules from the
source image's own header, exactly as the SR does (the same evidence, so never another
study), lies in a series of its own per study and model, and references the source image
(Source Image Sequence). Its UIDs follow from the study, the source image, the model's
weights and the overlay's bytes, so pushing again sends nothing new; the SR of the study
lists the SCs it was sent with among its evidence.
"""

from __future__ import annotations

import hashlib
import io
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pneumobatch import __version__
from pneumobatch.core.card import ModelCard
from pneumobatch.io.predictions import heatmap_file

#: Largest overlay side accepted (predict draws at most 1024 px).
MAX_SIDE = 4096
SERIES_NUMBER = 9702
MANUFACTURER = "pneumobatch"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def legend_text(card: ModelCard) -> str:
    return f"AI heatmap, pneumobatch {__version__}, model {card.name}, research use only, not for diagnosis"


class HeatmapRefused(Exception):
    """The row's heatmap cannot be sent; the message says why (never quoting the cell)."""


def read_overlay(cell: str, folder: Path) -> tuple[np.ndarray, str]:
    """The RGB overlay a CSV cell names, and the SHA-256 of its bytes; :class:`HeatmapRefused`
    for a cell naming nothing acceptable or a file that is no sane RGB PNG."""
    from PIL import Image, UnidentifiedImageError

    path = heatmap_file(cell, folder)
    if path is None:
        raise HeatmapRefused("its heatmap cell names no regular file inside the predictions' folder")
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise HeatmapRefused("its heatmap is not a PNG")
            if max(img.size) > MAX_SIDE or min(img.size) < 8:
                raise HeatmapRefused(f"its heatmap's size is outside 8-{MAX_SIDE} px a side")
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        raise HeatmapRefused("its heatmap cannot be read as a PNG") from exc
    return rgb, hashlib.sha256(data).hexdigest()


def with_legend(rgb: np.ndarray, text: str) -> np.ndarray:
    """The overlay with a black band below it holding ``text`` in white (wrapped), burned into the pixels."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    size = max(10, round(w / 48))
    font = ImageFont.load_default(size=size)
    per_line = max(12, int(w / (0.55 * size)) - 2)
    lines = textwrap.wrap(text, per_line)
    band = round(size * 1.35 * len(lines) + size)
    canvas = Image.new("RGB", (w, h + band), "black")
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(lines):
        draw.text((round(size / 2), h + round(size / 2) + round(n * size * 1.35)), line, fill="white", font=font)
    return np.asarray(canvas)


@dataclass(frozen=True)
class HeatmapCapture:
    """One SC to send: its UIDs and the dataset."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    source_sop_instance_uid: str
    dataset: Dataset


def series_uid(study: str, card: ModelCard) -> str:
    return generate_uid(entropy_srcs=["pneumobatch-heatmap-series", study, card.name, card.weights_sha256])


def sop_uid(study: str, source_sop: str, card: ModelCard, digest: str) -> str:
    return generate_uid(entropy_srcs=["pneumobatch-heatmap", study, source_sop, card.weights_sha256, digest])


def build_capture(
    evidence: Dataset, source_sop_class: str, rgb: np.ndarray, digest: str, card: ModelCard, instance_number: int = 1
) -> HeatmapCapture:
    """The SC of one overlay, in the study of ``evidence`` (:func:`~.sr.evidence_dataset` of the
    source image), referencing the source image."""
    import highdicom as hd

    study, source_sop = str(evidence.StudyInstanceUID), str(evidence.SOPInstanceUID)
    series, sop = series_uid(study, card), sop_uid(study, source_sop, card, digest)
    pixels = with_legend(rgb, legend_text(card))
    with warnings.catch_warnings():  # highdicom warns about odd person names, quoting them
        warnings.simplefilter("ignore", UserWarning)
        ds = hd.sc.SCImage.from_ref_dataset(
            evidence,
            pixels,
            "RGB",
            8,
            "PATIENT",
            series,
            SERIES_NUMBER,
            sop,
            instance_number,
            MANUFACTURER,
            patient_orientation=("L", "F"),
        )
    ds.BodyPartExamined = "CHEST"  # what predict explains (and what tells a validator no laterality is due)
    ds.PatientOrientation = ""  # type 2: the overlay keeps the source's display, whose orientation is not known here
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.SeriesDescription = f"AI heatmap {card.name} - NOT FOR DIAGNOSTIC USE"[:64]
    ds.DerivationDescription = f"Grad-CAM of model {card.name} over the source image; {legend_text(card)}"[:1024]
    ds.ManufacturerModelName = card.name[:64]
    ds.SoftwareVersions = [f"pneumobatch {__version__}"[:64], card.weights_sha256[:64] or "unknown weights"]
    source = Dataset()
    source.ReferencedSOPClassUID = source_sop_class
    source.ReferencedSOPInstanceUID = source_sop
    ds.SourceImageSequence = [source]
    return HeatmapCapture(study, series, sop, source_sop, ds)
