"""``predict --heatmaps``: Grad-CAM overlays of the shipped models, where they go, what a resumed or killed run does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from pneumobatch.cli import main
from pneumobatch.core.errors import EXIT_USAGE
from pneumobatch.model.heatmaps import BORDER_BAND, border_share, heatmap_name, overlay, wanted
from pneumobatch.model.store import read_card
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT

SAMPLE = ROOT / "sample_studies"


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """Twelve sample studies (positives and negatives of both models) and a DICOM with a patient's name."""
    root = tmp_path_factory.mktemp("heat") / "in"
    for study in sorted(p for p in SAMPLE.iterdir() if p.name.startswith("SAMPLE"))[:12]:
        shutil.copytree(study, root / study.name)
    rng = np.random.default_rng(0)
    (root / "named").mkdir()
    write_cxr(
        root / "named" / "a.dcm",
        rng.integers(0, 4096, (300, 260), dtype=np.uint16),
        extra={"PatientName": "SECRET^NAME"},
    )
    return root


def predict(studies: Path, out: Path, *extra: str) -> pd.DataFrame:
    args = ["predict", str(studies), "-m", "pneumonia", "-m", "etiology", "-o", str(out), "--quiet", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 1), result.output
    return read(out)


@pytest.fixture(scope="module")
def positive_run(studies: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "p.csv"
    predict(studies, out, "--heatmaps", "positive")
    return out


def test_every_finding_has_an_overlay_of_its_image_and_nothing_else_has_one(positive_run: Path, studies: Path):
    frame = read(positive_run)
    cards = {n: (read_card(ROOT / "weights" / f"{n}.json")) for n in ("pneumonia", "etiology")}
    findings = frame[[r.status == "ok" and cards[r.model].is_finding(r.pred_label) for r in frame.itertuples()]]
    assert set(findings.model) == {"pneumonia", "etiology"} and len(findings) < (frame.status == "ok").sum()
    assert (frame.loc[~frame.index.isin(findings.index), "heatmap"] == "").all()
    for row in findings.to_dict("records"):
        assert row["heatmap"] == f"p.heatmaps/{heatmap_name(row)}"
        png = Image.open(positive_run.parent / row["heatmap"])
        assert png.mode == "RGB" and max(png.size) <= 1024
        rgb = np.asarray(png).astype(int)
        assert (rgb[..., 0] - rgb[..., 2]).max() > 100  # red where the model looked: an overlay, not a grey copy
    info = json.loads(positive_run.with_name("p.run.json").read_text())["heatmaps"]
    assert info["mode"] == "positive" and info["layers"] == {"pneumonia": "_conv_head", "etiology": "_conv_head"}
    assert info["written"] == len(findings) and info["failed"] == 0
    assert sorted(p.name for p in positive_run.with_name("p.heatmaps").iterdir()) == sorted(
        Path(h).name for h in findings.heatmap
    )
    assert not any("SECRET" in p.name or "NAME" in p.name for p in positive_run.with_name("p.heatmaps").iterdir())


def test_all_explains_every_prediction_and_a_resume_writes_only_the_missing(studies: Path, tmp_path: Path):
    out = tmp_path / "a.csv"
    frame = predict(studies, out, "--heatmaps", "all")
    ok = frame[frame.status == "ok"]
    assert (ok.heatmap != "").all() and (frame.loc[frame.status != "ok", "heatmap"] == "").all()
    named = ok[ok.path == "named/a.dcm"].heatmap
    assert {Image.open(tmp_path / h).size for h in named} == {(260, 300)}  # aspect ratio kept
    folder = tmp_path / "a.heatmaps"
    gone = folder / Path(ok.heatmap.iloc[0]).name
    gone.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    time.sleep(0.01)
    again = predict(studies, out, "--heatmaps", "all", "--resume")
    assert list(again.heatmap) == list(frame.heatmap) and gone.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name in kept} == kept
    info = json.loads((tmp_path / "a.run.json").read_text())["heatmaps"]
    assert (info["written"], info["kept"]) == (1, len(ok) - 1)


def test_a_finished_run_gets_its_heatmaps_by_resuming_with_heatmaps(studies: Path, tmp_path: Path):
    out = tmp_path / "plain.csv"
    plain = predict(studies, out)
    assert "heatmap" not in plain.columns
    with_maps = predict(studies, out, "--resume", "--heatmaps", "positive")
    assert list(with_maps.prob_pneumonia) == list(plain.prob_pneumonia)
    assert (with_maps.heatmap != "").sum() > 0
    assert all((tmp_path / h).is_file() for h in with_maps.heatmap if h)


