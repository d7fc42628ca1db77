"""``pneumobatch pull`` against archives that misbehave: small fake servers on 127.0.0.1.

:class:`FakeDicomWeb` is a ``ThreadingHTTPServer`` answering QIDO-RS (DICOM JSON) and
WADO-RS (``multipart/related``) as an archive would, for studies the test describes; a
test makes one instance or one search answer go wrong (garbage bytes, a gzip bomb, a byte
every half second, no Content-Type). :func:`slow_find_scp` is a ``pynetdicom`` C-FIND SCP
sending a pending answer every second. Every server is stopped in its fixture's teardown,
and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from pneumobatch.cli import main
from pneumobatch.core.errors import OptionError
from pneumobatch.operations.pacs.connection import ENV_PASSWORD, ENV_TOKEN, ENV_USERNAME, connect_options
from pneumobatch.operations.pacs.ledger import Ledger
from pneumobatch.operations.pacs.pull import date_window
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT

DAY = "20261122"
TOKEN = "tok-S3CRET-4711"
BOUNDARY = "pneumobatch-test-boundary"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _uid_json(tag: str, value: str, vr: str = "UI") -> dict:
    return {tag: {"vr": vr, "Value": [value]}}


def _multipart(data: bytes) -> bytes:
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


@dataclass
class Instance:
    study: str
    series: str
    sop: str
    data: bytes


@dataclass
class FakeDicomWeb:
    """The archive's studies and what a test made go wrong: ``routes`` maps a path (after
    ``/dicom-web``, without the query) to a function that answers it instead."""

    instances: list[Instance] = field(default_factory=list)
    routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = field(default_factory=dict)
    authorization: list[str] = field(default_factory=list)
    url: str = ""

    def add_study(self, tmp: Path, n: int = 1) -> list[Instance]:
        """A DX study of ``n`` small real DICOM instances."""
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        added = []
        for _ in range(n):
            path = tmp / f"{pydicom.uid.generate_uid()}.dcm"
            ds = write_cxr(
                path,
                np.random.default_rng(len(self.instances)).integers(0, 255, (32, 32)).astype(np.uint8),
                modality="DX",
                study_instance_uid=study,
                series_instance_uid=series,
                extra={"StudyDate": DAY},
            )
            added.append(Instance(study, series, ds.SOPInstanceUID, path.read_bytes()))
        self.instances.extend(added)
        return added

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        self.authorization.append(handler.headers.get("Authorization", ""))
        path = urlsplit(handler.path).path.removeprefix("/dicom-web")
        if path in self.routes:
            return self.routes[path](handler)
        parts = path.strip("/").split("/")
        if parts == ["studies"]:
            studies = sorted({i.study for i in self.instances})
            return _json(
                handler,
                [
                    {
                        **_uid_json("0020000D", s),
                        **_uid_json("00080020", DAY, "DA"),
                        **_uid_json("00201208", str(sum(i.study == s for i in self.instances)), "IS"),
                    }
                    for s in studies
                ],
            )
        if len(parts) == 3 and parts[2] == "series":
            series = sorted({i.series for i in self.instances if i.study == parts[1]})
            return _json(handler, [{**_uid_json("0020000E", s), **_uid_json("00080060", "DX", "CS")} for s in series])
        if len(parts) == 5 and parts[4] == "instances":
            found = [i for i in self.instances if i.study == parts[1] and i.series == parts[3]]
            return _json(handler, [_uid_json("00080018", i.sop) for i in found])
        if len(parts) == 6:
            found = [i for i in self.instances if i.sop == parts[5]]
            if found:
                body = _multipart(found[0].data)
                return _send(handler, 200, body, f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        _send(handler, 404, b"", "text/plain")


def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: Optional[str], **headers) -> None:
    handler.send_response(status)
    if content_type is not None:
        handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in headers.items():
        handler.send_header(key.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def _json(handler: BaseHTTPRequestHandler, value) -> None:
    _send(handler, 200, json.dumps(value).encode(), "application/dicom+json")


def _wado_path(instance: Instance) -> str:
    return f"/studies/{instance.study}/series/{instance.series}/instances/{instance.sop}"


@pytest.fixture
def archive():
    """A fake DICOMweb archive on a free port of 127.0.0.1, stopped after the test."""
    fake = FakeDicomWeb()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            try:
                fake.answer(self)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up: as it should
                pass

        def log_message(self, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:  # a client hanging up mid-answer: expected here
            pass

    server = Server(("127.0.0.1", _free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _pull(archive: FakeDicomWeb, output: Path, *extra: str, env: Optional[dict] = None):
    return CliRunner().invoke(main, ["pull", str(output), "--url", archive.url, "--date", DAY, *extra], env=env or {})


def _dcm(folder: Path) -> set[str]:
    return {p.stem for p in folder.rglob("*.dcm") if p.is_file() and not p.is_symlink()}


def _subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


# ------------------------------------------------------------------ F1, F2: garbage


def test_a_non_dicom_instance_fails_alone_and_the_night_goes_on(archive, tmp_path):
    """F1: WADO answering bytes that are not DICOM is one failed instance, listed; the rest
    of its study and the next study are fetched, exit 1; the next run asks only for it."""
    bad, good = archive.add_study(tmp_path, 2)
    later = archive.add_study(tmp_path, 1)[0]
    bad.data = b"<html>maintenance</html>" * 10
    out = tmp_path / "night"
    result = _pull(archive, out)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and bad.sop in failed[0] and "not DICOM" in failed[0], result.stderr
    assert _dcm(out) == {good.sop, later.sop}
    assert "(2 new instances, 0 already here, 1 failed)" in result.stdout and "1 failed;" in result.stdout

    again = _pull(archive, out)  # the bad study is not complete: asked again, only its bad instance
    assert again.exit_code == 1 and "(0 new instances, 1 already here, 1 failed)" in again.stdout, again.output
    bad.data = _reencoded(bad, tmp_path)
    healed = _pull(archive, out)
    assert healed.exit_code == 0, healed.output
    assert _dcm(out) == {good.sop, later.sop, bad.sop}


def _reencoded(instance: Instance, tmp_path: Path) -> bytes:
    """A real DICOM file for ``instance`` (the archive repaired)."""
    path = tmp_path / "repaired.dcm"
    write_cxr(
        path,
        np.zeros((32, 32), np.uint8) + 7,
        study_instance_uid=instance.study,
        series_instance_uid=instance.series,
        sop_instance_uid=instance.sop,
        extra={"StudyDate": DAY},
    )
    return path.read_bytes()


@pytest.mark.parametrize(
    "answer, code",
    [
        ("[1]", 1),
        ("[[1]]", 1),
        ('{"0020000D": "x"}', 1),
        ('[{"0020000D": {"vr": "UI", "Value": ["../../etc"]}}]', 1),
        ("1", 3),
        ('"studies"', 3),
        ("not json", 3),
    ],
)
def test_a_garbled_study_search_is_a_counted_failure_or_one_line(archive, tmp_path, answer, code):
    """F2: items that are not DICOM JSON data sets are left out and listed (exit 1); an
    answer that is not a list of them at all is one line, exit 3; never a traceback."""
    archive.routes["/studies"] = lambda h: _send(h, 200, answer.encode(), "application/dicom+json")
    result = _pull(archive, tmp_path / "night")
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    if code == 1:
        assert "left out" in result.stderr and "0 studies" in result.stdout
    else:
        assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
        assert "QIDO-RS study search failed" in result.stderr


def test_garbled_series_search_and_a_wado_answer_without_content_type_fail_their_study(archive, tmp_path):
    """F2: a study whose series search is garbage and an instance sent without a
    Content-Type are listed failures; the third study is fetched, exit 1."""
    garbled = archive.add_study(tmp_path, 1)[0]
    untyped = archive.add_study(tmp_path, 1)[0]
    fine = archive.add_study(tmp_path, 1)[0]
    archive.routes[f"/studies/{garbled.study}/series"] = lambda h: _send(h, 200, b"[[1], 2]", "application/json")
    archive.routes[_wado_path(untyped)] = lambda h: _send(h, 200, _multipart(untyped.data), None)
    result = _pull(archive, tmp_path / "night", "--retries", "0")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert any(garbled.study in line and "left out" in line for line in failed), failed
    assert any(untyped.sop in line and "Content-Type" in line for line in failed), failed
    assert _dcm(tmp_path / "night") == {fine.sop}


# --------------------------------------------------------------- F3: a deflate bomb


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """A WADO multipart answer of 1 GiB (a DICOM preamble, then zeros), gzip-compressed: about 1 MB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"\0" * 128 + b"DICM"
    out = [packer.compress(head)]
    zeros = bytes(2**24)
    for _ in range(64):  # 64 x 16 MiB
        out.append(packer.compress(zeros))
    out.append(packer.compress(f"\r\n--{BOUNDARY}--\r\n".encode()))
    out.append(packer.flush())
    return b"".join(out)


