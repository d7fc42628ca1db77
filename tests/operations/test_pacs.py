"""PACS pull and push against a real Orthanc (DICOMweb and DIMSE), and their rules.

The ``orthanc_server`` fixture starts the Debian ``orthanc`` with its DICOMweb plugin on
free ports of 127.0.0.1, with HTTP basic authentication, temporary storage and our AE
registered as a modality, and always stops it; ``orthanc`` hands it to each test empty. When Orthanc is not installed the tests
FAIL (``make test`` installs it as root through scripts/install_orthanc.sh).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import requests
from click.testing import CliRunner

from pneumobatch.cli import main
from pneumobatch.core.errors import OptionError
from pneumobatch.core.uids import valid_uid
from pneumobatch.operations.pacs import connection as pacs_connection
from pneumobatch.operations.pacs.archive import InstanceRef
from pneumobatch.operations.pacs.client import open_archive
from pneumobatch.operations.pacs.connection import Connection, Credentials, connect_options
from pneumobatch.operations.pacs.dicomweb import DicomWebArchive
from pneumobatch.operations.pacs.ledger import Ledger
from pneumobatch.operations.pacs.pull import PullConfig, date_window, run_pull
from pneumobatch.operations.pacs.sr import FINDING_CODES, ImageResult, StudyResult
from pneumobatch.predict import run_predict
from pneumobatch.predict_config import PredictConfig
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT

SAMPLES = ROOT / "sample_studies"
USER, PASSWORD = "nightly", "pw-s3cret-不"
AET = "PNEUMOBATCH"
DAY = "20261122"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
INSTALL_HINT = "Orthanc is not installed: run `sh scripts/install_orthanc.sh` as root (or apt-get install -y orthanc orthanc-dicomweb)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _orthanc_binary() -> tuple[str, str]:
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else "")
    plugins = sorted(
        glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*")
        + glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*")
    )
    if not binary or not plugins:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return binary, plugins[0]


@dataclass
class Orthanc:
    http: str
    dicom_port: int

    @property
    def dicomweb(self) -> str:
        return f"{self.http}/dicom-web"

    def _rest(self, method: str, path: str, **kwargs) -> requests.Response:
        response = requests.request(
            method, f"{self.http}{path}", auth=(USER.encode(), PASSWORD.encode()), timeout=30, **kwargs
        )
        response.raise_for_status()
        return response

    def upload(self, path: Path) -> None:
        self._rest("POST", "/instances", data=path.read_bytes())

    def find(self, level: str, query: dict) -> list[str]:
        return self._rest("POST", "/tools/find", data=json.dumps({"Level": level, "Query": query})).json()

    def srs(self) -> list[pydicom.Dataset]:
        """Every SR instance in the archive, read back with pydicom."""
        return [
            pydicom.dcmread(_bytes_io(self._rest("GET", f"/instances/{i}/file").content))
            for i in self.find("Instance", {"Modality": "SR"})
        ]


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)


@contextmanager
def run_orthanc(folder: Path, **overrides):
    """A real Orthanc in ``folder`` (DICOMweb + DIMSE, auth on, our AE registered); the keys
    of ``overrides`` replace the config's (TLS, other modalities). Always stopped."""
    binary, plugin = _orthanc_binary()
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "pneumobatch-tests",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomCheckCalledAet": True,
        "DicomModalities": {
            "pneumobatch": {
                "AET": AET,
                "Host": "127.0.0.1",
                "Port": _free_port(),
                "AllowEcho": True,
                "AllowFind": True,
                "AllowGet": True,
                "AllowMove": True,
                "AllowStore": True,
            }
        },
        "StableAge": 1,
        "HttpTimeout": 30,
        **overrides,
    }
    (folder / "orthanc.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    log = open(folder / "orthanc.log", "wb")
    proc = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    try:
        server = Orthanc(f"http://127.0.0.1:{http_port}", dicom_port)
        deadline = time.monotonic() + 30
        while True:
            try:
                server._rest("GET", "/system")
                break
            except requests.RequestException:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (folder / "orthanc.log").read_text(errors="replace")[-800:]
                    pytest.fail(f"Orthanc did not start: {tail}", pytrace=False)
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()  # waits for the end: never left running
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def orthanc_server(tmp_path_factory):
    """One Orthanc for this module (stopping one takes seconds): DICOMweb + DIMSE, auth on."""
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def orthanc(orthanc_server):
    """The module's Orthanc, emptied: each test starts with an empty archive."""
    for patient in orthanc_server._rest("GET", "/patients").json():
        orthanc_server._rest("DELETE", f"/patients/{patient}")
    assert orthanc_server.find("Instance", {}) == []
    return orthanc_server


# ------------------------------------------------------------------------------ data


PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-0042",
    "PatientBirthDate": "19600101",
    "PatientSex": "F",
    "AccessionNumber": "ACC-17",
    "StudyID": "S17",
    "StudyTime": "101500",
}


