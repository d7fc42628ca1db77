"""Monitoring class shares across a model change: the 4-class etiology model replaced by the
5-class two-level one (``fungal``, fine labels). Issue 26.

Four nights of one model name ``etiology``: nights 0-1 the older 4-class model, nights 2-3
the new hierarchical one (other weights). Each night's predictions CSV and run.json are
written as predict writes them (:func:`~pneumobatch.operations.monitor.record.monitoring_block`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pneumobatch.cli import main
from pneumobatch.core.card import ModelCard
from pneumobatch.io.predictions import file_counts
from pneumobatch.operations.monitor.analysis import analyse, load_nights
from pneumobatch.operations.monitor.record import UNUSABLE_FINE, monitoring_block
from pneumobatch.operations.monitor.schema import night_problem

OLD = ["normal", "bacterial", "viral", "covid-19"]
NEW = ["normal", "bacterial", "viral", "fungal", "covid-19"]
FINE = ["normal", "Streptococcus", "other bacterial", "SARS", "other viral", "Pneumocystis", "covid-19"]
PARENT = ["normal", "bacterial", "bacterial", "viral", "viral", "fungal", "covid-19"]
IMAGES = 60


def _card(new: bool) -> ModelCard:
    return ModelCard(
        name="etiology",
        task="etiology",
        classes=NEW if new else OLD,
        architecture="x",
        input_size=8,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        weights_sha256=("5e" if new else "4d") * 32,
        hierarchy={"fine": FINE, "parent": PARENT} if new else {},
    )


def _frame(card: ModelCard, rng: np.random.Generator) -> pd.DataFrame:
    """A night's rows: probabilities drawn at random, the label the card's rule gives, the fine label below it."""
    proba = rng.dirichlet(np.ones(len(card.classes)), IMAGES)
    labels = card.decide_many(proba)
    rows = []
    for i, (p, label) in enumerate(zip(proba, labels)):
        below = [f for f, parent in zip(FINE, PARENT) if parent == label]
        rows.append(
            {
                "path": f"{i:03d}.dcm",
                "status": "ok",
                "reason": "",
                "model": card.name,
                "pred_label": label,
                "sop_instance_uid": f"1.2.3.{i}",
                **{f"prob_{c}": f"{v:.6f}" for c, v in zip(card.classes, p)},
                **({"fine_label": below[i % len(below)]} if card.hierarchy else {}),
            }
        )
    frame = pd.DataFrame(rows)
    if card.hierarchy:
        frame.loc[0, "fine_label"] = "Aspergillus"  # not one of the card's fine classes: counted as unusable
    return frame


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("class-nights")
    rng = np.random.default_rng(26)
    paths = []
    for night in range(4):
        card = _card(new=night >= 2)
        frame = _frame(card, rng)
        frame.to_csv(root / f"night{night}.csv", index=False)
        run = {
            "schema_version": 4,
            "started": f"2026-02-0{night + 1}T02:00:00+00:00",
            "finished": f"2026-02-0{night + 1}T02:10:00+00:00",
            "counts": file_counts(frame),
            "images_per_second": 20.0,
            "models": [{"name": card.name, "weights_sha256": card.weights_sha256, "card": card.to_dict()}],
            "monitoring": monitoring_block(frame, [card], 20.0),
        }
        path = root / f"night{night}.run.json"
        path.write_text(json.dumps(run))
        paths.append(path)
    return paths


def test_each_run_records_its_class_and_fine_counts(nights):
    old = json.loads(nights[0].read_text())["monitoring"]["models"]["etiology"]
    new = json.loads(nights[2].read_text())["monitoring"]["models"]["etiology"]
    assert old["classes"] == OLD and "fine_classes" not in old and "fine_counts" not in old["overall"]
    assert set(old["overall"]["class_counts"]) == set(OLD) and sum(old["overall"]["class_counts"].values()) == IMAGES
    assert new["classes"] == NEW and new["fine_classes"] == FINE
    assert set(new["overall"]["class_counts"]) == set(NEW) and new["overall"]["class_counts"]["fungal"] > 0
    fine = new["overall"]["fine_counts"]
    assert fine[UNUSABLE_FINE] == 1 and sum(fine.values()) == IMAGES and fine["Pneumocystis"] > 0
    assert night_problem(json.loads(nights[2].read_text())) is None


def test_the_five_class_model_after_the_four_class_one_is_an_alert_and_shares_have_no_fungal_before(nights):
    loaded, notes = load_nights(nights)
    assert not notes
    doc = analyse(loaded, baseline=2)
    changed = [a for a in doc["alerts"] if a["kind"] == "classes-changed"]
    assert [Path(a["run_json"]) for a in changed] == nights[2:]
    assert "added fungal" in changed[0]["message"] and "not comparable" in changed[0]["message"]
    assert {Path(a["run_json"]) for a in doc["alerts"] if a["kind"] == "weights-changed"} == set(nights[2:])
    shares = doc["series"]["models"]["etiology"]["class_share"]
    assert list(shares) == [*OLD, "fungal"]  # in order of first appearance
    assert shares["fungal"][:2] == [None, None] and all(s is not None and s > 0 for s in shares["fungal"][2:])
    for night in range(4):
        assert sum(shares[c][night] or 0 for c in shares) == pytest.approx(1.0)
    fine = doc["series"]["models"]["etiology"]["fine_share"]
    assert set(fine) == {*FINE, UNUSABLE_FINE}
    assert fine["Pneumocystis"][:2] == [None, None] and fine["Pneumocystis"][2] > 0
    assert fine[UNUSABLE_FINE][2] == pytest.approx(1 / IMAGES)


def test_an_older_run_json_without_class_counts_still_compares(nights, tmp_path):
    """A run.json written before class counts: no shares for it, its classes from its card, the same alert."""
    runs = []
    for path in nights:
        run = json.loads(path.read_text())
        if "night0" in path.name or "night1" in path.name:
            entry = run["monitoring"]["models"]["etiology"]
            entry.pop("classes")
            entry["overall"].pop("class_counts")
        runs.append(tmp_path / path.name)
        runs[-1].write_text(json.dumps(run))
    out = tmp_path / "m.pdf"
    result = CliRunner().invoke(main, ["monitor", *map(str, runs), "--baseline", "2", "-o", str(out)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert any("classes-changed" in line and "added fungal" in line for line in result.output.splitlines())
    doc = json.loads(out.with_suffix(".json").read_text())
    shares = doc["series"]["models"]["etiology"]["class_share"]
    assert all(shares[c][:2] == [None, None] for c in shares) and shares["viral"][2] is not None
    assert out.read_bytes().startswith(b"%PDF")  # with the share figures (images: their titles are not text)


def test_a_class_count_larger_than_the_images_is_left_out(nights, tmp_path):
    run = json.loads(nights[2].read_text())
    run["monitoring"]["models"]["etiology"]["overall"]["class_counts"]["fungal"] = 10**6
    assert "class_counts" in night_problem(run)
