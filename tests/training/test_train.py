"""Training on a tiny generated dataset; splits, thresholds, temperature and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pneumobatch.cli import main
from pneumobatch.core.errors import TrainingError
from pneumobatch.evaluation.metrics.calibration import fit_temperature
from pneumobatch.model.registry import load_model
from pneumobatch.training.config import TrainConfig
from pneumobatch.training.data import assign_splits, load_labels
from pneumobatch.training.evaluate import select_threshold
from pneumobatch.training.invariance import EXPORTS
from pneumobatch.training.loop import train
from tests.helpers import make_dataset


def small_config(manifest: Path, out: Path, **kw) -> TrainConfig:
    defaults = dict(
        data=manifest,
        out_dir=out,
        name="tiny",
        task="pneumonia",
        architecture="mobilenet_v3_small",
        init="random",
        input_size=32,
        batch_size=8,
        head_epochs=0,
        epochs=2,
        patience=5,
        lr=3e-3,
        workers=1,
    )
    defaults.update(kw)
    return TrainConfig(**defaults)


@pytest.mark.slow
def test_training_writes_complete_card_and_predict_loads_it(tmp_path: Path):
    manifest = make_dataset(tmp_path / "data")
    out = tmp_path / "weights"
    train(small_config(manifest, out, epochs=3))
    assert (out / "tiny.safetensors").exists() and (out / "tiny.curves.png").exists()
    assert not (out / "tiny.checkpoint.pt").exists()
    saved = json.loads((out / "tiny.json").read_text())
    for key in (
        "task",
        "classes",
        "architecture",
        "input_size",
        "mean",
        "std",
        "threshold",
        "thresholds",
        "temperature",
        "data",
        "metrics",
        "training",
        "pneumobatch_version",
        "weights_sha256",
    ):
        assert saved[key] not in (None, "", {}), key
    assert saved["classes"] == ["normal", "pneumonia"] and saved["positive"] == "pneumonia"
    assert saved["data"]["dropped_unmapped_labels"] == {"ARDS": 1}
    assert saved["data"]["counts"]["train"] == {"normal": 15, "pneumonia": 15}
    assert {"auc", "sensitivity", "specificity"} <= set(saved["metrics"]["test"])
    assert "synthetic" in saved["metrics"]["test_by_source"]
    history = saved["training"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learns
    assert saved["thresholds"]["recall_target_sensitivity"] >= 0.95
    # six validation positives cannot show 95% with a margin: the card says the plain rule applied
    assert saved["thresholds"]["recall_target_margin"].startswith("none")
    # the input is equalised (predict does the same) and every image went through random exports
    assert saved["preprocessing"] == {"intensity": "equalize"}
    assert saved["training"]["augmentation"].startswith("export round trips")
    # the export-invariance table of the test split, one row per export and subgroup
    invariance = saved["metrics"]["export_invariance"]
    assert {r["export"] for r in invariance["rows"]} == set(EXPORTS) and invariance["goal"]["max_mean_abs_dp"] == 0.05
    loaded = load_model(str(out / "tiny.json"))
    assert loaded.card.weights_sha256 == saved["weights_sha256"]
    # train fits the applicability statistics itself (several depths), threshold on validation
    assert (
        saved["applicability"]["file"] == "tiny.applicability.safetensors" and len(saved["applicability"]["layers"]) > 1
    )
    assert loaded.applicability is not None and loaded.applicability.threshold == saved["applicability"]["threshold"]
    # ... and exports the network with those layers, so that predict runs it without torch
    from pneumobatch.model.runtime import load_onnx_model

    exported = load_onnx_model(str(out / "tiny.json"))
    assert saved["onnx"]["weights_sha256"] == saved["weights_sha256"]
    assert saved["onnx"]["outputs"] == ["logits", *loaded.applicability.layer_names]
    assert exported.onnx_path == out / "tiny.onnx"

    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(tmp_path / "data" / "images"),
            "-o",
            str(tmp_path / "p.csv"),
            "-m",
            str(out / "tiny.json"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(tmp_path / "p.csv")
    assert len(predictions) == 48 and predictions.loc[predictions["status"] == "ok", "ood_score"].notna().all()
    result = CliRunner().invoke(  # the same in PyTorch: the export computes what the weights do
        main,
        ["predict", str(tmp_path / "data" / "images"), "-o", str(tmp_path / "t.csv"), "-m", str(out / "tiny.json"),
         "--backend", "torch", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    in_torch = pd.read_csv(tmp_path / "t.csv")
    assert (in_torch["pred_label"].fillna("") == predictions["pred_label"].fillna("")).all()
    assert (in_torch["prob_pneumonia"] - predictions["prob_pneumonia"]).abs().max() <= 1e-5

    # retune: operating points chosen again on validation, weights untouched, and the test
    # split never chooses anything (relabelling it changes only the test metrics)
    weights_bytes = (out / "tiny.safetensors").read_bytes()
    flipped = pd.read_csv(manifest)
    test_rows = flipped["split"] == "test"
    flipped.loc[test_rows, "finding"] = "No Finding"  # other test labels: only the test metrics may change
    flipped.to_csv(tmp_path / "data" / "flipped.csv", index=False)
    cards = {}
    for name, data in (("same", manifest), ("flipped", tmp_path / "data" / "flipped.csv")):
        folder = tmp_path / f"retune_{name}"
        folder.mkdir()
        for f in out.glob("tiny.*"):
            (folder / f.name).write_bytes(f.read_bytes())
        result = CliRunner().invoke(
            main,
            ["retune", "tiny", str(data), "--weights-dir", str(folder), "--target-recall", "0.6", "--workers", "1"],
        )
        assert result.exit_code == 0, result.output
        assert (folder / "tiny.safetensors").read_bytes() == weights_bytes
        cards[name] = json.loads((folder / "tiny.json").read_text())
    same, other = cards["same"], cards["flipped"]
    assert same["thresholds"]["target_recall"] == 0.6 and same["training"]["retuned"]["target_recall"] == 0.6
    assert (
        same["thresholds"]["recall_target"] >= saved["thresholds"]["recall_target"]
    )  # a lower target: a higher threshold
    assert (
        same["training"]["history"] == saved["training"]["history"]
        and same["weights_sha256"] == saved["weights_sha256"]
    )
    assert (same["threshold"], same["temperature"], same["thresholds"]) == (
        other["threshold"],
        other["temperature"],
        other["thresholds"],
    )
    assert same["metrics"]["val"] == other["metrics"]["val"] and same["metrics"]["test"] != other["metrics"]["test"]
    assert load_model("tiny", tmp_path / "retune_same").card.threshold == same["threshold"]


def test_split_is_stratified_and_patient_disjoint(tmp_path: Path):
    manifest = make_dataset(tmp_path / "data", n_per_class=40, with_split=False)
    config = small_config(manifest, tmp_path / "w")
    frame, task, dropped = load_labels(config.data, config.task)
    frame = assign_splits(frame, config)
    patients = frame.groupby("patient")["split"].nunique()
    assert (patients == 1).all()
    counts = frame.groupby(["split", "cls"]).size().unstack()
    assert set(counts.index) == {"train", "val", "test"}
    assert (counts > 0).all().all()
    assert counts.loc["train"].sum() > counts.loc["test"].sum()


def test_threshold_selection_meets_target_recall():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(200), np.ones(100)].astype(int)
    scores = np.r_[rng.beta(2, 5, 200), rng.beta(5, 2, 100)]
    chosen = select_threshold(y, scores, 0.95)
    recall = ((scores >= chosen["recall_target"]) & (y == 1)).sum() / 100
    assert recall >= 0.95
    # highest such threshold: nudging it up by the next score loses recall
    above = np.sort(scores[scores > chosen["recall_target"]])
    if len(above):
        assert ((scores >= above[0]) & (y == 1)).sum() / 100 < 0.95 or above[0] == chosen["recall_target"]
    # constructed case: positives at 0.9, 0.8, 0.3; negatives at 0.5, 0.2 -> recall 1.0 needs 0.3
    t = select_threshold(np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.8, 0.3, 0.5, 0.2]), 1.0)
    assert t["recall_target"] == pytest.approx(0.3) and t["recall_target_specificity"] == pytest.approx(0.5)
    assert t["youden"] == pytest.approx(0.8)
    with pytest.raises(TrainingError, match="both classes"):
        select_threshold(np.ones(3), np.array([0.1, 0.2, 0.3]), 0.95)


def test_temperature_scaling_softens_overconfident_logits():
    torch.manual_seed(0)
    targets = torch.randint(0, 2, (400,))
    logits = torch.randn(400, 2)
    logits[torch.arange(400), targets] += 1.0
    assert fit_temperature(logits * 5, targets) > 3  # 5x overconfident -> T about 5
    assert fit_temperature(logits, targets) == pytest.approx(1.0, abs=0.35)


@pytest.mark.slow
def test_resume_continues_from_checkpoint(tmp_path: Path, monkeypatch):
    manifest = make_dataset(tmp_path / "data")
    out = tmp_path / "w"
    import pneumobatch.training.loop as train_module  # where train looks predict_logits up

    calls = {"n": 0}
    original = train_module.predict_logits

    def dying(*args, **kwargs):  # simulate a kill after the second epoch's checkpoint
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "predict_logits", dying)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(manifest, out, epochs=4))
    assert (out / "tiny.checkpoint.pt").exists()
    monkeypatch.setattr(train_module, "predict_logits", original)
    messages: list[str] = []
    card = train(small_config(manifest, out, epochs=4, resume=True), progress=messages.append)
    assert any("resuming" in m and "epoch 3" in m for m in messages)
    epochs = [h["epoch"] for h in card.training["history"]]
    assert epochs == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "option, value, message",
    [
        (
            "--default-age-band",
            "kermany=teen",
            "--default-age-band wants PATTERN=child or PATTERN=adult, not 'kermany=teen'",
        ),
        (
            "--band-target-recall",
            "adult=1.5",
            "--band-target-recall wants child=R or adult=R with R between 0.5 and 1, not 'adult=1.5'",
        ),
        (
            "--band-target-recall",
            "elderly=0.9",
            "--band-target-recall wants child=R or adult=R with R between 0.5 and 1, not 'elderly=0.9'",
        ),
    ],
    ids=["age-band-default", "band-recall-range", "band-recall-band"],
)
def test_train_cli_bad_age_band_option_is_a_usage_error_naming_the_option_exit_3(
    tmp_path: Path, option: str, value: str, message: str
):
    manifest = make_dataset(tmp_path / "data")
    out = tmp_path / "w"
    result = CliRunner().invoke(main, ["train", str(manifest), "-o", str(out), "--init", "random", option, value])
    assert result.exit_code == 3, result.output
    assert result.output.splitlines()[-1] == f"Error: Invalid value for '{option}': {message.split(' ', 1)[1]}"
    assert "Traceback" not in result.output
    assert not (out / "pneumonia.safetensors").exists()


def test_train_cli_refuses_to_overwrite(tmp_path: Path):
    manifest = make_dataset(tmp_path / "data")
    out = tmp_path / "w"
    out.mkdir()
    (out / "pneumonia.safetensors").write_bytes(b"keep")
    result = CliRunner().invoke(main, ["train", str(manifest), "-o", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "pneumonia.safetensors").read_bytes() == b"keep"


def _etiology_dataset(root: Path) -> Path:
    """Five coarse classes drawn five ways; Streptococcus named in enough patients to be a fine class,
    Klebsiella in too few (it falls back to 'other bacterial')."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    findings = {
        "No Finding": 0,
        "Pneumonia/Bacterial": 1,
        "Pneumonia/Bacterial/Streptococcus": 1,
        "Pneumonia/Viral": 2,
        "Pneumonia/Fungal/Pneumocystis": 3,
        "Pneumonia/Viral/COVID-19": 4,
    }
    rows = []
    for f, (finding, shape) in enumerate(findings.items()):
        for i in range(15):
            img = np.full((40, 40), 60.0) + rng.normal(0, 5, (40, 40))
            img[4 + 6 * shape : 10 + 6 * shape, :] = 230  # the class's band
            name = f"images/{f}_{i:02d}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name)
            split = ("train", "train", "train", "val", "test")[i % 5]
            rows.append({"path": name, "finding": finding, "split": split, "patient_id": f"p{f}_{i}", "source": "s"})
    Image.fromarray(np.full((40, 40), 90, dtype=np.uint8)).save(root / "images/k.png")
    rows.append(
        {
            "path": "images/k.png",
            "finding": "Pneumonia/Bacterial/Klebsiella",
            "split": "train",
            "patient_id": "k1",
            "source": "s",
        }
    )
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