def _wait_with_rusage(proc: subprocess.Popen, timeout: float) -> tuple[int, int]:
    """``(exit code, peak RSS in KiB)`` of that one child, or kill it past ``timeout``.

    The peak is the child's own high-water mark (``VmHWM``, reset by exec), read while it
    runs: ``ru_maxrss`` would include the forked copy of this (large) pytest process."""
    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        try:
            with open(f"/proc/{proc.pid}/status") as status_file:
                marks = [int(line.split()[1]) for line in status_file if line.startswith("VmHWM:")]
        except OSError:
            marks = []
        peak = max([peak, *marks])  # a zombie (just exited) has no VmHWM line: keep the last one read
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, peak
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"pull still running after {timeout} s")
        time.sleep(0.05)


def _cap_memory() -> None:
    """The child may not take the machine down if the guard fails: 3 GiB of address space."""
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))


@pytest.mark.slow
def test_a_gzip_bomb_over_wado_is_refused_in_bounded_memory(archive, tmp_path, gzip_bomb):
    """F3: 1 GiB inflated, 1 MB on the wire: the instance fails (over the 256 MiB limit),
    the pull's RSS stays under 500 MB, the next study is fetched, exit 1."""
    bomb = archive.add_study(tmp_path, 1)[0]
    after = archive.add_study(tmp_path, 1)[0]
    assert len(gzip_bomb) < 3 * 2**20
    archive.routes[_wado_path(bomb)] = lambda h: _send(
        h, 200, gzip_bomb, f'multipart/related; type="application/dicom"; boundary={BOUNDARY}', Content_Encoding="gzip"
    )
    out = tmp_path / "night"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumobatch", "pull", str(out), "--url", archive.url, "--date", DAY, "--retries", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_subprocess_env(),
        preexec_fn=_cap_memory,
    )
    started = time.monotonic()
    code, peak_kib = _wait_with_rusage(proc, 60)
    stderr = proc.stderr.read().decode()
    assert code == 1, stderr
    assert time.monotonic() - started < 30
    assert peak_kib < 500 * 1024, f"peak RSS {peak_kib // 1024} MB"
    assert bomb.sop in stderr and "larger than the limit" in stderr and "Traceback" not in stderr
    assert _dcm(out) == {after.sop}


