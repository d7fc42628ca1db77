"""``pneumobatch listen``, ``predict --spool``, pull by C-MOVE and DIMSE over TLS, against a real Orthanc.

Orthanc is ``test_pacs.py``'s (:func:`~tests.operations.test_pacs.run_orthanc`); the modality
it sends to (our listener, or pull's C-MOVE receiver) is registered through its REST API
(``PUT /modalities/{id}``) with the test's free port, and it sends with
``POST /modalities/{id}/store``. The listener is a real ``pneumobatch listen`` subprocess
(started by :func:`listening`, always stopped); the allow-list and refusal rules are also
checked in-process (:class:`~pneumobatch.operations.pacs.listen.Listener`) with a
``pynetdicom`` SCU. TLS uses a CA and certificates made in the test with the ``openssl`` CLI.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import requests
from click.testing import CliRunner
from pydicom.uid import generate_uid
from pynetdicom import AE

from pneumobatch.cli import main
from pneumobatch.operations.pacs.ledger import Ledger
from pneumobatch.operations.pacs.listen import ListenConfig, Listener
from pneumobatch.operations.pacs.spool import JOURNAL_NAME, SpoolJournal
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT
from tests.operations import test_pacs
from tests.operations.test_pacs import AET, DAY, PATIENT, USER, _env, _free_port, run_orthanc

orthanc_server, orthanc = test_pacs.orthanc_server, test_pacs.orthanc

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
QUIET_S = 1.5  # the listener's --study-timeout in these tests
STOP_S = 30  # the most a listener may take to stop on SIGTERM


def _images(folder: Path, n: int, study: str = "", size: int = 64, seed: int = 0, modality: str = "CR") -> list[Path]:
    """``n`` radiographs of one study (a new one unless given), with the test patient's name."""
    folder.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{study[-8:]}-{i}.dcm"
        write_cxr(
            path,
            rng.integers(0, 255, (size, size)).astype(np.uint8),
            modality=modality,
            study_instance_uid=study,
            extra={**PATIENT, "StudyDate": DAY},
        )
        paths.append(path)
    return paths


def _upload(server, paths: list[Path]) -> str:
    """Upload one study's files; its Orthanc ID."""
    for path in paths:
        server.upload(path)
    study = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    return server.find("Study", {"StudyInstanceUID": study})[0]


def _modality(server, port: int, ae: str = AET, **allow) -> None:
    """(Re)register the modality Orthanc knows us by, at ``port``."""
    settings = {"AET": ae, "Host": "127.0.0.1", "Port": port, "AllowGet": True, "AllowMove": True, **allow}
    server._rest("PUT", "/modalities/pneumobatch", json=settings)


def _store(server, study_id: str, asynchronous: bool = False) -> requests.Response:
    """Orthanc sends a study to our modality (C-STORE); not raising on failure."""
    return requests.post(
        f"{server.http}/modalities/pneumobatch/store",
        json={"Resources": [study_id], "Synchronous": not asynchronous},
        auth=(USER.encode(), test_pacs.PASSWORD.encode()),
        timeout=120,
    )


