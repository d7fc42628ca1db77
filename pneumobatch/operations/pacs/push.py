"""Write predict's results back to an archive: one SR per study and model, verified.

Policy:

- **What.** Every study with at least one predicted (``ok``) DICOM image in the
  predictions CSV, for every model in it (or those asked for): one SR
  (:mod:`.sr`). Rows without a Study/SOP Instance UID (PNG, JPEG) cannot be sent and
  are counted. The models' cards come from ``OUT.run.json`` beside the CSV (else from
  the CSV's own columns).
- **Checked rows.** A row is sent only when an SR can state it truthfully: every
  probability a number in [0, 1], the threshold too, ``pred_label`` what the card's
  rule gives for them (:func:`~.sr.image_problem`), the model name, class names and
  operating point fit for a DICOM LO value. Any other row is refused: listed with its
  CSV row, path and reason, counted, exit 1; never sent, never silently dropped.
- **The organism, when it can be stated.** A two-level model's row also gives the SR its
  organism item (``fine_label`` and its probability in ``fine_top3``, :func:`~.sr.organism_of`).
  Cells that cannot be stated truthfully (a fine class the card does not have or not below
  ``pred_label``, a malformed ``fine_top3``) leave the item out with a one-line warning; the
  row's coarse finding is still sent (exit 0).
- **The image's study, not the CSV's.** The Study, Series and SOP Instance UIDs of an
  SR's references and its patient and study modules come from the source image's own
  header: read again from ``source`` (the folder predict read, joined with the CSV's
  ``path``, which must stay inside it; only regular files are opened, never blocking),
  else from the archive's copy, looked up under the row's own study and series. A row
  whose UIDs the header contradicts (a hand-edited CSV moving an image into another
  patient's study, or into a study nobody has) is refused. The CSV holds UIDs, never
  patient data.
- **Exactly once.** An SR's UID follows from the study, the weights and the result
  (:mod:`.sr`). The ledger skips SRs already delivered; an SR the archive already holds
  (a lost ledger) is recorded without being sent; either way the archive ends with one
  SR per study, model and result.
- **Verified.** After STOW-RS or C-STORE the SR is searched for (QIDO-RS or C-FIND);
  only then is it marked delivered. A failure is retried ``retries`` times with a
  growing wait, then listed in :attr:`PushResult.failures` (exit 1), never dropped.
- **An unusable archive stops push.** Before the first study and after every failed
  attempt, one cheap search with a short timeout (:class:`_Probe`) asks whether the
  archive answers at all: when it does not (unreachable, hung, refusing our credentials
  or AE title) push stops with one line and exit 3, within :data:`PROBE_TIMEOUT`
  seconds, instead of retrying every study.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence

import pandas as pd
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import EXIT_FILE_ERRORS, EXIT_OK, ArchiveError, FileRejected, OptionError, Status
from pneumobatch.core.uids import valid_uid
from pneumobatch.io.discovery import open_input, unescape_path
from pneumobatch.io.predictions import FINE_LABEL, FINE_PROB, FINE_TOP, OutputPaths, cell_text
from pneumobatch.operations.pacs.archive import Archive, InstanceRef, with_retries
from pneumobatch.operations.pacs.client import open_archive
from pneumobatch.operations.pacs.connection import Connection
from pneumobatch.operations.pacs.ledger import Ledger
from pneumobatch.operations.pacs.sr import (
    ImageResult,
    StudyResult,
    build_sr,
    card_problem,
    evidence_dataset,
    image_problem,
    organism_of,
)

log = logging.getLogger(__name__)

#: Seconds the probe that tells an unusable archive waits for its answer (the transfers
#: themselves wait the connection's timeout).
PROBE_TIMEOUT = 10.0
#: The day the probe searches (nothing is there: an answer of any length will do).
PROBE_DATE = "19000101"
#: Header values larger than this are not read (only small patient and study attributes are used).
DEFER_SIZE = "64 KB"
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
UID_COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid")


class SRBuildError(ArchiveError):
    """The SR of one study cannot be built from its headers and results."""

    retriable = False  # the same data would fail again


def default_ledger(predictions: Path) -> Path:
    """``OUT.ledger.sqlite`` beside the predictions CSV."""
    predictions = Path(predictions)
    return predictions.with_name(predictions.stem + ".ledger.sqlite")


@dataclass
class PushConfig:
    predictions: Path
    connection: Connection
    source: Optional[Path] = None
    ledger: Optional[Path] = None
    models: tuple[str, ...] = ()
    retries: int = 2
    retry_wait: float = 1.0
    heatmaps: bool = False  # also each positive image's heatmap as a Secondary Capture (heatmap_sc)


@dataclass
class PushResult:
    archive: str
    ledger: Path
    studies: int = 0  # (study, model) pairs with a predicted DICOM image
    sent: int = 0  # SRs stored and verified this run
    already_delivered: int = 0  # in the ledger: not sent again
    already_in_archive: int = 0  # the archive had it (same UID): recorded, not sent
    rows_without_uid: int = 0  # predicted rows that are not DICOM (PNG/JPEG)
    rows_refused: int = 0  # predicted rows not sent: values an SR cannot state, UIDs not the image's
    sop_instance_uids: list[str] = field(default_factory=list)  # every SR of this run's results
    failures: list[str] = field(default_factory=list)
    heatmaps_sent: int = 0  # heatmap SCs stored and verified this run
    heatmaps_before: int = 0  # in the ledger or already in the archive: not sent again
    heatmaps_refused: int = 0  # positive rows whose heatmap could not be sent (listed in failures)
    organisms_left_out: int = 0  # rows sent without their organism item (a warning each)

    @property
    def exit_code(self) -> int:
        return EXIT_FILE_ERRORS if self.failures else EXIT_OK

    def summary(self) -> str:
        return (
            f"{self.studies} SRs (study x model): {self.sent} sent and verified, "
            f"{self.already_delivered} delivered before, {self.already_in_archive} already in the archive, "
            f"{len(self.failures) - self.rows_refused} failed; {self.rows_refused} predicted rows refused "
            f"(not sent); {self.rows_without_uid} predicted rows without DICOM UIDs; "
            + (
                f"heatmap SCs: {self.heatmaps_sent} sent and verified, {self.heatmaps_before} sent before, "
                f"{self.heatmaps_refused} refused; "
                if self.heatmaps_sent or self.heatmaps_before or self.heatmaps_refused
                else ""
            )
            + (
                f"{self.organisms_left_out} rows sent without their organism item (see the warnings); "
                if self.organisms_left_out
                else ""
            )
            + f"ledger {self.ledger}"
        )


def load_cards(predictions: Path, frame: pd.DataFrame) -> dict[str, ModelCard]:
    """Each model's card: from run.json beside the CSV, else rebuilt from the CSV."""
    from pneumobatch.evaluation.labels.cards import card_from_run, describe_model

    run_path = OutputPaths(Path(predictions)).run
    run_models: dict[str, dict] = {}
    if run_path.is_file():
        try:
            run = json.loads(run_path.read_text(encoding="utf-8"))
            run_models = {str(m.get("name")): m for m in run.get("models", []) if isinstance(m, dict)}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("%s could not be read (%s); model cards rebuilt from the CSV", run_path, exc)
    cards = {}
    for name, rows in frame.groupby("model", sort=False):
        cards[str(name)] = card_from_run(run_models.get(str(name))) or describe_model(rows, run_models.get(str(name)))
    return cards


