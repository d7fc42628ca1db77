"""Fetch a night's chest radiographs from an archive into a folder ``predict`` reads.

Policy:

- **What.** Studies whose StudyDate lies in the window and whose ModalitiesInStudy
  holds CR, DX or DR (one search per modality, results merged); in them, the series
  of those modalities, and with ``body_parts`` only series whose BodyPartExamined is
  one of them or empty (predict's not-chest gate then decides on the descriptions).
- **Where.** ``OUTPUT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
  each written whole through a temporary file and a rename, in the transfer syntax the
  archive stored. UIDs come from the archive and are checked against the UID syntax
  before they become file names.
- **Only what is new.** The ledger (:mod:`.ledger`) records each instance once its file
  is in place. A study fetched completely is not searched again while the archive
  reports the same number of instances; a study with new images gets only those. A run
  killed at any moment resumes with the instance that was in flight; a file already in
  place (killed between rename and ledger) is recorded, not fetched again.
- **Failures.** The search itself failing stops the run (:class:`ArchiveError`, exit 3).
  A study that cannot be fetched is retried ``retries`` times, then listed in
  :attr:`PullResult.failures` (exit 1); the other studies go on.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from pneumobatch.core.errors import EXIT_FILE_ERRORS, EXIT_OK, ArchiveError, OptionError, OutputError
from pneumobatch.core.uids import valid_uid
from pneumobatch.io.atomicfile import atomic_write, temp_target
from pneumobatch.io.readers.dicom import CXR_MODALITIES
from pneumobatch.operations.pacs.client import InstanceRef, StudyInfo, open_archive, with_retries
from pneumobatch.operations.pacs.connection import Connection
from pneumobatch.operations.pacs.ledger import Ledger

log = logging.getLogger(__name__)

MODALITIES = tuple(sorted(CXR_MODALITIES))  # what predict reads: CR, DR, DX
#: The files a pull writes: ``<SOP Instance UID>.dcm``
_INSTANCE_FILE = re.compile(r"^[0-9.]+\.dcm$")


def default_ledger(output: Path) -> Path:
    """``OUTPUT.ledger.sqlite`` beside the folder (inside it, predict would read it)."""
    output = Path(output)
    return output.with_name(output.name + ".ledger.sqlite")


def _day(text: str, today: date) -> date:
    words = {"today": today, "yesterday": today - timedelta(days=1)}
    if text.lower() in words:
        return words[text.lower()]
    match = re.fullmatch(r"(\d+)d", text)
    if match:
        return today - timedelta(days=int(match.group(1)))
    try:
        return datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise OptionError(f"a date must be YYYYMMDD, today, yesterday or Nd (N days ago), not {text!r}") from None


def date_window(
    on: Optional[str] = None, since: Optional[str] = None, until: Optional[str] = None, today: Optional[date] = None
) -> str:
    """A DICOM date range ``YYYYMMDD-YYYYMMDD``: ``on`` one day, else ``since``..``until``
    (default yesterday..today)."""
    today = today or date.today()
    if on and (since or until):
        raise OptionError("--date is one day; do not combine it with --since/--until")
    first = _day(on or since or "yesterday", today)
    last = first if on else _day(until or "today", today)
    if last < first:
        raise OptionError(f"the date window ends ({last:%Y%m%d}) before it starts ({first:%Y%m%d})")
    return f"{first:%Y%m%d}-{last:%Y%m%d}"


@dataclass
class PullConfig:
    connection: Connection
    output: Path
    study_date: str
    modalities: tuple[str, ...] = MODALITIES
    body_parts: tuple[str, ...] = ()
    ledger: Optional[Path] = None
    retries: int = 2
    retry_wait: float = 1.0

    def __post_init__(self) -> None:
        # Modalities are searched for upper-case (DICOM code strings); none given: the radiograph ones.
        self.modalities = tuple(str(m).strip().upper() for m in self.modalities if str(m).strip()) or MODALITIES


@dataclass
class PullResult:
    archive: str
    output: Path
    ledger: Path
    studies_found: int = 0
    studies_up_to_date: int = 0
    studies_fetched: int = 0
    instances_fetched: int = 0
    instances_present: int = 0  # already fetched (ledger) or already in place
    instances_not_wanted: int = 0  # other modality or body part
    failures: list[str] = field(default_factory=list)

    study_date: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_FILE_ERRORS if self.failures else EXIT_OK

    def summary(self) -> str:
        return (
            f"{self.studies_found} studies in {self.study_date}: {self.studies_fetched} fetched "
            f"({self.instances_fetched} new instances, {self.instances_present} already here), "
            f"{self.studies_up_to_date} unchanged since the last pull, {len(self.failures)} failed; "
            f"wrote {self.output} (ledger {self.ledger})"
        )


def instance_path(output: Path, ref: InstanceRef) -> Path:
    return output / ref.study_instance_uid / ref.series_instance_uid / f"{ref.sop_instance_uid}.dcm"


def wanted(ref: InstanceRef, modalities: tuple[str, ...], body_parts: tuple[str, ...]) -> bool:
    if ref.modality.upper() not in {m.upper() for m in modalities}:
        return False
    return not body_parts or not ref.body_part or ref.body_part.upper() in {b.upper() for b in body_parts}


def _remove_stale_temps(output: Path) -> None:
    """Temporary files of a pull killed mid-write (ours by name and place); predict must not read them."""
    for path in output.glob("*/*/.*.dcm.tmp-*"):
        target = temp_target(path.name)
        if target is not None and _INSTANCE_FILE.match(target) and path.is_file():
            path.unlink(missing_ok=True)


def run_pull(config: PullConfig, progress: Optional[Callable[[InstanceRef], None]] = None) -> PullResult:
    """Fetch what is new in the window; ``progress`` is called after each instance is recorded."""
    output = Path(config.output)
    ledger_path = Path(config.ledger or default_ledger(output))
    conn = config.connection
    result = PullResult(archive=conn.name, output=output, ledger=ledger_path, study_date=config.study_date)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {output}: {exc.strerror or exc}") from exc
    _remove_stale_temps(output)
    with Ledger(ledger_path) as ledger, open_archive(conn) as archive:
        studies: dict[str, StudyInfo] = {}
        for modality in config.modalities:
            for study in archive.find_studies(config.study_date, modality):
                studies.setdefault(study.study_instance_uid, study)
        result.studies_found = len(studies)
        log.info("%s: %d studies in %s", conn.name, len(studies), config.study_date)
        for study in studies.values():
            if ledger.study_complete(conn.name, study.study_instance_uid, study.n_instances):
                result.studies_up_to_date += 1
                continue
            error = with_retries(
                partial(_pull_study, archive, ledger, study, config, result, progress),
                config.retries,
                config.retry_wait,
            )
            if error:
                result.failures.append(f"study {study.study_instance_uid}: {error}")
            else:
                result.studies_fetched += 1
    return result


def _pull_study(archive, ledger: Ledger, study: StudyInfo, config: PullConfig, result: PullResult, progress) -> None:
    name, output = config.connection.name, Path(config.output)
    done = ledger.fetched(name, study.study_instance_uid)
    todo = []
    for ref in archive.find_instances(study.study_instance_uid):
        if not wanted(ref, config.modalities, config.body_parts):
            result.instances_not_wanted += 1
            continue
        path = instance_path(output, ref)
        if ref.sop_instance_uid in done or path.is_file():
            if ref.sop_instance_uid not in done:
                ledger.mark_fetched(name, ref.study_instance_uid, ref.series_instance_uid, ref.sop_instance_uid, path)
            result.instances_present += 1
            continue
        todo.append(ref)
    for ref, ds in archive.retrieve(todo):
        if valid_uid(ds.get("SOPInstanceUID")) != ref.sop_instance_uid:
            raise ArchiveError(f"{name}: asked for instance {ref.sop_instance_uid}, got another one")
        path = instance_path(output, ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, lambda tmp, ds=ds: ds.save_as(tmp, enforce_file_format=True))
        except (ValueError, TypeError, AttributeError, KeyError) as exc:  # a malformed data set from the archive
            raise ArchiveError(f"{name}: instance {ref.sop_instance_uid} cannot be written as DICOM: {exc}") from exc
        ledger.mark_fetched(name, ref.study_instance_uid, ref.series_instance_uid, ref.sop_instance_uid, path)
        result.instances_fetched += 1
        if progress is not None:
            progress(ref)
    ledger.mark_study_complete(name, study.study_instance_uid, study.study_date, study.n_instances)
