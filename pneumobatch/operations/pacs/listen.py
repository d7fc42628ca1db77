"""``pneumobatch listen``: a C-STORE SCP that a PACS or a modality auto-routes radiographs to.

Policy:

- **Who.** Only callers on the allow-list (``AET@ADDRESS``: an IP address, a network such
  as ``10.1.2.0/24``, or a host name resolved at start) may associate; anyone else, and
  any association to another called AE title, is answered A-ASSOCIATE-RJ (calling /
  called AE title not recognised). With TLS (``tls_cert``, ``tls_key``, ``ca_bundle``)
  every caller must also present a certificate the CA bundle trusts, or the handshake fails.
- **What.** Storage of CR, DX (for presentation and for processing) and Secondary Capture
  images, in every transfer syntax predict decodes, and C-ECHO. Other SOP classes
  (C-FIND, C-MOVE, CT, SR ...) are not offered: their presentation contexts are rejected.
  An instance is refused with a DIMSE status: 0xA700 (out of resources) when it is larger
  than the limit or cannot be written (disk full, spool unwritable: one log line, nothing
  half-written stays), 0xC000 when it cannot be decoded or lacks a valid Study, Series
  or SOP Instance UID, 0xA900 when its SOP Class or Instance UID contradicts the request,
  or its SOP Instance UID is already in the spool under another study or series.
- **Where.** ``SPOOL/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
  (:mod:`.spool`): the path is made of the validated UIDs only; the file is the instance
  as sent, written whole. A SOP Instance UID already here is kept once (success, counted
  as a duplicate). The journal records who sent what; never a patient's name.
- **When.** A study is announced complete in the journal once no instance of it has come
  for ``study_timeout`` seconds (checked every second or so, and at start for studies a
  previous listener left); ``predict --spool`` reads only complete studies.
- **Stopping.** :func:`run_listen` runs until SIGTERM or SIGINT (the CLI turns them into
  :class:`~pneumobatch.core.errors.Interrupted`): new associations are no longer accepted,
  the ones in progress are finished (each ends within the network timeout), quiet studies
  are announced, and the counts are returned (and written as a Prometheus textfile when
  asked). A ``kill -9`` loses at most the instances not yet answered: the sender retries
  them, and the next listener removes the temporary file that was being written.
- **One listener per spool** (a lock file dying with its process).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pneumobatch.core.errors import Interrupted, OptionError, OutputError
from pneumobatch.core.uids import valid_uid
from pneumobatch.io.atomicfile import atomic_write
from pneumobatch.io.lockfile import LockBusy, ProcessLock
from pneumobatch.operations.pacs.archive import DATASET_ERRORS, InstanceRef
from pneumobatch.operations.pacs.connection import (
    DEFAULT_CALLING_AE,
    DEFAULT_MAX_INSTANCE_BYTES,
    DEFAULT_MOVE_PORT,
    ae_title,
    server_tls_context,
)
from pneumobatch.operations.pacs.dimse import IMAGE_STORAGE_CLASSES, add_storage_contexts, reject_association
from pneumobatch.operations.pacs.spool import SpoolJournal, Stored, remove_stale_temps, store_instance

log = logging.getLogger(__name__)

#: Seconds without an instance after which a study is complete.
DEFAULT_STUDY_TIMEOUT = 60.0
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Caller:
    """One allow-list entry: a calling AE title from some addresses."""

    ae_title: str
    networks: tuple[Network, ...]
    text: str

    def admits(self, calling_ae: str, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return calling_ae.strip() == self.ae_title and any(ip in n for n in self.networks)


def parse_callers(values: Sequence[str]) -> tuple[Caller, ...]:
    """``AET@ADDRESS`` entries (ADDRESS: IP, network, or host name resolved now)."""
    callers = []
    for value in values:
        title, sep, where = str(value).rpartition("@")
        if not sep or not title or not where:
            raise OptionError(f"--allow takes AET@ADDRESS (e.g. PACS@10.1.2.3 or MODALITY@10.1.2.0/24), not {value!r}")
        title = ae_title(title, "--allow's AE title")
        try:
            networks: tuple[Network, ...] = (ipaddress.ip_network(where, strict=False),)
        except ValueError:
            try:
                found = {info[4][0] for info in socket.getaddrinfo(where, None)}
            except OSError:
                raise OptionError(f"--allow {value}: {where!r} is no IP address, network or known host name") from None
            networks = tuple(ipaddress.ip_network(a) for a in sorted(found))
        callers.append(Caller(title, networks, str(value)))
    return tuple(callers)


@dataclass
class ListenConfig:
    spool: Path
    allow: Sequence[str] = ()
    port: int = DEFAULT_MOVE_PORT
    bind: str = "0.0.0.0"
    ae_title: str = DEFAULT_CALLING_AE
    study_timeout: float = DEFAULT_STUDY_TIMEOUT
    tls_cert: Optional[str] = None  # with tls_key and ca_bundle: DIMSE over TLS
    tls_key: Optional[str] = None
    ca_bundle: Optional[str] = None
    metrics: Optional[Path] = None  # a Prometheus textfile, rewritten as counts change
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    timeout: float = 60.0  # seconds an association may stay silent (bounds the wait on stopping)


@dataclass
class ListenResult:
    spool: Path
    received: int = 0
    duplicates: int = 0
    refused: int = 0  # instances refused with a DIMSE status
    rejected: int = 0  # associations rejected (caller not allowed, wrong called AE title)
    echoes: int = 0
    studies_complete: int = 0  # studies announced complete by this listener
    stopped_by: Optional[int] = None  # the signal that stopped it
    last_instance: Optional[float] = None
    failures: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0

    def summary(self) -> str:
        return (
            f"{self.received} instances received, {self.duplicates} duplicates, {self.refused} refused, "
            f"{self.rejected} associations rejected, {self.studies_complete} studies complete; spool {self.spool}"
        )


def metrics_text(result: ListenResult) -> str:
    """The listener's counts in the Prometheus text format (node_exporter's textfile collector)."""
    from pneumobatch.operations.monitor.prometheus import gauges_text

    return gauges_text(
        [
            (
                "pneumobatch_listen_instances",
                "Instances offered to the listener since it started, by outcome.",
                [
                    ({"outcome": "received"}, result.received),
                    ({"outcome": "duplicate"}, result.duplicates),
                    ({"outcome": "refused"}, result.refused),
                ],
            ),
            (
                "pneumobatch_listen_associations_rejected",
                "Associations rejected (caller not allowed).",
                [({}, result.rejected)],
            ),
            (
                "pneumobatch_listen_studies_complete",
                "Studies announced complete since start.",
                [({}, result.studies_complete)],
            ),
            (
                "pneumobatch_listen_last_instance_timestamp_seconds",
                "When the last instance was received (Unix time).",
                [({}, result.last_instance)],
            ),
        ]
    )


class Listener:
    """The storage SCP over one spool: :meth:`start`, :meth:`sweep` now and then, :meth:`stop`."""

    def __init__(self, config: ListenConfig) -> None:
        self.config = config
        self.callers = parse_callers(config.allow)
        if not self.callers:
            raise OptionError("nothing is accepted from an unknown caller: give --allow AET@ADDRESS for each sender")
        ae_title(config.ae_title, "--ae-title")
        self.tls = (
            server_tls_context(config.tls_cert, config.tls_key or "", config.ca_bundle or "")
            if config.tls_cert
            else None
        )
        self.result = ListenResult(Path(config.spool))
        self._lock = threading.Lock()  # the journal and the counts, across association threads
        self._server: Any = None
        self._journal: Optional[SpoolJournal] = None
        self._spool_lock: Optional[ProcessLock] = None
        self._written: Optional[tuple] = None

    def start(self) -> tuple[str, int]:
        """Take the spool, announce what a previous listener left quiet, start listening."""
        from pynetdicom import AE, evt

        spool = Path(self.config.spool)
        try:
            spool.mkdir(parents=True, exist_ok=True)
            self._spool_lock = ProcessLock(spool / ".listen.lock").acquire()
        except LockBusy as exc:
            raise OutputError(f"another pneumobatch listen (PID {exc.pid or '?'}) uses spool {spool}") from exc
        except OSError as exc:
            raise OutputError(f"cannot use spool {spool}: {exc.strerror or exc}") from exc
        try:
            self._journal = SpoolJournal(spool)
            removed = remove_stale_temps(spool)
            if removed:
                log.info("removed %d partial files a stopped listener left", removed)
            self.sweep()
            ae = AE(ae_title=self.config.ae_title)
            add_storage_contexts(ae)
            ae.require_called_aet = True
            ae.maximum_pdu_size = 0
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.timeout
            handlers = [
                (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_REJECTED, self._on_rejected),
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_C_ECHO, self._on_echo),
            ]
            try:
                self._server = ae.start_server(
                    (self.config.bind, self.config.port), block=False, evt_handlers=handlers, ssl_context=self.tls
                )
            except OSError as exc:
                raise OutputError(
                    f"cannot listen on {self.config.bind}:{self.config.port}: {exc.strerror or exc}"
                ) from None
        except BaseException:
            self._close()
            raise
        host, port = self._server.server_address[:2]
        log.info("listening on %s:%d as %s for %d callers", host, port, self.config.ae_title, len(self.callers))
        return host, port

    # handlers (association threads)
    def _on_requested(self, event: Any) -> None:
        primitive = event.assoc.requestor.primitive
        calling, address = str(primitive.calling_ae_title).strip(), event.assoc.requestor.address
        if not any(c.admits(calling, address) for c in self.callers):
            log.warning("association from %r at %s rejected: not on the allow-list", calling[:16], address)
            reject_association(event.assoc)
            self._on_rejected(event)  # pynetdicom signals only the rejections it makes itself

    def _on_rejected(self, event: Any) -> None:
        with self._lock:
            self.result.rejected += 1

    def _on_echo(self, event: Any) -> int:
        with self._lock:
            self.result.echoes += 1
        return 0x0000

    def _refuse(self, status: int, why: str, address: str) -> int:
        log.warning("instance from %s refused (0x%04X): %s", address, status, why)
        with self._lock:
            self.result.refused += 1
        return status

    def _on_store(self, event: Any) -> int:
        calling, address = event.assoc.requestor.ae_title.strip(), event.assoc.requestor.address
        limit = self.config.max_instance_bytes
        try:
            encoded = event.request.DataSet
            if encoded is not None and len(encoded.getbuffer()) > limit:
                return self._refuse(0xA700, f"larger than {limit // 2**20} MiB", address)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = event.dataset
                uids = [valid_uid(ds.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
                sop_class = valid_uid(ds.get("SOPClassUID"))
            requested = (valid_uid(event.request.AffectedSOPClassUID), valid_uid(event.request.AffectedSOPInstanceUID))
        except DATASET_ERRORS:
            return self._refuse(0xC000, "cannot be decoded", address)
        if not all(uids):
            return self._refuse(0xC000, "no valid Study, Series or SOP Instance UID", address)
        if (sop_class, uids[2]) != requested or sop_class not in IMAGE_STORAGE_CLASSES:
            return self._refuse(0xA900, "its SOP Class or Instance UID is not the one requested", address)
        ref = InstanceRef(*uids)
        with self._lock:
            try:
                stored = store_instance(self._journal, ref, event.encoded_dataset(), calling, address)  # type: ignore[arg-type]
            except OutputError as exc:
                log.error("out of resources, instance refused: %s", exc)
                self.result.refused += 1
                return 0xA700
            if stored is Stored.CONFLICT:
                self.result.refused += 1
            elif stored is Stored.DUPLICATE:
                self.result.duplicates += 1
            else:
                self.result.received += 1
                self.result.last_instance = time.time()
        if stored is Stored.CONFLICT:
            log.warning("instance %s refused: already in the spool under another study or series", ref.sop_instance_uid)
            return 0xA900
        return 0x0000

    # the main thread
    def sweep(self) -> list[str]:
        """Announce the studies quiet for the study timeout; rewrite the metrics if they changed."""
        with self._lock:
            done = self._journal.complete_quiet(self.config.study_timeout) if self._journal else []
            self.result.studies_complete += len(done)
            snapshot = (self.result.received, self.result.duplicates, self.result.refused, self.result.rejected)
        for uid in done:
            log.info("study %s complete", uid)
        if self.config.metrics is not None and (snapshot + (self.result.studies_complete,)) != self._written:
            atomic_write(Path(self.config.metrics), metrics_text(self.result))
            self._written = snapshot + (self.result.studies_complete,)
        return done

    def stop(self) -> ListenResult:
        """Accept no new association, finish those in progress, announce quiet studies."""
        if self._server is not None:
            server, self._server = self._server, None
            busy = server.active_associations
            server.shutdown()  # the listening socket closes; associations in progress go on
            for assoc in busy:
                assoc.join(timeout=self.config.timeout * 3)
        try:
            self.sweep()
        finally:
            self._close()
        return self.result

    def _close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._spool_lock is not None:
            self._spool_lock.release()
            self._spool_lock = None


def run_listen(config: ListenConfig, on_ready: Optional[Callable[[str, int], None]] = None) -> ListenResult:
    """Listen until SIGTERM or SIGINT (:class:`Interrupted`); the counts when stopped."""
    listener = Listener(config)
    host, port = listener.start()
    try:
        if on_ready is not None:
            on_ready(host, port)
        interval = max(0.1, min(1.0, config.study_timeout / 4))
        while True:
            time.sleep(interval)
            listener.sweep()
    except Interrupted as exc:
        listener.result.stopped_by = exc.signum
    finally:
        listener.stop()
    return listener.result
