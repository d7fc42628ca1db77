"""Walk input folders and recognise files by their content, not their extension.

PACS exports are full of extension-less DICOM files, DICOMDIR indexes, thumbnails
and housekeeping files; every regular file found becomes a :class:`FileEntry`
(and so one CSV row), whatever it turns out to be.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional, Sequence

from pneumobatch.core.errors import FileRejected, Reason

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


class FileKind(str, Enum):
    DICOM = "dicom"
    PNG = "png"
    JPEG = "jpeg"
    EMPTY = "empty"
    OTHER = "other"


@dataclass(frozen=True)
class FileEntry:
    """One regular file under an input root."""

    path: Path  # absolute path used for reading
    relpath: str  # POSIX path relative to its root; the ``path`` CSV column
    size: int
    mtime_ns: int
    #: set when the name cannot be read as a file at all (broken link, unreadable
    #: folder, FIFO...): the row's reason and detail; nothing is opened
    problem: Optional[tuple[Reason, str]] = None


def escape_path(text: str) -> str:
    """The ``path`` column's text for a file name: printable UTF-8 on one line, lossless.

    File names are bytes: old Samba/NFS shares hold names that are not UTF-8, and a
    name may contain a carriage return or newline. Python gives undecodable bytes as
    lone surrogates (``surrogateescape``). Each such byte and each control character
    becomes ``\\xNN`` (its byte value in hex), and a backslash becomes ``\\\\``, so
    every name maps to exactly one line of valid UTF-8 and :func:`unescape_path`
    recovers the original. Names without those characters are unchanged.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape hands it over
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_path(text: str) -> str:
    """Inverse of :func:`escape_path` (as a str with surrogate escapes, like ``os.fsdecode``)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 2] == "\\":
            out.append("\\")
            i += 2
        elif text[i] == "\\" and text[i + 1 : i + 2] == "x":
            code = int(text[i + 2 : i + 4], 16)
            out.append(chr(code + 0xDC00) if code >= 0x80 else chr(code))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def open_input(path: Path, *, follow_links: bool = True) -> BinaryIO:
    """Open an input file for reading; never waits on a FIFO, never reads a special file.

    Discovery saw a regular file, but the name may have been replaced since (a FIFO
    made where a file was, a device): the file is opened with ``O_NONBLOCK``, so opening
    a FIFO returns at once, and its type is checked on the opened descriptor, so what
    is read is what was checked. Anything but a regular file raises ``FileRejected``
    (``special-file``, the reason discovery gives such a name, so the row is the same
    whichever of the two saw it). Links are followed: a link inside the input folder is
    an input like any other. ``O_NONBLOCK`` stays set: regular files ignore it, and a
    kernel file that would block (``/proc/kmsg``) fails with ``EAGAIN`` instead. With
    ``follow_links=False`` a link under the name (one swapped in after the caller resolved
    the path) fails with ``ELOOP`` instead of being followed.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags if follow_links else flags | os.O_NOFOLLOW)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FileRejected(Reason.SPECIAL_FILE, "not a regular file when read (replaced after discovery?)")
    return open(fd, "rb")


def sniff(path: Path) -> FileKind:
    """Tell a file's kind from its first bytes (and a forced DICOM parse if needed)."""
    with open_input(path) as fh:
        head = fh.read(132)
    if not head:
        return FileKind.EMPTY
    if len(head) == 132 and head[128:132] == b"DICM":
        return FileKind.DICOM
    if head.startswith(PNG_SIGNATURE):
        return FileKind.PNG
    if head.startswith(JPEG_SIGNATURE):
        return FileKind.JPEG
    if _looks_like_raw_dicom(head):
        return FileKind.DICOM
    return FileKind.OTHER


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A preamble-less DICOM data set starts with a group 0x0002 or 0x0008 element.

    We check the first tag (little or big endian) and, for explicit VR, that the VR is
    two upper-case letters; this rejects text and random binary without parsing.
    """
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    if group_le not in (0x0002, 0x0008) and group_be not in (0x0002, 0x0008):
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    # implicit VR little endian: 4-byte length that must be plausible for a header element
    length = int.from_bytes(head[4:8], "little")
    return length < 1024


def walk(roots: Iterable[Path], *, follow_external_links: bool = False) -> Iterator[tuple[Path, FileEntry]]:
    """Yield ``(root, entry)`` for every file, link and folder problem below each root, sorted.

    Every name found gets an entry, so every name gets a CSV row:

    * regular files (directly or through a link) are entries to read;
    * a symbolic link whose target does not exist: ``broken-link``;
    * a link (to a file or a folder) whose target lies outside the root:
      ``external-link``, unless ``follow_external_links`` (a nightly export should not
      pull in files from elsewhere on the server by way of a stray link);
    * FIFOs, sockets and devices: ``special-file`` (never opened: a FIFO would block);
    * a folder that cannot be listed or entered: ``unreadable``, with the folder's
      relative path and a trailing ``/``;
    * the entries of a folder that can be listed but not entered (read permission
      without execute): each its own ``unreadable`` row, a folder among them with a
      trailing ``/``, so the night still names every file it could not read.

    Links to folders inside the root are followed once: a folder already visited
    (same device and inode) is not entered again, so link loops end. A root that is a
    file is yielded on its own with its name as the relative path.
    """
    for root in roots:
        root = Path(root)
        try:
            st = root.stat()
        except OSError as exc:
            yield root, FileEntry(root, escape_path(root.name), 0, 0, _problem_for(root, exc))
            continue
        if stat.S_ISREG(st.st_mode):
            yield root, FileEntry(root.resolve(), escape_path(root.name), st.st_size, st.st_mtime_ns)
        elif not stat.S_ISDIR(st.st_mode):
            yield root, FileEntry(root, escape_path(root.name), 0, 0, (Reason.SPECIAL_FILE, "not a regular file"))
        else:
            seen: set[tuple[int, int]] = set()
            real_root = root.resolve()
            yield from ((root, entry) for entry in _walk_dir(root, root, real_root, seen, follow_external_links))


def _is_link(path: Path) -> bool:
    """Whether ``path`` is a symbolic link; ``False`` when even that cannot be told."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:  # e.g. a folder that can be listed but not entered (no x permission)
        return False