def _copy(src: Path, dest: Path, study_date: str, **changes) -> pydicom.Dataset:
    ds = pydicom.dcmread(src)
    ds.StudyDate = study_date
    for keyword, value in {**PATIENT, **changes}.items():
        setattr(ds, keyword, value)
    ds.save_as(dest)
    return ds


@pytest.fixture
def archive_studies(tmp_path) -> dict[str, list[pydicom.Dataset]]:
    """Files to upload, by role: ``wanted`` (CR/DX chest in the window), ``knee`` (CR knee
    in the window), ``other`` (a CT study in the window, a DX study the week before)."""
    out = tmp_path / "upload"
    out.mkdir()
    rng = np.random.default_rng(3)
    wanted = [
        _copy(SAMPLES / "SAMPLE000/ST000/IM0001", out / "a.dcm", DAY),  # DX explicit
        _copy(SAMPLES / "SAMPLE002/ST002/IM0001", out / "b1.dcm", DAY),  # DX JPEG-LS, 2-image study
        _copy(SAMPLES / "SAMPLE002/ST002/IM0002", out / "b2.dcm", DAY),
        _copy(SAMPLES / "SAMPLE001/ST001/IM0001.dcm", out / "c.dcm", DAY),  # CR JPEG 2000
    ]
    study = pydicom.uid.generate_uid()
    for i in range(2):  # synthetic CR study, RLE, two series
        write_cxr(
            out / f"s{i}.dcm",
            rng.integers(0, 4095, (96, 96)).astype(np.uint16),
            "rle",
            bits_stored=12,
            modality="CR",
            study_instance_uid=study,
            patient_id="PID-0043",
            extra={**PATIENT, "PatientID": "PID-0043", "StudyDate": DAY},
        )
        wanted.append(pydicom.dcmread(out / f"s{i}.dcm"))
    knee = [_copy(SAMPLES / "SAMPLE901/XR_KNEE/IM0001", out / "knee.dcm", DAY)]
    other = [_copy(SAMPLES / "SAMPLE900/CT_CHEST/CT000001", out / "ct.dcm", DAY)]
    write_cxr(
        out / "old.dcm", rng.integers(0, 255, (64, 64)).astype(np.uint8), modality="DX", extra={"StudyDate": "20261115"}
    )
    other.append(pydicom.dcmread(out / "old.dcm"))
    return {"wanted": wanted, "knee": knee, "other": other, "folder": out}  # type: ignore[dict-item]


def _upload_all(server: Orthanc, studies) -> None:
    for path in sorted(Path(studies["folder"]).glob("*.dcm")):
        server.upload(path)


def _archive_args(server: Orthanc, protocol: str) -> list[str]:
    if protocol == "dicomweb":
        return ["--url", server.dicomweb]
    return ["--dimse", f"127.0.0.1:{server.dicom_port}", "--calling-ae", AET, "--called-ae", "ORTHANC"]


def _env() -> dict[str, str]:
    return {pacs_connection.ENV_USERNAME: USER, pacs_connection.ENV_PASSWORD: PASSWORD}


def _content_items(ds) -> list:
    """Every content item of an SR, depth first."""
    items = []
    for item in getattr(ds, "ContentSequence", []):
        items.append(item)
        items += _content_items(item)
    return items


def _meaning(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""


def _sop_uids(folder: Path) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in folder.rglob("*.dcm")}


