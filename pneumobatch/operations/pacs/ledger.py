"""What was fetched from and delivered to each archive: a small SQLite file.

Rows are committed one instance at a time, right after the instance's file was renamed
into place (pull) or after the archive confirmed it holds the SR (push), so a run killed
at any moment loses at most the one transfer in flight, and the next run neither
fetches nor sends anything twice. Keys are the archive's name (URL or DIMSE address,
never credentials) and UIDs; no patient data is stored.

Tables:

- ``studies``: study UID, study date, the instance count the archive reported when the
  study was last fetched completely (a study whose count is unchanged is not searched
  again), and when;
- ``fetched``: every instance fetched, with the file it was written to;
- ``delivered``: every SR confirmed in an archive, by study, model and weights SHA-256;
- ``received`` and ``spooled_studies``: the journal of a ``pneumobatch listen`` spool
  (:mod:`.spool`): every instance received, by whom, and per study when its last
  instance came, when it was announced complete and when it was predicted.

One run at a time uses a ledger: two pulls into two folders sharing one ledger would
each fetch every instance, so the second one is refused (:class:`LedgerBusy`, exit code 3)
while the first lives. The lock (``.LEDGER.lock`` beside it, :mod:`pneumobatch.io.lockfile`)
ends with the process that holds it: after a ``kill -9`` the next run takes it over.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from pneumobatch.core.errors import OutputError
from pneumobatch.io.lockfile import LockBusy, ProcessLock

#: Every table of a ledger and of a spool's journal (one schema, one file format).
SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    archive TEXT NOT NULL, study_instance_uid TEXT NOT NULL, study_date TEXT,
    n_instances INTEGER, complete_at TEXT,
    PRIMARY KEY (archive, study_instance_uid));
CREATE TABLE IF NOT EXISTS fetched (
    archive TEXT NOT NULL, sop_instance_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL, path TEXT NOT NULL, fetched_at TEXT NOT NULL,
    PRIMARY KEY (archive, sop_instance_uid));
CREATE TABLE IF NOT EXISTS delivered (
    archive TEXT NOT NULL, sop_instance_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL, model TEXT NOT NULL, weights_sha256 TEXT NOT NULL,
    delivered_at TEXT NOT NULL,
    PRIMARY KEY (archive, sop_instance_uid));
CREATE TABLE IF NOT EXISTS received (
    sop_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL, path TEXT NOT NULL, calling_ae TEXT NOT NULL,
    address TEXT NOT NULL, received_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spooled_studies (
    study_instance_uid TEXT PRIMARY KEY, n_instances INTEGER NOT NULL, last_received REAL NOT NULL,
    complete_at TEXT, predicted_at TEXT, predicted_instances INTEGER, predictions TEXT);
"""


def now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LedgerBusy(OutputError):
    """Another live pull or push uses this ledger."""


def lock_path(path: Path) -> Path:
    """The lock file of the ledger at ``path``."""
    return path.with_name("." + path.name + ".lock")


class Ledger:
    """The ledger file at ``path`` (created on first use), held by this run until :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot use ledger {self.path}: {exc.strerror or exc}") from exc
        try:
            self._lock = ProcessLock(lock_path(self.path)).acquire()
        except LockBusy as exc:
            by = f" (PID {exc.pid})" if exc.pid else ""
            raise LedgerBusy(
                f"another pneumobatch pull or push{by} is using ledger {self.path}; "
                "run this one when it has ended, or give it its own --ledger"
            ) from exc
        try:
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            self._lock.release()
            raise OutputError(f"cannot use ledger {self.path}: {exc}") from exc

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            self._lock.release()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, args: tuple) -> None:
        try:
            with self._db:  # one transaction, committed (and synced by SQLite) on exit
                self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise OutputError(f"cannot write ledger {self.path}: {exc}") from exc

    # pull
    def study_complete(self, archive: str, study_instance_uid: str, n_instances: Optional[int]) -> bool:
        """Fetched completely before, and the archive reports the same number of instances."""
        row = self._db.execute(
            "SELECT n_instances, complete_at FROM studies WHERE archive = ? AND study_instance_uid = ?",
            (archive, study_instance_uid),
        ).fetchone()
        return bool(row and row[1] and n_instances is not None and row[0] == n_instances)

    def mark_study_complete(
        self, archive: str, study_instance_uid: str, study_date: str, n_instances: Optional[int]
    ) -> None:
        self._write(
            "INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?)",
            (archive, study_instance_uid, study_date, n_instances, now_text()),
        )

    def fetched(self, archive: str, study_instance_uid: str) -> set[str]:
        """SOP Instance UIDs of the study already fetched from ``archive``."""
        rows = self._db.execute(
            "SELECT sop_instance_uid FROM fetched WHERE archive = ? AND study_instance_uid = ?",
            (archive, study_instance_uid),
        )
        return {r[0] for r in rows}

    def mark_fetched(
        self, archive: str, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str, path: Path
    ) -> None:
        self._write(
            "INSERT OR REPLACE INTO fetched VALUES (?, ?, ?, ?, ?, ?)",
            (archive, sop_instance_uid, study_instance_uid, series_instance_uid, str(path), now_text()),
        )

    # push
    def is_delivered(self, archive: str, sop_instance_uid: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM delivered WHERE archive = ? AND sop_instance_uid = ?", (archive, sop_instance_uid)
        ).fetchone()
        return row is not None

    def mark_delivered(
        self,
        archive: str,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        model: str,
        weights_sha256: str,
    ) -> None:
        self._write(
            "INSERT OR REPLACE INTO delivered VALUES (?, ?, ?, ?, ?, ?, ?)",
            (archive, sop_instance_uid, study_instance_uid, series_instance_uid, model, weights_sha256, now_text()),
        )

    def counts(self) -> dict[str, int]:
        """Rows per table (for summaries and tests)."""
        return {
            t: int(self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
            for t in ("studies", "fetched", "delivered")
        }
