"""Prediction CSVs: rows, crash-safe writing with resume, and the study CSV (rule: :mod:`pneumobatch.studies`).

Writing is crash-safe. During a run, rows are appended to a journal next to the
output (``OUT.partial``), flushed and fsynced after every batch. At the end the
previous output (when resuming), the journal and nothing else are merged in
discovery order and written to ``OUT`` through a temporary file and an atomic
rename; then the journal is removed. A run killed at any moment leaves either the
old ``OUT`` or none, plus a journal; ``--resume`` reads both, skips every file that
already has a row (same path, size and modification time) and finishes the job, so
the final CSV has exactly one row per file and model.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterable, Optional, Sequence

import pandas as pd

from pneumobatch.atomicfile import atomic_write
from pneumobatch.card import PROB_PREFIX, prob_column
from pneumobatch.discovery import FileEntry
from pneumobatch.errors import OutputError, OutputExists, Reason, Status  # noqa: F401 - re-exported
from pneumobatch.studies import STUDY_COLUMNS, aggregate_studies  # noqa: F401 - STUDY_COLUMNS re-exported

if TYPE_CHECKING:  # annotations only: outputs (and so report) must not import torch
    from pneumobatch.card import ModelCard
    from pneumobatch.inference import FileResult

#: File-level columns, in order; ``prob_<class>`` columns follow ``pred_label``.
LEADING_COLUMNS = [
    "path", "status", "reason", "detail", "study", "study_instance_uid", "series_instance_uid",
    "sop_instance_uid", "view_position", "task", "model", "weights_sha256", "pred_label",
]
TRAILING_COLUMNS = [
    "threshold", "operating_point", "age_band", "ood_score", "applicable", "warnings", "file_size", "file_mtime_ns",
]
PATIENT_COLUMN = "patient_id"
#: DICOM acquisition fields (devices, not people) after the trailing columns, for monitoring by scanner.
ACQUISITION_COLUMNS = ["manufacturer", "manufacturer_model_name", "station_name"]

STUDY_FROM = ("file", "parent-dir")


def columns_for(cards: Sequence[ModelCard], include_patient_id: bool) -> list[str]:
    probs: list[str] = []
    for card in cards:
        probs += [prob_column(c) for c in card.classes if prob_column(c) not in probs]
    return LEADING_COLUMNS + probs + TRAILING_COLUMNS + ACQUISITION_COLUMNS + ([PATIENT_COLUMN] if include_patient_id else [])


def study_key(result: FileResult, study_from: str) -> str:
    """Radiologists read studies: DICOM by StudyInstanceUID, PNG/JPEG by file or folder."""
    uid = result.meta.get("study_instance_uid") or ""
    if uid:
        return uid
    rel = result.entry.relpath
    if study_from == "parent-dir":
        parent = os.path.dirname(rel)
        return parent or "."
    return rel


def result_rows(
    result: FileResult, cards: Sequence[ModelCard], study_from: str, include_patient_id: bool, skip_ood: bool = False
) -> list[dict[str, Any]]:
    """One row per model for a file; skipped and error rows carry no probabilities.

    The decision uses the card's operating point for the image's age band (DICOM
    PatientAge) when the card has one, else the pooled threshold (``operating_point``).
    Models with applicability statistics add ``ood_score`` and ``applicable``; with
    ``skip_ood`` an inapplicable image's row becomes ``skipped``/``out-of-distribution``.
    """
    meta = result.meta
    base = {
        "path": result.entry.relpath,
        "status": result.status.value,
        "reason": result.reason,
        "detail": result.detail,
        "study": study_key(result, study_from) if result.status is Status.OK or meta.get("study_instance_uid") else "",
        "study_instance_uid": meta.get("study_instance_uid", ""),
        "series_instance_uid": meta.get("series_instance_uid", ""),
        "sop_instance_uid": meta.get("sop_instance_uid", ""),
        "view_position": meta.get("view_position", ""),
        "age_band": meta.get("age_band", "") if result.status is Status.OK else "",
        "file_size": result.entry.size,
        "file_mtime_ns": result.entry.mtime_ns,
        **{column: meta.get(column, "") for column in ACQUISITION_COLUMNS},
    }
    if include_patient_id:
        base[PATIENT_COLUMN] = meta.get("patient_id", "")
    rows = []
    for card in cards:
        row = dict(base, task=card.task, model=card.name, weights_sha256=card.weights_sha256)
        row["threshold"] = "" if card.threshold is None else f"{card.threshold:.6f}"
        probs = result.probs.get(card.name)
        if probs is not None:
            decision = card.decide(probs, meta.get("age_band"))
            row["pred_label"] = decision.label
            row["operating_point"] = decision.operating_point
            if decision.threshold is not None:
                row["threshold"] = f"{decision.threshold:.6f}"
            row.update({prob_column(c): f"{p:.6f}" for c, p in zip(card.classes, probs)})
            row["warnings"] = " ".join(card.age_warnings(meta.get("age_years")))
            score = result.ood_scores.get(card.name)
            if score is not None:
                applicable = bool(score <= float(card.applicability["threshold"]))
                row["ood_score"], row["applicable"] = f"{score:.4f}", "true" if applicable else "false"
                if skip_ood and not applicable:
                    row.update(status=Status.SKIPPED.value, reason=Reason.OUT_OF_DISTRIBUTION.value,
                               detail="unlike the model's training images (applicability score over its threshold)",
                               pred_label="", operating_point="", **{prob_column(c): "" for c in card.classes})
        rows.append(row)
    return rows


def row_key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    return (str(row["path"]), str(row["file_size"]), str(row["file_mtime_ns"]), str(row["model"]))


def entry_key(entry: FileEntry, model: str) -> tuple[str, str, str, str]:
    return (entry.relpath, str(entry.size), str(entry.mtime_ns), model)


@dataclass
class OutputPaths:
    predictions: Path

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is one of this output's own files (so never an input)."""
        resolved = path.resolve()
        mine = {p.resolve() for p in (self.predictions, self.journal, self.lock, self.studies, self.run)}
        tmp_prefixes = tuple(f".{p.name}.tmp-" for p in (self.predictions, self.studies, self.run))
        return resolved in mine or (
            resolved.parent == self.predictions.resolve().parent and resolved.name.startswith(tmp_prefixes)
        )

    @property
    def journal(self) -> Path:
        return self.predictions.with_name(self.predictions.name + ".partial")

    @property
    def lock(self) -> Path:
        return self.predictions.with_name("." + self.predictions.name + ".lock")

    @property
    def studies(self) -> Path:
        return self.predictions.with_name(self.predictions.stem + ".studies.csv")

    @property
    def run(self) -> Path:
        return self.predictions.with_name(self.predictions.stem + ".run.json")