def _spooled(spool: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, for every instance in the spool."""
    return {p.stem: p for p in spool.glob("*/*/*.dcm")}


def _wait(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}", pytrace=False)


@contextmanager
def listening(spool: Path, port: int, *args: str):
    """A real ``pneumobatch listen`` subprocess, ready (its start line seen); SIGTERM at the end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = spool.parent / f"listen-{port}.log"
    out = spool.parent / f"listen-{port}.out"
    with open(log, "wb") as err, open(out, "wb") as std:
        command = [
            sys.executable,
            "-m",
            "pneumobatch",
            "listen",
            str(spool),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
        ]
        proc = subprocess.Popen([*command, "--study-timeout", str(QUIET_S), *args], stderr=err, stdout=std, env=env)
        try:
            _wait(lambda: "listening on" in log.read_text() or proc.poll() is not None, 60, "the listener to start")
            assert proc.poll() is None, log.read_text()
            proc.log, proc.out = log, out  # type: ignore[attr-defined]
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _stop(proc) -> str:
    """SIGTERM the listener; its exit code must be 0; its stdout (the counts)."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=STOP_S) == 0, proc.log.read_text()
    return proc.out.read_text()


def _predict_spool(spool: Path, out: Path, weights_dir: Path):
    args = ["predict", "--spool", str(spool), "-o", str(out), "-m", "tiny", "--weights-dir", str(weights_dir)]
    return CliRunner().invoke(main, [*args, "--workers", "0", "--overwrite"])


# --------------------------------------------------------------- routed to the listener


@pytest.mark.slow
def test_orthanc_routes_studies_to_the_listener_predict_spool_predicts_each_once_and_push_files_the_sr(
    orthanc, tmp_path, weights_dir
):
    spool, port = tmp_path / "spool", _free_port()
    first = _images(tmp_path / "up", 3, seed=1)
    second = _images(tmp_path / "up", 1, seed=2, modality="DX")
    ids = [_upload(orthanc, first), _upload(orthanc, second)]
    _modality(orthanc, port)
    metrics = tmp_path / "listen.prom"
    with listening(spool, port, "--allow", "ORTHANC@127.0.0.1", "--metrics", str(metrics)) as proc:
        assert _store(orthanc, ids[0]).ok
        with SpoolJournal(spool) as journal:  # just arrived: still in its quiet period, not for predict
            assert journal.counts()["received"] == 3 and journal.to_predict() == []
        assert _predict_spool(spool, tmp_path / "early.csv", weights_dir).exit_code == 0
        assert len(pd.read_csv(tmp_path / "early.csv")) == 0  # nothing complete yet: an empty night
        assert _store(orthanc, ids[1]).ok
        assert _store(orthanc, ids[0]).ok  # sent again: kept once
        sent = {pydicom.dcmread(p).SOPInstanceUID: p for p in first + second}
        assert set(_spooled(spool)) == set(sent)
        for sop, path in _spooled(spool).items():  # the UID path, each file the instance as sent
            ds = pydicom.dcmread(path)
            assert path.relative_to(spool).parts == (ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{sop}.dcm")
            assert ds.PixelData == pydicom.dcmread(sent[sop]).PixelData
        with SpoolJournal(spool) as journal:
            _wait(lambda: journal.counts()["complete"] == 2, 10 * QUIET_S, "the studies to be complete")

        out = tmp_path / "night.csv"
        result = _predict_spool(spool, out, weights_dir)
        assert result.exit_code == 0, result.output
        assert "2 complete studies" in result.output
        rows = pd.read_csv(out)
        assert sorted(rows["sop_instance_uid"]) == sorted(sent) and set(rows["status"]) == {"ok"}
        assert all((spool / p).is_file() for p in rows["path"])  # paths relative to the spool
        again = _predict_spool(spool, tmp_path / "again.csv", weights_dir)
        assert "0 complete studies" in again.output and len(pd.read_csv(tmp_path / "again.csv")) == 0

        push = CliRunner().invoke(
            main,
            ["push", str(out), "--source", str(spool), "--dimse", f"127.0.0.1:{orthanc.dicom_port}"]
            + ["--calling-ae", AET, "--called-ae", "ORTHANC", "--ledger", str(tmp_path / "l.sqlite")],
            env=_env(),
        )
        assert push.exit_code == 0, push.output
        srs = orthanc.srs()
        assert sorted(s.StudyInstanceUID for s in srs) == sorted(
            {pydicom.dcmread(p).StudyInstanceUID for p in sent.values()}
        )
        counts = _stop(proc)
    assert "7 instances" not in counts and "4 instances received, 3 duplicates, 0 refused" in counts, counts
    assert "2 studies complete" in counts
    text = metrics.read_text()
    assert 'pneumobatch_listen_instances{outcome="received"} 4.0' in text
    assert 'pneumobatch_listen_instances{outcome="duplicate"} 3.0' in text
    journal_bytes = b"".join(p.read_bytes() for p in spool.glob(JOURNAL_NAME + "*"))
    assert PATIENT["PatientName"].encode() not in journal_bytes  # the journal holds no patient name


# ------------------------------------------------------------------------ refusals


@pytest.fixture
def listener(tmp_path):
    """An in-process listener allowing STORESCU@127.0.0.1 only."""
    started = []

    def start(**changes) -> tuple[Listener, int]:
        port = _free_port()
        config = ListenConfig(tmp_path / "spool", ["STORESCU@127.0.0.1"], port=port, bind="127.0.0.1", study_timeout=60)
        for key, value in changes.items():
            setattr(config, key, value)
        lsn = Listener(config)
        lsn.start()
        started.append(lsn)
        return lsn, port

    yield start
    for lsn in started:
        lsn.stop()


def _scu(port: int, calling: str = "STORESCU", called: str = AET, classes=(CR, CT)):
    ae = AE(ae_title=calling)
    for cls in classes:
        ae.add_requested_context(cls, [pydicom.uid.ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title=called)


def _instance(tmp_path: Path, **changes) -> pydicom.Dataset:
    (path,) = _images(tmp_path / "scu", 1, seed=len(list((tmp_path).rglob("*.dcm"))))
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def test_callers_off_the_allow_list_are_rejected_and_other_classes_refused(listener, tmp_path):
    lsn, port = listener()
    for calling, called in (("INTRUDER", AET), ("STORESCU", "SOMEONE-ELSE")):
        assoc = _scu(port, calling, called)
        assert assoc.is_rejected, (calling, called)
    lsn_other, other_port = listener(
        allow=["STORESCU@10.9.9.0/24"], spool=tmp_path / "other"
    )  # right AE, wrong address
    assert _scu(other_port).is_rejected

    assoc = _scu(port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assert CR in accepted and CT not in accepted  # a CT is not offered: its context is rejected
    good = _instance(tmp_path)
    assert assoc.send_c_store(good).Status == 0x0000
    assert assoc.send_c_store(good).Status == 0x0000  # a duplicate: success, kept once
    assert assoc.send_c_store(_instance(tmp_path, StudyInstanceUID="1.2.3.04")).Status == 0xC000  # invalid UID
    assert assoc.send_c_store(_instance(tmp_path, StudyInstanceUID="../../etc")).Status == 0xC000
    moved = _instance(tmp_path, SOPInstanceUID=good.SOPInstanceUID, StudyInstanceUID=generate_uid())
    assert assoc.send_c_store(moved).Status == 0xA900  # the same instance claimed by another study
    assoc.release()
    result = lsn.stop()
    assert (result.received, result.duplicates, result.refused, result.rejected) == (1, 1, 3, 2)
    assert list(_spooled(tmp_path / "spool")) == [good.SOPInstanceUID]
    assert lsn_other.stop().rejected == 1


def test_a_full_disk_answers_out_of_resources_and_leaves_nothing_half_written(listener, tmp_path, monkeypatch):
    lsn, port = listener()
    assoc = _scu(port)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert assoc.send_c_store(_instance(tmp_path)).Status == 0xA700
    monkeypatch.undo()
    spool = tmp_path / "spool"
    assert not [p for p in spool.rglob("*") if p.is_file() and p.parent != spool]  # no partial file
    ds = _instance(tmp_path)
    assert assoc.send_c_store(ds).Status == 0x0000  # room again: the retry succeeds
    assoc.release()
    assert (lsn.stop().refused, list(_spooled(spool))) == (1, [ds.SOPInstanceUID])


def test_listen_refuses_to_start_without_an_allow_list(tmp_path):
    result = CliRunner().invoke(main, ["listen", str(tmp_path / "s"), "--port", str(_free_port())])
    assert result.exit_code == 2 and result.output.startswith("Error: ") and "--allow" in result.output


# ------------------------------------------------------------------ kill -9, SIGTERM


@pytest.mark.slow
def test_kill_9_mid_association_leaves_no_partial_file_and_the_archive_retry_succeeds(orthanc, tmp_path):
    spool, port = tmp_path / "spool", _free_port()
    paths = _images(tmp_path / "up", 40, size=512)
    study_id = _upload(orthanc, paths)
    _modality(orthanc, port)
    with listening(spool, port, "--allow", "ORTHANC@127.0.0.1") as proc:
        job = _store(orthanc, study_id, asynchronous=True)
        assert job.ok
        _wait(lambda: len(_spooled(spool)) >= 3, 60, "three instances")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at_kill = _spooled(spool)
    assert 3 <= len(at_kill) < 40, len(at_kill)
    for path in at_kill.values():  # every file in place is whole
        assert len(pydicom.dcmread(path).PixelData) == 512 * 512
    stale = next(iter(at_kill.values())).parent / ".1.2.3.dcm.tmp-x7k2"  # what a kill mid-write leaves
    stale.write_bytes(b"DICM half")
    with listening(spool, port, "--allow", "ORTHANC@127.0.0.1") as proc:
        assert not stale.exists()  # removed before anything reads the spool
        assert _store(orthanc, study_id).ok  # the archive's retry
        assert len(_spooled(spool)) == 40
        counts = _stop(proc)
    with SpoolJournal(spool) as journal:
        assert journal.counts()["received"] == 40  # each instance once
    assert not list(spool.rglob(".*.tmp-*"))
    assert "duplicates" in counts


@pytest.mark.slow
def test_sigterm_finishes_the_association_in_progress(tmp_path):
    spool, port = tmp_path / "spool", _free_port()
    with listening(spool, port, "--allow", "STORESCU@127.0.0.1") as proc:
        assoc = _scu(port)
        assert assoc.is_established
        assert assoc.send_c_store(_instance(tmp_path)).Status == 0x0000
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None  # still finishing our association
        assert _scu(port).is_established is False  # but no new one is accepted
        for _ in range(2):
            assert assoc.send_c_store(_instance(tmp_path)).Status == 0x0000
        assoc.release()
        assert proc.wait(timeout=STOP_S) == 0
    assert "3 instances received" in proc.out.read_text()
    assert len(_spooled(spool)) == 3


# ----------------------------------------------------------------------- C-MOVE


@pytest.mark.slow
@pytest.mark.parametrize("how", ["refused-get", "move-to"])
def test_pull_by_c_move_from_an_archive_without_c_get(how, orthanc, tmp_path):
    study = _images(tmp_path / "up", 3)
    _upload(orthanc, study)
    move_port = _free_port()
    _modality(orthanc, move_port, AllowGet=False)
    args = ["pull", str(tmp_path / "night"), "--dimse", f"127.0.0.1:{orthanc.dicom_port}", "--called-ae", "ORTHANC"]
    args += ["--calling-ae", AET, "--date", DAY, "--move-port", str(move_port)]
    if how == "move-to":
        args += ["--move-to", AET]
    result = CliRunner().invoke(main, args, env=_env())
    assert result.exit_code == 0, result.output
    assert "(3 new instances" in result.output
    assert set(_spooled(tmp_path / "night")) == {pydicom.dcmread(p).SOPInstanceUID for p in study}
    again = CliRunner().invoke(main, args, env=_env())
    assert again.exit_code == 0 and "(0 new instances" in again.output  # the same ledger: nothing twice
    with Ledger(tmp_path / "night.ledger.sqlite") as ledger:
        assert ledger.counts()["fetched"] == 3


# -------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(folder: Path, name: str) -> None:
    """``name``-ca.crt and server/client certificates for 127.0.0.1 it signs (``name``-*.crt/key)."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = folder / "leaf.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.crt",
        "-days", "2", "-subj", f"/CN={name} test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder,
    )  # fmt: skip
    for leaf in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-{leaf}.key", "-out", f"{name}-{leaf}.csr",
            "-subj", "/CN=127.0.0.1", cwd=folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}-{leaf}.csr", "-CA", f"{name}-ca.crt", "-CAkey", f"{name}-ca.key",
            "-CAcreateserial", "-out", f"{name}-{leaf}.crt", "-days", "2", "-extfile", str(ext), cwd=folder,
        )  # fmt: skip


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A site CA (trusted) and a stranger's CA, and an Orthanc speaking DIMSE over TLS only."""
    folder = tmp_path_factory.mktemp("tls")
    _make_ca(folder, "site")
    _make_ca(folder, "stranger")
    settings = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(folder / "site-server.crt"),
        "DicomTlsPrivateKey": str(folder / "site-server.key"),
        "DicomTlsTrustedCertificates": str(folder / "site-ca.crt"),
        "DicomTlsRemoteCertificateRequired": True,
    }
    with run_orthanc(tmp_path_factory.mktemp("orthanc-tls"), **settings) as server:
        yield folder, server


