"""Shared test data: the tiny-model fixture and dataset builders.

Tests marked ``slow`` train a model; ``pytest -m "not slow"`` leaves them out while
working, ``make test`` (CI) runs everything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pneumobatch.core.card import ModelCard
from pneumobatch.model.registry import create_model, save_model


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory) -> Path:
    """The tests' own cache of ONNX exports (inference.cache_dir), never the user's ~/.cache;
    subprocesses inherit it."""
    import os

    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("PNEUMOBATCH_CACHE")
    os.environ["PNEUMOBATCH_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("PNEUMOBATCH_CACHE", None)
    else:
        os.environ["PNEUMOBATCH_CACHE"] = previous


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised pneumonia model (the shipped ones come from `train`)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    net = create_model("mobilenet_v3_small", 2, pretrained=False, input_size=32)
    card = ModelCard(
        name="tiny",
        task="pneumonia",
        classes=["normal", "pneumonia"],
        architecture="mobilenet_v3_small",
        input_size=32,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        positive="pneumonia",
        threshold=0.5,
    )
    save_model(net.eval(), card, folder)
    net3 = create_model("mobilenet_v3_small", 4, pretrained=False, input_size=40)
    card3 = ModelCard(
        name="tiny-etiology",
        task="etiology",
        classes=["normal", "bacterial", "viral", "covid-19"],
        architecture="mobilenet_v3_small",
        input_size=40,
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    save_model(net3.eval(), card3, folder)
    return folder


def make_dataset(root: Path, n_per_class: int = 24, with_split: bool = True) -> Path:
    """Two visually distinct classes: 'normal' smooth gradients, pneumonia bright blotches."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(2 * n_per_class):
        pneumonia = i % 2 == 1
        img = np.tile(np.linspace(30, 120, 48, dtype=np.float32), (48, 1))
        if pneumonia:
            y, x = rng.integers(8, 40, 2)
            img[y - 8 : y + 8, x - 8 : x + 8] = 250
        img += rng.normal(0, 5, img.shape)
        name = f"images/{i:03d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name)
        patient = f"p{i // 2}"  # two images per patient, of different classes
        split = ("train", "train", "train", "val", "test")[(i // 2) % 5]
        rows.append(
            {
                "path": name,
                "finding": "Pneumonia/Bacterial" if pneumonia else "No Finding",
                "split": split if with_split else "",
                "patient_id": patient,
                "source": "synthetic",
            }
        )
    rows.append(
        {"path": "images/000.png", "finding": "ARDS", "split": "train", "patient_id": "p0", "source": "synthetic"}
    )
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def one_line_error(result, code: int, *needles: str) -> None:
    """A CliRunner result that failed with ``code`` and one ``Error: ...`` line naming every needle."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