def _float(value) -> Optional[float]:
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    return None if pd.isna(number) else float(number)


def _probability(value) -> Optional[float]:
    """A ``prob_`` cell as a float; NaN (an empty or non-numeric cell) is kept, to be refused."""
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    return float(number)


def _quoted(text: str, limit: int = 120) -> str:
    """An untrusted CSV value fit for a message: on one line, escaped, cut short."""
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def refusal(image: ImageResult, model: str, reason: str) -> str:
    """The line listing a refused row on stderr: its CSV row, path and model, and why."""
    return f"row {image.row} (path {_quoted(image.path)}, model {_quoted(model)}): refused, not sent: {reason}"


def _spreadsheet_row(index) -> int:
    """The row a spreadsheet shows for a frame index of ``read_csv`` (the header is row 1)."""
    try:
        return int(index) + 2
    except (TypeError, ValueError):
        return 0


def _result_of(image: ImageResult, card: ModelCard) -> tuple:
    return (
        image.series_instance_uid,
        image.probs,
        image.pred_label,
        image.threshold,
        image.operating_point,
        organism_of(card, image)[0],
    )


@dataclass
class Rows:
    """What the predictions CSV asks push to send, after the checks that need no archive."""

    results: list[StudyResult]
    without_uid: int = 0  # predicted rows that are not DICOM (PNG/JPEG): nothing to send
    refused: list[str] = field(default_factory=list)  # one line per refused row
    warnings: list[str] = field(default_factory=list)  # one line per row sent without its organism item