def test_overlays_inside_the_input_folder_are_never_read_as_images(studies: Path, tmp_path: Path):
    root = tmp_path / "in"
    shutil.copytree(studies / "SAMPLE002", root / "SAMPLE002")
    out = root / "p.csv"
    first = predict(root, out, "--heatmaps", "all")
    assert (root / "p.heatmaps").is_dir() and any((root / "p.heatmaps").iterdir())
    second = predict(root, out, "--heatmaps", "all", "--overwrite")
    assert list(second.path) == list(first.path)
    assert not any(p.startswith("p.heatmaps") for p in second.path)


def test_another_jobs_heatmap_folder_is_not_taken_over(studies: Path, tmp_path: Path):
    (tmp_path / "p.heatmaps").mkdir()
    (tmp_path / "p.heatmaps" / "mine.png").write_bytes(b"x")
    result = CliRunner().invoke(main, ["predict", str(studies / "SAMPLE002"), "-o", str(tmp_path / "p.csv")])
    assert result.exit_code == EXIT_USAGE and "p.heatmaps exists" in result.output
    assert (tmp_path / "p.heatmaps" / "mine.png").read_bytes() == b"x"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_kill_9_keeps_every_heatmap_of_a_journaled_row_and_resume_writes_only_the_missing(
    studies: Path, tmp_path: Path, backend: str
):
    """auto: the overlays are drawn as the rows are made (before they reach the journal); torch:
    by Captum after every row is in the journal. A kill -9 loses no prediction and no heatmap of a
    row the journal holds; the resumed run keeps those files and writes the others."""
    out = tmp_path / "k.csv"
    cmd = [sys.executable, "-m", "pneumobatch", "predict", str(studies), "-m", "pneumonia", "-m", "etiology"]
    cmd += ["-o", str(out), "--heatmaps", "all", "--quiet", "--backend", backend, "--batch-size", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stderr=subprocess.PIPE)
    folder = tmp_path / "k.heatmaps"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(list(folder.glob("*.png"))) < 6:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and out.with_name("k.csv.partial").is_file()
    journaled = read(out.with_name("k.csv.partial"))
    kept = {Path(h).name for h in journaled.heatmap if h}
    assert backend == "torch" or kept  # the forward-pass path: rows reached the journal with their files
    assert all((tmp_path / h).is_file() for h in journaled.heatmap if h)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p.name in kept or backend == "torch"}
    run = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stderr
    frame = read(out)
    ok = frame[frame.status == "ok"]
    assert (ok.heatmap != "").all() and all((tmp_path / h).is_file() for h in ok.heatmap)
    assert {n: m for n, m in ((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.png")) if n in before} == before
    info = json.loads((tmp_path / "k.run.json").read_text())["heatmaps"]
    assert info["kept"] + info["written"] == len(ok) and info["kept"] >= len(before) and info["failed"] == 0


@pytest.mark.slow
def test_without_pytorch_the_forward_pass_draws_the_heatmaps_and_what_needs_backprop_is_flagged(tmp_path: Path):
    from tests.model.test_runtime import _RUN_AND_REPORT, no_torch_env

    env = no_torch_env(tmp_path)

    def pneumobatch(*args: str) -> tuple[dict, str]:
        run = subprocess.run([sys.executable, "-c", _RUN_AND_REPORT, *args], env=env, capture_output=True,
                             text=True, timeout=300, cwd=ROOT)  # fmt: skip
        return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr

    args = ["predict", str(SAMPLE), "-m", "pneumonia", "-m", "etiology", "--quiet"]
    out = tmp_path / "p.csv"
    report, stderr = pneumobatch(*args, "-o", str(out), "--heatmaps", "positive")
    assert report == {"code": 1, "torch": False}, stderr  # exit 1: the sample's unreadable files
    frame = read(out)
    assert (frame.heatmap != "").sum() > 0 and all((tmp_path / h).is_file() for h in frame.heatmap if h)
    assert json.loads((tmp_path / "p.run.json").read_text())["heatmaps"]["failed"] == 0
    plain = tmp_path / "q.csv"
    assert pneumobatch(*args, "-o", str(plain))[0]["code"] == 1
    report, stderr = pneumobatch(*args, "-o", str(plain), "--resume", "--heatmaps", "positive")
    assert report == {"code": 1, "torch": False} and "need PyTorch and Captum" in stderr, stderr
    again = read(plain)
    assert (again.heatmap == "").all() and again.warnings.str.contains("heatmap-failed").sum() == (
        frame.heatmap != ""
    ).sum()


@pytest.mark.parametrize("name", ["pneumonia", "etiology"])
def test_the_heatmaps_are_pytorch_grad_cams_gradcam(name: str):
    """Captum's layer Grad-CAM, with the weights below the layer frozen, gives the maps of
    pytorch-grad-cam's GradCAM (the reference implementation) on the shipped models."""
    import copy

    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pneumobatch.model.explain import GradCam
    from pneumobatch.model.preprocess import normalize
    from pneumobatch.model.registry import load_model

    model = load_model(name, None)
    reference = copy.deepcopy(model.net).eval()
    x = _inputs()
    classes = [i % len(model.card.classes) for i in range(len(x))]
    ours = GradCam(model, torch.device("cpu"))(x, classes)
    theirs = GradCAM(model=reference, target_layers=[reference.get_submodule("_conv_head")])(
        input_tensor=normalize(torch.from_numpy(x), model.card.mean, model.card.std),
        targets=[ClassifierOutputTarget(c) for c in classes],
    )
    assert ours.shape == theirs.shape == (len(x), 192, 192) and ours.max() > 0
    assert np.abs(ours - theirs).max() < 0.02 and np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999


def test_the_forward_pass_and_captum_draw_the_same_overlays(studies: Path, positive_run: Path, tmp_path: Path):
    out = tmp_path / "t.csv"
    frame = predict(studies, out, "--heatmaps", "positive", "--backend", "torch")
    assert not json.loads((tmp_path / "t.run.json").read_text())["heatmaps"]["from_forward_pass"]
    assert json.loads(positive_run.with_name("p.run.json").read_text())["heatmaps"]["from_forward_pass"]
    forward = read(positive_run)
    assert list(frame.heatmap.str.len() > 0) == list(forward.heatmap.str.len() > 0)
    for a, b in zip(forward.heatmap, frame.heatmap):
        if a:
            x = np.asarray(Image.open(positive_run.parent / a)).astype(int)
            y = np.asarray(Image.open(tmp_path / b)).astype(int)
            assert x.shape == y.shape and np.abs(x - y).max() <= 2


@pytest.mark.parametrize("name", ["pneumonia", "etiology"])
def test_the_closed_form_gradcam_of_the_export_is_captums(name: str):
    import torch
    from captum.attr import LayerGradCam

    from pneumobatch.model.preprocess import normalize
    from pneumobatch.model.registry import ARCHITECTURES, load_model

    model = load_model(name, None)
    x = normalize(torch.from_numpy(_inputs()), model.card.mean, model.card.std)
    seen = []
    hook = model.net._conv_head.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.inference_mode():
        model.net(x)
        maps = ARCHITECTURES["efficientnet_lite0"].gradcam(model.net, seen[-1]).numpy()
    hook.remove()
    reference = LayerGradCam(model.net, model.net._conv_head)
    for c in range(len(model.card.classes)):
        want = reference.attribute(x, target=c, relu_attributions=True).detach().numpy()[:, 0]
        assert want.max() > 0 or c == 0
        np.testing.assert_allclose(maps[:, c], want, atol=1e-6)


def _inputs() -> np.ndarray:
    """Six model inputs from sample images (random noise explains nothing: its maps are zero)."""
    from pneumobatch.io.discovery import sniff
    from pneumobatch.io.readers import ReadOptions, read_image
    from pneumobatch.model.preprocess import InputSpec, prepare

    files = sorted(p for p in SAMPLE.rglob("IM0001*"))[:6]
    spec = InputSpec(192, True)
    return np.stack([prepare(read_image(f, sniff(f), ReadOptions()).pixels, spec)[None] for f in files])


def test_border_share_of_a_uniform_map_is_the_bands_area_and_of_a_corner_map_all():
    assert border_share(np.ones((64, 64))) == pytest.approx(1 - (1 - 2 * BORDER_BAND) ** 2)
    corner = np.zeros((64, 64))
    corner[:4, :4] = 1
    assert border_share(corner) == 1.0
    centre = np.zeros((64, 64))
    centre[24:40, 24:40] = 1
    assert border_share(centre) == 0.0


def test_an_overlay_is_clear_where_the_map_is_cold_and_coloured_where_it_is_hot():
    grey = np.full((40, 50), 128, dtype=np.uint8)
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[:, 4:] = 1.0
    rgb = overlay(grey, heat)
    assert rgb.shape == (40, 50, 3)
    assert (rgb[:, :10] == 128).all()  # cold: the radiograph as it is
    hot = rgb[:, -10:].reshape(-1, 3).astype(int)
    assert (hot[:, 0] - hot[:, 1] > 60).all() and (hot[:, 0] - hot[:, 2] > 60).all()  # hot: red


def test_which_rows_a_mode_explains():
    pneumonia = read_card(ROOT / "weights" / "pneumonia.json")
    etiology = read_card(ROOT / "weights" / "etiology.json")
    assert wanted(pneumonia, "pneumonia", "positive") and not wanted(pneumonia, "normal", "positive")
    assert wanted(pneumonia, "normal", "all") and not wanted(pneumonia, "", "all")
    assert wanted(etiology, "viral", "positive") and not wanted(etiology, "normal", "positive")
