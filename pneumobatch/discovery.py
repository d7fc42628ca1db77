"""Walk input folders and recognise files by their content, not their extension.

PACS exports are full of extension-less DICOM files, DICOMDIR indexes, thumbnails
and housekeeping files; every regular file found becomes a :class:`FileEntry`
(and so one CSV row), whatever it turns out to be.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Iterator

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


def sniff(path: Path) -> FileKind:
    """Tell a file's kind from its first bytes (and a forced DICOM parse if needed)."""
    with open(path, "rb") as fh:
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


def walk(roots: Iterable[Path]) -> Iterator[tuple[Path, FileEntry]]:
    """Yield ``(root, entry)`` for every regular file below each root, in sorted order.

    Symbolic links to folders are followed once: a folder already visited (same
    device and inode) is not entered again, so link loops end. A root that is a file
    is yielded on its own with its name as the relative path.
    """
    for root in roots:
        root = Path(root)
        if root.is_file():
            st = root.stat()
            yield root, FileEntry(root.resolve(), root.name, st.st_size, st.st_mtime_ns)
            continue
        seen: set[tuple[int, int]] = set()
        yield from ((root, entry) for entry in _walk_dir(root, root, seen))


def _walk_dir(root: Path, folder: Path, seen: set[tuple[int, int]]) -> Iterator[FileEntry]:
    try:
        st = folder.stat()
    except OSError:
        return
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return
    seen.add(key)
    try:
        with os.scandir(folder) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for child in children:
        try:
            if child.is_dir(follow_symlinks=True):
                yield from _walk_dir(root, Path(child.path), seen)
            elif child.is_file(follow_symlinks=True):
                cst = child.stat(follow_symlinks=True)
                rel = Path(child.path).relative_to(root).as_posix()
                yield FileEntry(Path(child.path), rel, cst.st_size, cst.st_mtime_ns)
        except OSError:
            continue  # dangling link or vanished file: nothing to read
