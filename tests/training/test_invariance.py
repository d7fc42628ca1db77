"""The export-invariance test: real export files, the product's inference path, and the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pneumobatch.cli import main
from pneumobatch.core.card import ModelCard
from pneumobatch.evaluation.invariance import GOAL, MIN_IMAGES, invariance_table
from pneumobatch.io.discovery import FileKind, sniff
from pneumobatch.io.readers import ReadOptions
from pneumobatch.model.registry import LoadedModel
from pneumobatch.training.invariance import EXPORTS, measure_invariance, write_exports
from tests.helpers import save_tiny_model


def radiographs(folder: Path, n: int = 8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:180, 0:150]
        img = 120 + 70 * np.sin(x / (7.0 + i)) * np.cos(y / 11.0) + rng.normal(0, 6, (180, 150))
        img[20 + 5 * i : 50 + 5 * i, 30:70] = 235  # a bright patch in a different place in each
        path = folder / f"cxr{i}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_each_export_is_a_real_file_of_its_kind(tmp_path: Path):
    [path] = radiographs(tmp_path / "in", 1)
    [files], failed = write_exports([path], tmp_path / "out", tuple(EXPORTS), ReadOptions())
    assert failed == 0 and set(files) == set(EXPORTS)
    assert Image.open(files["resave224"]).size == (224, 224) and Image.open(files["resave224"]).mode == "RGB"
    assert max(Image.open(files["jpeg320-q60"]).size) == 320 and max(Image.open(files["jpeg1024-q95"]).size) == 1024
    assert Image.open(files["crop5"]).size == (150 - 2 * 8, 180 - 2 * 9)
    plain, windowed = pydicom.dcmread(files["dicom16"]), pydicom.dcmread(files["dicom16-voi"])
    assert (plain.Rows, plain.Columns, plain.BitsStored) == (180, 150, 16) and "WindowCenter" not in plain
    assert float(windowed.WindowWidth) > 0
    kinds = {name: sniff(p) for name, p in files.items()}
    assert (
        kinds["dicom16"] == FileKind.DICOM and kinds["jpeg512-q75"] == FileKind.JPEG and kinds["png8"] == FileKind.PNG
    )


class Brightness(torch.nn.Module):
    """A model that reads the export, not the lungs: its logit is the image's mean grey level."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), 6 * m], dim=1)


def brightness_model(tmp_path: Path, name: str, preprocessing: dict) -> LoadedModel:
    card = ModelCard(
        name=name,
        task="pneumonia",
        classes=["normal", "pneumonia"],
        architecture="brightness",
        input_size=32,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        positive="pneumonia",
        threshold=0.5,
        preprocessing=preprocessing,
    )
    return LoadedModel(card, Brightness().eval(), tmp_path / f"{name}.safetensors")


def test_an_equalising_model_barely_moves_under_gamma_and_a_window_where_a_plain_one_moves(tmp_path: Path):
    paths = radiographs(tmp_path / "in")
    models = [brightness_model(tmp_path, "plain", {}), brightness_model(tmp_path, "eq", {"intensity": "equalize"})]
    result = measure_invariance(models, paths, exports=("gamma0.8", "gamma1.2", "dicom16-voi", "png8"), workers=0)
    assert result["n_images"] == 8 and result["unreadable"] == 0

    def dp(model: str, export: str) -> float:
        [row] = [r for r in result[model]["rows"] if r["export"] == export and r["subgroup"] == "all"]
        return row["mean_abs_dp"]

    for export in ("gamma0.8", "gamma1.2", "dicom16-voi"):
        assert dp("eq", export) < 0.1 * dp("plain", export) and dp("plain", export) > 0.05, export
    assert dp("plain", "png8") < 1e-6 and dp("eq", "png8") < 1e-6  # a lossless copy changes nothing


def test_the_table_judges_subgroups_of_thirty_or_more_by_both_goals():
    n = 40
    classes, positive = ["normal", "pneumonia"], "pneumonia"
    p_ref = np.linspace(0.1, 0.9, n)
    ref = (np.c_[1 - p_ref, p_ref], np.where(p_ref >= 0.5, positive, "normal"))
    shifted = np.clip(p_ref + 0.2, 0, 1)  # every image +0.2: many more called positive
    exported = (np.c_[1 - shifted, shifted], np.where(shifted >= 0.5, positive, "normal"))
    groups = pd.DataFrame({"source": ["a"] * 35 + ["b"] * 5})
    table = invariance_table(classes, positive, ref, {"x": exported, "same": ref}, groups)
    rows = {(r["export"], r["subgroup"]): r for r in table["rows"]}
    assert rows[("x", "all")]["mean_abs_dp"] == pytest.approx(np.abs(shifted - p_ref).mean())
    assert rows[("x", "all")]["delta_share"] == pytest.approx(0.25, abs=0.03) and rows[("x", "all")]["passes"] is False
    assert rows[("x", "source=b")]["judged"] is False and rows[("x", "source=b")]["passes"] is None
    assert rows[("same", "source=a")]["passes"] is True and rows[("same", "all")]["mean_abs_dp"] == 0
    low, high = rows[("x", "all")]["delta_share_ci"]
    assert low <= rows[("x", "all")]["delta_share"] <= high
    assert table["passes"] is False and table["worst"]["export"] == "x" and MIN_IMAGES == 30 and GOAL == 0.05


def test_invariance_command_writes_its_table_and_refuses_what_it_cannot_do(tmp_path: Path):
    radiographs(tmp_path / "site", 6)
    weights = save_tiny_model(tmp_path / "w", name="tiny")
    out = tmp_path / "inv.json"
    args = ["invariance", str(tmp_path / "site"), "-m", "tiny", "--weights-dir", str(weights), "--workers", "0"]
    result = CliRunner().invoke(main, [*args, "-o", str(out), "--export", "jpeg320-q60", "--export", "crop5"])
    assert result.exit_code == 0, result.output  # six images: nothing to judge, nothing over the goal
    table = json.loads(out.read_text())
    assert table["n_images"] == 6 and table["files_found"] == 6 and set(table["exports"]) == {"jpeg320-q60", "crop5"}
    assert {r["export"] for r in table["tiny"]["rows"]} == {"jpeg320-q60", "crop5"}

    again = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert again.exit_code == 2 and "exists" in again.output and json.loads(out.read_text()) == table
    bad = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b.json"), "--export", "tiff"])
    assert bad.exit_code == 2 and "tiff" in bad.output and not (tmp_path / "b.json").exists()
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(main, ["invariance", str(tmp_path / "empty"), "-o", str(tmp_path / "e.json")])
    assert empty.exit_code == 2 and "no files" in empty.output
