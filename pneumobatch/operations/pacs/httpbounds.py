"""HTTP to a DICOMweb archive with a bound on what one answer may cost.

``requests`` bounds each read (a socket timeout), not a request: an archive sending one
byte every 20 s never times out, and it inflates a ``gzip`` answer without limit (a 1 MB
deflate bomb becomes gigabytes in memory). :func:`guarded_session` gives the session the
DICOMweb client uses, where every request:

- ends within a **deadline** (seconds, whatever trickles in: status line, headers or
  body): a watchdog shuts the request's socket down when the time is up, which wakes
  the blocked read; the request then fails with :class:`AnswerRefused`;
- reads its body itself, compressed as sent (``Content-Encoding`` gzip or deflate,
  inflated here piece by piece; any other encoding is refused), and stops as soon as the
  inflated answer would pass **max_bytes**.

:func:`one_part` takes the single DICOM part out of a WADO-RS ``multipart/related``
answer. Messages never quote what the archive sent (its headers are untrusted).
"""

from __future__ import annotations

import http.client
import socket
import threading
import weakref
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as TransportError

#: The most a DICOM JSON answer (a search page, an instance's metadata) may hold, inflated.
MAX_JSON_BYTES = 8 * 1024 * 1024
_CHUNK = 256 * 1024


class AnswerRefused(requests.exceptions.RequestException):
    """An answer past the deadline or the size limit, or one that cannot be read.

    ``reason`` is safe to show (it quotes nothing the archive sent); ``retriable`` says
    whether asking again may help (a slow archive may recover; a bomb stays one)."""

    def __init__(self, reason: str, retriable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retriable = retriable


class _Sockets:
    """The sockets a session opened, so a watchdog can cut the one a request blocks on."""

    def __init__(self) -> None:
        self._open: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, sock: Any) -> None:
        with self._lock:
            self._open.add(sock)

    def cut(self) -> None:
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            try:  # the plain socket's shutdown, also under TLS: wakes a thread blocked reading it
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except (OSError, TypeError):
                pass


