"""DICOM stored values to [0, 1] display values: Modality LUT, VOI (LUT or window), MONOCHROME1.

The policy is the reader's (:mod:`pneumobatch.io.readers.dicom`, module docstring): a
*Modality LUT Sequence* or *Rescale Slope/Intercept*; the first *VOI LUT Sequence*
item, else the first *Window Center/Width* by pydicom's ``apply_windowing``, else the
image's own min-max; MONOCHROME1 inverted; colour to luminance. Whichever decoder ran
(pydicom or the reduced-scale one), its stored values come through here.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing

from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.io.readers.dicom_values import as_float, as_text, first_value, header_value

logger = logging.getLogger(__name__)

#: VOI LUT Functions pydicom's windowing implements (PS3.3 C.11.2.1.3).
_WINDOW_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})
#: Wider windows are no window: the largest finite float32.
_MAX_WIDTH = float(np.finfo(np.float32).max)
#: Integer images spanning fewer stored values than this are windowed through a table.
_TABLE_SPAN = 1 << 16


def to_display(array: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Map stored values to [0, 1] display values (Modality LUT, VOI, MONOCHROME1)."""
    tabled = display_table(array, ds, photometric)
    if tabled is not None:
        table, index = tabled
        return table[index]
    return _to_display(array, ds, photometric)