# --------------------------------------------------------------- the whole nightly loop


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_pull_predict_push_against_orthanc(protocol, orthanc, archive_studies, weights_dir, tmp_path, capsys):
    """Pull a night's studies, predict them, push one SR per study and model, read the SRs
    back, push again: no duplicate. DICOMweb runs with --body-part CHEST and the source
    folder; DIMSE without either (so the knee is fetched, predict skips it, and the SR
    headers are fetched by C-FIND)."""
    _upload_all(orthanc, archive_studies)
    runner = CliRunner()
    pulled, ledger = tmp_path / "night", tmp_path / "pacs.ledger.sqlite"
    body = ["--body-part", "CHEST"] if protocol == "dicomweb" else []
    args = ["pull", str(pulled), *_archive_args(orthanc, protocol), "--date", DAY, "--ledger", str(ledger), *body]
    result = runner.invoke(main, args, env=_env())
    assert result.exit_code == 0, result.output

    # exactly the CR/DX studies of the day, as stored (transfer syntax and pixel data)
    wanted = {ds.SOPInstanceUID: ds for ds in archive_studies["wanted"]}
    knee = {ds.SOPInstanceUID for ds in archive_studies["knee"]}
    expected = set(wanted) | (set() if body else knee)
    assert _sop_uids(pulled) == expected
    for path in pulled.rglob("*.dcm"):
        got = pydicom.dcmread(path)
        assert path.relative_to(pulled).parts == (
            got.StudyInstanceUID,
            got.SeriesInstanceUID,
            f"{got.SOPInstanceUID}.dcm",
        )
        if got.SOPInstanceUID in wanted:
            source = wanted[got.SOPInstanceUID]
            assert got.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
            assert got.PixelData == source.PixelData
    studies_pulled = len({ds.StudyInstanceUID for ds in archive_studies["wanted"]}) + (0 if body else 1)

    # predict reads the folder unchanged
    out = tmp_path / "night.csv"
    models = ("tiny", "tiny-etiology")  # binary (threshold) and multi-class (argmax)
    run = run_predict(PredictConfig(inputs=[pulled], output=out, models=models, weights_dir=weights_dir, workers=0))
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    lateral = {uid for uid, ds in wanted.items() if ds.get("ViewPosition") == "LL"}  # SAMPLE002's second image
    assert lateral and set(frame.loc[frame["status"] == "ok", "sop_instance_uid"]) == set(wanted) - lateral
    assert run.counts["ok"] == len(wanted) - len(lateral)
    assert set(frame.loc[frame["status"] == "skipped", "reason"]) == {"lateral"} | (set() if body else {"not-chest"})

    # push: one SR per study (with a predicted image) and model, verified
    push = [
        "push",
        str(out),
        *_archive_args(orthanc, protocol),
        "--ledger",
        str(ledger),
        *(["--source", str(pulled)] if body else []),
    ]
    result = runner.invoke(main, push, env=_env())
    assert result.exit_code == 0, result.output
    studies = {ds.StudyInstanceUID for ds in wanted.values()}
    expected_srs = {(study, model) for study in studies for model in models}
    assert f"{len(expected_srs)} sent and verified" in result.output
    srs = orthanc.srs()
    assert sorted(
        (sr.StudyInstanceUID, sr.ContributingEquipmentSequence[0].ManufacturerModelName) for sr in srs
    ) == sorted(expected_srs)
    ok = frame[frame["status"] == "ok"]
    for sr in srs:
        source = next(ds for ds in wanted.values() if ds.StudyInstanceUID == sr.StudyInstanceUID)
        assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
        assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in wanted.values()}
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "AccessionNumber",
            "StudyID",
            "StudyDate",
        ):
            assert str(sr.get(keyword)) == str(source.get(keyword)), keyword
        model = sr.ContributingEquipmentSequence[0].ManufacturerModelName
        assert sr.ContributingEquipmentSequence[0].Manufacturer == "pneumobatch"
        assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
        rows = ok[(ok["study_instance_uid"] == sr.StudyInstanceUID) & (ok["model"] == model)]
        items = _content_items(sr)
        referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"}
        assert referenced == set(rows["sop_instance_uid"])  # the images, by SOP Instance UID
        # binary: the positive class is evaluated; multi-class: every class, the argmax Present
        classes = ["pneumonia"] if model == "tiny" else ["normal", "bacterial", "viral", "covid-19"]
        probabilities = sorted(
            float(i.MeasuredValueSequence[0].NumericValue) for i in items if _meaning(i) == "Probability"
        )
        assert probabilities == pytest.approx(
            sorted(rows[[f"prob_{c}" for c in classes]].astype(float).to_numpy().ravel()), abs=1e-6
        )
        for cls in classes:
            name = FINDING_CODES[cls].meaning
            evaluations = [
                i.ConceptCodeSequence[0].CodeMeaning for i in items if i.ValueType == "CODE" and _meaning(i) == name
            ]
            assert sorted(evaluations) == sorted(
                "Present" if label == cls else "Absent" for label in rows["pred_label"]
            ), cls
        texts = " ".join(str(i.get("TextValue", "")) for i in items)
        assert f"weights_sha256={rows['weights_sha256'].iloc[0]}" in texts and "NOT FOR DIAGNOSTIC USE" in texts
        assert f"operating_point={'pooled' if model == 'tiny' else 'argmax'}" in texts

    # pushing again: nothing sent (ledger), and with a lost ledger nothing duplicated
    again = runner.invoke(main, push, env=_env())
    assert (
        again.exit_code == 0
        and "0 sent and verified" in again.output
        and f"{len(expected_srs)} delivered before" in again.output
    )
    lost = runner.invoke(main, [*push, "--ledger", str(tmp_path / "new.sqlite")], env=_env())  # the last --ledger wins
    assert lost.exit_code == 0, lost.output
    assert f"{len(expected_srs)} already in the archive" in lost.output
    per_study_model = Counter(
        (sr.StudyInstanceUID, sr.ContributingEquipmentSequence[0].ManufacturerModelName) for sr in orthanc.srs()
    )
    duplicates = sum(n - 1 for n in per_study_model.values())
    assert set(per_study_model) == expected_srs and duplicates == 0

    # a changed result gives a new SR (the old one stays: the archive keeps its history)
    changed = frame.copy()
    first = changed.index[changed["status"] == "ok"][0]
    changed.loc[first, ["prob_normal", "prob_pneumonia", "pred_label"]] = ["0.876544", "0.123456", "normal"]
    changed.to_csv(out, index=False)
    result = runner.invoke(main, push, env=_env())
    assert result.exit_code == 0 and "1 sent and verified" in result.output
    assert len(orthanc.srs()) == len(expected_srs) + 1

    # credentials never reach a file or the output
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "upload" not in p.parts]
    for path in written:
        assert PASSWORD.encode() not in path.read_bytes(), path
    assert PASSWORD not in result.output
    with capsys.disabled():
        print(
            f"\n[PACS {protocol}] studies pulled {studies_pulled}, SRs pushed {len(expected_srs)} "
            f"({len(studies)} studies x {len(models)} models), duplicates after second push {duplicates}"
        )