# ------------------------------------------------------------ F4: dripping archives


def _drip(handler: BaseHTTPRequestHandler, every: float = 0.5, headers_too: bool = False) -> None:
    """An answer that never ends: a byte every ``every`` seconds (until the client leaves)."""
    if headers_too:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n":
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(every)
    handler.send_response(200)
    handler.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    for _ in range(600):
        handler.wfile.write(b"-")
        handler.wfile.flush()
        time.sleep(every)


@pytest.mark.slow
def test_an_instance_dripping_a_byte_at_a_time_ends_at_the_request_deadline(archive, tmp_path):
    """F4: WADO trickling a byte every 0.5 s (never a read timeout) fails that study at
    --request-timeout, the next study is fetched, and the whole pull ends in seconds."""
    slow = archive.add_study(tmp_path, 1)[0]
    fine = archive.add_study(tmp_path, 1)[0]
    archive.routes[_wado_path(slow)] = _drip
    out = tmp_path / "night"
    args = ["pull", str(out), "--url", archive.url, "--date", DAY, "--retries", "1", "--request-timeout", "2"]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pneumobatch", *args], capture_output=True, text=True, env=_subprocess_env(), timeout=40
    )
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 20
    assert slow.study in proc.stderr and "no complete answer within 2 s" in proc.stderr
    assert _dcm(out) == {fine.sop}


@pytest.mark.slow
@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "status-line"])
def test_a_study_search_dripping_ends_at_the_request_deadline_exit_3(archive, tmp_path, headers_too):
    """F4: a QIDO search that trickles (its body, or even its status line) is one line, exit 3, in seconds."""
    archive.add_study(tmp_path, 1)
    archive.routes["/studies"] = lambda h: _drip(h, headers_too=headers_too)
    args = ["pull", str(tmp_path / "night"), "--url", archive.url, "--date", DAY, "--request-timeout", "2"]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pneumobatch", *args], capture_output=True, text=True, env=_subprocess_env(), timeout=40
    )
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 15
    assert proc.stderr.startswith("Error: ") and "no complete answer within 2 s" in proc.stderr