def study_results(frame: pd.DataFrame, cards: dict[str, ModelCard], heatmaps: bool = False) -> Rows:
    """One :class:`StudyResult` per (study, model) with predicted DICOM images whose values
    an SR can state (:func:`~.sr.image_problem`, :func:`~.sr.card_problem`); the others are
    refused, each with its reason. Rows with no UID at all (PNG, JPEG) are counted; a row
    with some UIDs but not three valid ones is refused. A row whose organism cannot be stated
    (:func:`~.sr.organism_of`) is kept, with a warning logged and listed."""
    ok = frame[frame["status"].astype(str) == Status.OK.value]
    columns = ("study_instance_uid", "series_instance_uid", "sop_instance_uid")
    rows = Rows(results=[])
    groups: dict[tuple[str, str], dict[str, ImageResult]] = {}
    for index, row in ok.iterrows():
        raw = [str(row.get(c, "") or "").strip() for c in columns]
        study, series, sop = (valid_uid(v) for v in raw)
        model = str(row["model"])
        card = cards[model]
        image = ImageResult(
            sop_instance_uid=sop,
            series_instance_uid=series,
            probs=tuple((c, _probability(row.get(card.prob_column(c)))) for c in card.classes),
            pred_label=str(row.get("pred_label", "")),
            threshold=_float(row.get("threshold")) if card.binary else None,
            operating_point=str(
                row.get("operating_point", "")
                or ("pooled" if card.binary else "argmax" if card.log_offsets is None else "log-offsets")
            ),
            path=str(row.get("path", "")),
            row=_spreadsheet_row(index),
            heatmap=cell_text(row.get("heatmap"))
            if heatmaps and card.is_finding(str(row.get("pred_label", "")))
            else "",
            fine_label=cell_text(row.get(FINE_LABEL)) if card.hierarchy else "",
            fine_top=cell_text(row.get(FINE_TOP)) if card.hierarchy else "",
            fine_prob=cell_text(row.get(FINE_PROB)) if card.hierarchy else "",
        )
        if not any(raw):
            rows.without_uid += 1
            continue
        problem = (
            (
                "a study, series or SOP instance UID is missing or not a valid UID"
                if not (study and series and sop)
                else None
            )
            or card_problem(card)
            or image_problem(card, image)
        )
        if problem:
            rows.refused.append(refusal(image, model, problem))
            continue
        unstated = organism_of(card, image)[1]
        if unstated:
            line = (
                f"row {image.row} (path {_quoted(image.path)}, model {_quoted(model)}): "
                f"sent without its organism item: {unstated}"
            )
            log.warning("%s", line)
            rows.warnings.append(line)
        images = groups.setdefault((study, model), {})
        first = images.get(sop)
        if first is not None and _result_of(first, card) != _result_of(image, card):
            rows.refused.append(refusal(image, model, "an earlier row has the same image with another result"))
            continue
        images.setdefault(sop, image)  # the same image twice (a copy): one result in the SR
    for (study, model), images in sorted(groups.items()):
        rows.results.append(StudyResult(study, cards[model], tuple(images.values())))
    return rows


