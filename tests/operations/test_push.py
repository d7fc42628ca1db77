"""``pneumobatch push`` never puts a result in the wrong study, never sends a value the SR
cannot state truthfully, and tells an unusable archive (exit 3, at once) from a bad study.

Issue 23, P1-P5. Every push runs as a real ``python -m pneumobatch push`` subprocess with a
timeout, so a hang fails the test instead of stalling the suite. The Orthanc fixtures are
``tests/operations/test_pacs.py``'s (imported: this module starts its own Orthanc); the
misbehaving archives are small fake servers started here on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

from pneumobatch.operations.pacs.ledger import Ledger
from pneumobatch.predict import run_predict
from pneumobatch.predict_config import PredictConfig
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT
from tests.operations import test_pacs
from tests.operations.test_pacs import AET, PASSWORD, Orthanc, _content_items, _env, _free_port

# test_pacs.py's Orthanc (pytest finds fixtures by name in the module): one for this module
orthanc_server, orthanc = test_pacs.orthanc_server, test_pacs.orthanc

#: Seconds a push may take against an archive that cannot be used (P1: "in bounded time").
FAIL_FAST_S = 20
#: Seconds any push here may run before the test kills it (a hang is a failure).
PUSH_TIMEOUT_S = 60


@dataclass
class Night:
    """A predicted night: the folder predict read, its CSV and run.json, the images by name."""

    source: Path
    csv: Path
    run_json: Path
    images: dict[str, pydicom.Dataset]  # "a" -> patient A's image, ...
    paths: dict[str, str]  # "a" -> its ``path`` in the CSV


@pytest.fixture(scope="module")
def night(tmp_path_factory, weights_dir) -> Night:
    """Three patients: A and B one image each in their own study, C four images in one study."""
    folder = tmp_path_factory.mktemp("night")
    source = folder / "source"
    rng = np.random.default_rng(23)
    layout = {"a": ("PID-A", "Alpha^Anna"), "b": ("PID-B", "Beta^Bert")}
    layout.update({f"c{i}": ("PID-C", "Gamma^Cleo") for i in range(1, 5)})
    study_c, series_c = generate_uid(), generate_uid()
    images, paths = {}, {}
    for name, (patient_id, patient_name) in layout.items():
        rel = f"{name[0]}/{name}.dcm"
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        in_c = name.startswith("c")
        images[name] = write_cxr(
            source / rel,
            rng.integers(0, 255, (64, 64)).astype(np.uint8),
            study_instance_uid=study_c if in_c else None,
            series_instance_uid=series_c if in_c else None,
            patient_id=patient_id,
            extra={"PatientName": patient_name, "StudyDate": "20261122"},
        )
        paths[name] = rel
    csv = folder / "night.csv"
    run_predict(PredictConfig(inputs=[source], output=csv, models=("tiny",), weights_dir=weights_dir, workers=0))
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert set(frame["path"]) == set(paths.values()) and set(frame["status"]) == {"ok"}
    return Night(source, csv, csv.with_name("night.run.json"), images, paths)


def _predictions(night: Night, folder: Path, edit=None, keep: tuple[str, ...] = ()) -> Path:
    """A copy of the night's CSV (and run.json) in ``folder``: only the rows of the images
    ``keep`` names (all when empty), after ``edit(frame)``, a hand edit."""
    frame = pd.read_csv(night.csv, dtype=str, keep_default_na=False)
    if keep:
        frame = frame[frame["path"].isin([night.paths[name] for name in keep])].copy()
    if edit is not None:
        edit(frame)
    out = folder / "p.csv"
    frame.to_csv(out, index=False)
    shutil.copyfile(night.run_json, folder / "p.run.json")
    return out


def _row(frame: pd.DataFrame, night: Night, name: str) -> int:
    return frame.index[frame["path"] == night.paths[name]][0]


@dataclass
class Pushed:
    code: int
    stdout: str
    stderr: str
    seconds: float


def _push(predictions: Path, *args: str, timeout: float = PUSH_TIMEOUT_S) -> Pushed:
    """``pneumobatch push PREDICTIONS ARGS`` in a subprocess, killed after ``timeout`` seconds."""
    env = {
        **os.environ,
        **_env(),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "pneumobatch", "push", str(predictions), *args]
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"push still running after {timeout}s (a hang); stderr: {stderr[-500:]}", pytrace=False)
    return Pushed(proc.returncode, stdout, stderr, time.monotonic() - start)


def _refused_line(pushed: Pushed, path: str) -> str:
    """The stderr line that reports the row of ``path`` refused."""
    lines = [line for line in pushed.stderr.splitlines() if repr(path) in line and "refused" in line]
    assert len(lines) == 1, pushed.stderr
    return lines[0]


def _srs_by_study(server: Orthanc) -> dict[str, list[pydicom.Dataset]]:
    found: dict[str, list[pydicom.Dataset]] = {}
    for sr in server.srs():
        found.setdefault(sr.StudyInstanceUID, []).append(sr)
    return found


def _referenced(sr: pydicom.Dataset) -> set[str]:
    return {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in _content_items(sr) if i.ValueType == "IMAGE"}


def _upload(server: Orthanc, night: Night, *names: str) -> None:
    for name in names:
        server.upload(night.source / night.paths[name])


# ------------------------------------------------------------- P2: the study is the image's


ARCHIVES = {
    "dicomweb-source": lambda o, night: ["--url", o.dicomweb, "--source", str(night.source)],
    "dicomweb-archive": lambda o, night: ["--url", o.dicomweb],
    "dimse-archive": lambda o, night: [
        "--dimse",
        f"127.0.0.1:{o.dicom_port}",
        "--calling-ae",
        AET,
        "--called-ae",
        "ORTHANC",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("how", sorted(ARCHIVES))
def test_a_row_edited_into_another_patients_study_is_refused(how, orthanc, night, tmp_path):
    """Patient A's row given patient B's Study Instance UID (a spreadsheet slip): A's result
    never reaches B's study; an unknown UID never makes a phantom study. The references
    come from A's own header (read from --source, or the archive's copy)."""
    _upload(orthanc, night, "a", "b")
    a, b = night.images["a"], night.images["b"]

    def into_b(frame):
        frame.loc[_row(frame, night, "a"), "study_instance_uid"] = b.StudyInstanceUID

    edited = _predictions(night, tmp_path, into_b, keep=("a", "b"))
    pushed = _push(edited, *ARCHIVES[how](orthanc, night), "--ledger", str(tmp_path / "l1.sqlite"))
    assert pushed.code == 1, pushed.stderr
    assert "study_instance_uid" in _refused_line(pushed, night.paths["a"])
    srs = _srs_by_study(orthanc)
    assert set(srs) == {b.StudyInstanceUID}, "an SR went into another study than B's own"
    for sr in srs[b.StudyInstanceUID]:
        assert (sr.PatientID, _referenced(sr)) == ("PID-B", {b.SOPInstanceUID})
    assert "1 sent and verified" in pushed.stdout and "1 predicted rows refused" in pushed.stdout

    unknown = generate_uid()

    def into_nowhere(frame):
        into_b(frame)
        frame.loc[_row(frame, night, "a"), "study_instance_uid"] = unknown

    edited = _predictions(night, tmp_path, into_nowhere, keep=("a", "b"))
    pushed = _push(edited, *ARCHIVES[how](orthanc, night), "--ledger", str(tmp_path / "l2.sqlite"))
    assert pushed.code == 1, pushed.stderr
    _refused_line(pushed, night.paths["a"])
    assert orthanc.find("Study", {"StudyInstanceUID": unknown}) == [], "a phantom study was made"
    assert set(_srs_by_study(orthanc)) == {b.StudyInstanceUID}
    assert a.SOPInstanceUID not in set().union(*(_referenced(sr) for sr in orthanc.srs()))


# --------------------------------------------------- P3, P4: values the SR cannot hold


@pytest.mark.slow
def test_rows_whose_values_the_sr_cannot_state_are_refused_and_counted(orthanc, night, tmp_path):
    """Each bad row is refused with its path and reason, counted, exit 1; the good row of
    the same study is still sent, alone, and no refused image is named in any SR."""
    _upload(orthanc, night, *night.images)

    def vandalise(frame):
        frame.loc[_row(frame, night, "c1"), "prob_pneumonia"] = "7.5"
        c2 = _row(frame, night, "c2")  # P=0.9998 but reported "normal" (the SR would say Absent)
        frame.loc[c2, ["prob_normal", "prob_pneumonia", "pred_label"]] = ["0.0002", "0.9998", "normal"]
        frame.loc[_row(frame, night, "c3"), "operating_point"] = "x" * 100_000
        frame.loc[_row(frame, night, "b"), "prob_pneumonia"] = "nan"
        frame.loc[_row(frame, night, "a"), "model"] = "tiny\nINJECTED"

    edited = _predictions(night, tmp_path, vandalise)
    pushed = _push(edited, "--url", orthanc.dicomweb, "--source", str(night.source))
    assert pushed.code == 1, pushed.stderr
    assert "probabilit" in _refused_line(pushed, night.paths["c1"])
    assert "pred_label" in _refused_line(pushed, night.paths["c2"])
    assert "operating_point" in _refused_line(pushed, night.paths["c3"])
    assert "probabilit" in _refused_line(pushed, night.paths["b"])
    assert "model name" in _refused_line(pushed, night.paths["a"])
    assert "x" * 200 not in pushed.stderr and "\nINJECTED" not in pushed.stderr  # nothing raw on stderr
    assert "5 predicted rows refused" in pushed.stdout and "1 sent and verified" in pushed.stdout
    srs = orthanc.srs()
    assert len(srs) == 1 and _referenced(srs[0]) == {night.images["c4"].SOPInstanceUID}
    probabilities = [
        float(i.MeasuredValueSequence[0].NumericValue)
        for i in _content_items(srs[0])
        if "MeasuredValueSequence" in i and i.ConceptNameCodeSequence[0].CodeMeaning == "Probability"
    ]
    assert probabilities and all(0 <= p <= 1 for p in probabilities)


def test_a_row_with_a_nan_probability_is_refused_not_dropped(night, tmp_path):
    """P4: a row whose probability is nan was silently left out ("0 SRs", exit 0)."""

    def nan(frame):
        frame.loc[_row(frame, night, "a"), "prob_pneumonia"] = "nan"

    edited = _predictions(night, tmp_path, nan, keep=("a",))
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"  # never contacted: nothing is left to send
    pushed = _push(edited, "--url", url, "--source", str(night.source))
    assert pushed.code == 1, pushed.stderr
    assert "probabilit" in _refused_line(pushed, night.paths["a"])
    assert "1 predicted rows refused" in pushed.stdout


# ----------------------------------------------------- P5: paths stay inside --source


@pytest.mark.slow
def test_paths_outside_source_and_special_files_are_refused_without_hanging(orthanc, night, tmp_path):
    """A ``path`` leading out of --source (``../``, absolute) or naming a FIFO is refused
    at once; before, opening the FIFO blocked push for ever."""
    source = tmp_path / "source"
    shutil.copytree(night.source, source)
    os.mkfifo(tmp_path / "outside.fifo")
    os.mkfifo(source / "a" / "inside.fifo")
    os.symlink(tmp_path / "outside.fifo", source / "a" / "link.dcm")
    _upload(orthanc, night, *night.images)
    changes = {"a": "../outside.fifo", "b": "a/inside.fifo", "c1": "/etc/passwd", "c2": "a/link.dcm"}

    def repath(frame):
        for name, path in changes.items():
            frame.loc[_row(frame, night, name), "path"] = path

    edited = _predictions(night, tmp_path, repath)
    pushed = _push(edited, "--url", orthanc.dicomweb, "--source", str(source), timeout=FAIL_FAST_S)
    assert pushed.code == 1, pushed.stderr
    for name in ("a", "c1", "c2"):
        assert "outside --source" in _refused_line(pushed, changes[name])
    assert "not a regular file" in _refused_line(pushed, changes["b"])
    srs = orthanc.srs()
    assert len(srs) == 1
    assert _referenced(srs[0]) == {night.images["c3"].SOPInstanceUID, night.images["c4"].SOPInstanceUID}


# -------------------------------------------------- P1: an unusable archive is exit 3, fast


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Every request: 401, as an archive answers a wrong or expired password."""

    def _refuse(self) -> None:
        self.send_response(401, "Unauthorized")
        self.send_header("WWW-Authenticate", 'Basic realm="pacs"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _refuse

    def log_message(self, *args) -> None:
        pass


def _http_401() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _hung() -> Iterator[str]:
    """Accepts every connection and never says a word (a wedged archive)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def _dimse_rejecting() -> Iterator[str]:
    """A DICOM node that rejects our association (it is not the AE title we call)."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

    ae = AE(ae_title="SOMEONE-ELSE")
    ae.require_called_aet = True
    for context in (Verification, StudyRootQueryRetrieveInformationModelFind):
        ae.add_supported_context(context, ALL_TRANSFER_SYNTAXES)
    port = _free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()


def _closed() -> Iterator[str]:
    yield f"127.0.0.1:{_free_port()}"  # nothing listens there


UNUSABLE = {
    ("dicomweb", "401"): _http_401,
    ("dicomweb", "hung"): _hung,
    ("dicomweb", "closed"): _closed,
    ("dimse", "rejected"): _dimse_rejecting,
    ("dimse", "hung"): _hung,
    ("dimse", "closed"): _closed,
}


@pytest.mark.slow
@pytest.mark.parametrize("protocol, archive", sorted(UNUSABLE), ids=["-".join(k) for k in sorted(UNUSABLE)])
def test_an_unusable_archive_is_one_line_exit_3_in_bounded_time(protocol, archive, night, tmp_path):
    """Unreachable, wedged or refusing us: exit 3 with one line within FAIL_FAST_S, not
    exit 1 after retrying every study (about 40 s each when the archive hangs)."""
    edited = _predictions(night, tmp_path)
    ledger = tmp_path / "l.sqlite"
    server = UNUSABLE[(protocol, archive)]()
    address = next(server)
    try:
        where = ["--url", f"http://{address}/dicom-web"] if protocol == "dicomweb" else ["--dimse", address]
        pushed = _push(edited, *where, "--source", str(night.source), "--ledger", str(ledger), timeout=FAIL_FAST_S)
    finally:
        server.close()
    assert pushed.code == 3, pushed.stderr
    lines = pushed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), pushed.stderr
    assert "Traceback" not in pushed.stderr and PASSWORD not in pushed.stderr + pushed.stdout
    with Ledger(ledger) as recorded:
        assert recorded.counts()["delivered"] == 0


