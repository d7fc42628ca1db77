"""One way to write a file so that readers see the old file or the new one, never half.

The data go to ``.NAME.tmp-PID`` beside the target, are fsynced and renamed over it.
A replaced file keeps its permission bits; a new file gets the umask's (0644 under the
usual 022), whatever the library that wrote the temporary file chose.
A failure removes the temporary file and raises :class:`~pneumobatch.errors.OutputError`
naming the path (the CLI turns it into a one-line error, exit code 3).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

from pneumobatch.errors import OutputError

Content = Union[str, bytes, Callable[[Path], None]]


def temp_path(path: Path) -> Path:
    """The temporary file :func:`atomic_write` uses for ``path`` (outputs never read as inputs)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _mode_for(path: Path) -> int:
    """A replaced file keeps its permissions; a new one gets the umask's, like any other tool's."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: Path, content: Content) -> None:
    """Write ``content`` (text as UTF-8, bytes, or a function writing the file it is given)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as fh:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