def _open_source(source: Path, image: ImageResult) -> Optional[BinaryIO]:
    """The file of ``image.path`` inside ``source``, opened without blocking and without
    following a last link (:func:`~pneumobatch.io.discovery.open_input`: a FIFO never hangs
    push); None when there is no such file to read. Raises :class:`_Refused` for a path
    leading outside ``source`` or naming anything but a regular file."""
    root = os.path.realpath(source)
    try:
        real = os.path.realpath(os.path.join(root, unescape_path(image.path)))
    except (ValueError, IndexError) as exc:  # a malformed escape or a NUL byte in the cell
        raise _Refused("path is not a file name predict writes") from exc
    if not image.path or os.path.commonpath([root, real]) != root:
        raise _Refused("path leads outside --source")
    try:
        return open_input(Path(real), follow_links=False)
    except FileRejected as exc:
        raise _Refused("path is not a regular file") from exc
    except (OSError, ValueError):
        return None  # not there (or not ours to read): the archive's copy is used


class _Refused(Exception):
    """A row that must not be sent; the message says why (no CSV or header value in it)."""


def source_evidence(source: Path, study: str, image: ImageResult) -> Optional[Dataset]:
    """:func:`~.sr.evidence_dataset` of the image's own header, read again from ``source``;
    None when its file is not there (the archive's copy is used then). Raises
    :class:`_Refused` when the row's UIDs are not those of the file it names: the SR takes
    its study from the image, never from an edited CSV."""
    opened = _open_source(source, image)
    if opened is None:
        return None
    try:
        with opened as fh:
            header = dcmread(fh, stop_before_pixels=True, defer_size=DEFER_SIZE)
            claimed = (study, image.series_instance_uid, image.sop_instance_uid)
            actual = tuple(valid_uid(header.get(k)) for k in UID_KEYWORDS)
            for column, mine, theirs in zip(UID_COLUMNS, claimed, actual):
                if mine != theirs:
                    raise _Refused(f"its {column} is not the one in the image's own header")
            return evidence_dataset(header, *claimed)
    except (OSError, InvalidDicomError, ValueError, TypeError, AttributeError, KeyError, EOFError):
        return None  # unreadable now: the archive's copy is used, checked the same way


def archive_evidence(archive: Archive, study: str, image: ImageResult) -> Dataset:
    """The archive's copy of the image's header, found only under the row's own study and
    series: a row moved into another study (or an unknown one) is refused, not sent."""
    ref = InstanceRef(study, image.series_instance_uid, image.sop_instance_uid)
    if not archive.has_instance(ref):
        raise _Refused(
            "the archive holds no image with this sop_instance_uid under the row's study_instance_uid "
            "and series_instance_uid"
        )
    return evidence_dataset(archive.header(ref), study, image.series_instance_uid, image.sop_instance_uid)


class _Probe:
    """One cheap search with a short timeout (a study search for a day long past): it tells
    an archive that cannot be used at all (unreachable, hung, refusing our credentials or AE
    title) from one study's failure, so that push stops at once with exit 3 instead of
    retrying every study against it."""

    def __init__(self, conn: Connection, outcome: PushResult) -> None:
        self.conn, self.outcome, self.done = conn, outcome, False

    def once(self) -> None:
        if not self.done:
            self.check()
            self.done = True

    def check(self) -> None:
        """Raise :class:`ArchiveError` (exit 3) unless the archive answers a search in time.

        The search runs in a daemon thread given :data:`PROBE_TIMEOUT` seconds in all: a
        client library's own per-read timeouts cannot stretch it, and a search still
        hanging is left behind (it ends with the process)."""
        errors: list[BaseException] = []

        def search() -> None:
            try:
                with open_archive(replace(self.conn, timeout=min(self.conn.timeout, PROBE_TIMEOUT))) as archive:
                    archive.find_studies(PROBE_DATE, "SR")
            except BaseException as exc:  # handed to the main thread
                errors.append(exc)

        thread = threading.Thread(target=search, name="pneumobatch-archive-probe", daemon=True)
        thread.start()
        thread.join(PROBE_TIMEOUT)
        if thread.is_alive():
            error: Optional[BaseException] = ArchiveError(
                f"{self.conn.name}: a search got no answer within {PROBE_TIMEOUT:g}s"
            )
        else:
            error = errors[0] if errors else None
        if error is None:
            return
        if not isinstance(error, ArchiveError):
            raise error  # a bug, not the archive: the CLI reports it as one
        raise ArchiveError(
            f"{error}; the archive cannot be used, push stopped ({self.outcome.sent} SRs sent and verified "
            "before, in the ledger); run push again once it answers"
        ) from error


