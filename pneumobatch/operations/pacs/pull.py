"""Fetch a night's chest radiographs from an archive into a folder ``predict`` reads.

Policy:

- **What.** Studies whose StudyDate lies in the window and whose ModalitiesInStudy
  holds CR, DX or DR (one search per modality, results merged); in them, the series
  of those modalities, and with ``body_parts`` only series whose BodyPartExamined is
  one of them or empty (predict's not-chest gate then decides on the descriptions).
- **Where.** ``OUTPUT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
  each written whole through a temporary file and a rename, in the transfer syntax the
  archive stored. UIDs come from the archive and are checked against the UID syntax
  before they become file names. Nothing is written through a link: a study or series
  folder that is a symbolic link fails its instances (never followed out of OUTPUT),
  and a link where an instance belongs is not that instance (it is fetched, and the
  rename replaces the link).
- **Only what is new.** The ledger (:mod:`.ledger`) records each instance once its file
  is in place. A study fetched completely is not searched again while the archive
  reports the same number of instances; a study with new images gets only those. A run
  killed at any moment resumes with the instance that was in flight; a file already in
  place (killed between rename and ledger) is recorded, not fetched again.
- **Failures.** The search itself failing stops the run (:class:`ArchiveError`, exit 3).
  A study that cannot be fetched is retried ``retries`` times, then listed in
  :attr:`PullResult.failures` (exit 1); the other studies go on. An instance that
  arrives unusable (not DICOM, larger than the limit, another instance) fails alone: it
  is listed, the rest of its study and the night go on, and its study is not marked
  complete, so the next night asks for it again. Search answers the archive garbled are
  listed the same way.
- **Time.** Each request ends within the connection's deadline (``--request-timeout``),
  and a study, retries included, within ``study_timeout`` seconds (``--study-timeout``):
  an archive trickling a byte every 20 s cannot hold the night.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Callable, Optional

from pneumobatch.core.errors import EXIT_FILE_ERRORS, EXIT_OK, OptionError, OutputError
from pneumobatch.io.atomicfile import atomic_write
from pneumobatch.io.readers.dicom import CXR_MODALITIES
from pneumobatch.operations.pacs.archive import (
    Archive,
    BadInstance,
    InstanceRef,
    StudyInfo,
    archive_error,
    with_retries,
)
from pneumobatch.operations.pacs.client import open_archive
from pneumobatch.operations.pacs.connection import Connection
from pneumobatch.operations.pacs.ledger import Ledger
from pneumobatch.operations.pacs.spool import instance_folder as _instance_folder
from pneumobatch.operations.pacs.spool import instance_path, remove_stale_temps
from pneumobatch.operations.pacs.spool import path_kind as _kind

log = logging.getLogger(__name__)

MODALITIES = tuple(sorted(CXR_MODALITIES))  # what predict reads: CR, DR, DX
#: Seconds one study may take, retries included.
DEFAULT_STUDY_TIMEOUT = 900.0


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
        try:
            return today - timedelta(days=int(match.group(1)))
        except OverflowError:  # before year 1, or more days than a timedelta holds
            raise OptionError(f"a date of {match.group(1)[:12]} days ago is before the calendar starts") from None
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
    study_timeout: float = DEFAULT_STUDY_TIMEOUT

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
    instances_failed: int = 0  # arrived unusable, or could not be written
    studies_failed: int = 0
    failures: list[str] = field(default_factory=list)

    study_date: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_FILE_ERRORS if self.failures else EXIT_OK

    def summary(self) -> str:
        return (
            f"{self.studies_found} studies in {self.study_date}: {self.studies_fetched} fetched "
            f"({self.instances_fetched} new instances, {self.instances_present} already here"
            f"{f', {self.instances_failed} failed' if self.instances_failed else ''}), "
            f"{self.studies_up_to_date} unchanged since the last pull, {self.studies_failed} failed; "
            f"wrote {self.output} (ledger {self.ledger})"
        )


def wanted(ref: InstanceRef, modalities: tuple[str, ...], body_parts: tuple[str, ...]) -> bool:
    if ref.modality.upper() not in {m.upper() for m in modalities}:
        return False
    return not body_parts or not ref.body_part or ref.body_part.upper() in {b.upper() for b in body_parts}


def _write_instance(output: Path, ref: InstanceRef, ds) -> str:
    """Write one instance in place; "" when done, else why this instance was not written."""
    folder, why = _instance_folder(output, ref)
    if why:
        return f"instance {ref.sop_instance_uid} not written: {why}"
    path = folder / f"{ref.sop_instance_uid}.dcm"
    if _kind(path) == "folder":
        return f"instance {ref.sop_instance_uid} not written: {path} is a folder"
    try:  # a link or a special file under the name is replaced by the rename, never written through
        atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as exc:  # malformed data set
        return f"instance {ref.sop_instance_uid} cannot be written as DICOM ({type(exc).__name__})"
    return ""


@dataclass
class _Attempt:
    """What one attempt at a study found; only the last attempt's counts are kept."""

    present: int = 0
    not_wanted: int = 0
    bad: list[str] = field(default_factory=list)  # instances that failed, answers left out
    bad_instances: int = 0


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
    with Ledger(ledger_path) as ledger, open_archive(conn) as archive:
        remove_stale_temps(output)  # only once the ledger is ours: another pull's files in flight are its own
        studies: dict[str, StudyInfo] = {}
        for modality in config.modalities:
            for study in archive.find_studies(config.study_date, modality):
                studies.setdefault(study.study_instance_uid, study)
        result.failures.extend(archive.take_problems())
        result.studies_found = len(studies)
        log.info("%s: %d studies in %s", conn.name, len(studies), config.study_date)
        for study in studies.values():
            if ledger.study_complete(conn.name, study.study_instance_uid, study.n_instances):
                result.studies_up_to_date += 1
                continue
            _fetch_study(archive, ledger, study, config, result, progress)
    return result


