"""One small interface over the two ways to talk to an archive.

:class:`DicomWebArchive` uses ``dicomweb-client`` (QIDO-RS searches, WADO-RS retrieval
of each instance in its stored transfer syntax, STOW-RS); :class:`DimseArchive` uses
``pynetdicom`` (C-FIND in the Study Root model, C-GET into memory, C-STORE). Both
return the same small records, so :mod:`.pull` and :mod:`.push` never see a protocol.

Every value an archive sends is untrusted: UIDs are checked against the DICOM UID
syntax before they are used (as file names among other things), and an archive's
error text is never quoted back with our credentials in it (:meth:`Connection.scrub`).
Failures become :class:`~pneumobatch.core.errors.ArchiveError` with a one-line message.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pneumobatch.core.errors import ArchiveError
from pneumobatch.core.uids import valid_uid
from pneumobatch.io.readers.dicom import CODECS
from pneumobatch.operations.pacs.connection import Connection

log = logging.getLogger(__name__)

#: Image storage SOP classes a chest radiograph arrives in (C-GET must propose them).
IMAGE_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)
#: Transfer syntaxes C-GET accepts: the uncompressed ones and every one predict decodes.
RECEIVED_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    *CODECS,
)
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


def _identity(ds: Dataset) -> str:
    """The UID a search answer is about (instance, else series, else study)."""
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if keyword in ds:
            return str(ds.get(keyword))
    return repr(ds)


def with_retries(action: Callable[[], None], retries: int, wait: float) -> Optional[str]:
    """Run ``action``; an :class:`ArchiveError` is retried ``retries`` times after waits
    of ``wait``, 2 ``wait``, 4 ``wait``... (not when it says ``retriable = False``).
    Returns None on success, else the last error's message."""
    for attempt in range(retries + 1):
        try:
            action()
            return None
        except ArchiveError as exc:
            if attempt == retries or not getattr(exc, "retriable", True):
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


