"""Untrusted DICOM header values, read without raising and written without raw bytes.

Every header is untrusted (:mod:`pneumobatch.io.readers.dicom`): a value may fail to
convert from its VR, be multi-valued, hold control characters or be absurdly long. These
helpers turn any of that into None, a finite number or one short printable line, for the
reader's gate, its metadata and its pixel pipeline (:mod:`.dicom_pixels`) alike.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: Longest text a header value becomes (metadata columns cut shorter).
MAX_TEXT = 128
_QUOTED = re.compile(r"""(?<!\w)b?('[^']*'|"[^"]*")(?!\w)""")  # 'value' but not doesn't


def has_data(ds: Dataset, keyword: str) -> bool:
    """Whether an element is present with a non-empty value, without reading deferred data."""
    try:
        elem = ds.get_item(keyword, keep_deferred=True)
    except Exception:
        return False
    if elem is None:
        return False
    if elem.value is None:  # deferred (length known) or empty
        return bool(getattr(elem, "length", 0))
    try:
        return len(elem.value) > 0
    except TypeError:
        return True  # a number


def header_value(ds: Dataset, keyword: str) -> Any:
    """An element's value, or None when it is absent or cannot be converted from its VR."""
    try:
        return ds.get(keyword)
    except Exception:  # a value that cannot be converted from its VR
        return None


def first_value(value: Any) -> Any:
    """The first of a multi-valued element (None when it has none); a single value as it is."""
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0] if len(value) else None
    return value


def as_float(value: Any) -> Optional[float]:
    """A finite number, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if np.isfinite(number) else None


def as_int(value: Any) -> Optional[int]:
    """The first value as an integer when it is a whole number, else None."""
    number = as_float(first_value(value))
    return int(number) if number is not None and number.is_integer() else None


def frame_count(ds: Dataset) -> int:
    """*Number of Frames*; 1 when absent or not a positive integer."""
    frames = as_int(header_value(ds, "NumberOfFrames"))
    return frames if frames and frames > 0 else 1


def as_text(value: Any, limit: int = MAX_TEXT) -> str:
    """A header value as a single printable line of at most ``limit`` characters."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    elif isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = "".join(ch for ch in str(value) if ch.isprintable())
    return text.strip()[:limit]


def short_error(exc: BaseException) -> str:
    """First line of an exception message, with quoted (possibly header) values elided."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return as_text(_QUOTED.sub("'...'", text), 200)
