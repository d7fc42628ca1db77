"""The multi-class decision offsets chosen on validation, and the per-class table with intervals."""

from __future__ import annotations

import numpy as np

from pneumobatch.core.card import decide_indices
from pneumobatch.evaluation.metrics import balanced_offsets, class_table

CLASSES = ["normal", "bacterial", "viral", "fungal"]


def _skewed(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose priors are against viral: viral images get most of their mass on bacterial."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    logits = rng.normal(0, 1, size=(n, 4))
    logits[np.arange(n), y] += 2.0
    logits[:, 2] -= 1.8  # the prior: viral is rarely the most probable
    logits[:, 3] -= 3.0
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), y


def test_offsets_chosen_on_validation_lift_the_starved_class_on_new_data():
    val_p, val_y = _skewed(600, 0)
    decision = balanced_offsets(val_p, val_y, CLASSES)
    assert decision["rule"] == "log-offsets"
    offsets = decision["log_offsets"]
    assert offsets[0] == 0.0 and offsets[2] > 0.5  # viral pushed up
    assert offsets[3] == 0.0 and decision["not_judged"] == {"fungal": 0}  # no validation image: not judged
    assert decision["val_balanced_accuracy"]["offsets"] > decision["val_balanced_accuracy"]["argmax"] + 0.05
    test_p, test_y = _skewed(600, 1)  # other images of the same kind
    argmax = decide_indices(test_p, CLASSES, None)
    chosen = decide_indices(test_p, CLASSES, None, None, offsets)
    recall = lambda pred, c: (pred[test_y == c] == c).mean()  # noqa: E731
    assert recall(chosen, 2) > recall(argmax, 2) + 0.2
    balanced = lambda pred: np.mean([recall(pred, c) for c in range(3)])  # noqa: E731
    assert balanced(chosen) > balanced(argmax)


def test_a_class_with_few_validation_images_keeps_offset_zero():
    p, y = _skewed(300, 2)
    y[:4] = 3  # four fungal images: too few to choose a rule on
    decision = balanced_offsets(p, y, CLASSES)
    assert decision["log_offsets"][3] == 0.0 and decision["not_judged"] == {"fungal": 4}


def test_the_class_table_counts_and_exact_intervals():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
    proba = np.eye(4)[pred] * 0.7 + 0.075
    table = class_table(proba, y, pred, CLASSES, n_bootstrap=200)
    rows = {r["class"]: r for r in table["per_class"]}
    assert rows["normal"]["recall"] == 0.75 and rows["normal"]["precision"] == 3 / 6
    assert rows["bacterial"]["recall"] == 0.6 and rows["bacterial"]["precision"] == 0.75
    assert rows["viral"]["recall"] == 0.0 and rows["viral"]["n_predicted"] == 0 and rows["viral"]["precision"] is None
    # exact Clopper-Pearson: 0 of 1 -> [0, 0.975]; 3 of 4 -> [0.194, 0.994]
    assert np.allclose(rows["viral"]["recall_ci"], [0.0, 0.975], atol=1e-3)
    assert np.allclose(rows["normal"]["recall_ci"], [0.1941, 0.9937], atol=1e-3)
    assert rows["fungal"]["support"] == 0 and rows["fungal"]["recall"] is None and rows["fungal"]["auc"] is None
    assert abs(table["balanced_accuracy"] - (0.75 + 0.6 + 0.0) / 3) < 1e-12
    lo, hi = table["balanced_accuracy_ci"]
    assert lo <= table["balanced_accuracy"] <= hi