@pytest.mark.slow
def test_dimse_over_tls_listen_pull_and_push_and_an_untrusted_certificate_is_refused(tls, tmp_path, weights_dir):
    certs, server = tls
    study = _images(tmp_path / "up", 2)
    study_id = _upload(server, study)
    sops = {pydicom.dcmread(p).SOPInstanceUID for p in study}
    port = _free_port()
    _modality(server, port, UseDicomTls=True)
    site = ["--tls-cert", str(certs / "site-server.crt"), "--tls-key", str(certs / "site-server.key")]
    allow = ["--allow", "ORTHANC@127.0.0.1"]
    with listening(tmp_path / "spool", port, *allow, *site, "--ca-bundle", str(certs / "site-ca.crt")) as proc:
        assert "over TLS" in proc.log.read_text()
        assert _store(server, study_id).ok
        assert set(_spooled(tmp_path / "spool")) == sops
    # a listener trusting only a stranger's CA: Orthanc's certificate is refused, nothing lands
    with listening(tmp_path / "spool2", port, *allow, *site, "--ca-bundle", str(certs / "stranger-ca.crt")):
        assert not _store(server, study_id).ok
        assert _spooled(tmp_path / "spool2") == {}

    pull = ["pull", str(tmp_path / "night"), "--dimse", f"127.0.0.1:{server.dicom_port}", "--called-ae", "ORTHANC"]
    pull += ["--calling-ae", AET, "--date", DAY, "--tls", "--tls-cert", str(certs / "site-client.crt")]
    pull += ["--tls-key", str(certs / "site-client.key")]
    ok = CliRunner().invoke(main, [*pull, "--ca-bundle", str(certs / "site-ca.crt")], env=_env())
    assert ok.exit_code == 0, ok.output
    assert set(_spooled(tmp_path / "night")) == sops
    stranger = CliRunner().invoke(
        main, [pull[0], str(tmp_path / "n2"), *pull[2:], "--ca-bundle", str(certs / "stranger-ca.crt")], env=_env()
    )
    assert stranger.exit_code == 3 and stranger.output.startswith("Error: ") and "TLS" in stranger.output, (
        stranger.output
    )
    plain = CliRunner().invoke(main, [pull[0], str(tmp_path / "n3"), *pull[2:10]], env=_env())
    assert plain.exit_code == 3  # an archive speaking TLS only does not answer plain DIMSE

    out = tmp_path / "night.csv"
    predicted = CliRunner().invoke(
        main, ["predict", str(tmp_path / "night"), "-o", str(out), "-m", "tiny", "--weights-dir", str(weights_dir)]
    )
    assert predicted.exit_code == 0, predicted.output
    push = ["push", str(out), "--source", str(tmp_path / "night"), *pull[2:], "--ca-bundle", str(certs / "site-ca.crt")]
    pushed = CliRunner().invoke(main, [a for a in push if a not in ("--date", DAY)], env=_env())
    assert pushed.exit_code == 0, pushed.output
    (sr,) = server.srs()  # the SR, over TLS, in the study it was computed from
    assert sr.StudyInstanceUID == pydicom.dcmread(study[0]).StudyInstanceUID


