"""DICOMweb: QIDO-RS searches, WADO-RS retrieval of each instance as stored, STOW-RS.

Searches and STOW-RS go through ``dicomweb-client``; WADO-RS is read here (one GET per
instance, its one part taken out of the multipart answer) so that an instance's size is
bounded. Every request goes through the guarded session of :mod:`.httpbounds`: a deadline per
request whatever trickles in, answers inflated here with a limit.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from http import HTTPStatus
from typing import Iterator, Sequence, Union

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from pneumobatch.core.errors import ArchiveError
from pneumobatch.operations.pacs.archive import (
    DATASET_ERRORS,
    HEADER_KEYWORDS,
    SEARCH_PAGE,
    Archive,
    BadInstance,
    InstanceRef,
    StudyInfo,
    archive_error,
    identity,
    instance_refs,
    read_instance,
    uid_of,
)
from pneumobatch.operations.pacs.connection import Connection


def _phrase(status: object) -> str:
    """The standard reason phrase of an HTTP status (not the archive's own text, untrusted)."""
    try:
        return HTTPStatus(int(status)).phrase  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


class DicomWebArchive(Archive):
    """QIDO-RS / WADO-RS / STOW-RS through ``dicomweb-client`` and one guarded ``requests``
    session (:mod:`.httpbounds`: a deadline per request, answers inflated here with a limit)."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        import requests
        from dicomweb_client.api import DICOMwebClient

        from pneumobatch.operations.pacs.httpbounds import guarded_session

        session, self._adapter = guarded_session(conn.timeout, self.budget)
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
        self._base = conn.url.rstrip("/")
        self._client = DICOMwebClient(self._base, session=session)
        self._client.set_http_retry_params(retry=False)  # ours are bounded and counted (pull, push)
        self._requests = requests

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        from pneumobatch.operations.pacs.httpbounds import AnswerRefused

        rq = self._requests
        try:
            yield
        except AnswerRefused as exc:
            raise archive_error(f"{self.conn.name}: {what} failed: {exc.reason}", exc.retriable) from None
        except rq.exceptions.SSLError:
            raise ArchiveError(
                f"{self.conn.name}: {what} failed: TLS certificate not verified (a site CA goes in --ca-bundle)"
            ) from None
        except rq.exceptions.InvalidHeader:  # its text quotes the header: our credentials
            raise archive_error(
                f"{self.conn.name}: {what} failed: a request header is not valid HTTP (check the credentials)", False
            ) from None
        except rq.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise ArchiveError(f"{self.conn.name}: {what} failed: HTTP {status} {_phrase(status)}".rstrip()) from None
        except rq.ConnectionError:
            raise ArchiveError(f"{self.conn.name}: {what} failed: cannot connect") from None
        except rq.Timeout:
            raise ArchiveError(f"{self.conn.name}: {what} failed: timed out") from None
        except (rq.RequestException, ValueError, OSError) as exc:
            raise self._fail(what, exc) from None

    def _search(self, what: str, fn, **kwargs) -> list[Dataset]:
        """All matches, page by page. Paging is ours, not ``get_remaining``: an archive that
        ignores ``offset`` (Orthanc 1.10's plugin does with filters) would repeat its first
        page for ever; a page bringing nothing new ends the search instead. Items that are
        not DICOM JSON data sets are left out and counted (:attr:`problems`); an answer that
        is not a list of them at all fails the search."""
        seen: dict[str, Dataset] = {}
        offset = 0
        while True:
            with self._call(what):
                answer = fn(limit=SEARCH_PAGE, offset=offset, **kwargs)
            if not isinstance(answer, list):
                raise ArchiveError(f"{self.conn.name}: {what} failed: the answer is not a list of DICOM JSON data sets")
            page = []
            with warnings.catch_warnings():  # pydicom's warnings would quote the archive's values
                warnings.simplefilter("ignore")
                for item in answer:
                    try:
                        page.append(Dataset.from_json(item))
                    except DATASET_ERRORS:
                        pass
            self._left_out(what, len(answer) - len(page), "not DICOM JSON data sets")
            new = {identity(d): d for d in page if identity(d) not in seen}
            seen.update(new)
            if len(answer) < SEARCH_PAGE or not new:
                return list(seen.values())
            offset += len(answer)

    def find_studies(self, study_date: str, modality: str) -> list[StudyInfo]:
        what = "QIDO-RS study search"
        found = self._search(
            what,
            self._client.search_for_studies,
            search_filters={"StudyDate": study_date, "ModalitiesInStudy": modality},
            fields=["NumberOfStudyRelatedInstances"],
        )
        return self._studies(found, what)

    def find_instances(self, study_instance_uid: str) -> list[InstanceRef]:
        refs = []
        series = self._search(
            "QIDO-RS series search",
            self._client.search_for_series,
            study_instance_uid=study_instance_uid,
            fields=["Modality", "BodyPartExamined"],
        )
        for s in series:
            series_uid = uid_of(s, "SeriesInstanceUID")
            if not series_uid:
                self._left_out("QIDO-RS series search", 1, "no valid SeriesInstanceUID")
                continue
            what = "QIDO-RS instance search"
            instances = self._search(
                what,
                self._client.search_for_instances,
                study_instance_uid=study_instance_uid,
                series_instance_uid=series_uid,
            )
            found = instance_refs(study_instance_uid, series_uid, s, instances)
            self._left_out(what, len(instances) - len(found), "no valid SOPInstanceUID")
            refs.extend(found)
        return refs

    def has_instance(self, ref: InstanceRef) -> bool:
        found = self._search(
            "QIDO-RS instance search",
            self._client.search_for_instances,
            study_instance_uid=ref.study_instance_uid,
            series_instance_uid=ref.series_instance_uid,
            search_filters={"SOPInstanceUID": ref.sop_instance_uid},
        )
        return any(uid_of(d, "SOPInstanceUID") == ref.sop_instance_uid for d in found)

    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[tuple[InstanceRef, Union[Dataset, BadInstance]]]:
        from pneumobatch.operations.pacs.httpbounds import AnswerRefused, one_part

        for ref in refs:
            what = f"WADO-RS retrieve of {ref.sop_instance_uid}"
            url = (
                f"{self._base}/studies/{ref.study_instance_uid}/series/{ref.series_instance_uid}"
                f"/instances/{ref.sop_instance_uid}"
            )
            accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'  # as stored: no transcoding
            result: Union[Dataset, BadInstance]
            try:
                with self._call(what), self._adapter.allowing(self.conn.max_instance_bytes):
                    response = self._session.get(url, headers={"Accept": accept})
                    response.raise_for_status()
                part = one_part(response.content, response.headers.get("Content-Type", ""))
                del response  # the whole answer: only the part is kept
                result = read_instance(part, ref)
            except AnswerRefused as exc:
                result = BadInstance(f"{self.conn.name}: {what} failed: {exc.reason}")
            except BadInstance as exc:
                result = BadInstance(f"{self.conn.name}: {exc}")
            except ArchiveError as exc:
                if getattr(exc, "retriable", True):
                    raise  # the archive, not this instance: the study is tried again
                result = BadInstance(str(exc))
            yield ref, result

    def header(self, ref: InstanceRef) -> Dataset:
        what = "WADO-RS metadata"
        with self._call(what):
            meta = self._client.retrieve_instance_metadata(
                ref.study_instance_uid, ref.series_instance_uid, ref.sop_instance_uid
            )
        keep = {f"{tag_for_keyword(k):08X}" for k in HEADER_KEYWORDS}  # nothing else, no bulk data
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return Dataset.from_json({tag: value for tag, value in meta.items() if str(tag).upper() in keep})
        except DATASET_ERRORS:
            raise ArchiveError(f"{self.conn.name}: {what} failed: the answer is not a DICOM JSON data set") from None

    def store(self, ds: Dataset) -> None:
        with self._call("STOW-RS store"):
            response = self._client.store_instances([ds], study_instance_uid=ds.StudyInstanceUID)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            raise ArchiveError(f"{self.conn.name}: STOW-RS refused {ds.SOPInstanceUID}")

    def close(self) -> None:
        self._session.close()