@pytest.mark.slow
def test_etiology_trains_two_levels_with_a_fallback_rule_and_decision_offsets(tmp_path: Path):
    from pneumobatch.core.hierarchy import Hierarchy

    manifest = _etiology_dataset(tmp_path / "data")
    out = tmp_path / "weights"
    train(
        small_config(manifest, out, task="etiology", name="etio", epochs=2, invariance_test=False, export_augment=False)
    )
    saved = json.loads((out / "etio.json").read_text())
    assert saved["classes"] == ["normal", "bacterial", "viral", "fungal", "covid-19"]
    tree = Hierarchy.from_dict(saved["classes"], saved["hierarchy"])
    # 9 Streptococcus training patients and 3 in validation: its own class; Klebsiella: 1 patient
    assert "Streptococcus" in tree.fine and "other bacterial" in tree.fine and "Klebsiella" not in tree.fine
    assert saved["hierarchy"]["organisms"]["Klebsiella"]["fine_class"] == "other bacterial"
    assert saved["hierarchy"]["counts"]["Streptococcus"]["train"] == {"images": 9, "patients": 9}
    # 3 validation images a class (bacterial 6): too few to choose offsets, so the argmax stays
    assert saved["decision"]["rule"] == "argmax"
    assert saved["decision"]["not_judged"] == {"normal": 3, "bacterial": 6, "viral": 3, "fungal": 3, "covid-19": 3}
    per_class = {r["class"]: r for r in saved["metrics"]["test_per_class"]["per_class"]}
    assert per_class["fungal"]["support"] == 3 and per_class["fungal"]["recall_ci"] is not None
    assert saved["metrics"]["test_fine"]["top3_accuracy"] >= saved["metrics"]["test_fine"]["top1_accuracy"]
    loaded = load_model(str(out / "etio.json"))
    x = torch.zeros(2, 3, 32, 32)
    assert loaded.net(x).shape == (2, len(tree.fine))  # one output per fine class
    from pneumobatch.model.runtime import load_onnx_model

    assert load_onnx_model(str(out / "etio.json")).card.hierarchy["fine"] == list(tree.fine)
