"""Plain helpers the tests share: the repository root, a tiny PNG training set, a CLI error check.

They are imported as ``from tests.helpers import ...`` (pytest puts the repository root on
``sys.path``: ``pythonpath = ["."]`` in pyproject.toml). Fixtures live in ``conftest.py``;
this module holds no fixtures, so importing it never registers one twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: sample_studies/, weights/, README.md, benchmarks/, tests/data/."""


def save_tiny_model(
    folder: Path,
    *,
    name: str = "tiny",
    input_size: int = 32,
    seed: int = 0,
    preprocessing: Optional[dict] = None,
    task: str = "pneumonia",
    classes: Sequence[str] = ("normal", "pneumonia"),
    hierarchy: Optional[dict] = None,
    decision: Optional[dict] = None,
) -> Path:
    """A randomly initialised model (MobileNetV3-small, a two-class pneumonia one unless told
    otherwise) saved as ``name`` in ``folder``: the weights are those of ``torch.manual_seed(seed)``,
    so the same call gives the same SHA-256 and another seed other weights under the same name.
    With ``hierarchy`` (``fine``/``parent``) the network has one output per fine class."""
    import torch

    from pneumobatch.core.card import ModelCard
    from pneumobatch.model.registry import create_model, save_model

    classes = list(classes)
    binary = len(classes) == 2
    card = ModelCard(
        name=name,
        task=task,
        classes=classes,
        architecture="mobilenet_v3_small",
        input_size=input_size,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        positive=classes[1] if binary else None,
        threshold=0.5 if binary else None,
        preprocessing=dict(preprocessing or {}),
        hierarchy=dict(hierarchy or {}),
        decision=dict(decision or {}),
    )
    torch.manual_seed(seed)
    net = create_model("mobilenet_v3_small", len(card.output_classes), pretrained=False, input_size=input_size)
    save_model(net.eval(), card, folder)
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