class _Delivery:
    """One study's SR: its images' headers (from --source, else the archive), the rows
    whose UIDs the headers contradict refused, then the SR of the rest sent and verified."""

    def __init__(self, archive: Archive, ledger: Ledger, config: PushConfig, outcome: PushResult, result: StudyResult):
        self.archive, self.ledger, self.config, self.outcome, self.result = archive, ledger, config, outcome, result
        self.evidence: dict[str, Dataset] = {}
        self.kept: list[ImageResult] = []
        self.pending: list[ImageResult] = []  # to be looked up in the archive
        self.final: Optional[StudyResult] = None
        self._captures: Optional[list] = None

    def refuse(self, image: ImageResult, reason: str) -> None:
        self.outcome.failures.append(refusal(image, self.result.card.name, reason))
        self.outcome.rows_refused += 1

    def from_source(self) -> None:
        """The headers --source holds (no archive needed); the other images are pending."""
        for image in self.result.images:
            evidence = None
            if self.config.source is not None:
                try:
                    evidence = source_evidence(self.config.source, self.result.study_instance_uid, image)
                except _Refused as exc:
                    self.refuse(image, str(exc))
                    continue
            if evidence is None:
                self.pending.append(image)
            else:
                self.evidence[image.sop_instance_uid] = evidence
                self.kept.append(image)

    @property
    def empty(self) -> bool:
        return not self.kept and not self.pending

    def __call__(self) -> None:
        """Look the pending images up, then send the SR (retried as a whole: done lookups stay done)."""
        while self.pending:
            image = self.pending[0]
            try:
                self.evidence[image.sop_instance_uid] = archive_evidence(
                    self.archive, self.result.study_instance_uid, image
                )
                self.kept.append(image)
            except _Refused as exc:
                self.refuse(image, str(exc))
            self.pending.pop(0)
        if not self.kept:
            return
        order = {image.sop_instance_uid: n for n, image in enumerate(self.result.images)}
        kept = tuple(sorted(self.kept, key=lambda image: order[image.sop_instance_uid]))
        captures = self.captures(kept)
        sent = {c.source_sop_instance_uid for c in captures}  # a refused heatmap leaves its image's SR without one
        kept = tuple(i if i.sop_instance_uid in sent else replace(i, heatmap="") for i in kept)
        self.final = StudyResult(self.result.study_instance_uid, self.result.card, kept)
        if self.final.sop_instance_uid != self.result.sop_instance_uid and self.ledger.is_delivered(
            self.config.connection.name, self.final.sop_instance_uid
        ):
            self.outcome.already_delivered += 1
            return
        for capture in captures:
            _deliver_capture(self.archive, self.ledger, capture, self.result.card, self.config, self.outcome)
        _deliver(
            self.archive,
            self.ledger,
            self.final,
            self.evidence,
            self.config,
            self.outcome,
            [c.dataset for c in captures],
        )

    def captures(self, kept: tuple[ImageResult, ...]) -> list:
        """The heatmap SCs of the kept images that have one (built once: a retry sends the same);
        a heatmap that cannot be sent is refused with its reason, its image's SR still goes."""
        from pneumobatch.operations.pacs.heatmap_sc import HeatmapRefused, build_capture, read_overlay

        if self._captures is not None:
            return self._captures
        self._captures = []
        folder = Path(self.config.predictions).parent
        for n, image in enumerate(kept, start=1):
            if not image.heatmap:
                continue
            evidence = self.evidence[image.sop_instance_uid]
            try:
                rgb, digest = read_overlay(image.heatmap, folder)
                self._captures.append(
                    build_capture(evidence, str(evidence.SOPClassUID), rgb, digest, self.result.card, n)
                )
            except HeatmapRefused as exc:
                self.outcome.failures.append(refusal(image, self.result.card.name, f"heatmap not sent: {exc}"))
                self.outcome.heatmaps_refused += 1
            except (ValueError, TypeError, KeyError) as exc:  # highdicom refuses a header value
                self.outcome.failures.append(
                    refusal(
                        image, self.result.card.name, f"heatmap not sent: cannot build the SC ({type(exc).__name__})"
                    )
                )
                self.outcome.heatmaps_refused += 1
        return self._captures