def _read_rows(path: Path, complete_lines_only: bool = False) -> list[dict[str, str]]:
    data = path.read_bytes()
    if complete_lines_only and data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # a run killed mid-write leaves half a line
    text = data.decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


class PredictionWriter:
    """Owns an output CSV for one run: lock, journal, resume and the final atomic write."""

    def __init__(self, paths: OutputPaths, columns: list[str], *, resume: bool, overwrite: bool) -> None:
        self.paths = paths
        self.columns = columns
        self.resume = resume
        self.previous: dict[tuple[str, str, str, str], dict[str, str]] = {}
        self._journal: Optional[IO[str]] = None
        self._writer: Optional[csv.DictWriter] = None
        self._lock_fh: Optional[IO[str]] = None
        self._check(overwrite)

    def _check(self, overwrite: bool) -> None:
        out = self.paths.predictions
        if not self.resume and not overwrite:
            if out.exists():
                raise OutputExists(f"{out} exists; pass --resume to continue that job or --overwrite to replace it")
            if self.paths.journal.exists():
                raise OutputExists(
                    f"{self.paths.journal} holds rows of an interrupted run; pass --resume to finish it or --overwrite to start again"
                )

    def __enter__(self) -> PredictionWriter:
        out = self.paths.predictions
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fh = open(self.paths.lock, "w")
        except OSError as exc:
            raise OutputError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise OutputError(f"another pneumobatch run is writing {out}") from exc
        if self.resume:
            for source, partial in ((out, False), (self.paths.journal, True)):
                if source.exists():
                    try:
                        rows = _read_rows(source, complete_lines_only=partial)
                    except (OSError, UnicodeDecodeError, csv.Error) as exc:
                        raise OutputError(f"cannot resume from {source}: {exc}") from exc
                    for row in rows:
                        if row.get("path") is not None and row.get("model"):
                            self.previous[row_key(row)] = row
        try:
            self._journal = open(self.paths.journal, "a", newline="", encoding="utf-8")
            if self.paths.journal.stat().st_size == 0:
                self._journal.write(",".join(self.columns) + "\n")
            else:  # continue a journal; make sure a torn last line is closed off
                self._repair_journal()
                if self._journal_columns() != self.columns:
                    raise OutputError(
                        f"{self.paths.journal} was written with other models or options; "
                        "resume with the same --model and --include-patient-id options"
                    )
        except OSError as exc:
            raise OutputError(f"cannot write {self.paths.journal}: {exc.strerror or exc}") from exc
        self._writer = csv.DictWriter(self._journal, fieldnames=self.columns, lineterminator="\n")
        return self

    def _journal_columns(self) -> list[str]:
        with open(self.paths.journal, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
        return header or self.columns

    def _repair_journal(self) -> None:
        data = self.paths.journal.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.paths.journal, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def __exit__(self, *exc_info: object) -> None:
        if self._journal:
            self._journal.close()
        if self._lock_fh:
            try:
                self.paths.lock.unlink()  # still held: nobody else can be inside
            except OSError:
                pass
            self._lock_fh.close()

    def done(self, entry: FileEntry, model: str) -> bool:
        return entry_key(entry, model) in self.previous

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        assert self._writer is not None and self._journal is not None
        self._writer.writerows(rows)
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def finalize(self, entries: Sequence[FileEntry], models: Sequence[str]) -> pd.DataFrame:
        """Merge previous rows and the journal in discovery order; atomic write; drop journal."""
        assert self._journal is not None
        self._journal.close()
        rows = dict(self.previous)
        for row in _read_rows(self.paths.journal, complete_lines_only=True):
            rows[row_key(row)] = row
        ordered = []
        for entry in entries:
            for model in models:
                key = entry_key(entry, model)
                if key in rows:
                    ordered.append(rows.pop(key))
        current = {e.relpath for e in entries}
        # rows of files from earlier runs that were not found again (moved, or another root)
        ordered += [r for k, r in rows.items() if k[0] not in current]
        columns = list(self.columns) + [c for r in ordered for c in r if c not in self.columns]
        frame = pd.DataFrame(ordered, columns=list(dict.fromkeys(columns))).fillna("")
        atomic_write_text(self.paths.predictions, frame.to_csv(index=False, lineterminator="\n"))
        os.remove(self.paths.journal)
        return frame


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def file_counts(frame: pd.DataFrame) -> dict[str, Any]:
    """Files (not rows: several models give several rows) by status, and by status and reason."""
    files = frame.drop_duplicates("path")
    status = files["status"].value_counts()
    by_reason: dict[str, dict[str, int]] = {}
    for (s, r), n in files[files["status"] != Status.OK.value].groupby(["status", "reason"]).size().items():
        by_reason.setdefault(str(s), {})[str(r) or "(none given)"] = int(n)
    return {
        "files": int(len(files)),
        "ok": int(status.get(Status.OK.value, 0)),
        "skipped": int(status.get(Status.SKIPPED.value, 0)),
        "error": int(status.get(Status.ERROR.value, 0)),
        "by_reason": by_reason,
    }


def write_studies(frame: pd.DataFrame, cards: Sequence[ModelCard], path: Path) -> pd.DataFrame:
    """``OUT.studies.csv`` (:func:`pneumobatch.studies.aggregate_studies`), numbers as in the file CSV."""
    studies = aggregate_studies(frame, cards)
    for col in [c for c in studies.columns if c.startswith(PROB_PREFIX)] + ["threshold"]:
        studies[col] = [f"{v:.6f}" if pd.notna(v) else "" for v in studies[col]]
    studies = studies.fillna("")
    atomic_write_text(path, studies.to_csv(index=False, lineterminator="\n"))
    return studies


def write_run_json(path: Path, info: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(info, indent=2, default=str) + "\n")
