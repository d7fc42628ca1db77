"""One small interface over the two ways to talk to an archive: :func:`open_archive`.

:class:`DicomWebArchive` (:mod:`.dicomweb`) uses ``dicomweb-client`` (QIDO-RS searches,
STOW-RS) and reads WADO-RS itself (each instance in its stored transfer syntax, through
the bounded session of :mod:`.httpbounds`); :class:`DimseArchive` (:mod:`.dimse`) uses
``pynetdicom`` (C-FIND in the Study Root model, C-GET into memory, C-STORE). Both
implement :class:`~.archive.Archive` and return the same small records, so :mod:`.pull`
and :mod:`.push` never see a protocol (they import the records from :mod:`.archive`).

Every value an archive sends is untrusted: UIDs are checked against the DICOM UID
syntax before they are used (as file names among other things), and an archive's
error text is never quoted back with our credentials in it (:meth:`Connection.scrub`).
Failures become :class:`~pneumobatch.core.errors.ArchiveError` with a one-line message.

Bounds: each request ends within the connection's ``deadline`` (and within the time
left to the study being pulled, :meth:`Archive.until`), whatever trickles in; a DICOMweb
answer is inflated here, at most ``max_instance_bytes`` for an instance
(:mod:`.httpbounds`); a C-FIND or C-GET waits for each answer only as long as is left. An
instance that arrives but is no DICOM (or too large, or not the one asked for) is a
:class:`BadInstance`, yielded in its place by :meth:`Archive.retrieve`: one failed
instance, not a failed night. Search answers that are not DICOM data sets with a valid
UID are left out and noted in :attr:`Archive.problems`. An association interrupted by
an error or a signal is aborted, never released (a release waits for the archive).
"""

from __future__ import annotations

from pneumobatch.operations.pacs.archive import Archive
from pneumobatch.operations.pacs.connection import Connection
from pneumobatch.operations.pacs.dicomweb import DicomWebArchive
from pneumobatch.operations.pacs.dimse import DimseArchive


def open_archive(conn: Connection) -> Archive:
    """The archive client for ``conn``'s protocol."""
    return DicomWebArchive(conn) if conn.protocol == "dicomweb" else DimseArchive(conn)