def run_push(config: PushConfig, progress: Optional[Callable[[StudyResult], None]] = None) -> PushResult:
    """Check, build, send, verify and record the SRs of a predictions CSV."""
    from pneumobatch.io.predictions import load_predictions

    frame = load_predictions(config.predictions)
    cards = load_cards(config.predictions, frame)
    if config.models:
        unknown = [m for m in config.models if m not in cards]
        if unknown:
            raise OptionError(
                f"{config.predictions} has no model {', '.join(unknown)} (it has {', '.join(cards) or 'none'})"
            )
        frame = frame[frame["model"].isin(config.models)]
    rows = study_results(frame, cards, heatmaps=config.heatmaps)
    conn = config.connection
    ledger_path = Path(config.ledger or default_ledger(config.predictions))
    outcome = PushResult(
        archive=conn.name, ledger=ledger_path, studies=len(rows.results), rows_without_uid=rows.without_uid
    )
    outcome.failures.extend(rows.refused)
    outcome.rows_refused = len(rows.refused)
    outcome.organisms_left_out = len(rows.warnings)
    probe = _Probe(conn, outcome)
    with Ledger(ledger_path) as ledger, open_archive(conn) as archive:
        for result in rows.results:
            if ledger.is_delivered(conn.name, result.sop_instance_uid):
                outcome.sop_instance_uids.append(result.sop_instance_uid)
                outcome.already_delivered += 1
                continue
            delivery = _Delivery(archive, ledger, outcome=outcome, config=config, result=result)
            delivery.from_source()
            if delivery.empty:
                outcome.studies -= 1  # every row of it refused: no SR to send
                continue
            probe.once()
            error = with_retries(delivery, config.retries, config.retry_wait, after_failure=probe.check)
            if delivery.final is None and not delivery.pending:
                outcome.studies -= 1
            else:
                outcome.sop_instance_uids.append((delivery.final or result).sop_instance_uid)
            if error:
                outcome.failures.append(f"study {result.study_instance_uid}, model {result.card.name}: {error}")
            if progress is not None:
                progress(result)
    return outcome


def _deliver_capture(
    archive: Archive, ledger: Ledger, capture, card: ModelCard, config: PushConfig, outcome: PushResult
) -> None:
    """Store one heatmap SC and check the archive has it, unless the ledger or the archive already does."""
    name = config.connection.name
    ref = InstanceRef(capture.study_instance_uid, capture.series_instance_uid, capture.sop_instance_uid)
    if ledger.is_delivered(name, capture.sop_instance_uid):
        outcome.heatmaps_before += 1
        return
    if archive.has_instance(ref):
        outcome.heatmaps_before += 1
    else:
        archive.store(capture.dataset)
        if not archive.has_instance(ref):
            raise ArchiveError(f"{name}: heatmap SC {capture.sop_instance_uid} was accepted but is not found")
        outcome.heatmaps_sent += 1
    ledger.mark_delivered(
        name, capture.study_instance_uid, capture.series_instance_uid, capture.sop_instance_uid, card.name,
        card.weights_sha256,
    )  # fmt: skip


def _deliver(
    archive: Archive,
    ledger: Ledger,
    result: StudyResult,
    evidence: dict[str, Dataset],
    config: PushConfig,
    outcome: PushResult,
    captures: Sequence[Dataset] = (),
) -> None:
    name = config.connection.name
    ref = InstanceRef(result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid)
    if archive.has_instance(ref):
        outcome.already_in_archive += 1
    else:
        try:
            sr = build_sr(result, evidence, captures)
        except (ValueError, TypeError, KeyError) as exc:  # highdicom refuses a header value
            raise SRBuildError(f"cannot build the SR: {exc}") from exc
        archive.store(sr)
        if not archive.has_instance(ref):
            raise ArchiveError(f"{name}: SR {result.sop_instance_uid} was accepted but is not found in the archive")
        outcome.sent += 1
    ledger.mark_delivered(
        name,
        result.study_instance_uid,
        result.series_instance_uid,
        result.sop_instance_uid,
        result.card.name,
        result.weights_sha256,
    )
