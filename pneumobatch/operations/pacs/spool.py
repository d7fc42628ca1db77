"""Where instances land: ``ROOT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

Policy (``pull`` writes its OUTPUT folder and ``listen`` its spool by the same rules):

- The path is made of the three UIDs only, each valid by :func:`~pneumobatch.core.uids.valid_uid`
  (checked by the caller), never of anything else in a header.
- Folders are created one level at a time and never followed when they are links: a link
  planted in the folder cannot send an instance outside it (that instance fails).
- Each file is written whole (:func:`~pneumobatch.io.atomicfile.atomic_write`: temporary
  file, fsync, rename); a temporary file left by a ``kill -9`` is removed by the next run
  (:func:`remove_stale_temps`) before anyone reads the folder.

A spool also has a journal, ``ROOT/.pneumobatch-spool.sqlite`` (:class:`SpoolJournal`, the
ledger's schema: tables ``received`` and ``spooled_studies``): each instance is recorded
once its file is in place, so a second copy of a SOP Instance UID is kept once; a study is
announced *complete* when no instance of it has come for a quiet period, and marked
*predicted* by ``predict --spool`` once its CSV is written. A study that gains an instance
after that is open again, and is predicted again once it is quiet. The journal holds UIDs,
paths, calling AE titles and addresses: no patient data. The listener and ``predict --spool``
use it at the same time (SQLite's own locking, write-ahead log).
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import stat
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

from pneumobatch.core.errors import OutputError
from pneumobatch.io.atomicfile import atomic_write, temp_target
from pneumobatch.operations.pacs.archive import InstanceRef
from pneumobatch.operations.pacs.ledger import SCHEMA, now_text

#: The files pull and listen write: ``<SOP Instance UID>.dcm``
INSTANCE_FILE = re.compile(r"^[0-9.]+\.dcm$")
#: The journal's name inside a spool (a dot file: predict is given study folders, never the spool).
JOURNAL_NAME = ".pneumobatch-spool.sqlite"


def instance_path(root: Path, ref: InstanceRef) -> Path:
    return Path(root) / ref.study_instance_uid / ref.series_instance_uid / f"{ref.sop_instance_uid}.dcm"


def path_kind(path: Path) -> str:
    """What is at ``path``, links not followed: file, folder, link, missing or other."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if stat.S_ISLNK(mode):
        return "link"
    return "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "other"


def instance_folder(root: Path, ref: InstanceRef) -> tuple[Path, str]:
    """``ROOT/<study>/<series>``, each level made here if missing and never a link;
    ``(folder, "")``, or ``(path, why)`` when a level is a link or not a folder (that
    instance fails: nothing is written outside ROOT)."""
    folder = Path(root)
    for name in (ref.study_instance_uid, ref.series_instance_uid):
        folder = folder / name
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise OutputError(f"cannot create {folder}: {exc.strerror or exc}") from exc
        kind = path_kind(folder)
        if kind == "link":
            return folder, f"{folder} is a symbolic link; pneumobatch does not write through links"
        if kind != "folder":
            return folder, f"{folder} exists and is not a folder"
    return folder, ""


def remove_stale_temps(root: Path) -> int:
    """Remove the temporary files of a run killed mid-write (ours by name and place); predict
    must not read them. Never inside a linked folder: what a link leads to is not ours."""
    removed = 0
    for path in Path(root).glob("*/*/.*.dcm.tmp-*"):
        if path_kind(path.parent) != "folder" or path_kind(path.parent.parent) != "folder":
            continue
        target = temp_target(path.name)
        if target is not None and INSTANCE_FILE.match(target) and path_kind(path) == "file":
            path.unlink(missing_ok=True)
            removed += 1
    return removed


class Stored(str, Enum):
    """What became of an instance offered to the spool."""

    NEW = "new"  # written and recorded
    DUPLICATE = "duplicate"  # this SOP Instance UID is already here, in the same study and series
    CONFLICT = "conflict"  # this SOP Instance UID is already here, in another study or series: refused


@dataclass(frozen=True)
class SpooledStudy:
    """A study of the spool: its folder, instances, and when it was announced complete."""

    study_instance_uid: str
    folder: Path
    n_instances: int
    complete_at: Optional[str]
    predicted_instances: Optional[int]


