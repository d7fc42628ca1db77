"""DIMSE: C-FIND in the Study Root model, C-GET or C-MOVE into memory, C-STORE (``pynetdicom``).

Retrieval is C-GET on one association, or C-MOVE: the archive is asked to send each
instance to ``move_to`` (the AE title it knows for us), and a storage SCP of our own,
listening on ``move_port`` for the duration of the retrieval and accepting only the
archive's address, takes them into memory as C-GET does. Without ``move_to`` an archive
that refuses C-GET (no C-GET context, a refusal status, or an abort instead of an
answer, before any C-GET succeeded) is asked by C-MOVE to ``calling_ae``, once for the
rest of the run. With ``dimse_tls`` every association is TLS
(:func:`~.connection.client_tls_context`; the C-MOVE listener
:func:`~.connection.server_tls_context`).

Each request waits for each answer only as long as is left of its deadline (a pending
answer every 30 s does not keep a search alive), in waits a signal ends at once; an
association interrupted by an error or a signal is aborted, never released (a release
would wait for the archive to finish what it is doing).
"""

from __future__ import annotations

import logging
import socket
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

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
from pneumobatch.operations.pacs.connection import Connection, client_tls_context, server_tls_context

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
#: C-GET answers that mean "not here": the archive does not offer C-GET to us.
GET_REFUSED = (0x0122, 0x0124, 0xA701, 0xA900, 0xC000)
#: C-MOVE statuses that mean the archive does not know where to send (our AE title).
MOVE_DESTINATION_UNKNOWN = 0xA801


class _NoAnswer(ArchiveError):
    """A DIMSE request ended without a status (the peer aborted, or the DIMSE timeout)."""


class _GetRefused(ArchiveError):
    """The archive does not offer C-GET to us: retrieve by C-MOVE instead."""


def add_storage_contexts(ae: Any) -> None:
    """The storage SCP contexts of a radiograph receiver: the image classes in every
    transfer syntax predict decodes, and Verification (C-ECHO)."""
    from pynetdicom.sop_class import Verification

    for cls in IMAGE_STORAGE_CLASSES:
        ae.add_supported_context(cls, list(RECEIVED_SYNTAXES))
    ae.add_supported_context(Verification)


def reject_association(assoc: Any) -> None:
    """Answer an association request with A-ASSOCIATE-RJ: rejected permanently, calling AE
    title not recognised (what a caller off the allow-list is told)."""
    assoc.acse.send_reject(0x01, 0x01, 0x03)
    assoc.kill()  # waits until the rejection is sent (as pynetdicom's own rejections do)


def resolve_addresses(host: str) -> set[str]:
    """The IP addresses of ``host`` (to accept the archive's C-MOVE associations only)."""
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise ArchiveError(f"cannot resolve {host}: {exc.strerror or exc}") from exc