# ------------------------------------------------------ the checks themselves, no archive


def _card(binary: bool):
    from pneumobatch.core.card import ModelCard

    classes = ["normal", "pneumonia"] if binary else ["normal", "bacterial", "viral"]
    return ModelCard(
        name="m",
        task="pneumonia" if binary else "etiology",
        classes=classes,
        architecture="a",
        input_size=32,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        positive="pneumonia" if binary else None,
        threshold=0.5 if binary else None,
        weights_sha256="ab" * 32,
    )


def test_a_label_is_checked_against_the_cards_rule_within_the_csvs_rounding():
    """pred_label must be what the card's rule gives; predict decides on unrounded values
    and writes 6 decimals, so a probability at its threshold (or a near tie) goes either way."""
    from pneumobatch.operations.pacs.sr import ImageResult, card_problem, image_problem

    binary, multi = _card(True), _card(False)

    def image(probs, label, threshold=0.5, point="pooled"):
        return ImageResult("1.2.3.4", "1.2.3", tuple(probs), label, threshold, point)

    assert image_problem(binary, image([("normal", 0.3), ("pneumonia", 0.7)], "pneumonia")) is None
    assert "pred_label" in image_problem(binary, image([("normal", 0.0002), ("pneumonia", 0.9998)], "normal"))
    assert image_problem(binary, image([("normal", 0.5), ("pneumonia", 0.5)], "normal")) is None  # 0.4999996
    assert image_problem(binary, image([("normal", 0.2), ("pneumonia", 0.8)], "pneumonia", 0.9)) is not None
    assert "threshold" in image_problem(binary, image([("normal", 0.3), ("pneumonia", 0.7)], "pneumonia", 1.5))
    for bad in (7.5, -0.1, float("nan"), float("inf")):
        assert "probability" in image_problem(binary, image([("normal", 0.3), ("pneumonia", bad)], "pneumonia"))
    assert "operating_point" in image_problem(
        binary, image([("normal", 0.3), ("pneumonia", 0.7)], "pneumonia", point="a\\b")
    )
    assert "pred_label" in image_problem(binary, image([("normal", 0.3), ("pneumonia", 0.7)], "viral"))
    tie = [("normal", 0.4), ("bacterial", 0.4), ("viral", 0.2)]
    assert image_problem(multi, image(tie, "bacterial", None, "argmax")) is None
    assert image_problem(multi, image(tie, "viral", None, "argmax")) is not None
    assert card_problem(binary) is None
    for name in ("m\nx", "m\\x", "m" * 65, ""):
        assert "model name" in card_problem(_replace_name(binary, name))


def _replace_name(card, name: str):
    from dataclasses import replace

    return replace(card, name=name)