def _fetch_study(archive: Archive, ledger: Ledger, study: StudyInfo, config: PullConfig, result: PullResult, progress):
    """One study, retried while its time lasts; its failures go to ``result``."""
    attempt = _Attempt()
    fetched_now: set[str] = set()
    until = time.monotonic() + config.study_timeout

    def once() -> None:
        nonlocal attempt
        if time.monotonic() >= until:
            raise archive_error(
                f"not finished within {config.study_timeout:g} s (--study-timeout); "
                "what was fetched is kept and the next run goes on",
                retriable=False,
            )
        attempt = _Attempt()
        _pull_study(archive, ledger, study, config, result, progress, attempt, fetched_now)

    with archive.until(until):
        error = with_retries(once, config.retries, config.retry_wait)
    result.instances_present += attempt.present
    result.instances_not_wanted += attempt.not_wanted
    result.instances_failed += attempt.bad_instances
    uid = study.study_instance_uid
    result.failures.extend(f"study {uid}: {problem}" for problem in attempt.bad)
    if error:
        result.failures.append(f"study {uid}: {error}")
    if error or attempt.bad:
        result.studies_failed += 1
    else:
        result.studies_fetched += 1


def _pull_study(
    archive: Archive,
    ledger: Ledger,
    study: StudyInfo,
    config: PullConfig,
    result: PullResult,
    progress,
    attempt: _Attempt,
    fetched_now: set[str],
) -> None:
    name, output = config.connection.name, Path(config.output)
    done = ledger.fetched(name, study.study_instance_uid)
    refs = archive.find_instances(study.study_instance_uid)
    attempt.bad.extend(archive.take_problems())
    todo = []
    for ref in refs:
        if not wanted(ref, config.modalities, config.body_parts):
            attempt.not_wanted += 1
            continue
        path = instance_path(output, ref)
        kind = _kind(path)
        if kind == "link" or "link" in (_kind(path.parent), _kind(path.parent.parent)):
            todo.append(
                ref
            )  # a link is not an instance: fetched (the rename replaces it), or failed if a folder is one
        elif ref.sop_instance_uid in done or kind == "file":
            if ref.sop_instance_uid not in done:  # in place (killed between rename and ledger)
                ledger.mark_fetched(name, ref.study_instance_uid, ref.series_instance_uid, ref.sop_instance_uid, path)
            if ref.sop_instance_uid not in fetched_now:  # fetched by an earlier attempt: counted there
                attempt.present += 1
        else:
            todo.append(ref)
    for ref, got in archive.retrieve(todo):
        problem = str(got) if isinstance(got, BadInstance) else _write_instance(output, ref, got)
        if problem:
            attempt.bad.append(problem)
            attempt.bad_instances += 1
            continue
        path = instance_path(output, ref)
        ledger.mark_fetched(name, ref.study_instance_uid, ref.series_instance_uid, ref.sop_instance_uid, path)
        fetched_now.add(ref.sop_instance_uid)
        result.instances_fetched += 1
        if progress is not None:
            progress(ref)
    if not attempt.bad:  # a study with a failed instance is asked for again next time
        ledger.mark_study_complete(name, study.study_instance_uid, study.study_date, study.n_instances)
