"""Where the archive is and how to log in.

Policy:

- An archive is either a DICOMweb base URL (``https://pacs/dicom-web``) or a DIMSE
  address (``host:port`` with calling and called AE titles).
- Credentials (HTTP basic user and password, or a bearer token) come from the
  environment (``PNEUMOBATCH_PACS_USERNAME``, ``PNEUMOBATCH_PACS_PASSWORD``,
  ``PNEUMOBATCH_PACS_TOKEN``) or from a config file readable by its owner only
  (mode 0600; ``--config`` or ``PNEUMOBATCH_PACS_CONFIG``). They are never options, a
  URL with ``user:password@`` is refused, and they never appear in a ``repr``, a log
  line or an error message. What ``$(cat file)`` leaves around a value (a CRLF file's
  carriage return) is dropped: whitespace around a user name or token, CR and LF around
  a password; a control character inside one is refused, with a message that names the
  variable, never the value.
- Each request to the archive ends within ``deadline`` seconds in all (``timeout`` bounds
  one read), and an instance may be at most ``max_instance_bytes`` once inflated.
- TLS certificates are verified by default; ``ca_bundle`` names a site CA, and only the
  config file can turn verification off (``tls_verify = false``, logged as a warning).
  DIMSE runs over TLS with ``dimse_tls`` (``--tls``): the archive's certificate is
  verified against ``ca_bundle`` (else the system's CAs) and its host name, and ours
  (``tls_certificate``, ``tls_key``) is presented when given (archives usually ask for
  one). :func:`client_tls_context` and :func:`server_tls_context` build the
  :class:`ssl.SSLContext` that pynetdicom is handed; a file that cannot be read is one
  line naming it.
- DIMSE retrieval is C-GET, or C-MOVE to ``move_to`` (the AE title the archive knows for
  us) with our own short-lived storage SCP on ``move_port``; without ``move_to`` an
  archive that refuses C-GET is asked by C-MOVE to ``calling_ae``.

Config file (INI), every key optional; the environment wins over the file::

    [pacs]
    url = https://pacs.example.org/dicom-web
    username = pneumobatch
    password = ...
    # token = ...           (bearer token instead of username/password)
    # ca_bundle = /etc/ssl/site-ca.pem
    # dimse = pacs.example.org:104
    # calling_ae = PNEUMOBATCH
    # called_ae = PACS
    # dimse_tls = true      (DIMSE over TLS)
    # tls_certificate = /etc/pneumobatch/tls/pneumobatch.crt
    # tls_key = /etc/pneumobatch/tls/pneumobatch.key
    # move_to = PNEUMOBATCH  (retrieve by C-MOVE to this AE title)
    # move_port = 11112
"""

from __future__ import annotations

import base64
import configparser
import logging
import os
import re
import ssl
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import quote, urlsplit

from pneumobatch.core.errors import OptionError
from pneumobatch.core.files import PACS_CONFIG_LIMIT, FileReadError, read_small_file

log = logging.getLogger(__name__)

