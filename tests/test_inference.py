"""How predict splits the machine by default (inference.default_split): from the cores at hand."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pneumobatch.inference import available_cores, default_split


def test_available_cores_is_the_affinity_mask():
    assert available_cores() == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize("cores, workers, threads", [(1, 1, 1), (2, 1, 1), (4, 2, 2), (16, 8, 8), (3, 1, 2)])
def test_cpu_splits_the_cores_between_decoding_and_the_network(cores: int, workers: int, threads: int):
    split = default_split(torch.device("cpu"), cores)
    assert (split.workers, split.threads, split.batch_size) == (workers, threads, 16)
    assert split.workers + split.threads <= max(cores, 2)  # never more busy processes than cores (one core: 2)


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 1), (16, 15)])
def test_cuda_decodes_on_every_core_but_one_with_larger_batches(cores: int, workers: int):
    split = default_split(torch.device("cuda"), cores)
    assert (split.workers, split.threads, split.batch_size) == (workers, 1, 64)


def test_default_is_taken_from_this_machine():
    assert default_split(torch.device("cpu")) == default_split(torch.device("cpu"), available_cores())


def test_onnxruntime_gives_the_shipped_models_probabilities_and_applicability_scores():
    pytest.importorskip("onnxruntime")
    from pneumobatch.inference import Predictor
    from pneumobatch.models import load_model

    cpu = torch.device("cpu")
    models = [load_model("pneumonia")]  # etiology has the same architecture
    applicability = {m.card.name: m.applicability for m in models}
    assert all(applicability.values())
    s = models[0].card.input_size
    inputs = {s: torch.randint(0, 256, (5, 1, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))}
    eager, onnx = Predictor(models, cpu, None, applicability, backend="torch"), Predictor(models, cpu, None, applicability)
    assert (eager.backend, onnx.backend) == ("torch", "onnxruntime")
    eager_scores: dict = {}
    onnx_scores: dict = {}
    expected, got = eager(inputs, eager_scores), onnx(inputs, onnx_scores)
    np.testing.assert_allclose(got["pneumonia"], expected["pneumonia"], atol=1e-5)
    np.testing.assert_allclose(onnx_scores["pneumonia"], eager_scores["pneumonia"], rtol=1e-4)


def test_precision_or_gpu_keeps_pytorch():
    from pneumobatch.inference import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "torch"
    assert resolve_backend("auto", torch.device("cuda"), None) == "torch"
    assert resolve_backend("torch", torch.device("cpu"), None) == "torch"


def test_backend_option_chooses_the_forward_pass_and_refuses_what_cannot_run(weights_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    import json

    import pandas as pd
    from click.testing import CliRunner

    from pneumobatch.cli import main
    from pneumobatch.synthetic import write_cxr

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(4):
        write_cxr(tmp_path / "in" / f"{i}.dcm", rng.integers(0, 4096, (96, 96)).astype(np.uint16), bits_stored=12)
    base = ["predict", str(tmp_path / "in"), "-m", "tiny", "--weights-dir", str(weights_dir), "--quiet", "--device", "cpu"]
    probs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.csv"
        result = CliRunner().invoke(main, base + ["--backend", backend, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads(out.with_suffix(".run.json").read_text())["backend"] == backend
        probs[backend] = pd.read_csv(out).sort_values("path")["prob_pneumonia"].to_numpy()
    np.testing.assert_allclose(probs["onnxruntime"], probs["torch"], atol=2e-6)
    refused = CliRunner().invoke(main, base + ["--backend", "onnxruntime", "--precision", "bf16", "-o", str(tmp_path / "x.csv")])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1 and "fp32 on the CPU only" in refused.output
    assert not (tmp_path / "x.csv").exists()
