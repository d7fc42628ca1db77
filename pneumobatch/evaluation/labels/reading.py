"""Reading a labels CSV: encoding and separator sniffing, one-line errors for unreadable files.

Failures a user must fix (missing file, an Excel workbook, no rows, more than
:data:`~pneumobatch.core.files.LABELS_FILE_LIMIT` bytes) raise
:class:`~pneumobatch.core.errors.LabelError` with a one-line message; a path naming a folder,
a FIFO or a device is a usage error (still a ``LabelError``, but exit code 2, as the CLI's
own check of a folder gives), never opened for reading (:func:`~pneumobatch.core.files.read_small_file`), so never a hang.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd

from pneumobatch.core.errors import EXIT_USAGE, LabelError
from pneumobatch.core.files import LABELS_FILE_LIMIT, FileReadError, read_small_file

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
    try:
        raw = read_small_file(path, limit=LABELS_FILE_LIMIT, what="labels file")
    except FileReadError as e:
        error = LabelError(str(e))
        if e.not_a_file and not isinstance(e.__cause__, FileNotFoundError):
            error.exit_code = (
                EXIT_USAGE  # a folder, a FIFO, a device: the wrong path was given, as click says of a folder
            )
        raise error from e
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
