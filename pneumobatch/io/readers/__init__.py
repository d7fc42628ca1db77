"""Image readers: one module per format, each returning an :class:`Image`.

Every reader returns a float32 2-D array in [0, 1] where 1 is the brightest
display value (bone white, air black, whatever the file's photometric
interpretation), plus metadata. Anything that cannot or should not be
predicted raises :class:`~pneumobatch.core.errors.FileRejected` with a reason code.
"""

from __future__ import annotations

from pathlib import Path

from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.io.discovery import FileKind
from pneumobatch.io.readers.base import (
    DEFAULT_MAX_PIXELS,
    RESIZE_MARGIN,
    Image,
    ReadOptions,
    check_content,
    decode_side,
)


def read_image(path: Path, kind: FileKind, options: ReadOptions | None = None) -> Image:
    """Read one file of a known kind; raises ``FileRejected`` for anything not predictable."""
    options = options or ReadOptions()
    if kind is FileKind.EMPTY:
        raise FileRejected(Reason.EMPTY, "file is empty")
    if kind is FileKind.DICOM:
        from pneumobatch.io.readers.dicom import read_dicom

        image = read_dicom(path, options)
    elif kind in (FileKind.PNG, FileKind.JPEG):
        from pneumobatch.io.readers.raster import read_raster

        image = read_raster(path, options)
    else:
        raise FileRejected(Reason.NOT_IMAGE, "not DICOM, PNG or JPEG")
    try:
        check_content(image)
    except FileRejected as exc:
        exc.meta = dict(image.meta)
        raise
    return image


__all__ = ["DEFAULT_MAX_PIXELS", "RESIZE_MARGIN", "Image", "ReadOptions", "check_content", "decode_side", "read_image"]