def _int(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _instance_refs(study_instance_uid: str, series_uid: str, series: Any, instances: Any) -> list[InstanceRef]:
    """The instances of one series the archive listed, those with a valid SOP Instance UID."""
    return [
        InstanceRef(
            study_instance_uid, series_uid, sop, _ds_value(series, "Modality"), _ds_value(series, "BodyPartExamined")
        )
        for sop in (valid_uid(i.get("SOPInstanceUID")) for i in instances)
        if sop
    ]


def _ds_value(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        value = "\\".join(str(v) for v in value)
    return str(value or "").strip()


class Archive:
    """The operations :mod:`.pull` and :mod:`.push` need; see the two implementations."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _fail(self, what: str, exc: BaseException) -> ArchiveError:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ArchiveError(self.conn.scrub(f"{self.conn.name}: {what} failed: {detail[:300]}"))

    # queries
    def find_studies(self, study_date: str, modality: str) -> list[StudyInfo]:
        raise NotImplementedError

    def find_instances(self, study_instance_uid: str) -> list[InstanceRef]:
        raise NotImplementedError

    def has_instance(self, ref: InstanceRef) -> bool:
        raise NotImplementedError

    # transfers
    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[tuple[InstanceRef, Dataset]]:
        """Each instance with its file meta, in its stored transfer syntax, as it arrives."""
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
        uid = valid_uid(ds.get("StudyInstanceUID"))
        if not uid:
            return None
        return StudyInfo(uid, _ds_value(ds, "StudyDate"), _int(ds.get("NumberOfStudyRelatedInstances")))


def open_archive(conn: Connection) -> Archive:
    """The archive client for ``conn``'s protocol."""
    return DicomWebArchive(conn) if conn.protocol == "dicomweb" else DimseArchive(conn)


# ---------------------------------------------------------------------------- DICOMweb


class DicomWebArchive(Archive):
    """QIDO-RS / WADO-RS / STOW-RS through ``dicomweb-client`` and one ``requests`` session."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        import requests
        from dicomweb_client.api import DICOMwebClient
        from requests.adapters import HTTPAdapter

        class TimeoutAdapter(HTTPAdapter):  # requests has no session-wide timeout: a hung archive would hang the night
            def send(self, request, **kwargs):
                kwargs["timeout"] = kwargs.get("timeout") or conn.timeout
                return super().send(request, **kwargs)

        session = requests.Session()
        for scheme in ("http://", "https://"):
            session.mount(scheme, TimeoutAdapter())
        session.verify = conn.ca_bundle or conn.tls_verify
        creds = conn.credentials
        if creds.token:
            session.headers["Authorization"] = f"Bearer {creds.token}"
        elif creds.username:
            session.auth = (
                creds.username.encode("utf-8"),
                creds.password.encode("utf-8"),
            )  # requests would try latin-1
        self._session = session
        self._client = DICOMwebClient(conn.url.rstrip("/"), session=session)
        self._client.set_http_retry_params(retry=False)  # ours are bounded and counted (pull, push)
        self._requests = requests

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        rq = self._requests
        try:
            yield
        except rq.exceptions.SSLError:
            raise ArchiveError(
                f"{self.conn.name}: {what} failed: TLS certificate not verified (a site CA goes in --ca-bundle)"
            ) from None
        except rq.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            reason = exc.response.reason if exc.response is not None else ""
            raise ArchiveError(f"{self.conn.name}: {what} failed: HTTP {status} {reason}".rstrip()) from None
        except rq.ConnectionError:
            raise ArchiveError(f"{self.conn.name}: {what} failed: cannot connect") from None
        except rq.Timeout:
            raise ArchiveError(f"{self.conn.name}: {what} failed: timed out") from None
        except (rq.RequestException, ValueError, OSError) as exc:
            raise self._fail(what, exc) from None

    def _search(self, what: str, fn, **kwargs) -> list[Dataset]:
        """All matches, page by page. Paging is ours, not ``get_remaining``: an archive that
        ignores ``offset`` (Orthanc 1.10's plugin does with filters) would repeat its first
        page for ever; a page bringing nothing new ends the search instead."""
        seen: dict[str, Dataset] = {}
        offset = 0
        while True:
            with self._call(what):
                page = [Dataset.from_json(item) for item in fn(limit=SEARCH_PAGE, offset=offset, **kwargs)]
            new = {_identity(d): d for d in page if _identity(d) not in seen}
            seen.update(new)
            if len(page) < SEARCH_PAGE or not new:
                return list(seen.values())
            offset += len(page)

    def find_studies(self, study_date: str, modality: str) -> list[StudyInfo]:
        found = self._search(
            "QIDO-RS study search",
            self._client.search_for_studies,
            search_filters={"StudyDate": study_date, "ModalitiesInStudy": modality},
            fields=["NumberOfStudyRelatedInstances"],
        )
        return [s for s in map(self._study, found) if s is not None]

    def find_instances(self, study_instance_uid: str) -> list[InstanceRef]:
        refs = []
        series = self._search(
            "QIDO-RS series search",
            self._client.search_for_series,
            study_instance_uid=study_instance_uid,
            fields=["Modality", "BodyPartExamined"],
        )
        for s in series:
            series_uid = valid_uid(s.get("SeriesInstanceUID"))
            if not series_uid:
                continue
            instances = self._search(
                "QIDO-RS instance search",
                self._client.search_for_instances,
                study_instance_uid=study_instance_uid,
                series_instance_uid=series_uid,
            )
            refs.extend(_instance_refs(study_instance_uid, series_uid, s, instances))
        return refs

    def has_instance(self, ref: InstanceRef) -> bool:
        found = self._search(
            "QIDO-RS instance search",
            self._client.search_for_instances,
            study_instance_uid=ref.study_instance_uid,
            series_instance_uid=ref.series_instance_uid,
            search_filters={"SOPInstanceUID": ref.sop_instance_uid},
        )
        return any(valid_uid(d.get("SOPInstanceUID")) == ref.sop_instance_uid for d in found)

    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[tuple[InstanceRef, Dataset]]:
        for ref in refs:
            with self._call("WADO-RS retrieve"):
                ds = self._client.retrieve_instance(
                    ref.study_instance_uid,
                    ref.series_instance_uid,
                    ref.sop_instance_uid,
                    media_types=(("application/dicom", "*"),),  # as stored: no transcoding
                )
            yield ref, ds

    def header(self, ref: InstanceRef) -> Dataset:
        with self._call("WADO-RS metadata"):
            meta = self._client.retrieve_instance_metadata(
                ref.study_instance_uid, ref.series_instance_uid, ref.sop_instance_uid
            )
            keep = {f"{tag_for_keyword(k):08X}" for k in HEADER_KEYWORDS}  # nothing else, no bulk data
            return Dataset.from_json({tag: value for tag, value in meta.items() if tag.upper() in keep})

    def store(self, ds: Dataset) -> None:
        with self._call("STOW-RS store"):
            response = self._client.store_instances([ds], study_instance_uid=ds.StudyInstanceUID)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            raise ArchiveError(f"{self.conn.name}: STOW-RS refused {ds.SOPInstanceUID}")

    def close(self) -> None:
        self._session.close()


# ------------------------------------------------------------------------------- DIMSE


class DimseArchive(Archive):
    """C-FIND / C-GET / C-STORE through ``pynetdicom``, one association per operation group."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        from pynetdicom import AE

        self._AE = AE

    @contextmanager
    def _association(
        self, what: str, contexts: Sequence[tuple[str, Sequence[str]]], roles=(), handlers=()
    ) -> Iterator[Any]:
        ae = self._AE(ae_title=self.conn.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.conn.timeout
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, list(syntaxes))
        try:
            assoc = ae.associate(
                self.conn.host,
                self.conn.port,
                ae_title=self.conn.called_ae,
                ext_neg=list(roles),
                evt_handlers=list(handlers),
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise self._fail(what, exc) from None
        if not assoc.is_established:
            if assoc.is_rejected:
                reason = f"association rejected (check the AE titles and that the archive knows {self.conn.calling_ae})"
            else:
                reason = f"no association: cannot connect, or the archive aborted (check host, port and that it knows {self.conn.calling_ae})"
            raise ArchiveError(f"{self.conn.name}: {what} failed: {reason}")
        try:
            yield assoc
        finally:
            assoc.release()

    def _find(self, level: str, keys: dict[str, Any], what: str) -> list[Dataset]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        answers = []
        with self._association(what, [(FIND, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as assoc:
            for status, identifier in assoc.send_c_find(query, FIND):
                code = getattr(status, "Status", None)
                if code is None:
                    raise ArchiveError(f"{self.conn.name}: {what} failed: no answer (timeout or aborted)")
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    answers.append(identifier)
                elif code != 0x0000:
                    raise ArchiveError(f"{self.conn.name}: {what} failed: status 0x{code:04X}")
        return answers

    def find_studies(self, study_date: str, modality: str) -> list[StudyInfo]:
        found = self._find(
            "STUDY",
            {
                "StudyDate": study_date,
                "ModalitiesInStudy": modality,
                "StudyInstanceUID": "",
                "NumberOfStudyRelatedInstances": "",
            },
            "C-FIND studies",
        )
        return [s for s in map(self._study, found) if s is not None]

    def find_instances(self, study_instance_uid: str) -> list[InstanceRef]:
        refs = []
        series = self._find(
            "SERIES",
            {"StudyInstanceUID": study_instance_uid, "SeriesInstanceUID": "", "Modality": "", "BodyPartExamined": ""},
            "C-FIND series",
        )
        for s in series:
            series_uid = valid_uid(s.get("SeriesInstanceUID"))
            if not series_uid:
                continue
            instances = self._find(
                "IMAGE",
                {"StudyInstanceUID": study_instance_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": ""},
                "C-FIND instances",
            )
            refs.extend(_instance_refs(study_instance_uid, series_uid, s, instances))
        return refs

    def _image_keys(self, ref: InstanceRef) -> dict[str, Any]:
        return {
            "StudyInstanceUID": ref.study_instance_uid,
            "SeriesInstanceUID": ref.series_instance_uid,
            "SOPInstanceUID": ref.sop_instance_uid,
        }

    def has_instance(self, ref: InstanceRef) -> bool:
        found = self._find("IMAGE", self._image_keys(ref), "C-FIND instance")
        return any(valid_uid(d.get("SOPInstanceUID")) == ref.sop_instance_uid for d in found)

    def header(self, ref: InstanceRef) -> Dataset:
        keys = dict(self._image_keys(ref), **{k: "" for k in HEADER_KEYWORDS if k != "SpecificCharacterSet"})
        found = self._find("IMAGE", keys, "C-FIND instance header")
        if not found:
            raise ArchiveError(f"{self.conn.name}: instance {ref.sop_instance_uid} not found")
        return found[0]

    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[tuple[InstanceRef, Dataset]]:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        received: list[Dataset] = []

        def on_store(event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            received.append(ds)
            return 0x0000

        # one context per (class, transfer syntax predict decodes): the archive sends each
        # image as stored, without transcoding (4 classes x 16 syntaxes: within the 128 allowed)
        contexts = [(GET, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        contexts += [(cls, [ts]) for cls in IMAGE_STORAGE_CLASSES for ts in RECEIVED_SYNTAXES]
        roles = [build_role(cls, scp_role=True) for cls in IMAGE_STORAGE_CLASSES]
        if not refs:
            return
        with self._association("C-GET", contexts, roles, [(evt.EVT_C_STORE, on_store)]) as assoc:
            for ref in refs:
                received.clear()
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                for keyword, value in self._image_keys(ref).items():
                    setattr(query, keyword, value)
                final = None
                for status, _identifier in assoc.send_c_get(query, GET):
                    final = getattr(status, "Status", None)
                    if final is None:
                        raise ArchiveError(f"{self.conn.name}: C-GET failed: no answer (timeout or aborted)")
                got = [d for d in received if valid_uid(d.get("SOPInstanceUID")) == ref.sop_instance_uid]
                if final not in (0x0000,) or not got:
                    raise ArchiveError(
                        f"{self.conn.name}: C-GET of {ref.sop_instance_uid} failed: status 0x{final or 0:04X}"
                    )
                yield ref, got[0]

    def store(self, ds: Dataset) -> None:
        syntax = ds.file_meta.TransferSyntaxUID
        with self._association("C-STORE", [(ds.SOPClassUID, [syntax])]) as assoc:
            status = assoc.send_c_store(ds)
        code = getattr(status, "Status", None)
        if code is None:
            raise ArchiveError(f"{self.conn.name}: C-STORE of {ds.SOPInstanceUID} failed: no answer")
        if code not in (0x0000, 0xB000, 0xB007, 0xB006):
            raise ArchiveError(f"{self.conn.name}: C-STORE of {ds.SOPInstanceUID} failed: status 0x{code:04X}")
