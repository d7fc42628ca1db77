"""Reading a labels CSV: encoding and separator sniffing, one-line errors for unreadable files.

Failures a user must fix (missing file, a folder, an Excel workbook, no rows) raise
:class:`~pneumobatch.core.errors.LabelError` with a one-line message.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd

from pneumobatch.core.errors import LabelError

log = logging.getLogger(__name__)


def _decode(raw: bytes, path: Path) -> tuple[str, str]:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        encodings = ["utf-16"]
    else:
        encodings = ["utf-8-sig", "cp1252", "latin-1"]
    for encoding in encodings:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        if encoding not in ("utf-8-sig", "utf-16"):
            log.warning("labels file %s is not UTF-8; read it as %s", path, encoding)
        return text, encoding
    raise LabelError(f"labels file {path} is not text in a known encoding (UTF-8, UTF-16, cp1252)")


def _delimiter(text: str) -> str:
    header = text.split("\n", 1)[0]
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def read_labels(path: Path | str) -> pd.DataFrame:
    """Read a labels CSV as strings (UIDs stay exact), whitespace stripped.

    UTF-8 (with or without BOM), UTF-16 and cp1252 files are accepted, and comma,
    semicolon, tab or pipe separators. ``attrs['source']`` and ``attrs['encoding']``
    record where it came from.
    """
    path = Path(path)
    if not path.exists():
        raise LabelError(f"labels file not found: {path}")
    if path.is_dir():
        raise LabelError(f"labels file {path} is a folder, not a CSV file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LabelError(f"cannot read labels file {path}: {e.strerror or e}") from e
    if not raw.strip():
        raise LabelError(f"labels file {path} is empty")
    if raw.startswith(b"PK\x03\x04"):
        raise LabelError(f"labels file {path} looks like an Excel workbook; save it as CSV")
    text, encoding = _decode(raw, path)
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=_delimiter(text),
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=True,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LabelError(f"labels file {path} is not a readable CSV: {first}") from e
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise LabelError(f"labels file {path} has a header but no rows")
    for col in frame.columns:
        frame[col] = frame[col].str.strip()
    frame.attrs["source"] = str(path)
    frame.attrs["encoding"] = encoding
    return frame
