"""What the two archive clients share: the records, the interface, the failure types.

:class:`Archive` is what :mod:`.pull` and :mod:`.push` talk to; :mod:`.dicomweb` and
:mod:`.dimse` implement it, :func:`~.client.open_archive` picks one. Every value an
archive sends is untrusted: UIDs are checked against the DICOM UID syntax before they are
used (as file names among other things); search answers that are not data sets with a
valid UID are left out and noted in :attr:`Archive.problems`; an instance that arrives
unusable is a :class:`BadInstance`, one failed instance and not a failed night.
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pneumobatch.core.errors import ArchiveError
from pneumobatch.core.uids import valid_uid
from pneumobatch.operations.pacs.connection import Connection

log = logging.getLogger(__name__)

#: Attributes of the patient and study modules that an SR copies from its source images.
HEADER_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "SOPClassUID",
    "SpecificCharacterSet",
)


#: Results asked for per QIDO-RS request.
SEARCH_PAGE = 500


def identity(ds: Dataset) -> str:
    """The UID a search answer is about (instance, else series, else study)."""
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if keyword in ds:
            return uid_of(ds, keyword) or f"invalid {keyword} {id(ds)}"
    return f"no UID {id(ds)}"


def archive_error(message: str, retriable: bool = True) -> ArchiveError:
    """An :class:`ArchiveError`; ``retriable=False`` when asking again cannot help."""
    error = ArchiveError(message)
    error.retriable = retriable
    return error


class BadInstance(ArchiveError):
    """One instance arrived unusable (not DICOM, too large, another one): that instance
    fails, the others go on. Asking again the same night does not help."""

    retriable = False


#: What a data set read from an archive may raise (pydicom converts values lazily).
DATASET_ERRORS = (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, IndexError, EOFError, OSError)


def with_retries(
    action: Callable[[], None], retries: int, wait: float, after_failure: Optional[Callable[[], None]] = None
) -> Optional[str]:
    """Run ``action``; an :class:`ArchiveError` is retried ``retries`` times after waits
    of ``wait``, 2 ``wait``, 4 ``wait``... (not when it says ``retriable = False``).
    ``after_failure`` runs after each retriable failure and may raise to stop at once (push
    probes the archive there: an archive that is itself unusable ends the run, exit 3).
    Returns None on success, else the last error's message."""
    for attempt in range(retries + 1):
        try:
            action()
            return None
        except ArchiveError as exc:
            if not getattr(exc, "retriable", True):
                return str(exc)
            if after_failure is not None:
                after_failure()
            if attempt == retries:
                return str(exc)  # the caller lists it (stderr, exit 1)
            log.info("retrying in %gs: %s", wait * 2**attempt, exc)
            time.sleep(wait * 2**attempt)
    return None  # pragma: no cover - the loop always returns


@dataclass(frozen=True)
class StudyInfo:
    """A study the archive has; ``n_instances`` as it reports (None when it does not)."""

    study_instance_uid: str
    study_date: str
    n_instances: Optional[int]


@dataclass(frozen=True)
class InstanceRef:
    """One instance in the archive, with its series' modality and body part."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str = ""
    body_part: str = ""


def as_int(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def instance_refs(study_instance_uid: str, series_uid: str, series: Any, instances: Any) -> list[InstanceRef]:
    """The instances of one series the archive listed, those with a valid SOP Instance UID."""
    try:
        modality, body_part = ds_value(series, "Modality"), ds_value(series, "BodyPartExamined")
    except DATASET_ERRORS:
        return []
    return [
        InstanceRef(study_instance_uid, series_uid, sop, modality, body_part)
        for sop in (uid_of(i, "SOPInstanceUID") for i in instances)
        if sop
    ]


def read_instance(data: bytes, ref: InstanceRef) -> Dataset:
    """The instance in ``data`` (a DICOM file), which must be the one ``ref`` names;
    :class:`BadInstance` otherwise (never quoting what the archive sent)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(BytesIO(data))
            got = valid_uid(ds.get("SOPInstanceUID"))
    except DATASET_ERRORS:
        raise BadInstance(f"instance {ref.sop_instance_uid}: the archive sent something that is not DICOM") from None
    if got != ref.sop_instance_uid:
        raise BadInstance(f"instance {ref.sop_instance_uid}: the archive sent another instance")
    return ds


def uid_of(ds: Dataset, keyword: str) -> str:
    """A valid UID from a search answer, else empty (also when pydicom cannot convert the value)."""
    try:
        return valid_uid(ds.get(keyword))
    except DATASET_ERRORS:
        return ""


def ds_value(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        value = "\\".join(str(v) for v in value)
    return str(value or "").strip()


class Archive:
    """The operations :mod:`.pull` and :mod:`.push` need; see the two implementations."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.problems: list[str] = []  # search answers left out, since the last take_problems()
        self._until: Optional[float] = None

    def _fail(self, what: str, exc: BaseException) -> ArchiveError:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ArchiveError(self.conn.scrub(f"{self.conn.name}: {what} failed: {detail[:300]}"))

    def take_problems(self) -> list[str]:
        """The notes on answers left out since the last call (and forget them)."""
        problems, self.problems = self.problems, []
        return problems

    def _left_out(self, what: str, n: int, why: str) -> None:
        if n:
            self.problems.append(f"{self.conn.name}: {what}: {n} answer{'s' * (n != 1)} left out ({why})")

    @contextmanager
    def until(self, moment: float) -> Iterator[None]:
        """Requests inside the block end by ``moment`` (``time.monotonic()``) at the latest."""
        before, self._until = self._until, moment
        try:
            yield
        finally:
            self._until = before

    def budget(self) -> float:
        """Seconds the next request may take: the deadline, or less when the block of
        :meth:`until` ends sooner (0 or less: no time left)."""
        seconds = self.conn.deadline
        if self._until is not None:
            seconds = min(seconds, self._until - time.monotonic())
        return seconds

    def _studies(self, found: list[Dataset], what: str) -> list[StudyInfo]:
        studies = [s for s in map(self._study, found) if s is not None]
        self._left_out(what, len(found) - len(studies), "no valid StudyInstanceUID")
        return studies

    # queries
    def find_studies(self, study_date: str, modality: str) -> list[StudyInfo]:
        raise NotImplementedError

    def find_instances(self, study_instance_uid: str) -> list[InstanceRef]:
        raise NotImplementedError

    def has_instance(self, ref: InstanceRef) -> bool:
        raise NotImplementedError

    # transfers
    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[tuple[InstanceRef, Union[Dataset, BadInstance]]]:
        """Each instance with its file meta, in its stored transfer syntax, as it arrives;
        a :class:`BadInstance` in place of one that arrived unusable."""
        raise NotImplementedError

    def header(self, ref: InstanceRef) -> Dataset:
        """The patient and study attributes (:data:`HEADER_KEYWORDS`) of one instance."""
        raise NotImplementedError

    def store(self, ds: Dataset) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _study(ds: Dataset) -> Optional[StudyInfo]:
        try:
            uid = valid_uid(ds.get("StudyInstanceUID"))
            if not uid:
                return None
            return StudyInfo(uid, ds_value(ds, "StudyDate"), as_int(ds.get("NumberOfStudyRelatedInstances")))
        except DATASET_ERRORS:  # a value pydicom cannot convert
            return None
