"""The two-level etiology classes: probabilities that add up, the fallback rule, the decision
offsets, and older cards (4-class etiology) that still load and decide as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumobatch.core.card import ModelCard, validate_card
from pneumobatch.core.errors import ModelError
from pneumobatch.core.hierarchy import Hierarchy, build, organism, other, parse_top_text, top_text
from pneumobatch.core.tasks import TASKS, task_from_card

COARSE = ("normal", "bacterial", "viral", "fungal", "covid-19")
TREE = Hierarchy(
    COARSE,
    ("normal", "Streptococcus", "other bacterial", "SARS", "other viral", "Pneumocystis", "covid-19"),
    ("normal", "bacterial", "bacterial", "viral", "viral", "fungal", "covid-19"),
)
OLD_CARD = Path(__file__).parents[1] / "data" / "etiology_v0.3_card.json"


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_fine_probabilities_sum_to_their_coarse_class_in_every_row(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(500, len(TREE.fine)))
    coarse, fine = TREE.probabilities(logits, temperature)
    np.testing.assert_allclose(coarse.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(fine.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(TREE.coarse_of(fine), coarse, atol=1e-12)
    for k, name in enumerate(COARSE):
        below = [j for j, p in enumerate(TREE.parent) if p == name]
        np.testing.assert_allclose(fine[:, below].sum(axis=1), coarse[:, k], atol=1e-12)
    # the temperature acts on the coarse level only: the split within a coarse class does not move
    _, fine_t1 = TREE.probabilities(logits, 1.0)
    within = fine[:, 1] / fine[:, 1:3].sum(axis=1)
    np.testing.assert_allclose(within, fine_t1[:, 1] / fine_t1[:, 1:3].sum(axis=1), atol=1e-12)


def test_a_card_turns_fine_outputs_into_coarse_probabilities_and_a_fine_label():
    card = ModelCard("e", "etiology", list(COARSE), "x", 32, [0.5] * 3, [0.25] * 3, hierarchy=TREE.to_dict())
    assert card.output_classes == list(TREE.fine)
    logits = np.array([[0, 3, 2.9, 0, 0, 0, 0]], dtype=np.float32)
    out = card.output_probs(logits)
    coarse = card.class_probs(out[0])
    assert coarse.shape == (5,)
    assert card.decide(coarse).label == "bacterial"
    assert card.tree.best_below(out[0], "bacterial") == "Streptococcus"
    assert card.output_index("bacterial", "Streptococcus") == 1
    assert card.output_index("bacterial", "SARS") == 1  # not below bacterial: the first one below it
    ranked = card.tree.ranked(out[0])
    assert [n for n, _ in ranked] == ["Streptococcus", "other bacterial", "normal"]
    assert parse_top_text(top_text(ranked)) == [(n, round(p, 6)) for n, p in ranked]


def test_the_fallback_rule_keeps_organisms_with_enough_patients_and_folds_the_rest():
    rows = []
    rows += [("bacterial", "Streptococcus", "train", f"s{i}") for i in range(3)] + [
        ("bacterial", "Streptococcus", "val", "s9")
    ]
    rows += [("bacterial", "Klebsiella", "train", f"k{i}") for i in range(2)] + [
        ("bacterial", "Klebsiella", "val", "k9")
    ]
    rows += [("bacterial", None, "train", f"b{i}") for i in range(5)]
    # SARS: three images of ONE patient in train: one patient, not three
    rows += [("viral", "SARS", "train", "v1")] * 3 + [("viral", "SARS", "val", "v2")]
    rows += [("viral", None, "train", "v3")]
    # Pneumocystis: enough train patients but none in validation
    rows += [("fungal", "Pneumocystis", "train", f"f{i}") for i in range(4)]
    rows += [("normal", None, "train", "n1"), ("covid-19", None, "train", "c1")]
    tree = build(COARSE, rows)
    assert tree.fine == ("normal", "Streptococcus", "other bacterial", "viral", "fungal", "covid-19")
    assert tree.parent == ("normal", "bacterial", "bacterial", "viral", "fungal", "covid-19")
    assert tree.fine_class("bacterial", "Klebsiella") == other("bacterial")
    assert tree.fine_class("bacterial", "streptococcus") == "Streptococcus"
    assert tree.fine_class("bacterial", None) == "other bacterial"
    assert tree.fine_class("viral", "SARS") == "viral"
    assert tree.fine_class("fungal", "Pneumocystis") == "fungal"
    assert ">= 3 patients" in tree.rule


def test_organisms_of_findings():
    assert organism("Pneumonia/Bacterial/Streptococcus".split("/")) == "Streptococcus"
    assert organism(["Pneumonia", "Bacterial"]) is None
    assert organism(["No Finding"]) is None
    task = TASKS["etiology"]
    assert task.map_label("Pneumonia/Fungal/Pneumocystis") == "fungal"
    assert task.organism("Pneumonia/Fungal/Pneumocystis") == "Pneumocystis"
    assert task.organism("Pneumonia/Viral/COVID-19") is None  # COVID-19 is a class, not an organism below one
    assert task.map_label("Pneumonia/Lipoid") is None and task.map_label("ARDS") is None


def test_an_old_four_class_etiology_card_still_loads_and_decides_by_the_argmax():
    data = json.loads(OLD_CARD.read_text())
    validate_card(data)
    card = ModelCard.from_dict(data)
    assert card.classes == ["normal", "bacterial", "viral", "covid-19"]
    assert card.tree is None and card.output_classes == card.classes and card.log_offsets is None
    decision = card.decide([0.1, 0.3, 0.35, 0.25])
    assert (decision.label, decision.operating_point) == ("viral", "argmax")
    task = task_from_card(card.task, card.classes)
    assert task.map_label("Pneumonia/Fungal/Pneumocystis") is None  # its classes have no fungal
    assert task.map_label("Pneumonia/Bacterial/Streptococcus") == "bacterial"


def test_log_offsets_change_the_decision_and_are_validated():
    base = json.loads(OLD_CARD.read_text())
    card = ModelCard.from_dict({**base, "decision": {"rule": "log-offsets", "log_offsets": [0.0, 0.5, 0.0, 0.0]}})
    probs = np.array([0.1, 0.3, 0.35, 0.25])
    decision = card.decide(probs)
    assert (decision.label, decision.operating_point) == ("bacterial", "log-offsets")  # log .3 + .5 > log .35
    assert list(card.decide_many(probs[None])) == ["bacterial"]
    with pytest.raises(ModelError, match="log_offsets"):
        validate_card({**base, "decision": {"log_offsets": [0.0, 0.5]}})
    with pytest.raises(ModelError, match="finite"):
        validate_card({**base, "decision": {"log_offsets": [0.0, float("nan"), 0.0, 0.0]}})


def test_a_card_whose_hierarchy_does_not_cover_its_classes_is_refused():
    base = json.loads(OLD_CARD.read_text())
    with pytest.raises(ModelError, match="hierarchy"):
        validate_card({**base, "hierarchy": {"fine": ["normal", "bacterial"], "parent": ["normal", "bacterial"]}})
    with pytest.raises(ModelError, match="hierarchy"):
        validate_card({**base, "hierarchy": {"fine": ["a", "b"], "parent": ["normal"]}})


def test_hostile_top3_cells_are_left_out():
    assert parse_top_text("SARS 0.5; nonsense; x nan; y 7; ; z -0.1; other viral 0.25") == [
        ("SARS", 0.5),
        ("other viral", 0.25),
    ]
    assert parse_top_text(None) == []