def test_a_study_timeout_bounds_a_study_and_its_retries(archive, tmp_path):
    """F4: a study whose instances each arrive just within the request deadline stops at
    --study-timeout; what it fetched is kept and the next run goes on."""
    instances = archive.add_study(tmp_path, 6)

    def slow_answer(instance: Instance) -> Callable:
        def answer(handler: BaseHTTPRequestHandler) -> None:
            time.sleep(0.6)
            _send(handler, 200, _multipart(instance.data), f'multipart/related; boundary="{BOUNDARY}"')

        return answer

    for instance in instances:
        archive.routes[_wado_path(instance)] = slow_answer(instance)
    out = tmp_path / "night"
    started = time.monotonic()
    result = _pull(archive, out, "--study-timeout", "1.5", "--request-timeout", "5")
    assert time.monotonic() - started < 6
    assert result.exit_code == 1, result.output
    assert "not finished within 1.5 s (--study-timeout)" in result.stderr
    assert 1 <= len(_dcm(out)) < 6
    rest = _pull(archive, out)
    assert rest.exit_code == 0 and _dcm(out) == {i.sop for i in instances}, rest.output


# -------------------------------------------------- F4, F10: a C-FIND that drips pendings


@pytest.fixture
def slow_find_scp():
    """A C-FIND SCP that answers a pending every second, 120 times; ``entered`` is set once a search is in."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    entered = threading.Event()

    def on_find(event):
        entered.set()
        for _ in range(120):
            if event.is_cancelled:
                return
            answer = pydicom.Dataset()
            answer.QueryRetrieveLevel = "STUDY"
            answer.StudyInstanceUID = pydicom.uid.generate_uid()
            yield 0xFF00, answer
            time.sleep(1)

    ae = AE(ae_title="SLOWFIND")
    ae.add_supported_context(FIND)
    port = _free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield port, entered
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_c_find_sending_a_pending_every_second_ends_at_the_request_deadline(slow_find_scp, tmp_path):
    """F4: each pending answer resets pynetdicom's timeout; the request deadline does not."""
    port, _ = slow_find_scp
    args = ["pull", str(tmp_path / "n"), "--dimse", f"127.0.0.1:{port}", "--called-ae", "SLOWFIND", "--date", DAY]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pneumobatch", *args, "--request-timeout", "2"],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=40,
    )
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 15
    assert "C-FIND studies failed: no complete answer within 2 s" in proc.stderr


@pytest.mark.slow
def test_sigterm_during_a_slow_c_find_stops_at_once_and_says_how_to_go_on(slow_find_scp, tmp_path):
    """F10: SIGTERM in the middle of a C-FIND ends pull within seconds (the association is
    aborted, not released), exit 143, and the hint is true for pull (no --resume option)."""
    port, entered = slow_find_scp
    args = ["pull", str(tmp_path / "n"), "--dimse", f"127.0.0.1:{port}", "--called-ae", "SLOWFIND", "--date", DAY]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumobatch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_subprocess_env(),
    )
    try:
        assert entered.wait(20), "the search never reached the archive"
        time.sleep(1.5)  # a pending or two in
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    assert took < 5, f"SIGTERM took {took:.1f} s"
    assert "--resume" not in stderr and "run the same command again" in stderr and "ledger" in stderr


def test_the_signal_hint_for_push_names_no_option_push_lacks():
    """F10: push keeps a ledger, not a journal: the hint says so."""
    from pneumobatch.cli import _interrupted
    from pneumobatch.core.errors import Interrupted

    class Ctx:
        invoked_subcommand = "push"

    line = _interrupted(Ctx(), Interrupted(signal.SIGTERM))
    assert "--resume" not in line and "run the same command again" in line and line.startswith("interrupted by SIGTERM")
    Ctx.invoked_subcommand = "predict"
    assert "--resume" in _interrupted(Ctx(), Interrupted(signal.SIGTERM))


