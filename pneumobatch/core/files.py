"""Reading a small file a user names (a site file, a labels CSV, a run.json, a PACS config).

:func:`read_small_file` reads only a regular file, and only up to a size limit, so that a
path naming a FIFO (which would block a plain ``open`` until a writer comes), a device
(``/dev/zero`` never ends), a folder or a file far larger than any such file can be is one
line (:class:`FileReadError`) instead of a hang or a MemoryError:

- the path is checked with ``stat`` before it is opened, so a FIFO or a device is never
  opened at all (opening some devices has effects);
- it is opened with ``O_NONBLOCK`` (a FIFO swapped in after the check does not block the
  open) and its type and size are checked again on the opened descriptor (``fstat``);
- at most ``limit + 1`` bytes are read, so a file growing while it is read is refused too.

Callers turn :class:`FileReadError` into their own error (``SiteError``, ``LabelError``,
``OptionError``, a monitor note); :attr:`FileReadError.not_a_file` says the path names no
regular file, which is a usage error (the wrong path was given).
"""

from __future__ import annotations

import errno
import math
import os
import stat
from pathlib import Path
from typing import Any, Optional

#: Size limits of the files pneumobatch reads whole (bytes); far above what real files hold.
SITE_FILE_LIMIT = 1 << 20  # a site file is a few KiB
LABELS_FILE_LIMIT = 512 << 20  # a labels CSV: millions of rows
RUN_JSON_LIMIT = 64 << 20  # a run.json: the cards and monitoring block of one night
PACS_CONFIG_LIMIT = 1 << 20  # a PACS config: a few lines of INI

_KINDS = (
    (stat.S_ISDIR, "a folder, not a file"),
    (stat.S_ISFIFO, "a FIFO (named pipe), not a regular file"),
    (stat.S_ISCHR, "a character device, not a regular file"),
    (stat.S_ISBLK, "a block device, not a regular file"),
    (stat.S_ISSOCK, "a socket, not a regular file"),
)


class FileReadError(Exception):
    """A named file could not be read: one line, ``{what} {path}: {problem}``.

    ``not_a_file`` is true when the path names no regular file (missing, a folder, a FIFO,
    a device, a socket); false when it is one but cannot be read or is too large.
    """

    def __init__(self, message: str, *, not_a_file: bool) -> None:
        super().__init__(message)
        self.not_a_file = not_a_file


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} bytes"


def _not_regular(mode: int) -> str | None:
    """What a file of this mode is, when it is not a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((text for test, text in _KINDS if test(mode)), "not a regular file")


def _problem(e: OSError) -> tuple[str, bool]:
    """An OSError's one-line reason and whether it means the path names no regular file."""
    if e.errno == errno.ENOENT:
        return "not found", True
    if e.errno == errno.ENXIO:  # open() of a socket, or of a FIFO swapped in (O_NONBLOCK)
        return "not a regular file", True
    if e.errno == errno.EISDIR:
        return "a folder, not a file", True
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied", False
    return e.strerror or type(e).__name__, False


def read_small_file(path: Path | str, *, limit: int, what: str) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    ``what`` names the file in messages (``"site file"``). Raises :class:`FileReadError`
    (one line naming the path; chained to the OSError where there is one) when the path
    names no regular file, cannot be read, or holds more than ``limit`` bytes. Never blocks
    on a FIFO and never reads a device.
    """
    path = Path(path)
    limit_text = _size(limit)

    def fail(problem: str, not_a_file: bool) -> FileReadError:
        return FileReadError(f"{what} {path}: {problem}", not_a_file=not_a_file)

    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind is not None:
            raise fail(f"is {kind}", True)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise fail(*_problem(e)) from e
    except ValueError as e:  # a NUL byte in the path
        raise fail("not a valid path", True) from e
    try:
        st = os.fstat(fd)
        kind = _not_regular(st.st_mode)
        if kind is not None:  # swapped in between the check and the open
            raise fail(f"is {kind}", True)
        if st.st_size > limit:
            raise fail(f"is {_size(st.st_size)}, more than the {limit_text} a {what} may hold", False)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(limit + 1 - total, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise fail(f"holds more than the {limit_text} a {what} may hold", False)
        return b"".join(chunks)
    except OSError as e:
        raise fail(*_problem(e)) from e
    finally:
        os.close(fd)


def first_non_finite(document: Any) -> Optional[tuple[tuple[Any, ...], float]]:
    """Where the first NaN or infinite number of a parsed JSON document is (the keys and list
    indices leading to it) and the number, else None. Python's JSON reader accepts ``NaN``,
    ``Infinity`` and ``1e999``, which no schema's minimum/maximum refuses. Iterative, so a
    deeply nested document cannot exhaust the stack."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), document)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where, value
        if isinstance(value, dict):
            stack.extend(((*where, k), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend(((*where, i), v) for i, v in reversed(list(enumerate(value))))
    return None