def _watched_pools(sockets: _Sockets) -> dict[str, type]:
    """urllib3 pool classes whose connections register their socket once connected."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Watched(HTTPConnection):
        def connect(self) -> None:
            super().connect()
            sockets.add(self.sock)

    class WatchedTLS(HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            sockets.add(self.sock)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Watched

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = WatchedTLS

    return {"http": Pool, "https": TLSPool}


def _inflater(encoding: str, first: bytes):
    """A decompressor for ``Content-Encoding`` (None: sent as is)."""
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":  # zlib-wrapped as the RFC says, or raw deflate as some servers send
        wrapped = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
    raise AnswerRefused("the answer is in a content encoding pneumobatch does not read", retriable=False)


def _too_large(max_bytes: int) -> AnswerRefused:
    return AnswerRefused(f"the answer is larger than the limit of {max_bytes // 2**20} MiB", retriable=False)


def read_body(raw: Any, headers: Any, max_bytes: int) -> bytes:
    """The whole body of a urllib3 response, inflated here, never more than ``max_bytes``."""
    encoding = str(headers.get("Content-Encoding", "")).strip().lower()
    length = str(headers.get("Content-Length", "")).strip()
    if encoding in ("", "identity") and length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    inflater = None
    while True:
        try:
            chunk = raw.read(_CHUNK, decode_content=False)
        except (TransportError, http.client.HTTPException, OSError, ValueError) as exc:  # urllib3's, not requests'
            raise AnswerRefused("the answer broke off") from exc
        if not chunk:
            break
        if inflater is None:
            inflater = _inflater(encoding, chunk) or False
        if inflater is False:
            body += chunk
        else:
            pending = chunk
            while pending:  # a piece at a time, at most one byte past the limit: a bomb stops here
                try:
                    body += inflater.decompress(pending, min(_CHUNK, max_bytes + 1 - len(body)))
                except zlib.error as exc:
                    raise AnswerRefused("the compressed answer is corrupt", retriable=False) from exc
                if len(body) > max_bytes:
                    raise _too_large(max_bytes)
                pending = inflater.unconsumed_tail
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    if inflater:
        try:
            body += inflater.flush()
        except zlib.error as exc:
            raise AnswerRefused("the compressed answer is corrupt", retriable=False) from exc
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)


class GuardedAdapter(HTTPAdapter):
    """Every request within :attr:`budget` seconds and :attr:`max_bytes` (see the module)."""

    def __init__(self, read_timeout: float, budget: Callable[[], float]) -> None:
        self._sockets = _Sockets()
        self.read_timeout = read_timeout
        self.budget = budget  # seconds this request may take (the caller's deadline, its study's)
        self.max_bytes = MAX_JSON_BYTES
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _watched_pools(self._sockets)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _watched_pools(self._sockets)
        return manager

    @contextmanager
    def allowing(self, max_bytes: int) -> Iterator[None]:
        """Answers up to ``max_bytes`` (an instance) inside the block, JSON-sized outside."""
        before, self.max_bytes = self.max_bytes, max_bytes
        try:
            yield
        finally:
            self.max_bytes = before

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):  # noqa: ANN001
        seconds = self.budget()
        if seconds <= 0:
            raise AnswerRefused("no time left for this request", retriable=False)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            self._sockets.cut()

        watchdog = threading.Timer(seconds, expire)
        watchdog.daemon = True
        watchdog.start()
        response: Optional[requests.Response] = None
        try:
            read_timeout = max(0.1, min(self.read_timeout, seconds))
            response = super().send(
                request, stream=True, timeout=read_timeout, verify=verify, cert=cert, proxies=proxies
            )
            body = read_body(response.raw, response.headers, self.max_bytes)
        except requests.exceptions.RequestException as exc:
            if response is not None:
                response.close()
            if expired.is_set():
                raise AnswerRefused(f"no complete answer within {seconds:g} s") from exc
            raise
        except BaseException:
            if response is not None:
                response.close()
            raise
        finally:
            watchdog.cancel()
        if expired.is_set():  # the cut may end a body without Content-Length as if it were whole
            response.close()
            raise AnswerRefused(f"no complete answer within {seconds:g} s")
        response.raw.release_conn()
        response._content = body  # what requests would have read: the inflated body
        response._content_consumed = True
        return response


def guarded_session(read_timeout: float, budget: Callable[[], float]) -> tuple[requests.Session, GuardedAdapter]:
    """A session whose every request goes through one :class:`GuardedAdapter`."""
    session = requests.Session()
    adapter = GuardedAdapter(read_timeout, budget)
    for scheme in ("http://", "https://"):
        session.mount(scheme, adapter)
    return session, adapter


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    media, *params = [part.strip() for part in content_type.split(";")]
    values = {}
    for param in params:
        key, _, value = param.partition("=")
        values[key.strip().lower()] = value.strip().strip('"')
    return media.lower(), values


def one_part(body: bytes, content_type: str) -> bytes:
    """The one part of a WADO-RS instance answer (``multipart/related``, or a bare
    ``application/dicom`` body as some archives send); :class:`AnswerRefused` otherwise."""
    media, params = _media_type(content_type or "")
    if media == "application/dicom":
        return body
    if media != "multipart/related":
        what = "without a Content-Type" if not media else "with a media type other than multipart/related"
        raise AnswerRefused(f"the archive answered {what}", retriable=False)
    boundary = params.get("boundary", "").encode("latin-1", "replace")
    if not boundary:
        raise AnswerRefused("the multipart answer has no boundary", retriable=False)
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    head_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
    if end < 0:
        raise AnswerRefused("the multipart answer is cut short or malformed", retriable=False)
    if not body.startswith(b"--", end + 2 + len(delimiter)):
        raise AnswerRefused("the archive answered more than one part for one instance", retriable=False)
    return body[head_end + 4 : end]
