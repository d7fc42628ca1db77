"""A lock file that dies with the process holding it: one run at a time on an output or a ledger.

The lock is a POSIX record lock (``fcntl.lockf``) on a small file beside what it guards. Such
a lock belongs to the process, not to the open file: the kernel drops it the moment that
process ends, however it ends (``kill -9``, the OOM killer), and the children it forks
(decoding workers) do not hold it, so an orphaned worker can never keep a night locked.
A ``flock`` lock, by contrast, is shared by every process that inherited the descriptor.

Two properties of record locks shape the code:

- they do not exclude the holder itself, so this process's own locks are kept in a set and
  a second lock on the same file from the same process is refused as well;
- closing *any* descriptor of the file drops the process's lock, so :func:`holder` never
  opens a file this process has locked (the set tells it), and nothing else here does.

The file holds the holder's PID (for the message another run gets). A lock left by a dead
run is free: the next run simply takes it. The holder removes the file when it lets go;
after taking the lock a run checks that the name still leads to the file it locked (another
run may have removed it in between) and tries again if not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from pathlib import Path
from typing import Optional

from pneumobatch.core.errors import OutputError
from pneumobatch.io.atomicfile import open_regular

_held: set[tuple[int, int]] = set()  # (device, inode) of the lock files this process holds
_mutex = threading.Lock()


class LockBusy(Exception):
    """Another live process (or this one) holds the lock; ``pid`` is its PID when the file says so."""

    def __init__(self, path: Path, pid: Optional[int]) -> None:
        super().__init__(f"{path} is held" + (f" by PID {pid}" if pid else ""))
        self.path, self.pid = path, pid


def _read_pid(fd: int) -> Optional[int]:
    """The PID written in the lock file (anyone can write there: only a plain small number is used)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 1 << 22 else None


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class ProcessLock:
    """An exclusive lock on ``path`` held by this process until :meth:`release` (or its death)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None
        self._key: Optional[tuple[int, int]] = None

    def acquire(self) -> ProcessLock:
        """Take the lock without waiting; :class:`LockBusy` if a live run holds it,
        :class:`OutputError` if the file cannot be made (quoting the path, cause chained)."""
        for _ in range(10):  # a run that removes the file between our open and our lock: again
            with _mutex:
                mine = _held_here(self.path)
                if mine is not None:
                    raise LockBusy(self.path, mine)
                fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
                key = _key(os.fstat(fd))
                if key in _held:  # made between the two calls above: never close it (our lock would go)
                    raise LockBusy(self.path, os.getpid())
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    pid = _read_pid(fd)
                    os.close(fd)
                    if exc.errno in (errno.EACCES, errno.EAGAIN):
                        raise LockBusy(self.path, pid) from exc
                    raise OutputError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
                try:
                    same = _key(os.stat(self.path, follow_symlinks=False)) == key
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)  # the lock goes with it: the file we locked was removed by its holder
                    continue
                _held.add(key)
            self._fd, self._key = fd, key
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:  # the PID is only for messages
                pass
            return self
        raise OutputError(f"cannot lock {self.path}: it is removed and made again all the time")

    def release(self) -> None:
        """Remove the file (we still hold it: nobody else is inside) and let go."""
        if self._fd is None:
            return
        with _mutex:
            try:
                if _key(os.stat(self.path, follow_symlinks=False)) == self._key:
                    self.path.unlink()
            except OSError:
                pass
            _held.discard(self._key)  # type: ignore[arg-type]
            os.close(self._fd)
            self._fd = self._key = None

    def __enter__(self) -> ProcessLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _held_here(path: Path) -> Optional[int]:
    """This process's PID when it holds the lock at ``path`` itself, else None (call under ``_mutex``)."""
    try:
        return os.getpid() if _key(os.stat(path, follow_symlinks=False)) in _held else None
    except OSError:
        return None


def holder(path: Path) -> Optional[int]:
    """Whether a live run holds the lock at ``path``: its PID (0 when the file names none), else None.

    Tests the lock without taking it; this process's own locks count as held. A name that is
    no regular file, or one this user cannot open, is no lock held (taking it will say why).
    """
    with _mutex:
        mine = _held_here(path)
        if mine is not None:
            return mine
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    return _read_pid(fd) or 0
                return None
            return None  # free: closing the descriptor below lets it go again
        finally:
            os.close(fd)
