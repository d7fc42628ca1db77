"""Thumbnails of the cases to look at (:mod:`.cases`): small PNGs held in memory for the PDF.

A case's thumbnail is its heatmap (the RGB overlay ``predict --heatmaps`` drew, accepted by
:func:`pneumobatch.io.predictions.heatmap_file`) when it has one, else the image itself, read from disk with the
package's readers (:func:`pneumobatch.io.readers.read_image`, DICOM too) and shown grey. The
image is found under ``--images DIR`` when given (the CSV's ``path`` relative to it), else
under the run's input roots from run.json (:func:`pneumobatch.io.discovery.input_file`).
Both are reduced to :data:`THUMBNAIL_SIDE` pixels on the long side.

Only pixels are drawn: nothing of a DICOM header (names, IDs, dates) is read into the
thumbnail or its caption; text burned into the pixels by the source stays. An image that
cannot be found or read becomes a placeholder (the case's ``thumbnail`` says which), never
an error: the report is written all the same.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from pneumobatch.io.predictions import MAX_HEATMAP_BYTES, heatmap_file

log = logging.getLogger(__name__)

#: Long side of a thumbnail, in pixels.
THUMBNAIL_SIDE = 256
#: Largest heatmap PNG decoded (predict draws at most 1024 px a side).
MAX_HEATMAP_PIXELS = 4096 * 4096
#: What a case's ``thumbnail`` says: drawn from the heatmap, from the image, or a placeholder.
FROM_HEATMAP, FROM_IMAGE, NOT_FOUND, UNREADABLE = "heatmap", "image", "image not found", "image unreadable"


def _png(image: Any) -> io.BytesIO:
    """``image`` (Pillow) reduced to :data:`THUMBNAIL_SIDE` and saved as a PNG without metadata."""
    from PIL import Image

    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format="PNG")
    out.seek(0)
    return out


def heatmap_thumbnail(path: Path) -> io.BytesIO:
    """The heatmap PNG at ``path`` (already accepted by :func:`pneumobatch.io.predictions.heatmap_file`) as a thumbnail."""
    from PIL import Image

    from pneumobatch.io.discovery import open_input

    with open_input(path, follow_links=False) as fh:
        data = fh.read(MAX_HEATMAP_BYTES + 1)
    if len(data) > MAX_HEATMAP_BYTES:
        raise ValueError("heatmap file too large")
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG" or image.width * image.height > MAX_HEATMAP_PIXELS:
            raise ValueError("not a heatmap PNG of a sensible size")
        return _png(image.convert("RGB"))


def image_thumbnail(path: Path) -> io.BytesIO:
    """The image at ``path`` read as predict reads it (pixels only), grey, as a thumbnail."""
    from PIL import Image

    from pneumobatch.io.discovery import sniff
    from pneumobatch.io.readers import ReadOptions, read_image

    options = ReadOptions(include_lateral=True, min_side=THUMBNAIL_SIDE // 2)  # reduced decode where it can
    pixels = read_image(path, sniff(path), options).pixels  # the header (meta) is left unread here
    grey = (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return _png(Image.fromarray(grey))


def image_file(rel: str, roots: Sequence[Path], images: Optional[Path]) -> Optional[Path]:
    """The image a case's ``path`` names: under ``images`` when given, else under the run's roots."""
    from pneumobatch.io.discovery import input_file, resolve_inside

    if images is not None:
        path = resolve_inside(images, rel)
        return path if path is not None and path.is_file() else None
    return input_file(rel, roots)


def case_thumbnail(
    case: dict[str, Any], csv_folder: Path, roots: Sequence[Path], images: Optional[Path]
) -> tuple[Optional[io.BytesIO], str]:
    """One case's thumbnail (None: a placeholder) and where it came from."""
    if case.get("heatmap"):
        path = heatmap_file(case["heatmap"], csv_folder)
        if path is not None:
            try:
                return heatmap_thumbnail(path), FROM_HEATMAP
            except Exception as exc:  # a damaged heatmap: fall back to the image
                log.debug("heatmap of case %s unreadable: %s", case["path"], exc)
    try:
        path = image_file(case["path"], roots, images)
    except ValueError:  # a path cell that is no escaped name (``\\xZZ``, a NUL): names no file
        path = None
    if path is None:
        return None, NOT_FOUND
    try:
        return image_thumbnail(path), FROM_IMAGE
    except Exception as exc:  # one unreadable image must not stop the report: a placeholder
        log.debug("image of case %s unreadable: %s", case["path"], exc)
        return None, UNREADABLE


def render_thumbnails(doc: dict[str, Any], csv_folder: Path, images: Optional[Path]) -> dict[tuple[str, int], Any]:
    """Thumbnails of every case in ``doc`` by (model name, case index); records in each case
    where its thumbnail came from (``thumbnail``) and adds a warning for images not found."""
    roots = [Path(r) for r in (doc.get("run", {}).get("roots") or []) if isinstance(r, str) and r]
    thumbs: dict[tuple[str, int], Any] = {}
    missing = unreadable = 0
    for section in doc["models"]:
        for i, case in enumerate((section.get("cases") or {}).get("cases", [])):
            png, source = case_thumbnail(case, csv_folder, roots, images)
            case["thumbnail"] = source
            missing += source == NOT_FOUND
            unreadable += source == UNREADABLE
            if png is not None:
                thumbs[(section["name"], i)] = png
    where = f"under --images {images}" if images is not None else "under the run's input folders (run.json roots)"
    if missing:
        hint = "" if images is not None else "; give their folder with --images"
        doc["warnings"].append(f"{missing} images of the cases to look at not found {where}{hint}")
    refused = sum(int((s.get("cases") or {}).get("refused_heatmaps", 0)) for s in doc["models"])
    if refused:
        doc["warnings"].append(
            f"{refused} heatmap cells of the cases to look at refused (not a file inside the predictions' folder)"
        )
    if unreadable:
        doc["warnings"].append(f"{unreadable} images of the cases to look at could not be read (placeholders shown)")
    return thumbs
