"""Reduced-resolution decoding of compressed DICOM frames (Pillow): only the pixels the model needs.

The models look at ~200 px; radiographs are 2,000-3,000 px a side. A JPEG 2000 codestream
holds the image at every level of its wavelet decomposition, and JPEG baseline/extended
can scale by 1/2, 1/4 or 1/8 in the DCT domain, so decoding at a reduced scale costs a
fraction of a full decode (2048 px lossless J2K, one core: ~2 images/s full, ~150 at 1/8).

:func:`decode_reduced` returns a frame's *stored values* as pydicom's decoders would (same
dtype, signedness and bit depth), at the largest reduction that leaves both sides at least
``side`` pixels, or ``None`` when it does not apply: nothing to gain, not monochrome, a
codestream whose size, precision or sign disagrees with the header (pydicom knows those
corrections), or any Pillow failure. On ``None`` the caller decodes in full with pydicom,
and everything after decoding (Modality LUT, VOI, MONOCHROME1) is the caller's one pixel
pipeline, whichever decoder ran.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image as PILImage
from pydicom import uid

logger = logging.getLogger(__name__)

#: JPEG 2000 syntaxes decoded here (HTJ2K is left to pydicom: nothing installed writes it to test).
J2K_SYNTAXES = frozenset({uid.JPEG2000Lossless, uid.JPEG2000})
#: JPEG syntaxes with DCT scaling (8-bit frames only; Pillow has no 12-bit JPEG).
JPEG_SYNTAXES = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit})
TRANSFER_SYNTAXES = J2K_SYNTAXES | JPEG_SYNTAXES


@dataclass(frozen=True)
class Layout:
    """What the DICOM header says the frame holds (single-sample, monochrome)."""

    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    signed: bool


@dataclass(frozen=True)
class J2KHeader:
    """The main-header fields of a JPEG 2000 codestream that decoding depends on."""

    columns: int
    rows: int
    components: int
    precision: int  # of the first component
    signed: bool
    levels: Optional[int]  # wavelet decomposition levels (COD); None if not found


def j2k_header(data: bytes) -> Optional[J2KHeader]:
    """Parse SIZ (and COD) of a JPEG 2000 codestream, raw or inside JP2 boxes; ``None`` if absent."""
    pos = data.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ
    if pos < 0 or pos + 43 > len(data):
        return None
    siz = pos + 2

    def u32(offset: int) -> int:
        return int.from_bytes(data[siz + offset : siz + offset + 4], "big")

    xsiz, ysiz, xosiz, yosiz = u32(6), u32(10), u32(14), u32(18)
    components = int.from_bytes(data[siz + 38 : siz + 40], "big")
    ssiz = data[siz + 40]
    levels = None
    marker = siz + 2 + int.from_bytes(data[siz + 2 : siz + 4], "big")
    while marker + 9 <= len(data) and data[marker] == 0xFF:
        code = data[marker + 1]
        if code == 0x52:  # COD: Lcod(2) Scod(1) SGcod(4) then SPcod, whose first byte is NL
            levels = data[marker + 9]
            break
        if code == 0x90:  # SOT: end of the main header
            break
        marker += 2 + int.from_bytes(data[marker + 2 : marker + 4], "big")
    return J2KHeader(
        max(xsiz - xosiz, 0), max(ysiz - yosiz, 0), components, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels
    )


def reduction(columns: int, rows: int, side: int, limit: int) -> int:
    """Largest k <= ``limit`` such that both sides divided by 2**k (rounded up) stay >= ``side``."""
    k = 0
    while k < limit and -(-columns // (2 << k)) >= side and -(-rows // (2 << k)) >= side:
        k += 1
    return k


def decode_reduced(frame: bytes, tsyntax: str, layout: Layout, side: int) -> Optional[np.ndarray]:
    """Stored values of ``frame`` at a reduced scale with both sides >= ``side``; ``None``: decode in full."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # the reader checked the size
            if tsyntax in J2K_SYNTAXES:
                return _j2k(frame, layout, side)
            if tsyntax in JPEG_SYNTAXES:
                return _jpeg(frame, layout, side)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure: pydicom decodes the frame instead
        logger.debug("reduced decode failed, decoding in full: %s", exc)
    return None


def _j2k(frame: bytes, layout: Layout, side: int) -> Optional[np.ndarray]:
    header = j2k_header(frame)
    if (
        header is None
        or header.levels is None
        or header.components != 1
        or (header.columns, header.rows) != (layout.columns, layout.rows)
        or header.precision != layout.bits_stored
        or header.signed != layout.signed
        or header.precision > layout.bits_allocated
        or layout.bits_allocated not in (8, 16)
    ):
        return None
    k = reduction(header.columns, header.rows, side, header.levels)
    if k == 0:
        return None
    with PILImage.open(io.BytesIO(frame)) as img:
        if img.format != "JPEG2000" or img.mode not in ("L", "I;16"):
            return None
        img.reduce = k
        img.load()
        decoded = np.asarray(img)
    # Pillow scales samples to fill its 8- or 16-bit mode and offsets signed ones to unsigned
    values = decoded.astype(np.int32) >> (decoded.dtype.itemsize * 8 - header.precision)
    if header.signed:
        values -= 1 << (header.precision - 1)
    return values.astype(f"{'i' if layout.signed else 'u'}{layout.bits_allocated // 8}")


def _jpeg(frame: bytes, layout: Layout, side: int) -> Optional[np.ndarray]:
    if (layout.bits_allocated, layout.bits_stored, layout.signed) != (8, 8, False):
        return None
    with PILImage.open(io.BytesIO(frame)) as img:
        if img.format != "JPEG" or img.mode != "L" or img.size != (layout.columns, layout.rows):
            return None
        img.draft("L", (side, side))  # 1/2, 1/4 or 1/8, keeping both sides >= side
        if img.size == (layout.columns, layout.rows):
            return None
        return np.asarray(img)
