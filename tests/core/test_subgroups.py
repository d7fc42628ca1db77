"""Age bands, subgroup-balanced sampling, split leakage and per-band operating points."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import EXIT_FATAL, EXIT_USAGE, OptionError, TrainingError
from pneumobatch.core.subgroups import (
    age_band,
    age_bands,
    age_years,
    parse_band_defaults,
    parse_band_targets,
    view_group,
)
from pneumobatch.evaluation.metrics import band_thresholds
from pneumobatch.training.config import TrainConfig
from pneumobatch.training.data import annotate_subgroups, load_labels, remove_leakage
from pneumobatch.training.loop import _epoch_order, _sample_weights
from tests.helpers import make_dataset


@pytest.mark.parametrize(
    "value, years",
    [
        ("045Y", 45.0),
        ("006M", 0.5),
        ("017Y", 17.0),
        (" 18 ", 18.0),
        (62, 62.0),
        ("", None),
        ("abc", None),
        ("999Y", None),
        (float("nan"), None),
        (None, None),
    ],
)
def test_age_years_reads_dicom_ages_and_numbers(value, years):
    assert age_years(value) == years


def test_age_band_boundary_is_18_years():
    assert [age_band(a) for a in ("017Y", "018Y", "3", None)] == ["child", "adult", "child", "unknown"]


def test_band_defaults_apply_only_where_the_age_is_missing():
    defaults = parse_band_defaults(["kermany*=child", "RSNA*=adult"])
    bands = age_bands(["", "40", "", ""], ["Kermany-pediatric", "kermany-pediatric", "RSNA normals", "NIH"], defaults)
    assert bands == ["child", "adult", "adult", "unknown"]
    with pytest.raises(OptionError):
        parse_band_defaults(["kermany=teen"])


@pytest.mark.parametrize(
    "parse, spec, option",
    [
        (parse_band_defaults, "kermany=teen", "--default-age-band"),
        (parse_band_defaults, "=child", "--default-age-band"),
        (parse_band_targets, "elderly=0.9", "--band-target-recall"),
        (parse_band_targets, "adult=1.5", "--band-target-recall"),
        (parse_band_targets, "adult", "--band-target-recall"),
    ],
)
def test_bad_age_band_options_are_option_errors_naming_the_option(parse, spec, option):
    with pytest.raises(OptionError, match=f"^{option} wants .*, not {spec!r}$") as raised:
        parse([spec])
    assert raised.value.exit_code == EXIT_USAGE
    with pytest.raises(OptionError) as raised:
        parse([spec], exit_code=EXIT_FATAL)  # what train, retune and report give it
    assert raised.value.exit_code == EXIT_FATAL


def test_view_groups_fold_supine_and_portable_into_ap():
    assert [view_group(v) for v in ("AP Supine", "ap", "PA", "LL", "")] == ["AP", "AP", "PA", "unknown", "unknown"]


def _frame(rows):
    return pd.DataFrame(rows, columns=["path", "split", "patient"])


def test_a_test_image_listed_again_in_validation_is_removed_from_validation(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(name.encode())
    shutil.copy(tmp_path / "a.png", tmp_path / "a_copy.png")  # same bytes, another name
    frame = _frame(
        [
            (str(tmp_path / "a.png"), "test", ""),
            (str(tmp_path / "a.png"), "val", ""),
            (str(tmp_path / "a_copy.png"), "train", ""),
            (str(tmp_path / "b.png"), "train", ""),
            (str(tmp_path / "b.png"), "train", ""),
            (str(tmp_path / "c.png"), "val", ""),
        ]
    )
    kept, removed = remove_leakage(frame)
    assert sorted(zip(kept["path"].map(lambda p: Path(p).name), kept["split"])) == [
        ("a.png", "test"),
        ("b.png", "train"),
        ("c.png", "val"),
    ]
    assert removed == {"duplicate_rows": 1, "same_file_in_two_splits": 2}


def test_a_patient_in_two_splits_is_refused(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(name.encode())
    frame = _frame([(str(tmp_path / "a.png"), "train", "p1"), (str(tmp_path / "b.png"), "test", "p1")])
    with pytest.raises(TrainingError, match="patient"):
        remove_leakage(frame)


def test_no_test_patient_reaches_training_on_the_manifest_split(tmp_path):
    manifest = make_dataset(tmp_path)
    config = TrainConfig(data=manifest, out_dir=tmp_path / "w", name="t")
    frame, _, _ = load_labels(config.data, config.task)
    frame, _ = remove_leakage(frame)
    test_patients = set(frame.loc[frame["split"] == "test", "patient"])
    assert test_patients and not test_patients & set(frame.loc[frame["split"] != "test", "patient"])


def test_source_balanced_sampling_gives_classes_equal_shares_and_damps_big_sources():
    # class 0: 900 images of source A, 100 of B; class 1: 100 of A.
    frame = pd.DataFrame({"sg_source": ["A"] * 900 + ["B"] * 100 + ["A"] * 100})
    targets = torch.tensor([0] * 1000 + [1] * 100)
    weights = _sample_weights(frame, targets, 2)
    order = _epoch_order(targets, "source", torch.Generator().manual_seed(0), weights)
    drawn = targets[order]
    assert len(order) == len(targets)
    assert abs(float((drawn == 1).float().mean()) - 0.5) < 0.05
    share_b = float(weights[900:1000].sum() / weights[:1000].sum())
    assert share_b == pytest.approx(np.sqrt(100) / (np.sqrt(900) + np.sqrt(100)))


def test_operating_points_per_age_band_and_their_use():
    rng = np.random.default_rng(0)
    bands = np.array(["child"] * 200 + ["adult"] * 200)
    y = rng.integers(0, 2, 400).astype(bool)
    # adults' scores sit higher overall: one pooled threshold cannot suit both bands
    scores = np.clip(0.3 * y + rng.normal(0.3, 0.1, 400) + np.where(bands == "adult", 0.3, 0.0), 0, 1)
    by_band = band_thresholds(y, scores, bands, 0.95)
    assert set(by_band) == {"child", "adult"}
    assert by_band["adult"]["recall_target"] > by_band["child"]["recall_target"]
    for band in ("child", "adult"):
        mask = bands == band
        assert (scores[mask & y] >= by_band[band]["recall_target"]).mean() >= 0.95
    probs = np.c_[1 - scores, scores]
    card = ModelCard(
        name="m",
        task="pneumonia",
        classes=["normal", "pneumonia"],
        architecture="a",
        input_size=8,
        mean=[0.5],
        std=[0.5],
        positive="pneumonia",
        threshold=0.5,
        thresholds={"by_age_band": by_band},
    )
    pred = card.decide_many(probs, np.array(["adult", "unknown"] * 200)) == "pneumonia"
    thr = np.where(np.arange(400) % 2 == 0, by_band["adult"]["recall_target"], 0.5)
    assert (pred == (scores >= thr)).all()
    assert [card.decide(p, b).label for p, b in zip(probs, ["adult", "unknown"] * 200)] == list(
        card.decide_many(probs, np.array(["adult", "unknown"] * 200))
    )


def test_bands_without_enough_validation_images_get_no_own_threshold():
    bands = np.array(["child"] * 30 + ["adult"] * 8)
    y = np.array([True, False] * 19)
    assert set(band_thresholds(y, np.linspace(0, 1, 38), bands, 0.95)) == {"child"}


def test_annotate_subgroups_uses_manifest_columns(tmp_path):
    frame = pd.DataFrame(
        {"source": ["kermany", "nih"], "age": ["", "70"], "view": ["PA", "AP Supine"], "sex": ["", "F"]}
    )
    config = TrainConfig(data=tmp_path, out_dir=tmp_path, name="t", default_age_band=("kermany=child",))
    out = annotate_subgroups(frame, config)
    assert out[["sg_source", "sg_age_band", "sg_view", "sg_sex"]].values.tolist() == [
        ["kermany", "child", "PA", "unknown"],
        ["nih", "adult", "AP", "F"],
    ]


def test_subgroups_too_small_for_a_number_say_so():
    from pneumobatch.evaluation.metrics import subgroup_metrics

    groups = ["big"] * 40 + ["tiny"] * 4
    y = (["normal", "pneumonia"] * 20) + ["normal", "normal", "normal", "pneumonia"]
    p = np.linspace(0.05, 0.95, 44)
    proba = np.c_[1 - p, p]
    table = subgroup_metrics(
        groups, y, proba, ["normal", "pneumonia"], positive="pneumonia", threshold=0.5, n_bootstrap=50
    )
    rows = {r["value"]: r for r in table["groups"]}
    assert rows["big"]["auc"] is not None and rows["big"]["sensitivity"] is not None
    assert rows["tiny"]["auc"] is None and rows["tiny"]["sensitivity"] is None and rows["tiny"]["specificity"] is None
    assert any("too few" in note for note in rows["tiny"]["notes"])


def test_report_by_age_band_derives_bands_from_age_and_source_defaults(tmp_path):
    from pneumobatch.evaluation.report import build_report
    from pneumobatch.evaluation.report.options import ReportOptions

    preds = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(24)],
            "status": "ok",
            "reason": "",
            "model": "m",
            "task": "pneumonia",
            "pred_label": ["normal", "pneumonia"] * 12,
            "prob_normal": [0.8, 0.2] * 12,
            "prob_pneumonia": [0.2, 0.8] * 12,
            "threshold": "0.5",
        }
    )
    labels = pd.DataFrame(
        {
            "path": preds["path"],
            "label": ["normal", "pneumonia"] * 12,
            "age": ["70"] * 12 + [""] * 12,
            "source": ["nih"] * 12 + ["kermany-pediatric"] * 12,
        }
    )
    preds.to_csv(tmp_path / "p.csv", index=False)
    labels.to_csv(tmp_path / "l.csv", index=False)
    doc = build_report(
        ReportOptions(
            tmp_path / "p.csv",
            labels=tmp_path / "l.csv",
            by=["age_band"],
            default_age_band=["kermany*=child"],
            n_bootstrap=20,
        )
    )
    groups = {g["value"]: g["n"] for g in doc["models"][0]["subgroups"]["age_band"]["groups"]}
    assert groups == {"adult": 12, "child": 12}


def test_training_and_report_derive_the_same_subgroups():
    """One derivation, two sets of column names: train's sg_* columns equal report --by's."""
    from pneumobatch.core.subgroups import REPORT_COLUMNS, TRAINING_COLUMNS, add_subgroup_columns

    frame = pd.DataFrame(
        {
            "source": ["kermany", "nih", ""],
            "age": ["", "070Y", "9"],
            "view": ["PA", "AP Supine", "LL"],
            "sex": ["", "F", "m"],
        }
    )
    defaults = [("kermany", "child")]
    report = add_subgroup_columns(frame, defaults)
    train = add_subgroup_columns(frame, defaults, names=TRAINING_COLUMNS)
    for r, t in (
        (REPORT_COLUMNS.age_band, "sg_age_band"),
        (REPORT_COLUMNS.view, "sg_view"),
        (REPORT_COLUMNS.sex, "sg_sex"),
    ):
        assert report[r].tolist() == train[t].tolist()
    assert report["age_band"].tolist() == ["child", "adult", "child"]
    assert train["sg_source"].tolist() == ["kermany", "nih", "unknown"]
    assert train["sg_age"].tolist()[1:] == [70.0, 9.0] and train["sg_age"].isna().tolist()[0]
    assert "sg_source" not in report.columns and "age_band" not in train.columns


def test_report_cli_bad_default_age_band_is_a_usage_error_naming_the_option_exit_3(tmp_path):
    from click.testing import CliRunner

    from pneumobatch.cli import main

    preds = pd.DataFrame(
        {
            "path": ["a.png", "b.png"],
            "status": "ok",
            "reason": "",
            "model": "m",
            "task": "pneumonia",
            "pred_label": ["normal", "pneumonia"],
            "prob_normal": [0.8, 0.2],
            "prob_pneumonia": [0.2, 0.8],
            "threshold": "0.5",
        }
    )
    preds.to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame({"path": ["a.png", "b.png"], "label": ["normal", "pneumonia"]}).to_csv(tmp_path / "l.csv", index=False)
    args = ["report", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "l.csv"), "--by", "age_band"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "r.pdf"), "--default-age-band", "kermany"])
    assert result.exit_code == 3, result.output
    assert result.output.splitlines()[-1] == (
        "Error: Invalid value for '--default-age-band': wants PATTERN=child or PATTERN=adult, not 'kermany'"
    )
    assert "Traceback" not in result.output
    assert not (tmp_path / "r.pdf").exists()
