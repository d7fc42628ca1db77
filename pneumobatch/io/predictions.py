"""Prediction CSVs: rows, crash-safe writing with resume, and the study CSV (rule: :mod:`pneumobatch.core.studies`).

Writing is crash-safe. During a run, rows are appended to a journal next to the
output (``OUT.partial``), flushed and fsynced after every batch. At the end the
previous output (when resuming), the journal and nothing else are merged in
discovery order and written to ``OUT`` through a temporary file and an atomic
rename; then the journal is removed. A run killed at any moment leaves either the
old ``OUT`` or none, plus a journal; ``--resume`` reads both, skips every file that
already has a row (same path, size and modification time) and finishes the job, so
the final CSV has exactly one row per file and model.

One run at a time writes an output: it holds ``.OUT.lock`` (:mod:`pneumobatch.io.lockfile`),
a lock that ends with the process holding it, however it ends, and that its decoding
workers never hold; the lock of a run killed with ``kill -9`` is simply taken over.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Optional, Sequence

from pneumobatch.core.card import PROB_PREFIX, prob_column
from pneumobatch.core.errors import OutputError, OutputExists, Reason, ReportError, ResumeMismatch, Status
from pneumobatch.core.hierarchy import FINE_COLUMNS, FINE_LABEL, FINE_PROB, FINE_TOP, top_text
from pneumobatch.core.studies import aggregate_studies
from pneumobatch.io.atomicfile import atomic_write, check_replaceable, open_regular, temp_prefix
from pneumobatch.io.discovery import FileEntry
from pneumobatch.io.lockfile import LockBusy, ProcessLock, holder

if TYPE_CHECKING:  # annotations only: outputs (and so report) must not import torch
    import pandas as pd

    from pneumobatch.core.card import ModelCard
    from pneumobatch.io.results import FileResult

log = logging.getLogger(__name__)

#: File-level columns, in order; ``prob_<class>`` columns follow ``pred_label``.
LEADING_COLUMNS = [
    "path",
    "status",
    "reason",
    "detail",
    "study",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "view_position",
    "task",
    "model",
    "weights_sha256",
    "pred_label",
]
TRAILING_COLUMNS = [
    "threshold",
    "operating_point",
    "age_band",
    "ood_score",
    "applicable",
    "warnings",
    "file_size",
    "file_mtime_ns",
]
PATIENT_COLUMN = "patient_id"
#: DICOM acquisition fields (devices, not people) after the trailing columns, for monitoring by scanner.
ACQUISITION_COLUMNS = ["manufacturer", "manufacturer_model_name", "station_name"]

STUDY_FROM = ("file", "parent-dir")


#: After the acquisition fields in runs with ``--heatmaps``: the overlay's path, relative to the CSV's folder.
HEATMAP_COLUMN = "heatmap"
#: ``predict --heatmaps`` choices: rows whose decision is a finding, or every row with a prediction
#: (:mod:`pneumobatch.model.explain`).
HEATMAP_MODES = ("positive", "all")
#: Largest heatmap file a reader of the CSV opens (predict's overlays are at most 1024 px a side: well under 4 MiB).
MAX_HEATMAP_BYTES = 16 * 1024 * 1024


def cell_text(cell: Any) -> str:
    """A CSV cell as stripped text: empty for a missing one (None, or NaN as pandas reads an empty cell)."""
    return "" if cell is None or (isinstance(cell, float) and cell != cell) else str(cell).strip()


def heatmap_file(cell: Any, folder: Path) -> Optional[Path]:
    """The heatmap a ``heatmap`` cell names, resolved, or None: the cell (untrusted) must be a
    relative path inside ``folder`` (the predictions CSV's), without ``..``, naming a regular
    file of at most :data:`MAX_HEATMAP_BYTES`; links are followed only within ``folder``.
    ``report`` and ``push --heatmaps`` open only what this accepts."""
    import stat
    from pathlib import PurePosixPath

    from pneumobatch.io.discovery import resolve_inside

    text = cell_text(cell)
    if not text or "\\" in text or ".." in PurePosixPath(text).parts:
        return None
    path = resolve_inside(folder, text)
    if path is None:
        return None
    try:
        real = Path(os.path.realpath(path))
        st = os.stat(real)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_HEATMAP_BYTES:
        return None
    return real


def columns_for(cards: Sequence[ModelCard], include_patient_id: bool, heatmaps: bool = False) -> list[str]:
    probs: list[str] = []
    for card in cards:
        probs += [prob_column(c) for c in card.classes if prob_column(c) not in probs]
    fine = FINE_COLUMNS if any(card.hierarchy for card in cards) else []
    return (
        LEADING_COLUMNS
        + probs
        + fine
        + TRAILING_COLUMNS
        + ACQUISITION_COLUMNS
        + ([HEATMAP_COLUMN] if heatmaps else [])
        + ([PATIENT_COLUMN] if include_patient_id else [])
    )


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
    Models with applicability statistics add ``ood_score`` and ``applicable`` (as the
    model layer decided it, :attr:`FileResult.applicable`); with ``skip_ood`` an
    inapplicable image's row becomes ``skipped``/``out-of-distribution``.
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
        outputs = result.probs.get(card.name)  # of the network's outputs: a two-level model's fine classes
        if outputs is not None:
            probs = card.class_probs(outputs)
            decision = card.decide(probs, meta.get("age_band"))
            row["pred_label"] = decision.label
            row["operating_point"] = decision.operating_point
            if decision.threshold is not None:
                row["threshold"] = f"{decision.threshold:.6f}"
            row.update({prob_column(c): f"{p:.6f}" for c, p in zip(card.classes, probs)})
            if (tree := card.tree) is not None:
                row[FINE_LABEL] = tree.best_below(outputs, decision.label)
                row[FINE_PROB] = f"{float(outputs[tree.fine.index(row[FINE_LABEL])]):.6f}"
                row[FINE_TOP] = top_text(tree.ranked(outputs))
            row["warnings"] = " ".join(card.age_warnings(meta.get("age_years")))
            score = result.ood_scores.get(card.name)
            if score is not None:
                applicable = result.applicable[card.name]  # decided by the model layer
                row["ood_score"], row["applicable"] = f"{score:.4f}", "true" if applicable else "false"
                if skip_ood and not applicable:
                    row.update(
                        status=Status.SKIPPED.value,
                        reason=Reason.OUT_OF_DISTRIBUTION.value,
                        detail="unlike the model's training images (applicability score over its threshold)",
                        pred_label="",
                        operating_point="",
                        **({c: "" for c in FINE_COLUMNS} if card.hierarchy else {}),
                        **{prob_column(c): "" for c in card.classes},
                    )
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
        """Whether ``path`` is one of this output's own files (so never an input); never raises.

        A name that cannot be resolved (a link it is not allowed to read, such as
        ``/proc/1/cwd``; one whose target vanished) is compared as it is spelt.
        """
        resolved = self._resolved(path)
        mine = {self._resolved(p) for p in (self.predictions, self.journal, self.lock, self.studies, self.run)}
        tmp_prefixes = tuple(temp_prefix(p) for p in (self.predictions, self.studies, self.run))
        return (
            resolved in mine
            or (resolved.parent == self._resolved(self.predictions).parent and resolved.name.startswith(tmp_prefixes))
            or resolved.is_relative_to(self._resolved(self.heatmaps))
        )

    @staticmethod
    def _resolved(path: Path) -> Path:
        try:
            return Path(path).resolve()
        except (OSError, RuntimeError):  # RuntimeError: a link loop (Python < 3.13)
            return Path(os.path.abspath(path))

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

    @property
    def heatmaps(self) -> Path:
        """The folder of ``predict --heatmaps`` overlays."""
        return self.predictions.with_name(self.predictions.stem + ".heatmaps")

    @property
    def replaced(self) -> tuple[Path, Path, Path]:
        """The files a run replaces at its end."""
        return (self.predictions, self.studies, self.run)


# --- spreadsheet formula injection (OWASP CSV injection) -------------------------------
#: A cell starting with one of these is run as a formula by Excel, LibreOffice, Sheets.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


_TRIGGER_CHARS = frozenset(FORMULA_TRIGGERS)


def _may_need_quote(column: pd.Series) -> bool:
    """Whether any cell starts (after leading quotes) with a trigger: a cheap Python pass that
    spares the vectorised check below (about 2 ms per column) the columns that cannot need it."""
    return any(str(v).lstrip("'")[:1] in _TRIGGER_CHARS for v in column.to_numpy())


def _needs_quote(column: pd.Series) -> pd.Series:
    """Cells that start (after any leading single quotes) with a formula trigger and are no plain number."""
    import pandas as pd

    text = column.astype(str)
    stripped = text.str.lstrip("'")
    trigger = stripped.str[:1].isin(FORMULA_TRIGGERS)
    number = pd.to_numeric(stripped.where(trigger, ""), errors="coerce").notna()
    return trigger & ~number


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Prefix a single quote to every cell a spreadsheet would run as a formula (OWASP).

    A cell starting with ``= + - @``, a tab or a carriage return (numbers such as ``-3``
    excepted) gets a leading ``'``; so does such a cell that already starts with quotes,
    so :func:`restore_formulas` gives back exactly the original text.
    """
    import pandas as pd

    frame = frame.copy()
    for col in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[col]) and _may_need_quote(frame[col]):
            mask = _needs_quote(frame[col])
            if mask.any():
                frame.loc[mask, col] = "'" + frame.loc[mask, col].astype(str)
    return frame