class SpoolJournal:
    """The journal of the spool at ``root`` (created on first use); one connection, used by
    one thread at a time (the listener serialises its callers)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / JOURNAL_NAME
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if path_kind(self.path) not in ("file", "missing"):
                raise OutputError(f"{self.path} is not a regular file; pneumobatch does not write through links")
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise OutputError(f"cannot use spool journal {self.path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SpoolJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        try:
            with self._db:  # one transaction, committed (and synced by SQLite) on exit
                for sql, args in statements:
                    self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise OutputError(f"cannot write spool journal {self.path}: {exc}") from exc

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise OutputError(f"cannot read spool journal {self.path}: {exc}") from exc

    def where(self, sop_instance_uid: str) -> Optional[tuple[str, str]]:
        """``(study, series)`` of an instance already received, else None."""
        rows = self._read(
            "SELECT study_instance_uid, series_instance_uid FROM received WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def record(self, ref: InstanceRef, path: Path, calling_ae: str, address: str) -> None:
        """An instance whose file is in place; its study is open (again) until it is quiet."""
        self._write(
            [
                (
                    "INSERT OR IGNORE INTO received VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        ref.sop_instance_uid,
                        ref.study_instance_uid,
                        ref.series_instance_uid,
                        str(path),
                        calling_ae,
                        address,
                        now_text(),
                    ),
                ),
                (
                    "INSERT INTO spooled_studies (study_instance_uid, n_instances, last_received) VALUES (?, 1, ?) "
                    "ON CONFLICT(study_instance_uid) DO UPDATE SET n_instances = n_instances + 1, "
                    "last_received = excluded.last_received, complete_at = NULL",
                    (ref.study_instance_uid, time.time()),
                ),
            ]
        )

    def complete_quiet(self, quiet_seconds: float, now: Optional[float] = None) -> list[str]:
        """Announce complete every open study without an instance for ``quiet_seconds``; their UIDs."""
        cutoff = (time.time() if now is None else now) - quiet_seconds
        rows = self._read(
            "SELECT study_instance_uid FROM spooled_studies WHERE complete_at IS NULL AND last_received <= ?",
            (cutoff,),
        )
        uids = [r[0] for r in rows]
        if uids:
            stamp = now_text()
            self._write(
                [
                    (
                        "UPDATE spooled_studies SET complete_at = ? WHERE study_instance_uid = ? "
                        "AND complete_at IS NULL AND last_received <= ?",
                        (stamp, uid, cutoff),
                    )
                    for uid in uids
                ]
            )
        return uids

    def studies(self) -> list[SpooledStudy]:
        rows = self._read(
            "SELECT study_instance_uid, n_instances, complete_at, predicted_instances FROM spooled_studies "
            "ORDER BY last_received"
        )
        return [SpooledStudy(r[0], self.root / r[0], int(r[1]), r[2], r[3]) for r in rows]

    def to_predict(self) -> list[SpooledStudy]:
        """Complete studies not yet predicted with all the instances they now have."""
        return [
            s
            for s in self.studies()
            if s.complete_at and (s.predicted_instances is None or s.predicted_instances < s.n_instances)
        ]

    def mark_predicted(self, studies: list[SpooledStudy], predictions: Path) -> None:
        """Studies predicted into ``predictions`` (a CSV already written), with the instances they had."""
        stamp = now_text()
        self._write(
            [
                (
                    "UPDATE spooled_studies SET predicted_at = ?, predicted_instances = ?, predictions = ? "
                    "WHERE study_instance_uid = ?",
                    (stamp, s.n_instances, str(predictions), s.study_instance_uid),
                )
                for s in studies
            ]
        )

    def counts(self) -> dict[str, int]:
        """Instances received, studies, complete studies and predicted studies (summaries and tests)."""
        (received,) = self._read("SELECT COUNT(*) FROM received")[0]
        studies, complete, predicted = self._read(
            "SELECT COUNT(*), COUNT(complete_at), COUNT(predicted_at) FROM spooled_studies"
        )[0]
        return {"received": received, "studies": studies, "complete": complete, "predicted": predicted}


def store_instance(journal: SpoolJournal, ref: InstanceRef, data: bytes, calling_ae: str, address: str) -> Stored:
    """Write one received instance (``data``: the whole DICOM file) into the journal's spool.

    A SOP Instance UID already received is kept once (the copy here stays). A file already
    in place but not in the journal (a listener killed between the rename and the journal)
    is recorded, not written again. :class:`OutputError` when it cannot be written (disk
    full, spool unwritable, a link in the way): nothing half-written stays.
    """
    known = journal.where(ref.sop_instance_uid)
    if known is not None:
        same = known == (ref.study_instance_uid, ref.series_instance_uid)
        return Stored.DUPLICATE if same else Stored.CONFLICT
    folder, why = instance_folder(journal.root, ref)
    if why:
        raise OutputError(f"instance {ref.sop_instance_uid} not written: {why}")
    path = folder / f"{ref.sop_instance_uid}.dcm"
    kind = path_kind(path)
    if kind == "folder":
        raise OutputError(f"instance {ref.sop_instance_uid} not written: {path} is a folder")
    if kind != "file":  # a link or a special file under the name is replaced by the rename
        atomic_write(path, data)
    journal.record(ref, path, calling_ae, address)
    return Stored.NEW
