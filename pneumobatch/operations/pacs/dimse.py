"""DIMSE: C-FIND in the Study Root model, C-GET into memory, C-STORE (``pynetdicom``).

Each request waits for each answer only as long as is left of its deadline (a pending
answer every 30 s does not keep a search alive), in waits a signal ends at once; an
association interrupted by an error or a signal is aborted, never released (a release
would wait for the archive to finish what it is doing).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, Union

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pneumobatch.core.errors import ArchiveError
from pneumobatch.io.readers.dicom import CODECS
from pneumobatch.operations.pacs.archive import (
    DATASET_ERRORS,
    HEADER_KEYWORDS,
    Archive,
    BadInstance,
    InstanceRef,
    StudyInfo,
    archive_error,
    instance_refs,
    uid_of,
)
from pneumobatch.operations.pacs.connection import Connection

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
        seconds = self.budget()
        if seconds <= 0:
            raise archive_error(f"{self.conn.name}: {what} not started: no time left", False)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = min(self.conn.timeout, seconds)
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
        except BaseException:  # an error or a signal mid-exchange: a release would wait for the archive
            assoc.abort()
            raise
        assoc.release()

    def _answers(self, assoc: Any, responses: Iterator[tuple[Any, Any]], what: str) -> Iterator[tuple[int, Any]]:
        """``(status code, identifier)`` of each response, all within :meth:`budget`
        seconds: the wait for each is what is left (a pending answer every 30 s does not
        keep a search alive), and a short wait ends in a signal as soon as it comes."""
        seconds = self.budget()
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ArchiveError(f"{self.conn.name}: {what} failed: no complete answer within {seconds:g} s")
            assoc.dimse_timeout = min(self.conn.timeout, left)
            try:
                status, identifier = next(responses)
            except StopIteration:
                return
            code = getattr(status, "Status", None)
            if code is None:
                if time.monotonic() >= deadline:
                    raise ArchiveError(f"{self.conn.name}: {what} failed: no complete answer within {seconds:g} s")
                raise ArchiveError(f"{self.conn.name}: {what} failed: no answer (timeout or aborted)")
            yield code, identifier

    def _find(self, level: str, keys: dict[str, Any], what: str) -> list[Dataset]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        answers = []
        with self._association(what, [(FIND, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as assoc:
            for code, identifier in self._answers(assoc, assoc.send_c_find(query, FIND), what):
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    answers.append(identifier)
                elif code != 0x0000:
                    raise ArchiveError(f"{self.conn.name}: {what} failed: status 0x{code:04X}")
        return answers

    def find_studies(self, study_date: str, modality: str) -> list[StudyInfo]:
        what = "C-FIND studies"
        found = self._find(
            "STUDY",
            {
                "StudyDate": study_date,
                "ModalitiesInStudy": modality,
                "StudyInstanceUID": "",
                "NumberOfStudyRelatedInstances": "",
            },
            what,
        )
        return self._studies(found, what)

    def find_instances(self, study_instance_uid: str) -> list[InstanceRef]:
        refs = []
        series = self._find(
            "SERIES",
            {"StudyInstanceUID": study_instance_uid, "SeriesInstanceUID": "", "Modality": "", "BodyPartExamined": ""},
            "C-FIND series",
        )
        for s in series:
            series_uid = uid_of(s, "SeriesInstanceUID")
            if not series_uid:
                self._left_out("C-FIND series", 1, "no valid SeriesInstanceUID")
                continue
            instances = self._find(
                "IMAGE",
                {"StudyInstanceUID": study_instance_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": ""},
                "C-FIND instances",
            )
            found = instance_refs(study_instance_uid, series_uid, s, instances)
            self._left_out("C-FIND instances", len(instances) - len(found), "no valid SOPInstanceUID")
            refs.extend(found)
        return refs

    def _image_keys(self, ref: InstanceRef) -> dict[str, Any]:
        return {
            "StudyInstanceUID": ref.study_instance_uid,
            "SeriesInstanceUID": ref.series_instance_uid,
            "SOPInstanceUID": ref.sop_instance_uid,
        }

    def has_instance(self, ref: InstanceRef) -> bool:
        found = self._find("IMAGE", self._image_keys(ref), "C-FIND instance")
        return any(uid_of(d, "SOPInstanceUID") == ref.sop_instance_uid for d in found)

    def header(self, ref: InstanceRef) -> Dataset:
        keys = dict(self._image_keys(ref), **{k: "" for k in HEADER_KEYWORDS if k != "SpecificCharacterSet"})
        found = self._find("IMAGE", keys, "C-FIND instance header")
        if not found:
            raise ArchiveError(f"{self.conn.name}: instance {ref.sop_instance_uid} not found")
        return found[0]

    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[tuple[InstanceRef, Union[Dataset, BadInstance]]]:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        received: list[Union[Dataset, BadInstance]] = []
        limit = self.conn.max_instance_bytes

        def on_store(event) -> int:
            try:
                encoded = event.request.DataSet
                if encoded is not None and len(encoded.getbuffer()) > limit:
                    raise BadInstance(f"{self.conn.name}: C-GET sent an instance larger than {limit // 2**20} MiB")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = event.dataset
                    ds.file_meta = event.file_meta
            except BadInstance as exc:
                received.append(exc)
                return 0xA700  # refused: out of resources
            except DATASET_ERRORS:
                received.append(BadInstance(f"{self.conn.name}: C-GET sent an instance that cannot be decoded"))
                return 0xC000
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
                codes = [code for code, _identifier in self._answers(assoc, assoc.send_c_get(query, GET), "C-GET")]
                final = codes[-1] if codes else None
                bad = [d for d in received if isinstance(d, BadInstance)]
                got = [
                    d
                    for d in received
                    if isinstance(d, Dataset) and uid_of(d, "SOPInstanceUID") == ref.sop_instance_uid
                ]
                if got:
                    yield ref, got[0]
                elif bad:
                    yield ref, bad[0]
                elif final == 0x0000 and received:
                    yield (
                        ref,
                        BadInstance(
                            f"{self.conn.name}: instance {ref.sop_instance_uid}: the archive sent another instance"
                        ),
                    )
                else:
                    raise ArchiveError(
                        f"{self.conn.name}: C-GET of {ref.sop_instance_uid} failed: status 0x{final or 0:04X}"
                    )

    def store(self, ds: Dataset) -> None:
        syntax = ds.file_meta.TransferSyntaxUID
        with self._association("C-STORE", [(ds.SOPClassUID, [syntax])]) as assoc:
            status = assoc.send_c_store(ds)
        code = getattr(status, "Status", None)
        if code is None:
            raise ArchiveError(f"{self.conn.name}: C-STORE of {ds.SOPInstanceUID} failed: no answer")
        if code not in (0x0000, 0xB000, 0xB007, 0xB006):
            raise ArchiveError(f"{self.conn.name}: C-STORE of {ds.SOPInstanceUID} failed: status 0x{code:04X}")
