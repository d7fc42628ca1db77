"""How output files are written: atomically, never through a planted link, never over an input.

- :func:`atomic_write`: the data go to a fresh temporary file beside the target (made
  with ``O_EXCL`` under an unpredictable name, ``.NAME.tmp-XXXXXXXX``), are fsynced and
  renamed over it, so readers see the old file or the new one, never half. A replaced file
  keeps its permission bits; a new file gets the umask's (0644 under the usual 022),
  whatever the library that wrote the temporary file chose.
- :func:`open_regular`: files written in place (the lock, the journal) are opened with
  ``O_NOFOLLOW`` and must be regular files: a symbolic link planted under their name is
  refused, never followed, so nothing outside the output is truncated or appended to.
- :func:`check_replaceable`: an output may replace only a regular file that is not an
  input: never a device, a FIFO, a folder, a symbolic link or a file being read.

Failures raise :class:`~pneumobatch.core.errors.OutputError` naming the path (the CLI turns it
into a one-line error, exit code 3); a failed write removes its temporary file.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from pneumobatch.core.errors import OutputError

Content = Union[str, bytes, Callable[[Path], None]]


def temp_prefix(path: Path) -> str:
    """Name prefix of :func:`atomic_write`'s temporary files for ``path`` (outputs never read as inputs)."""
    return f".{Path(path).name}.tmp-"


#: The characters of ``tempfile``'s random name suffixes (``tempfile._RandomNameSequence``).
_TEMP_SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def temp_target(name: str) -> Optional[str]:
    """The file name an :func:`atomic_write` temporary file called ``name`` was for, else None.

    Lets a writer killed mid-write (SIGKILL leaves the temporary file) clean up after itself.
    """
    head, sep, suffix = name.rpartition(".tmp-")
    if not sep or len(head) < 2 or not head.startswith(".") or not suffix or not set(suffix) <= _TEMP_SUFFIX_CHARS:
        return None
    return head[1:]


def _mode_for(path: Path) -> int:
    """A replaced file keeps its permissions; a new one gets the umask's, like any other tool's."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def atomic_write(path: Path, content: Content) -> None:
    """Write ``content`` (text as UTF-8, bytes, or a function writing the file it is given)."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {_reason(exc)}") from exc
    tmp = Path(name)
    try:
        with open(fd, "wb") as fh:
            if not callable(content):
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
        if callable(content):
            content(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {_reason(exc)}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_regular(path: Path, flags: int) -> int:
    """Open (or create) ``path`` for writing in place; never through a link, never a special file.

    Returns a file descriptor. A symbolic link under the name, a FIFO, a device or a folder
    raises :class:`OutputError` (and a FIFO is never waited on: ``O_NONBLOCK``).
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symbolic link; pneumobatch does not write through links") from exc
        raise OutputError(f"cannot write {path}: {_reason(exc)}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path} is not a regular file; choose another -o")
    return fd


def _resolved(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except OSError:
        return Path(os.path.abspath(path))


def check_replaceable(path: Path, inputs: Iterable[Path] = (), error: type[Exception] = OutputError) -> None:
    """Refuse to replace something that is not a regular file, or an input file.

    Nothing at ``path`` is fine. A symbolic link, FIFO, socket, device or folder, or the
    same file as one of ``inputs``, raises ``error`` (the caller's documented type:
    :class:`OutputError` for predict, ``ReportError`` for report; both exit with 3).
    """
    inputs = list(inputs)
    if any(_resolved(path) == _resolved(source) for source in inputs):  # named as an input, even one not there yet
        raise error(f"output {path} would overwrite an input file; choose another -o")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"cannot write {path}: {_reason(exc)}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise error(f"{path} is a symbolic link; pneumobatch does not write through links, choose another -o")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} exists and is not a regular file; choose another -o")
    for source in inputs:
        try:
            same = os.path.samefile(path, source)
        except OSError:
            continue
        if same:
            raise error(f"output {path} would overwrite an input file; choose another -o")