def _problem_for(path: Path, exc: OSError) -> tuple[Reason, str]:
    """The row's reason for a name that cannot be stat'ed; never raises itself."""
    if isinstance(exc, FileNotFoundError) and _is_link(path):
        return Reason.BROKEN_LINK, "the link's target does not exist"
    if isinstance(exc, PermissionError):
        return Reason.UNREADABLE, "permission denied"
    return Reason.UNREADABLE, (exc.strerror or type(exc).__name__)[:200]


def _listed_as_folder(child: os.DirEntry) -> bool:
    """Whether the listing says ``child`` is a folder (not a link to one); ``False`` when it cannot tell."""
    try:
        return child.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _inside(path: Path, real_root: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(real_root)
        return True
    except (ValueError, OSError):  # a link that cannot be resolved is not known to be inside
        return False


def resolve_inside(root: Path, relpath: str) -> Optional[Path]:
    """The file a ``path`` cell (:func:`escape_path`'s text, relative to ``root``) names, or
    None when it is absolute or leads outside ``root`` (``..``, a link pointing out): a CSV
    cell is untrusted and such a name is never opened."""
    name = unescape_path(str(relpath))
    if not name or os.path.isabs(name):
        return None
    path = Path(root) / name
    return path if is_inside(path, root) else None


def root_prefixes(roots: Sequence[Path]) -> dict[Path, str]:
    """Distinct ``path`` prefixes for several input folders: the shortest unique tail of each.

    ``/a/studies`` and ``/b/studies`` become ``a/studies`` and ``b/studies``; folders with
    different names keep just their name. One root: no prefix.
    """
    resolved = [Path(r).resolve() for r in roots]
    if len(resolved) < 2:
        return {r: "" for r in resolved}
    prefixes = {}
    for r in resolved:
        for depth in range(1, len(r.parts) + 1):
            tail = r.parts[-depth:]
            if sum(other.parts[-depth:] == tail for other in resolved) == 1:
                break
        prefixes[r] = escape_path("/".join(p for p in tail if p != "/")) or "root"
    return prefixes


def input_file(relpath: str, roots: Sequence[Path]) -> Optional[Path]:
    """The input file a ``path`` cell of a run over ``roots`` names, or None when it names no
    regular file inside its root: the inverse of predict's naming (:func:`root_prefixes`; a
    file given as a root is its own name). Paths of ``predict --spool`` (relative to the
    folder above the roots) are found too. The cell is untrusted: :func:`resolve_inside`."""
    unique = list(dict.fromkeys(Path(r).resolve() for r in roots))
    text = str(relpath)
    prefixes = root_prefixes(unique)
    tried: list[tuple[Path, str]] = []
    for root in unique:
        if not root.is_dir():
            if text == escape_path(root.name) and root.is_file():
                return root
            continue
        prefix = prefixes[root]
        if not prefix or text.startswith(prefix + "/"):
            tried.append((root, text[len(prefix) + 1 :] if prefix else text))
    for root in unique:  # predict --spool: named from the spool, the roots' parent
        name = escape_path(root.name)
        if root.is_dir() and text.startswith(name + "/"):
            tried.append((root, text[len(name) + 1 :]))
    for root, rest in tried:
        path = resolve_inside(root, rest)
        if path is not None and path.is_file():
            return path
    return None


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, links and ``..`` resolved, lies in ``folder`` (or is it)."""
    return _inside(path, Path(os.path.realpath(folder)))


def _walk_dir(
    root: Path, folder: Path, real_root: Path, seen: set[tuple[int, int]], follow_external: bool
) -> Iterator[FileEntry]:
    rel_folder = escape_path(folder.relative_to(root).as_posix())
    try:
        st = folder.stat()
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return
        seen.add(key)
        with os.scandir(folder) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        reason, detail = _problem_for(folder, exc)
        yield FileEntry(folder, f"{rel_folder}/", 0, 0, (reason, f"folder: {detail}"))
        return
    for child in children:
        path = Path(child.path)
        rel = escape_path(path.relative_to(root).as_posix())
        try:
            cst = child.stat(follow_symlinks=True)
        except OSError as exc:
            # the folder was listed, but its entries cannot be looked at (a folder with
            # read but no execute permission); the listing still tells a folder apart
            reason, detail = _problem_for(path, exc)
            if _listed_as_folder(child):
                yield FileEntry(path, f"{rel}/", 0, 0, (reason, f"folder: {detail}"))
            else:
                yield FileEntry(path, rel, 0, 0, (reason, detail))
            continue
        if child.is_symlink() and not follow_external and not _inside(path, real_root):
            yield FileEntry(path, rel, 0, 0, (Reason.EXTERNAL_LINK, "link to outside the input folder"))
        elif stat.S_ISDIR(cst.st_mode):
            yield from _walk_dir(root, path, real_root, seen, follow_external)
        elif stat.S_ISREG(cst.st_mode):
            yield FileEntry(path, rel, cst.st_size, cst.st_mtime_ns)
        else:
            yield FileEntry(path, rel, 0, 0, (Reason.SPECIAL_FILE, "FIFO, socket or device: not read"))