def test_journal_has_no_patient_table(tmp_path):
    with SpoolJournal(tmp_path) as journal:
        journal.counts()
    columns = {
        row[1].lower()
        for table in ("received", "spooled_studies")
        for row in sqlite3.connect(tmp_path / JOURNAL_NAME).execute(f"PRAGMA table_info({table})")
    }
    assert not any("patient" in c or "name" in c for c in columns)


def test_listen_on_a_taken_port_or_a_taken_spool_is_one_line_exit_3(listener, tmp_path):
    lsn, port = listener()
    taken_port = CliRunner().invoke(
        main, ["listen", str(tmp_path / "s2"), "--port", str(port), "--bind", "127.0.0.1"] + ["--allow", "A@127.0.0.1"]
    )
    assert taken_port.exit_code == 3 and taken_port.output.startswith("Error: cannot listen on"), taken_port.output
    taken_spool = CliRunner().invoke(
        main, ["listen", str(tmp_path / "spool"), "--port", str(_free_port())] + ["--allow", "A@127.0.0.1"]
    )
    assert taken_spool.exit_code == 3 and "another pneumobatch listen" in taken_spool.output, taken_spool.output


def test_predict_takes_inputs_or_a_spool_and_a_spool_must_be_one(tmp_path):
    both = CliRunner().invoke(main, ["predict", str(tmp_path), "--spool", str(tmp_path)])
    assert both.exit_code == 2 and "one of them" in both.output
    not_a_spool = CliRunner().invoke(main, ["predict", "--spool", str(tmp_path)])
    assert not_a_spool.exit_code == 2 and "is not a pneumobatch listen spool" in not_a_spool.output