# --------------------------------------------------------------- resume and next night


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_killed_pull_resumes_and_next_night_fetches_only_new(protocol, orthanc, archive_studies, tmp_path):
    _upload_all(orthanc, archive_studies)
    args = (
        dict(url=orthanc.dicomweb)
        if protocol == "dicomweb"
        else dict(dimse=f"127.0.0.1:{orthanc.dicom_port}", calling_ae=AET, called_ae="ORTHANC")
    )
    conn = connect_options(environ=_env(), **args)
    pulled = tmp_path / "night"
    config = PullConfig(conn, pulled, f"{DAY}-{DAY}", body_parts=("CHEST",), retry_wait=0.01)
    total = len(archive_studies["wanted"])

    class Killed(BaseException):
        pass

    fetched: list = []

    def kill_after_two(ref) -> None:
        fetched.append(ref)
        if len(fetched) == 2:
            raise Killed  # as a SIGTERM/KeyboardInterrupt would, between two instances

    with pytest.raises(Killed):
        run_pull(config, kill_after_two)
    assert len(_sop_uids(pulled)) == 2
    # a temporary file left by a kill mid-write is removed, never read by predict
    study_dir = next(p for p in pulled.iterdir() if p.is_dir())
    series_dir = next(study_dir.iterdir())
    stale = series_dir / ".1.2.3.dcm.tmp-999"
    stale.write_bytes(b"DICM half")

    resumed = run_pull(config)
    # push's fallback for headers not on disk: the archive's copy of the patient module
    with open_archive(conn) as archive:
        source = archive_studies["wanted"][0]
        header = archive.header(InstanceRef(source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID))
    assert (str(header.PatientName), header.PatientID, header.SOPClassUID) == (
        PATIENT["PatientName"],
        PATIENT["PatientID"],
        source.SOPClassUID,
    )
    assert resumed.instances_fetched == total - 2  # nothing fetched twice
    assert _sop_uids(pulled) == {ds.SOPInstanceUID for ds in archive_studies["wanted"]}
    assert resumed.exit_code == 0 and not list(pulled.rglob(".*.tmp-*"))

    # the next night: nothing new, nothing fetched, unchanged studies not even searched
    quiet = run_pull(config)
    assert (quiet.instances_fetched, quiet.studies_up_to_date) == (0, resumed.studies_found)
    # a late image in a known study, and a new study
    late = archive_studies["wanted"][0]
    rng = np.random.default_rng(9)
    write_cxr(
        tmp_path / "late.dcm",
        rng.integers(0, 255, (64, 64)).astype(np.uint8),
        modality="DX",
        study_instance_uid=late.StudyInstanceUID,
        extra={**PATIENT, "StudyDate": DAY},
    )
    write_cxr(
        tmp_path / "new.dcm", rng.integers(0, 255, (64, 64)).astype(np.uint8), modality="CR", extra={"StudyDate": DAY}
    )
    orthanc.upload(tmp_path / "late.dcm")
    orthanc.upload(tmp_path / "new.dcm")
    night2 = run_pull(config)
    assert night2.instances_fetched == 2 and night2.studies_found == resumed.studies_found + 1
    with Ledger(tmp_path / "night.ledger.sqlite") as ledger:
        assert ledger.counts()["fetched"] == total + 2


