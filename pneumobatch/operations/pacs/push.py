"""Write predict's results back to an archive: one SR per study and model, verified.

Policy:

- **What.** Every study with at least one predicted (``ok``) DICOM image in the
  predictions CSV, for every model in it (or those asked for): one SR
  (:mod:`.sr`). Rows without a Study/SOP Instance UID (PNG, JPEG) cannot be sent and
  are counted. The models' cards come from ``OUT.run.json`` beside the CSV (else from
  the CSV's own columns).
- **Source headers.** The patient and study modules are copied from the source DICOM
  files (``source``: the folder predict read, joined with the CSV's ``path``); an image
  whose file is not there has its header fetched from the archive (WADO-RS metadata or
  C-FIND). The CSV itself holds UIDs, never patient data.
- **Exactly once.** An SR's UID follows from the study, the weights and the result
  (:mod:`.sr`). The ledger skips SRs already delivered; an SR the archive already holds
  (a lost ledger) is recorded without being sent; either way the archive ends with one
  SR per study, model and result.
- **Verified.** After STOW-RS or C-STORE the SR is searched for (QIDO-RS or C-FIND);
  only then is it marked delivered. A failure is retried ``retries`` times with a
  growing wait, then listed in :attr:`PushResult.failures` (exit 1), never dropped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import EXIT_FILE_ERRORS, EXIT_OK, ArchiveError, OptionError, Status
from pneumobatch.core.uids import valid_uid
from pneumobatch.io.discovery import unescape_path
from pneumobatch.io.predictions import OutputPaths
from pneumobatch.operations.pacs.client import Archive, InstanceRef, open_archive, with_retries
from pneumobatch.operations.pacs.connection import Connection
from pneumobatch.operations.pacs.ledger import Ledger
from pneumobatch.operations.pacs.sr import ImageResult, StudyResult, build_sr, evidence_dataset

log = logging.getLogger(__name__)


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


@dataclass
class PushResult:
    archive: str
    ledger: Path
    studies: int = 0  # (study, model) pairs with a predicted DICOM image
    sent: int = 0  # SRs stored and verified this run
    already_delivered: int = 0  # in the ledger: not sent again
    already_in_archive: int = 0  # the archive had it (same UID): recorded, not sent
    rows_without_uid: int = 0  # predicted rows that are not DICOM (PNG/JPEG)
    sop_instance_uids: list[str] = field(default_factory=list)  # every SR of this run's results
    failures: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_FILE_ERRORS if self.failures else EXIT_OK

    def summary(self) -> str:
        return (
            f"{self.studies} SRs (study x model): {self.sent} sent and verified, "
            f"{self.already_delivered} delivered before, {self.already_in_archive} already in the archive, "
            f"{len(self.failures)} failed; {self.rows_without_uid} predicted rows without DICOM UIDs; "
            f"ledger {self.ledger}"
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


def study_results(frame: pd.DataFrame, cards: dict[str, ModelCard]) -> tuple[list[StudyResult], int]:
    """One :class:`StudyResult` per (study, model) with predicted DICOM images, and the
    number of predicted rows that have no UIDs."""
    ok = frame[frame["status"].astype(str) == Status.OK.value]
    uids = {
        c: ok[c].map(valid_uid) if c in ok else pd.Series("", index=ok.index)
        for c in ("study_instance_uid", "series_instance_uid", "sop_instance_uid")
    }
    has_uids = (
        (uids["study_instance_uid"] != "") & (uids["sop_instance_uid"] != "") & (uids["series_instance_uid"] != "")
    )
    results = []
    for (study, model), rows in ok[has_uids].groupby([uids["study_instance_uid"][has_uids], "model"], sort=True):
        card = cards[str(model)]
        images = {}
        for _, row in rows.iterrows():
            probs = tuple((c, _float(row.get(card.prob_column(c)))) for c in card.classes)
            if any(p is None for _, p in probs):
                continue
            sop = valid_uid(row["sop_instance_uid"])
            images[sop] = ImageResult(
                sop_instance_uid=sop,
                series_instance_uid=valid_uid(row["series_instance_uid"]),
                probs=probs,  # type: ignore[arg-type]
                pred_label=str(row.get("pred_label", "")),
                threshold=_float(row.get("threshold")) if card.binary else None,
                operating_point=str(row.get("operating_point", "") or ("pooled" if card.binary else "argmax")),
                path=str(row.get("path", "")),
            )
        if images:
            results.append(StudyResult(str(study), card, tuple(images.values())))
    return results, int((~has_uids).sum())


def _source_header(source: Optional[Path], image: ImageResult) -> Optional[Dataset]:
    if source is None or not image.path:
        return None
    path = Path(source) / unescape_path(image.path)
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError, TypeError, AttributeError):
        return None
    return ds if valid_uid(ds.get("SOPInstanceUID")) == image.sop_instance_uid else None


def _evidence(archive: Archive, result: StudyResult, source: Optional[Path]) -> dict[str, Dataset]:
    evidence = {}
    for image in result.images:
        header = _source_header(source, image)
        if header is None:
            header = archive.header(
                InstanceRef(result.study_instance_uid, image.series_instance_uid, image.sop_instance_uid)
            )
        evidence[image.sop_instance_uid] = evidence_dataset(
            header, result.study_instance_uid, image.series_instance_uid, image.sop_instance_uid
        )
    return evidence


def run_push(config: PushConfig, progress: Optional[Callable[[StudyResult], None]] = None) -> PushResult:
    """Build, send, verify and record the SRs of a predictions CSV."""
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
    results, without_uid = study_results(frame, cards)
    conn = config.connection
    ledger_path = Path(config.ledger or default_ledger(config.predictions))
    outcome = PushResult(archive=conn.name, ledger=ledger_path, studies=len(results), rows_without_uid=without_uid)
    with Ledger(ledger_path) as ledger, open_archive(conn) as archive:
        for result in results:
            outcome.sop_instance_uids.append(result.sop_instance_uid)
            if ledger.is_delivered(conn.name, result.sop_instance_uid):
                outcome.already_delivered += 1
                continue
            error = with_retries(
                partial(_deliver, archive, ledger, result, config, outcome), config.retries, config.retry_wait
            )
            if error:
                outcome.failures.append(f"study {result.study_instance_uid}, model {result.card.name}: {error}")
            if progress is not None:
                progress(result)
    return outcome


def _deliver(archive: Archive, ledger: Ledger, result: StudyResult, config: PushConfig, outcome: PushResult) -> None:
    name = config.connection.name
    ref = InstanceRef(result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid)
    if archive.has_instance(ref):
        outcome.already_in_archive += 1
    else:
        evidence = _evidence(archive, result, config.source)
        try:
            sr = build_sr(result, evidence)
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
