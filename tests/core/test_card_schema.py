"""A model card is checked when it is loaded: types, ranges, the SHA-256, the class count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pneumobatch.cli import main
from pneumobatch.core.errors import EXIT_FATAL, ModelError
from pneumobatch.model.registry import default_weights_dir, load_model, read_card


@pytest.fixture()
def card_folder(weights_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "w"
    shutil.copytree(weights_dir, folder)
    return folder


def edit_card(folder: Path, change) -> None:
    path = folder / "tiny.json"
    card = json.loads(path.read_text())
    change(card)
    path.write_text(json.dumps(card))  # json.dumps writes NaN and Infinity as Python reads them


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c.pop("weights_sha256"), "weights_sha256"),  # else tampered weights would load
        (lambda c: c.update(weights_sha256=""), "weights_sha256"),
        (lambda c: c.update(temperature=0), "temperature"),  # NaN probabilities
        (lambda c: c.update(temperature=-1.0), "temperature"),  # inverted probabilities
        (lambda c: c.update(temperature=float("nan")), "temperature"),
        (lambda c: c.update(temperature=float("inf")), "temperature"),
        (lambda c: c.update(temperature="1.0"), "temperature"),
        (lambda c: c.update(threshold=1.5), "threshold"),
        (lambda c: c.update(threshold=-0.1), "threshold"),
        (lambda c: c.update(threshold=float("nan")), "threshold"),
        (
            lambda c: c.update(thresholds={"by_age_band": {"child": {"recall_target": 7}}}),
            "thresholds/by_age_band/child/recall_target",
        ),
        (lambda c: c.update(input_size=100000), "input_size"),
        (lambda c: c.update(input_size=0), "input_size"),
        (lambda c: c.update(input_size="32"), "input_size"),
        (lambda c: c.update(classes="normal,pneumonia"), "classes"),
        (lambda c: c.update(classes=["normal", "normal"]), "classes"),
        (lambda c: c.update(std=[0.25, 0.0, 0.25]), "std/1"),
        (lambda c: c.update(mean=[0.5, 0.5]), "mean"),
        (lambda c: c.update(positive="covid-19"), "positive"),
        (lambda c: c.pop("architecture"), "architecture"),
    ],
)
def test_a_bad_card_is_refused_naming_the_field(card_folder: Path, change, field: str):
    edit_card(card_folder, change)
    with pytest.raises(ModelError) as info:
        load_model("tiny", card_folder)
    message = str(info.value)
    assert f"invalid model card: {field}:" in message, message
    assert "\n" not in message


def test_the_class_count_must_match_the_weights_output_layer(card_folder: Path):
    edit_card(card_folder, lambda c: c.update(classes=["normal", "bacterial", "viral"], positive=None))
    with pytest.raises(ModelError, match="lists 3 classes but the weights' output layer has 2"):
        load_model("tiny", card_folder)


def test_predict_with_a_bad_card_is_one_line_exit_3(card_folder: Path, tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray((np.add.outer(np.arange(64), np.arange(64)) * 3 % 256).astype(np.uint8)).save(folder / "a.png")
    edit_card(card_folder, lambda c: c.update(temperature=0))
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(folder),
            "-o",
            str(tmp_path / "p.csv"),
            "--weights-dir",
            str(card_folder),
            "-m",
            "tiny",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert result.exit_code == EXIT_FATAL and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "temperature" in lines[0], result.stderr
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("name", ["pneumonia", "etiology"])
def test_the_shipped_cards_pass(name: str):
    card = read_card(default_weights_dir() / f"{name}.json")
    assert card.name == name and card.temperature > 0 and len(card.weights_sha256) == 64