def display_table(array: np.ndarray, ds: Dataset, photometric: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(table, index)`` with ``table[index]`` exactly :func:`to_display`'s image, for a grey
    integer image spanning fewer than :data:`_TABLE_SPAN` stored values (every DICOM radiograph):
    each step of the mapping is a function of the stored value, so it is computed once per value
    (the same float32 arithmetic) and the image indexes the table; None for other images.
    ``index`` is the stored array itself when it is unsigned, else shifted to start at 0; a min-max
    mapping takes the range of the values present (a histogram), as the per-pixel one does."""
    if array.ndim != 2 or array.dtype.kind not in "iu" or array.size < _TABLE_SPAN or photometric == "PALETTE COLOR":
        return None
    lo, hi = int(array.min()), int(array.max())
    lo = 0 if array.dtype.kind == "u" else lo
    if hi - lo >= _TABLE_SPAN:
        return None
    stored = np.arange(lo, hi + 1).astype(array.dtype)
    index = array if lo == 0 else np.subtract(array, lo, dtype=np.int32)
    values = _modality_lut(stored, ds) if header_value(ds, "VOILUTSequence") else None
    table = None if values is None else _voi_lut(values, ds)
    if table is None:
        table = _window(_modality_lut(stored, ds), ds)
    if table is None:  # min-max over the values the image holds
        present = np.bincount(index.ravel(), minlength=len(stored)).astype(bool)
        modality = _modality_lut(stored, ds) if values is None else values
        seen = modality[present]
        table = _ramp_range(modality, float(seen.min()), float(seen.max()))
    table = np.asarray(table, dtype=np.float32)
    if photometric == "MONOCHROME1":
        table = np.subtract(np.float32(1.0), table, dtype=np.float32)
    return _finish(table), index


def _ramp_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return _ramp(values, lo, hi - lo)


def _to_display(array: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """:func:`to_display` pixel by pixel (colour, palette, float, or a span too wide for a table)."""
    if photometric == "PALETTE COLOR" and array.ndim == 2:
        array = apply_color_lut(array, ds)
    if array.ndim == 3:  # colour: pydicom has converted YBR to RGB
        if array.shape[-1] != 3:
            raise FileRejected(Reason.UNSUPPORTED_PIXELS, f"{array.shape[-1]} samples per pixel")
        luma = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return _finish(_minmax(luma))
    if array.ndim != 2:
        raise FileRejected(Reason.UNSUPPORTED_PIXELS, f"unexpected pixel shape {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        finite = array[np.isfinite(array)]
        array = np.nan_to_num(array, nan=finite.min() if finite.size else 0.0)
    values = _modality_lut(array, ds) if header_value(ds, "VOILUTSequence") else None
    display = None if values is None else _voi_lut(values, ds)
    if display is None:  # (integer images with a table's span never come here: display_table)
        display = _window(_modality_lut(array, ds), ds)
    if display is None:
        display = _minmax(_modality_lut(array, ds) if values is None else values)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, display, out=display)
    return _finish(display)


def _finish(display: np.ndarray) -> np.ndarray:
    """Every path above yields [0, 1]; this guards the float32 and finite promises."""
    display = display.astype(np.float32, copy=False)
    if np.isnan(display.min()):  # min propagates NaN; one cheap pass
        display = np.clip(np.nan_to_num(display, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return display


def _ramp(values: np.ndarray, lower: float, width: float) -> np.ndarray:
    """``(values - lower) / width`` as a new float32 array clipped to [0, 1] (three passes)."""
    out = np.subtract(values, lower, dtype=np.float32)
    out *= np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


def _minmax(values: np.ndarray) -> np.ndarray:
    """Scale by the image's own range; a constant image becomes all zeros (as ``raster.minmax``)."""
    lo, hi = float(values.min()), float(values.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return _ramp(values, lo, hi - lo)


def _modality_lut(array: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values to modality values (float32 when rescaled)."""
    if header_value(ds, "ModalityLUTSequence"):
        try:
            return apply_modality_lut(array, ds)
        except Exception as exc:
            logger.debug("ignoring unusable Modality LUT Sequence: %s", exc)
            return array
    slope = as_float(header_value(ds, "RescaleSlope"))
    intercept = as_float(header_value(ds, "RescaleIntercept"))
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    if slope == 1.0 and intercept == 0.0:
        return array
    return array.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _voi_lut(values: np.ndarray, ds: Dataset) -> Optional[np.ndarray]:
    """Apply the first VOI LUT Sequence item, scaled by its output range; None if unusable."""
    if not header_value(ds, "VOILUTSequence"):
        return None
    try:
        descriptor = [int(v) for v in ds.VOILUTSequence[0].LUTDescriptor]
        entries, first = descriptor[0] or 65536, descriptor[1]
        # pydicom maps the LUT's own input domain; this yields the table itself
        table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
    except Exception as exc:
        logger.debug("ignoring unusable VOI LUT Sequence: %s", exc)
        return None
    table = table.astype(np.float32)
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        return None
    table = (table - lo) / (hi - lo)
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.intp)
    return table[index]


def _window(values: np.ndarray, ds: Dataset) -> Optional[np.ndarray]:
    """Apply the first Window Center/Width (PS3.3 C.11.2.1.2) with pydicom; None if absent or unusable.

    pydicom's :func:`~pydicom.pixels.apply_windowing` computes the window on a data set
    holding only the parsed centre, width and function, with a one-bit output range so
    that it yields [0, 1]. An unknown function is taken as LINEAR. A width pydicom would
    refuse (LINEAR below 1, the others not positive) or beyond float32's range (no
    real window; the old float32 formula overflowed there) leaves the window unused.
    """
    center = as_float(first_value(header_value(ds, "WindowCenter")))
    width = as_float(first_value(header_value(ds, "WindowWidth")))
    if center is None or width is None:
        return None
    function = as_text(header_value(ds, "VOILUTFunction")).upper() or "LINEAR"
    if function not in _WINDOW_FUNCTIONS:
        logger.debug("unknown VOI LUT Function %r; using LINEAR", function[:16])
        function = "LINEAR"
    if (width < 1 if function == "LINEAR" else width <= 0) or width > _MAX_WIDTH:
        return None
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"  # MONOCHROME1 is inverted afterwards
    window.BitsStored, window.PixelRepresentation = 1, 0  # output range [0, 1]
    # FD rather than DS: the parsed floats as they are (a DS of more than 16 characters warns)
    window.add_new(0x00281050, "FD", center)  # Window Center
    window.add_new(0x00281051, "FD", width)  # Window Width
    window.VOILUTFunction = function
    with np.errstate(over="ignore"):  # SIGMOID: exp overflows to inf far below the centre, giving 0
        return apply_windowing(values, window).astype(np.float32)