# ------------------------------------------------------------------ F5: credentials


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n", " "])
def test_a_token_read_from_a_crlf_file_works_and_is_never_printed(archive, tmp_path, ending):
    """F5: ``$(cat token)`` of a CRLF file leaves a CR: dropped, the token works, and it
    never reaches stderr (a real process, as cron runs it)."""
    study = archive.add_study(tmp_path, 1)[0]
    proc = subprocess.run(
        [sys.executable, "-m", "pneumobatch", "pull", str(tmp_path / "n"), "--url", archive.url, "--date", DAY, "-v"],
        capture_output=True,
        text=True,
        env=_subprocess_env(**{ENV_TOKEN: TOKEN + ending}),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stderr + proc.stdout
    assert set(archive.authorization) == {f"Bearer {TOKEN}"}
    assert _dcm(tmp_path / "n") == {study.sop}


@pytest.mark.parametrize(
    "variable, value",
    [
        (ENV_TOKEN, f"{TOKEN[:5]}\r\n{TOKEN[5:]}"),
        (ENV_TOKEN, f"{TOKEN[:5]} {TOKEN[5:]}"),
        (ENV_TOKEN, f"{TOKEN[:5]}\x1b{TOKEN[5:]}"),
        (ENV_PASSWORD, f"{TOKEN[:5]}\n{TOKEN[5:]}"),
    ],
)
def test_a_credential_with_a_control_character_inside_is_refused_without_quoting_it(archive, tmp_path, variable, value):
    """F5: refused with one line (exit 2) that names the variable, never the value."""
    env = {variable: value, **({ENV_USERNAME: "nightly"} if variable == ENV_PASSWORD else {})}
    result = _pull(archive, tmp_path / "n", env=env)
    assert result.exit_code == 2, result.output
    assert variable in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert TOKEN[:5] not in result.output and TOKEN[5:] not in result.output
    assert archive.authorization == []  # nothing was sent


def test_messages_are_scrubbed_of_every_form_a_library_quotes_a_secret_in():
    """F5: as given, URL-encoded, inside a basic-auth header, escaped in a repr."""
    import base64

    from pneumobatch.operations.pacs.connection import Connection, Credentials

    conn = connect_options(
        url="https://pacs.example.org/dicom-web", environ={ENV_USERNAME: "u", ENV_PASSWORD: "p@ss w"}
    )
    basic = base64.b64encode(b"u:p@ss w").decode()
    for text in ("p@ss w", "p%40ss%20w", f"Authorization: Basic {basic}"):
        assert "p@ss" not in conn.scrub(text) and "%40ss" not in conn.scrub(text) and basic not in conn.scrub(text)
    raw = Connection(url="https://x/dicom-web", credentials=Credentials(token=TOKEN + "\r"))  # built by hand, unchecked
    assert TOKEN not in raw.scrub(repr({"Authorization": f"Bearer {TOKEN}\r"}))


# ---------------------------------------------------------------- F6, F7: planted links


def test_a_study_folder_planted_as_a_link_outside_output_is_never_written_through(archive, tmp_path):
    """F6: OUTPUT/<study> is a link to a folder outside: its instance fails (listed, exit 1),
    nothing lands outside OUTPUT, the other study is fetched."""
    planted = archive.add_study(tmp_path, 1)[0]
    other = archive.add_study(tmp_path, 1)[0]
    out, outside = tmp_path / "night", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / planted.study).symlink_to(outside, target_is_directory=True)
    result = _pull(archive, out)
    assert result.exit_code == 1, result.output
    assert list(outside.rglob("*")) == []
    assert any(planted.sop in line and "symbolic link" in line for line in result.stderr.splitlines())
    assert _dcm(out) == {other.sop}


def test_a_file_link_planted_at_an_instance_path_is_replaced_by_the_instance(archive, tmp_path):
    """F7: a link where an instance belongs is not that instance: it is fetched, the link
    replaced by the file (the file it pointed to untouched), and only then recorded."""
    instance = archive.add_study(tmp_path, 1)[0]
    out = tmp_path / "night"
    series = out / instance.study / instance.series
    series.mkdir(parents=True)
    decoy = tmp_path / "decoy.dcm"
    decoy.write_bytes(b"not the instance")
    (series / f"{instance.sop}.dcm").symlink_to(decoy)
    result = _pull(archive, out)
    assert result.exit_code == 0, result.output
    assert "(1 new instances, 0 already here)" in result.stdout
    path = series / f"{instance.sop}.dcm"
    assert not path.is_symlink() and pydicom.dcmread(path).SOPInstanceUID == instance.sop
    assert decoy.read_bytes() == b"not the instance"
    with Ledger(tmp_path / "night.ledger.sqlite") as ledger:
        assert ledger.counts()["fetched"] == 1


# ------------------------------------------------------------------------- F8: dates


@pytest.mark.parametrize("since", ["1000000d", "99999999999999999999999d"])
def test_a_window_before_the_calendar_starts_is_a_usage_error(tmp_path, since):
    """F8: one line, exit 2 (was OverflowError, exit 4)."""
    with pytest.raises(OptionError, match="before the calendar starts"):
        date_window(since=since)
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    result = CliRunner().invoke(main, ["pull", str(tmp_path / "n"), "--url", url, "--since", since])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