def restore_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Undo :func:`neutralise_formulas` on a CSV read back (resume, report)."""
    import pandas as pd

    frame = frame.copy()
    for col in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[col]) and _may_need_quote(frame[col]):
            mask = frame[col].astype(str).str.startswith("'") & _needs_quote(frame[col])
            if mask.any():
                frame.loc[mask, col] = frame.loc[mask, col].astype(str).str[1:]
    return frame


def to_csv_text(frame: pd.DataFrame, header: bool = True) -> str:
    """A frame as pneumobatch writes CSVs: formulas neutralised, ``\\n`` line ends."""
    return neutralise_formulas(frame).to_csv(index=False, header=header, lineterminator="\n")


def read_csv_text(text: str) -> pd.DataFrame:
    """A pneumobatch CSV's text read back: strings as written, formulas restored."""
    import pandas as pd

    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    return restore_formulas(frame)


#: Columns that mark a CSV as written by ``pneumobatch predict``.
SIGNATURE_COLUMNS = ("path", "status", "reason", "model", "weights_sha256", "file_size", "file_mtime_ns")


def _read_rows(data: bytes, source: Path, complete_lines_only: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a predictions CSV or journal; raises ResumeMismatch if it is not one."""
    import pandas as pd

    if complete_lines_only and data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # a run killed mid-write leaves half a line
    try:
        frame = read_csv_text(data.decode("utf-8"))
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
        raise ResumeMismatch(
            f"{source} is not a pneumobatch predictions CSV ({type(exc).__name__}); "
            "it was left as it is: choose another -o"
        ) from exc
    missing = [c for c in SIGNATURE_COLUMNS if c not in frame.columns]
    if missing:
        raise ResumeMismatch(
            f"{source} is not a pneumobatch predictions CSV (no column {', '.join(missing)}); "
            "it was left as it is: choose another -o"
        )
    return list(frame.columns), frame.to_dict("records")


def _probabilities_valid(row: dict[str, str], card: ModelCard) -> bool:
    """An ok row's probabilities are numbers in [0, 1] (an Excel round trip can make them ``0,93``)."""
    if row.get("status") != Status.OK.value:
        return True
    for cls in card.classes:
        try:
            p = float(row.get(prob_column(cls), ""))
        except ValueError:
            return False
        if not 0.0 <= p <= 1.0:  # also False for NaN
            return False
    return True


def busy_error(paths: OutputPaths, pid: Optional[int]) -> OutputError:
    """What a run is told when a live run (PID ``pid``) writes the same output: exit code 3."""
    by = f" (PID {pid})" if pid and pid != os.getpid() else ""
    return OutputError(
        f"another pneumobatch run{by} is writing {paths.predictions}; "
        "wait for it to end (this output is left as it is), or choose another -o"
    )


def check_not_busy(paths: OutputPaths) -> None:
    """Refuse at once (before loading anything) an output a live run is writing; a lock left
    by a dead run does not count (the kernel let it go with that run)."""
    pid = holder(paths.lock)
    if pid is not None:
        raise busy_error(paths, pid)


class PredictionWriter:
    """Owns an output CSV for one run: lock, journal, resume and the final atomic write.

    Files are written only where that is safe (:mod:`pneumobatch.io.atomicfile`): the lock
    and the journal never through a symbolic link, ``OUT``, ``OUT.studies.csv`` and
    ``OUT.run.json`` never over a special file or an input. ``--resume`` continues only
    an output this run could have written: a pneumobatch CSV whose rows all come from this
    run's models with the same weights (SHA-256); anything else is refused and left as it
    is. Rows whose probabilities no longer read as numbers (a spreadsheet round trip) are
    predicted again. Rows of files no longer found are dropped, so the CSV describes the
    inputs as they are now.
    """

    def __init__(
        self,
        paths: OutputPaths,
        columns: list[str],
        *,
        resume: bool,
        overwrite: bool,
        cards: Sequence[ModelCard] = (),
        inputs: Sequence[Path] = (),
    ) -> None:
        self.paths = paths
        self.columns = columns
        self.resume = resume
        self.cards = {c.name: c for c in cards}
        self.previous: dict[tuple[str, str, str, str], dict[str, str]] = {}
        self._journal: Optional[IO[str]] = None
        self._lock: Optional[ProcessLock] = None
        self._check(overwrite, inputs)

    def _busy(self, pid: Optional[int]) -> OutputError:
        return busy_error(self.paths, pid)

    def _check(self, overwrite: bool, inputs: Sequence[Path]) -> None:
        out = self.paths.predictions
        for path in self.paths.replaced:
            check_replaceable(path, inputs)
        check_not_busy(self.paths)  # a live run: its journal is no interrupted run's
        if overwrite:
            return
        if not self.resume:
            if out.exists():
                raise OutputExists(f"{out} exists; pass --resume to continue that job or --overwrite to replace it")
            if self.paths.journal.exists():
                raise OutputExists(
                    f"{self.paths.journal} holds rows of an interrupted run; pass --resume to finish it or --overwrite to start again"
                )
        if not out.exists() and not self.paths.journal.exists():  # nothing to resume: the sidecars are another job's
            for path in (self.paths.studies, self.paths.run, self.paths.heatmaps):
                if path.exists():
                    raise OutputExists(f"{path} exists; pass --overwrite to replace it or choose another -o")

    def __enter__(self) -> PredictionWriter:
        out = self.paths.predictions
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
        try:
            self._lock = ProcessLock(self.paths.lock).acquire()
        except LockBusy as exc:
            raise self._busy(exc.pid) from exc
        try:
            self._open_journal()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _open_journal(self) -> None:
        out, journal = self.paths.predictions, self.paths.journal
        if self.resume and out.exists():
            try:
                data = out.read_bytes()
            except OSError as exc:
                raise OutputError(f"cannot resume from {out}: {exc.strerror or exc}") from exc
            self._remember(out, _read_rows(data, out)[1])
        fd = open_regular(journal, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        self._journal = open(fd, "a", newline="", encoding="utf-8")
        try:
            data = _read_fd(fd)
            if data and not self.resume:  # --overwrite: an interrupted run's rows are not kept
                data = b""
                os.ftruncate(fd, 0)
            if data and not data.endswith(b"\n"):  # a torn last line is cut off
                data = data[: data.rfind(b"\n") + 1]
                os.ftruncate(fd, len(data))
            if not data:
                self._journal.write(",".join(self.columns) + "\n")
                self._journal.flush()
            else:
                columns, rows = _read_rows(data, journal)
                if columns != self.columns:
                    raise ResumeMismatch(
                        f"{journal} was written with other models or options; "
                        "resume with the same --model and --include-patient-id options"
                    )
                if self.resume:
                    self._remember(journal, rows)
        except OSError as exc:
            raise OutputError(f"cannot write {journal}: {exc.strerror or exc}") from exc

    def _remember(self, source: Path, rows: list[dict[str, str]]) -> None:
        """Keep rows to resume from, after checking they come from this run's models and weights."""
        invalid = 0
        for row in rows:
            card = self.cards.get(row["model"])
            if card is None:
                raise ResumeMismatch(
                    f"{source} holds rows of model {row['model']!r}, which this run does not use; "
                    "resume with the same --model options, or choose another -o"
                )
            if card.weights_sha256 and str(row["weights_sha256"]).lower() != card.weights_sha256.lower():
                raise ResumeMismatch(
                    f"{source} holds rows of model {card.name!r} made with other weights "
                    f"(SHA-256 {str(row['weights_sha256'])[:12]}…, now {card.weights_sha256[:12]}…); "
                    "choose another -o, or --overwrite to predict everything again"
                )
            if not _probabilities_valid(row, card):
                invalid += 1
                continue
            self.previous[row_key(row)] = row
        if invalid:
            log.warning(
                "%d rows of %s have probabilities that are not numbers in [0, 1] (edited in a spreadsheet?); "
                "those files are predicted again",
                invalid,
                source,
            )

    def __exit__(self, *exc_info: object) -> None:
        if self._journal:
            try:
                self._journal.close()
            except OSError:  # e.g. the disk is full: rows not flushed are predicted again on --resume
                pass
            self._journal = None
        if self._lock is not None:
            self._lock.release()  # removes the file: still held, nobody else can be inside
            self._lock = None

    def done(self, entry: FileEntry, model: str) -> bool:
        return entry_key(entry, model) in self.previous

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add rows to the journal, flushed and fsynced (disk full: :class:`OutputError`)."""
        import pandas as pd

        assert self._journal is not None
        if not rows:
            return
        frame = pd.DataFrame(list(rows), columns=self.columns, dtype=object).fillna("")
        try:
            self._journal.write(to_csv_text(frame, header=False))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as exc:
            raise OutputError(
                f"cannot write {self.paths.journal}: {exc.strerror or exc}; free space and run again with --resume"
            ) from exc

    def finalize(
        self,
        entries: Sequence[FileEntry],
        models: Sequence[str],
        amend: Optional[Callable[[pd.DataFrame], None]] = None,
    ) -> pd.DataFrame:
        """Merge previous rows and the journal in discovery order; atomic write; drop journal.

        Only rows of files found in this run are kept (a deleted input loses its row), with
        this run's columns (a ``patient_id`` column is not carried over without
        ``--include-patient-id``). ``amend`` may change the merged rows in place before they
        are written (the heatmaps pass); killed meanwhile, the journal is still there to resume.
        """
        import pandas as pd

        assert self._journal is not None
        try:
            self._journal.close()
            data = self.paths.journal.read_bytes()
        except OSError as exc:
            raise OutputError(f"cannot write {self.paths.journal}: {exc.strerror or exc}") from exc
        finally:
            self._journal = None
        rows = dict(self.previous)
        for row in _read_rows(data, self.paths.journal, complete_lines_only=True)[1]:
            rows[row_key(row)] = row
        ordered = [rows[key] for entry in entries for model in models if (key := entry_key(entry, model)) in rows]
        frame = pd.DataFrame(ordered, columns=self.columns, dtype=object).fillna("")
        if amend is not None:
            amend(frame)
        atomic_write(self.paths.predictions, to_csv_text(frame))
        os.remove(self.paths.journal)
        return frame


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


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
    """``OUT.studies.csv`` (:func:`pneumobatch.core.studies.aggregate_studies`), numbers as in the file CSV."""
    import pandas as pd

    studies = aggregate_studies(frame, cards)
    for col in [c for c in studies.columns if c.startswith(PROB_PREFIX)] + ["threshold"]:
        studies[col] = [f"{v:.6f}" if pd.notna(v) else "" for v in studies[col]]
    studies = studies.fillna("")
    atomic_write(path, to_csv_text(studies))
    return studies


def write_run_json(path: Path, info: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(info, indent=2, default=str) + "\n")


#: Columns a predictions CSV must have.
REQUIRED_COLUMNS = ("path", "status")


def load_predictions(path: Path | str) -> pd.DataFrame:
    """Read a predictions CSV; ``prob_*`` and ``threshold`` become floats."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ReportError(f"predictions file not found: {path}")
    try:
        frame = restore_formulas(
            pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", encoding_errors="replace")
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReportError(f"cannot read predictions file {path}: {first}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ReportError(f"{path} is not a pneumobatch predictions CSV: no column {', '.join(missing)}")
    for col in frame.columns:
        if col.startswith(PROB_PREFIX) or col == "threshold":
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    if "model" not in frame.columns:
        frame["model"] = ""
    if "reason" not in frame.columns:
        frame["reason"] = ""
    frame["status"] = frame["status"].str.strip().str.lower()
    return frame