ENV_USERNAME = "PNEUMOBATCH_PACS_USERNAME"
ENV_PASSWORD = "PNEUMOBATCH_PACS_PASSWORD"
ENV_TOKEN = "PNEUMOBATCH_PACS_TOKEN"
ENV_CONFIG = "PNEUMOBATCH_PACS_CONFIG"
CONFIG_SECTION = "pacs"
DEFAULT_CALLING_AE = "PNEUMOBATCH"
DEFAULT_CALLED_AE = "ANY-SCP"
#: Seconds one read from the archive may wait, and one request may take in all.
DEFAULT_TIMEOUT, DEFAULT_DEADLINE = 60.0, 120.0
#: The most one instance may hold (inflated): twice what predict reads at its default
#: --max-pixels (64 Mpx at 2 bytes), so a deflate bomb is refused, not inflated.
DEFAULT_MAX_INSTANCE_BYTES = 256 * 1024 * 1024
#: The port our storage SCP listens on for C-MOVE (the DICOM registered port).
DEFAULT_MOVE_PORT = 11112
_AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e](?:[\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials; never shown (``repr`` names only which kind is set)."""

    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        kind = "token" if self.token else "basic" if self.username else "none"
        return f"Credentials({kind})"

    def __bool__(self) -> bool:
        return bool(self.token or self.username)

    def secrets(self) -> list[str]:
        """The values that must never be printed (for scrubbing messages), in every form a
        library may quote them: as given, escaped as in a ``repr``, URL-encoded, and the
        basic-auth header value."""
        forms = set()
        for secret in (self.password, self.token):
            if secret:
                forms.update({secret, repr(secret)[1:-1], quote(secret, safe="")})
        if self.username:
            pair = f"{self.username}:{self.password}".encode()
            forms.add(base64.b64encode(pair).decode("ascii"))
        return sorted((f for f in forms if f), key=len, reverse=True)


@dataclass(frozen=True)
class Connection:
    """One archive: DICOMweb (``url``) or DIMSE (``host``, ``port``, AE titles)."""

    url: str = ""
    host: str = ""
    port: int = 0
    calling_ae: str = DEFAULT_CALLING_AE
    called_ae: str = DEFAULT_CALLED_AE
    credentials: Credentials = field(default_factory=Credentials)
    tls_verify: bool = True
    ca_bundle: str = ""
    timeout: float = DEFAULT_TIMEOUT
    deadline: float = DEFAULT_DEADLINE
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    dimse_tls: bool = False
    tls_certificate: str = ""
    tls_key: str = ""
    move_to: str = ""  # C-MOVE destination AE title; empty: C-GET (C-MOVE to calling_ae if C-GET is refused)
    move_port: int = DEFAULT_MOVE_PORT

    @property
    def protocol(self) -> str:
        return "dicomweb" if self.url else "dimse"

    @property
    def name(self) -> str:
        """How the archive is named in the ledger and in messages (no credentials)."""
        if self.url:
            return self.url.rstrip("/")
        return f"dimse://{self.called_ae}@{self.host}:{self.port}"

    def scrub(self, text: str) -> str:
        """``text`` with every secret of this connection replaced by ``***``."""
        for secret in self.credentials.secrets():
            text = text.replace(secret, "***")
        return text


def read_config(path: Path) -> dict[str, str]:
    """The ``[pacs]`` section of a config file that only its owner can read."""
    try:
        st = path.stat()
    except OSError as exc:
        raise OptionError(f"PACS config {path}: {exc.strerror or exc}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise OptionError(
            f"PACS config {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"it may hold passwords: chmod 600 {path}"
        )
    parser = configparser.ConfigParser(interpolation=None)
    try:  # a regular file of at most PACS_CONFIG_LIMIT bytes: a FIFO or a device is refused, never waited on
        raw = read_small_file(path, limit=PACS_CONFIG_LIMIT, what="PACS config")
    except FileReadError as exc:
        raise OptionError(str(exc)) from exc
    try:
        parser.read_string(raw.decode("utf-8"), source=str(path))
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise OptionError(f"PACS config {path} cannot be read: {type(exc).__name__}") from exc
    if not parser.has_section(CONFIG_SECTION):
        raise OptionError(f"PACS config {path} has no [{CONFIG_SECTION}] section")
    return dict(parser.items(CONFIG_SECTION))


def _bool(value: str, key: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise OptionError(f"PACS config: {key} must be true or false")


def ae_title(value: str, what: str) -> str:
    """``value`` when it is a DICOM AE title (1 to 16 printable ASCII characters, no backslash)."""
    if not _AE_TITLE.match(value):
        raise OptionError(f"{what} must be 1 to 16 printable ASCII characters without backslash: {value!r}")
    return value


def _credential(value: str, name: str, strip: str, token: bool = False) -> str:
    """A credential as meant: ``strip`` characters dropped around it (a file's line end),
    none inside that is a control character; a token nothing but visible ASCII (it goes
    into a header as it is). The message names where it came from, never the value."""
    value = value.strip(strip)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise OptionError(f"{name} holds a control character (not shown); write it on one line without them")
    if token and any(not 0x21 <= ord(c) <= 0x7E for c in value):
        raise OptionError(f"{name} holds a space or a non-ASCII character (not shown); a bearer token has neither")
    return value


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError(f"--dimse takes HOST:PORT, e.g. pacs.example.org:104, not {value!r}")
    return host, int(port)


def connect_options(
    *,
    url: Optional[str] = None,
    dimse: Optional[str] = None,
    calling_ae: Optional[str] = None,
    called_ae: Optional[str] = None,
    ca_bundle: Optional[str] = None,
    config: Optional[Path] = None,
    environ: Optional[Mapping[str, str]] = None,
    timeout: float = DEFAULT_TIMEOUT,
    deadline: float = DEFAULT_DEADLINE,
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    tls: bool = False,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    move_to: Optional[str] = None,
    move_port: Optional[int] = None,
) -> Connection:
    """A :class:`Connection` from options, the environment and the config file (in that order)."""
    env = os.environ if environ is None else environ
    config = config or (Path(env[ENV_CONFIG]) if env.get(ENV_CONFIG) else None)
    file = read_config(config) if config else {}
    url = url or file.get("url", "")
    dimse = dimse or file.get("dimse", "")
    if bool(url) == bool(dimse):
        raise OptionError("give the archive as --url (DICOMweb) or --dimse HOST:PORT (DIMSE), one of them")
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OptionError("--url must be an http(s) DICOMweb base URL, e.g. https://pacs.example.org/dicom-web")
        if parts.username or parts.password:
            raise OptionError(
                f"--url must not hold credentials; set {ENV_USERNAME}/{ENV_PASSWORD} or {ENV_TOKEN}, or use a 0600 config file"
            )
    credentials = Credentials(
        username=_credential(*_source(env, ENV_USERNAME, file, "username", config), string.whitespace),
        password=_credential(*_source(env, ENV_PASSWORD, file, "password", config), "\r\n"),
        token=_credential(*_source(env, ENV_TOKEN, file, "token", config), string.whitespace, token=True),
    )
    tls_verify = _bool(file["tls_verify"], "tls_verify") if "tls_verify" in file else True
    if not tls_verify:
        log.warning("TLS certificate verification is OFF for %s (tls_verify = false in the PACS config)", url or dimse)
    host, port = _host_port(dimse) if dimse else ("", 0)
    dimse_tls = tls or (_bool(file["dimse_tls"], "dimse_tls") if "dimse_tls" in file else False)
    tls_certificate, tls_key = tls_cert or file.get("tls_certificate", ""), tls_key or file.get("tls_key", "")
    move_to = move_to or file.get("move_to", "")
    if url and (dimse_tls or move_to):
        raise OptionError("--tls and --move-to are for DIMSE (--dimse); DICOMweb uses https:// URLs")
    if bool(tls_certificate) != bool(tls_key) and not (tls_certificate and _has_key(tls_certificate)):
        raise OptionError("--tls-cert and --tls-key go together (or give one PEM file holding both as --tls-cert)")
    if move_port is None:
        move_port = _port(file["move_port"], "move_port") if "move_port" in file else DEFAULT_MOVE_PORT
    return Connection(
        url=url,
        host=host,
        port=port,
        calling_ae=ae_title(calling_ae or file.get("calling_ae") or DEFAULT_CALLING_AE, "--calling-ae"),
        called_ae=ae_title(called_ae or file.get("called_ae") or DEFAULT_CALLED_AE, "--called-ae"),
        credentials=credentials,
        tls_verify=tls_verify,
        ca_bundle=ca_bundle or file.get("ca_bundle", ""),
        timeout=timeout,
        deadline=deadline,
        max_instance_bytes=max_instance_bytes,
        dimse_tls=dimse_tls,
        tls_certificate=tls_certificate,
        tls_key=tls_key,
        move_to=ae_title(move_to, "--move-to") if move_to else "",
        move_port=move_port,
    )


def _port(value: str, key: str) -> int:
    if not value.strip().isdigit() or not 0 < int(value) < 65536:
        raise OptionError(f"PACS config: {key} must be a port number (1 to 65535)")
    return int(value)


def _has_key(pem: str) -> bool:
    try:
        with open(pem, "rb") as fh:
            return b"PRIVATE KEY-----" in fh.read(1 << 20)
    except OSError:
        return False


def _load_chain(context: ssl.SSLContext, certificate: str, key: str) -> None:
    try:
        context.load_cert_chain(certificate, key or None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise OptionError(f"TLS certificate {certificate} or key {key or '(in the same file)'}: {reason}") from exc


def _load_ca(context: ssl.SSLContext, ca_bundle: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise OptionError(f"CA bundle {ca_bundle}: {reason}") from exc


def client_tls_context(conn: Connection) -> ssl.SSLContext:
    """The context for DIMSE over TLS to ``conn``: the archive's certificate verified (its
    host name too) against ``ca_bundle`` or the system's CAs, ours presented when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if conn.ca_bundle:
        _load_ca(context, conn.ca_bundle)
    if not conn.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if conn.tls_certificate:
        _load_chain(context, conn.tls_certificate, conn.tls_key)
    return context


def server_tls_context(certificate: str, key: str, ca_bundle: str) -> ssl.SSLContext:
    """The context of a storage SCP over TLS: our certificate, and every caller's certificate
    required and verified against ``ca_bundle`` (an untrusted or missing one fails the handshake)."""
    if not certificate or not ca_bundle:
        raise OptionError(
            "DIMSE over TLS needs our certificate and key (--tls-cert, --tls-key) and the CA that signs "
            "the callers' certificates (--ca-bundle)"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.verify_mode = ssl.CERT_REQUIRED
    _load_ca(context, ca_bundle)
    _load_chain(context, certificate, key)
    return context


def _source(env: Mapping[str, str], variable: str, file: Mapping[str, str], key: str, config) -> tuple[str, str]:
    """A credential's value and where it came from (the variable, else the config file's key)."""
    if env.get(variable):
        return env[variable], variable
    return file.get(key, ""), f"{key} in PACS config {config}"
