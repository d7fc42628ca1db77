"""What every reader shares: :class:`ReadOptions`, the :class:`Image` it returns, the reduced-decode
side and the one blank-image rule (:func:`check_content`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.io.readers.bodyparts import DEFAULT_VOCABULARY, BodyPartVocabulary

#: Default ceiling on decoded pixels (rows x columns x frames read): 64 megapixels,
#: four times a 4k x 4k detector. Larger images are refused as ``too-large``.
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass
class ReadOptions:
    """What a reader is allowed to do; one instance is shared by a whole run."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    include_lateral: bool = False
    #: The model's input size (the largest, with several models): readers may decode at a
    #: reduced scale (JPEG 2000 resolution levels, JPEG DCT scaling) as long as both sides
    #: stay at or above :func:`decode_side`. ``None``: always decode at full size.
    min_side: Optional[int] = None
    #: Chest / non-chest words for the ``not-chest`` gate (see :mod:`pneumobatch.io.readers.bodyparts`).
    body_parts: BodyPartVocabulary = DEFAULT_VOCABULARY
    #: Above 0, decoding also keeps the image as displayed, long side at most this (``predict
    #: --heatmaps`` draws on it; :func:`pneumobatch.model.preprocess.display_image`).
    display_side: int = 0
    #: A DICOM or an 8-bit PNG/JPEG may come back as a table of display values and its stored values
    #: (``Image.table``, ``Image.index``) instead of the image (predict's decoding: the equalisation
    #: needs no image).
    defer_pixels: bool = False


@dataclass
class Image:
    """A decoded image and what we know about it.

    ``pixels``: float32 (rows, columns) in [0, 1], 1 = white on display.
    ``meta``: keys among ``study_instance_uid``, ``series_instance_uid``,
    ``sop_instance_uid``, ``view_position``, ``modality``, ``patient_id``, ``age_band``,
    ``transfer_syntax``, ``photometric_interpretation``, ``frames``, ``manufacturer``,
    ``manufacturer_model_name``, ``station_name`` (all strings
    or ints; values come from untrusted headers and are sanitised by the reader).
    """

    pixels: Optional[np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    #: With ``ReadOptions.defer_pixels``, a DICOM or 8-bit PNG/JPEG reader may return ``pixels`` None and the image
    #: as ``table[index]`` (its display value per stored value, its stored values): what
    #: :func:`pneumobatch.model.preprocess.prepare_image` equalises without building the image.
    table: Optional[np.ndarray] = None
    index: Optional[np.ndarray] = None

    def display_pixels(self) -> np.ndarray:
        """``pixels``, built from ``table`` and ``index`` when the reader deferred them."""
        if self.pixels is None:
            assert self.table is not None and self.index is not None
            self.pixels = self.table[self.index]
        return self.pixels


#: Reduced-resolution decoding keeps both sides at least this factor above the model's
#: input size, so that the final antialiased resize still averages over >= 2 source pixels
#: (a 2048 px image for a 192 px model decodes at 512 px, 1/4). Measured with the shipped
#: models (benchmarks/reduced_decode.py): a margin of 1.25 (2048 px decoded at 256) moved a
#: 512 px JPEG 2000 sample study by 0.16 and flipped its label; JPEG 2000's low-pass band
#: aliases more than the final resize does.
RESIZE_MARGIN = 2.0


def decode_side(options: ReadOptions) -> Optional[int]:
    """Smallest side a reduced-resolution decode may produce; ``None``: decode at full size."""
    return math.ceil(options.min_side * RESIZE_MARGIN) if options.min_side else None


#: Smallest side a radiograph can have and still be predicted (the models see ~200 px).
MIN_SIDE = 32
#: A displayed image whose 1st-99th percentile spread is below this is blank.
MIN_SPREAD = 0.02


def check_content(pixels: np.ndarray | Image) -> None:
    """Refuse images that hold no radiograph: the one place this is decided.

    Not finite anywhere (NaN/inf float pixels), smaller than :data:`MIN_SIDE` on a
    side, or (nearly) constant after display scaling (all black, all white, a flat
    DICOM, a JPEG whose data stop right after the header and decode as grey). Such an
    image would otherwise get a confident prediction of nothing. An :class:`Image` the
    reader left as ``table[index]`` is judged on the same values without building it.
    """
    deferred = isinstance(pixels, Image) and pixels.pixels is None
    if isinstance(pixels, Image) and not deferred:
        pixels = pixels.pixels
    shape = pixels.index.shape if deferred else pixels.shape
    if len(shape) != 2 or min(shape) < MIN_SIDE:
        raise FileRejected(Reason.BLANK_IMAGE, f"{shape[-1]}x{shape[0]} pixels: too small for a radiograph")
    if not np.isfinite(pixels.table if deferred else pixels).all():
        raise FileRejected(Reason.BLANK_IMAGE, "pixel values that are not finite numbers")
    step = max(1, int(np.sqrt(shape[0] * shape[1] / 65536)))  # percentiles of a subsample: fast on 3000x3000
    sample = pixels.table[pixels.index[::step, ::step]] if deferred else pixels[::step, ::step]
    low, high = np.percentile(sample, [1, 99])
    if high - low < MIN_SPREAD:
        raise FileRejected(Reason.BLANK_IMAGE, "the image is (nearly) constant")
