"""PNG and JPEG reader (Pillow).

8-bit images are scaled by 1/255. 16-bit grayscale PNG exports rarely use the
full 16 bits (12-bit detectors are common), so they are min-max scaled, the same
policy as a DICOM without a VOI window. Colour, alpha and palette images are
converted to luminance (ITU-R 601-2), the alpha channel is ignored.

A PNG's chunk lengths are checked before Pillow sees the file: Pillow reads every
chunk but the image data whole, so one claiming a gigabyte of metadata (in a file that
holds it, sparse) would be read into memory, twice over, before the CRC fails.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError

from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.io.discovery import PNG_SIGNATURE, open_input
from pneumobatch.io.readers.base import Image, ReadOptions, decode_side

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
#: Chunks Pillow streams to the decoder rather than reading whole (image data, APNG frames).
_STREAMED_CHUNKS = frozenset({b"IDAT", b"fdAT"})
#: Largest other chunk read (text, ICC profile, EXIF, private chunks): real ones are kilobytes,
#: an ICC profile a few megabytes.
MAX_PNG_CHUNK = 16 * 1024 * 1024


def minmax(array: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the image's own range; a constant image becomes all zeros."""
    array = array.astype(np.float32, copy=False)
    lo, hi = float(array.min()), float(array.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(array.shape, dtype=np.float32)
    return (array - lo) / (hi - lo)


def read_raster(path: Path, options: ReadOptions) -> Image:
    """Read a PNG or JPEG file as a float32 grayscale image in [0, 1]."""
    try:
        with warnings.catch_warnings(), open_input(path) as fh:
            # Pillow warns (and past 2x raises) for decompression bombs; we check ourselves.
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            _check_png_chunks(fh)
            with PILImage.open(fh) as img:
                width, height = img.size
                if width * height > options.max_pixels:
                    raise FileRejected(
                        Reason.TOO_LARGE,
                        f"{width}x{height} pixels exceeds the limit of {options.max_pixels} (--max-pixels)",
                    )
                fmt = img.format
                if fmt == "JPEG" and (side := decode_side(options)):
                    # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 when still big enough.
                    img.draft("L", (side, side))
                gray = _to_gray(ImageOps.exif_transpose(img))  # a phone photo of a film may be rotated
    except FileRejected:
        raise
    except PILImage.DecompressionBombError as exc:
        raise FileRejected(
            Reason.TOO_LARGE, f"more pixels than the limit of {options.max_pixels} (--max-pixels)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise FileRejected(Reason.CORRUPT, "not a decodable PNG/JPEG") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, PermissionError):
            raise FileRejected(Reason.UNREADABLE, "permission denied") from exc
        raise FileRejected(Reason.CORRUPT, _short(exc)) from exc
    meta = {"format": fmt.lower() if fmt else "", "frames": 1}
    if gray.dtype != np.uint8:
        return Image(gray, meta)
    if options.defer_pixels:  # predict: equalised through the 256 grey levels' histogram, no float image
        return Image(None, meta, table=EIGHT_BIT_DISPLAY, index=gray)
    return Image(np.take(EIGHT_BIT_DISPLAY, gray), meta)


def _check_png_chunks(fh: BinaryIO) -> None:
    """Refuse a PNG with a chunk Pillow would read whole that is over :data:`MAX_PNG_CHUNK`.

    Walks the chunk headers (8 bytes each, seeking over the data) up to ``IEND`` or the
    end of the file; a file that is not a PNG, or whose chunks stop early, is left for
    Pillow to judge. Leaves ``fh`` at the start.
    """
    if fh.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
        fh.seek(0)
        return
    pos = len(PNG_SIGNATURE)
    while len(head := fh.read(8)) == 8:
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind not in _STREAMED_CHUNKS and length > MAX_PNG_CHUNK:
            raise FileRejected(
                Reason.CORRUPT,
                f"a PNG chunk outside the image data claims {length} bytes (limit {MAX_PNG_CHUNK})",
            )
        if kind == b"IEND":
            break
        pos += 12 + length  # header, data, CRC
        fh.seek(pos)
    fh.seek(0)


#: An 8-bit grey level's display value: the level / 255 (float32).
EIGHT_BIT_DISPLAY = np.arange(256, dtype=np.float32) / np.float32(255.0)
EIGHT_BIT_DISPLAY.flags.writeable = False


def _to_gray(img: PILImage.Image) -> np.ndarray:
    """The grey levels of an image: uint8 for 8-bit images (display values :data:`EIGHT_BIT_DISPLAY`),
    float32 in [0, 1] for 16-bit and float ones (min-max scaled)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return minmax(np.asarray(img))
    if img.mode == "F":
        return minmax(np.asarray(img))
    if img.mode in ("LA", "RGBA", "PA", "P", "RGBa", "La"):
        img = img.convert("RGBA").convert("RGB")
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