class DimseArchive(Archive):
    """C-FIND / C-GET / C-STORE through ``pynetdicom``, one association per operation group."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        from pynetdicom import AE

        self._AE = AE
        self._retrieve_by: Optional[str] = "move" if conn.move_to else None  # "get" once C-GET worked

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
        tls = (client_tls_context(self.conn), self.conn.host) if self.conn.dimse_tls else None
        try:
            assoc = ae.associate(
                self.conn.host,
                self.conn.port,
                ae_title=self.conn.called_ae,
                ext_neg=list(roles),
                evt_handlers=list(handlers),
                tls_args=tls,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise self._fail(what, exc) from None
        if not assoc.is_established:
            if assoc.is_rejected:
                reason = f"association rejected (check the AE titles and that the archive knows {self.conn.calling_ae})"
            else:
                via = ", or the TLS handshake failed (certificates, --ca-bundle)" if tls else ""
                reason = f"no association: cannot connect{via}, or the archive aborted (check host, port and that it knows {self.conn.calling_ae})"
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
                raise _NoAnswer(f"{self.conn.name}: {what} failed: no answer (timeout or aborted)")
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
        refs = list(refs)
        if not refs:
            return
        if not self.conn.move_to and self._retrieve_by != "move":
            done = 0
            try:
                for item in self._retrieve_by_get(refs):
                    self._retrieve_by = "get"
                    done += 1
                    yield item
                return
            except _GetRefused as exc:
                log.warning(
                    "%s; retrieving by C-MOVE to %s (port %d) from now on",
                    exc,
                    self.conn.calling_ae,
                    self.conn.move_port,
                )
                self._retrieve_by = "move"
                refs = refs[done:]
        yield from self._retrieve_by_move(refs)

    def _on_store(self, received: list, what: str):
        """A C-STORE handler taking instances into ``received`` (a data set, or a
        :class:`BadInstance` for one too large or undecodable)."""
        limit = self.conn.max_instance_bytes

        def on_store(event) -> int:
            try:
                encoded = event.request.DataSet
                if encoded is not None and len(encoded.getbuffer()) > limit:
                    raise BadInstance(f"{self.conn.name}: {what} sent an instance larger than {limit // 2**20} MiB")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = event.dataset
                    ds.file_meta = event.file_meta
            except BadInstance as exc:
                received.append(exc)
                return 0xA700  # refused: out of resources
            except DATASET_ERRORS:
                received.append(BadInstance(f"{self.conn.name}: {what} sent an instance that cannot be decoded"))
                return 0xC000
            received.append(ds)
            return 0x0000

        return on_store

    def _query(self, ref: InstanceRef) -> Dataset:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        for keyword, value in self._image_keys(ref).items():
            setattr(query, keyword, value)
        return query

    def _outcome(
        self, ref: InstanceRef, received: list, final: Any, what: str
    ) -> tuple[InstanceRef, Union[Dataset, BadInstance]]:
        bad = [d for d in received if isinstance(d, BadInstance)]
        got = [d for d in received if isinstance(d, Dataset) and uid_of(d, "SOPInstanceUID") == ref.sop_instance_uid]
        if got:
            return ref, got[0]
        if bad:
            return ref, bad[0]
        if final in (0x0000, 0xB000) and received:
            return ref, BadInstance(
                f"{self.conn.name}: instance {ref.sop_instance_uid}: the archive sent another instance"
            )
        if what == "C-MOVE" and final == MOVE_DESTINATION_UNKNOWN:
            raise archive_error(
                f"{self.conn.name}: C-MOVE failed: the archive does not know move destination "
                f"{self._move_destination()} (register that AE title with our host and port {self.conn.move_port})",
                retriable=False,
            )
        raise ArchiveError(f"{self.conn.name}: {what} of {ref.sop_instance_uid} failed: status 0x{final or 0:04X}")

    def _retrieve_by_get(self, refs: list[InstanceRef]) -> Iterator[tuple[InstanceRef, Union[Dataset, BadInstance]]]:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        received: list[Union[Dataset, BadInstance]] = []
        # one context per (class, transfer syntax predict decodes): the archive sends each
        # image as stored, without transcoding (4 classes x 16 syntaxes: within the 128 allowed)
        contexts = [(GET, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        contexts += [(cls, [ts]) for cls in IMAGE_STORAGE_CLASSES for ts in RECEIVED_SYNTAXES]
        roles = [build_role(cls, scp_role=True) for cls in IMAGE_STORAGE_CLASSES]
        first = self._retrieve_by is None
        with self._association(
            "C-GET", contexts, roles, [(evt.EVT_C_STORE, self._on_store(received, "C-GET"))]
        ) as assoc:
            if first and not any(cx.abstract_syntax == GET for cx in assoc.accepted_contexts):
                raise _GetRefused(f"{self.conn.name}: the archive does not offer C-GET")
            for ref in refs:
                received.clear()
                try:
                    answers = self._answers(assoc, assoc.send_c_get(self._query(ref), GET), "C-GET")
                    codes = [code for code, _identifier in answers]
                except _NoAnswer as exc:
                    if first and not received:  # Orthanc, for one, drops a C-GET it does not allow
                        raise _GetRefused(f"{self.conn.name}: the archive did not answer C-GET") from exc
                    raise
                final = codes[-1] if codes else None
                if first and not received and final in GET_REFUSED:
                    raise _GetRefused(f"{self.conn.name}: the archive refused C-GET (status 0x{final:04X})")
                first = False
                yield self._outcome(ref, received, final, "C-GET")

    def _move_destination(self) -> str:
        return self.conn.move_to or self.conn.calling_ae

    def _retrieve_by_move(self, refs: list[InstanceRef]) -> Iterator[tuple[InstanceRef, Union[Dataset, BadInstance]]]:
        """C-MOVE to our own storage SCP, listening on ``move_port`` while the instances come."""
        from pynetdicom import evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        received: list[Union[Dataset, BadInstance]] = []
        archive_addresses = resolve_addresses(self.conn.host)

        def on_requested(event) -> None:  # only the archive may send us instances
            if event.assoc.requestor.address not in archive_addresses:
                log.warning(
                    "C-MOVE listener: association from %s refused (not the archive)", event.assoc.requestor.address
                )
                reject_association(event.assoc)

        scp = self._AE(ae_title=self._move_destination())
        add_storage_contexts(scp)
        scp.acse_timeout = scp.dimse_timeout = scp.network_timeout = self.conn.timeout
        tls = (
            server_tls_context(self.conn.tls_certificate, self.conn.tls_key, self.conn.ca_bundle)
            if self.conn.dimse_tls
            else None
        )
        handlers = [(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, self._on_store(received, "C-MOVE"))]
        try:
            server = scp.start_server(("", self.conn.move_port), block=False, evt_handlers=handlers, ssl_context=tls)
        except OSError as exc:
            raise archive_error(
                f"cannot listen on port {self.conn.move_port} for C-MOVE: {exc.strerror or exc} "
                "(another pneumobatch listen on it? give --move-port)",
                retriable=False,
            ) from None
        try:
            with self._association("C-MOVE", [(MOVE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as assoc:
                for ref in refs:
                    received.clear()
                    responses = assoc.send_c_move(self._query(ref), self._move_destination(), MOVE)
                    codes = [code for code, _identifier in self._answers(assoc, responses, "C-MOVE")]
                    yield self._outcome(ref, received, codes[-1] if codes else None, "C-MOVE")
        finally:
            server.shutdown()

    def store(self, ds: Dataset) -> None:
        syntax = ds.file_meta.TransferSyntaxUID
        with self._association("C-STORE", [(ds.SOPClassUID, [syntax])]) as assoc:
            status = assoc.send_c_store(ds)
        code = getattr(status, "Status", None)
        if code is None:
            raise ArchiveError(f"{self.conn.name}: C-STORE of {ds.SOPInstanceUID} failed: no answer")
        if code not in (0x0000, 0xB000, 0xB007, 0xB006):
            raise ArchiveError(f"{self.conn.name}: C-STORE of {ds.SOPInstanceUID} failed: status 0x{code:04X}")