@pytest.mark.slow
def test_pull_killed_with_sigkill_resumes_without_fetching_twice(orthanc, tmp_path):
    """A real kill -9 of ``pneumobatch pull`` in the middle of a 60-image study."""
    import signal
    import sys

    rng = np.random.default_rng(5)
    study, total = pydicom.uid.generate_uid(), 60
    for i in range(total):
        write_cxr(
            tmp_path / f"{i}.dcm",
            rng.integers(0, 255, (128, 128)).astype(np.uint8),
            modality="DX",
            study_instance_uid=study,
            extra={"StudyDate": DAY},
        )
        orthanc.upload(tmp_path / f"{i}.dcm")
    pulled = tmp_path / "night"
    args = ["pull", str(pulled), "--url", orthanc.dicomweb, "--date", DAY, "-q"]
    env = {**os.environ, **_env(), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "pneumobatch", *args], env=env)
    deadline = time.monotonic() + 60
    while len(list(pulled.rglob("*.dcm"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the pull ended before it could be killed"
    at_kill = len(list(pulled.rglob("*.dcm")))
    assert 3 <= at_kill < total, at_kill

    result = CliRunner().invoke(main, args[:-1], env=_env())
    assert result.exit_code == 0, result.output
    assert f"({total - at_kill} new instances" in result.output  # each missing one fetched once, no other
    assert len(_sop_uids(pulled)) == total and not list(pulled.rglob(".*.tmp-*"))
    with Ledger(tmp_path / "night.ledger.sqlite") as ledger:
        assert ledger.counts()["fetched"] == total


# ------------------------------------------------------------------------ failures


def test_missing_orthanc_fails_with_one_line_install_hint(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y orthanc orthanc-dicomweb"):
        _orthanc_binary()


def test_push_to_unreachable_archive_exits_3_at_once_and_records_nothing(tmp_path, weights_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    write_cxr(folder / "x.dcm", np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8))
    out = tmp_path / "p.csv"
    run_predict(PredictConfig(inputs=[folder], output=out, models=("tiny",), weights_dir=weights_dir, workers=0))
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"  # nothing listens there
    result = CliRunner().invoke(
        main, ["push", str(out), "--url", url, "--source", str(folder), "--retries", "1"], env=_env()
    )
    assert result.exit_code == 3, result.output  # the archive is unusable: one line, not a failure per study
    assert result.output.startswith("Error: ") and "cannot connect" in result.output and PASSWORD not in result.output
    with Ledger(tmp_path / "p.ledger.sqlite") as ledger:
        assert ledger.counts()["delivered"] == 0


def test_pull_from_unreachable_archive_is_one_line_exit_3(tmp_path):
    port = _free_port()
    for archive in (["--url", f"http://127.0.0.1:{port}/dicom-web"], ["--dimse", f"127.0.0.1:{port}"]):
        result = CliRunner().invoke(main, ["pull", str(tmp_path / "n"), *archive, "--date", DAY], env=_env())
        assert result.exit_code == 3, result.output
        assert result.output.startswith("Error: ") and "Traceback" not in result.output


# ------------------------------------------------------------ credentials and rules


def test_credentials_come_from_env_or_a_private_config_never_shown(tmp_path):
    config = tmp_path / "pacs.ini"
    config.write_text(
        f"[pacs]\nurl = https://pacs.example.org/dicom-web\nusername = u\npassword = {PASSWORD}\n", encoding="utf-8"
    )
    config.chmod(0o644)
    with pytest.raises(OptionError, match="chmod 600"):
        connect_options(config=config, environ={})
    result = CliRunner().invoke(
        main, ["pull", str(tmp_path / "n"), "--config", str(config)], env={pacs_connection.ENV_PASSWORD: ""}
    )
    assert result.exit_code == 2 and result.output.startswith("Error: ") and "chmod 600" in result.output
    assert PASSWORD not in result.output and len(result.output.strip().splitlines()) == 1
    config.chmod(0o600)
    conn = connect_options(config=config, environ={})
    assert conn.credentials.password == PASSWORD and PASSWORD not in repr(conn)
    assert conn.tls_verify is True
    session = DicomWebArchive(conn)._session
    assert session.verify is True  # TLS verification on by default
    env = connect_options(config=config, environ={pacs_connection.ENV_PASSWORD: "from-env"})
    assert env.credentials.password == "from-env"
    with pytest.raises(OptionError, match="must not hold credentials"):
        connect_options(url="https://u:p@pacs.example.org/dicom-web", environ={})
    with pytest.raises(OptionError, match="one of them"):
        connect_options(environ={})
    assert conn.scrub(f"401 for {PASSWORD}") == "401 for ***"
    # no command-line option takes a password
    result = CliRunner().invoke(main, ["pull", "--help"])
    assert "password" not in result.output.lower().replace("pneumobatch_pacs_password", "")


def test_date_window():
    from datetime import date

    today = date(2026, 11, 23)
    assert date_window(today=today) == "20261122-20261123"
    assert date_window(on="20261101", today=today) == "20261101-20261101"
    assert date_window(since="7d", until="yesterday", today=today) == "20261116-20261122"
    with pytest.raises(OptionError):
        date_window(since="2026-11-01", today=today)
    with pytest.raises(OptionError):
        date_window(since="20261123", until="20261101", today=today)


def test_uids_from_an_archive_are_checked_before_use_as_file_names():
    assert valid_uid("1.2.840.10008.1.2") == "1.2.840.10008.1.2"
    for bad in ("../../etc/passwd", "1.2/3", "1..2", "01.2", "1.2 ", "x" * 70, ""):
        assert valid_uid(bad) in ("", bad.strip()) and "/" not in valid_uid(bad) and ".." not in valid_uid(bad)


def test_sr_uids_are_deterministic_per_study_model_and_result():
    from pneumobatch.core.card import ModelCard

    card = ModelCard(
        name="m",
        task="pneumonia",
        classes=["normal", "pneumonia"],
        architecture="a",
        input_size=8,
        mean=[],
        std=[],
        positive="pneumonia",
        threshold=0.5,
        weights_sha256="ab" * 32,
    )
    image = ImageResult("1.2.3.4", "1.2.3", (("normal", 0.3), ("pneumonia", 0.7)), "pneumonia", 0.5, "pooled")
    one = StudyResult("1.2.3", card, (image,))
    assert one.sop_instance_uid == StudyResult("1.2.3", card, (image,)).sop_instance_uid
    changed = StudyResult(
        "1.2.3",
        card,
        (ImageResult("1.2.3.4", "1.2.3", (("normal", 0.4), ("pneumonia", 0.6)), "pneumonia", 0.5, "pooled"),),
    )
    other_model = StudyResult("1.2.3", ModelCard(**{**card.to_dict(), "weights_sha256": "cd" * 32}), (image,))
    assert len({one.sop_instance_uid, changed.sop_instance_uid, other_model.sop_instance_uid}) == 3
    assert one.series_instance_uid == changed.series_instance_uid != other_model.series_instance_uid
    assert valid_uid(one.sop_instance_uid)


def test_credentials_repr_hides_secrets():
    creds = Credentials(username="u", password="p4ss", token="")
    conn = Connection(url="https://x/dicom-web", credentials=creds)
    assert "p4ss" not in repr(conn) and "basic" in repr(creds)


def test_a_killed_pulls_temporary_files_are_removed_and_nothing_else(tmp_path):
    """The names atomic_write really makes (tempfile's random suffix), not a guess at them."""
    import tempfile

    from pneumobatch.io.atomicfile import temp_prefix
    from pneumobatch.operations.pacs.spool import remove_stale_temps as _remove_stale_temps

    series = tmp_path / "1.2.3" / "1.2.3.4"
    series.mkdir(parents=True)
    target = series / "1.2.3.4.5.dcm"
    stale = [Path(tempfile.mkstemp(prefix=temp_prefix(target), dir=series)[1]) for _ in range(20)]
    kept = [target, series / ".hidden_by_user.dcm", series / "notes.dcm.tmp-keep", tmp_path / ".1.2.dcm.tmp-abc"]
    for path in kept:
        path.write_bytes(b"x")
    _remove_stale_temps(tmp_path)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
