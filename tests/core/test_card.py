"""The model card and its one decision rule (no torch needed)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pneumobatch.core.card import Decision, ModelCard, decide_indices
from pneumobatch.core.errors import ModelError


def card(**kw) -> ModelCard:
    base = dict(
        name="pneu",
        task="pneumonia",
        classes=["normal", "pneumonia"],
        architecture="a",
        input_size=32,
        mean=[0.5],
        std=[0.5],
        positive="pneumonia",
    )
    return ModelCard(**{**base, **kw})


def test_binary_without_threshold_uses_half_inclusive():
    """The issue's disagreement: [0.5, 0.5] is positive everywhere (p >= 0.5)."""
    c = card(threshold=None)
    assert c.decide([0.5, 0.5]) == Decision("pneumonia", 0.5, "pooled")
    assert c.decide([0.51, 0.49]).label == "normal"
    assert c.decide_many(np.array([[0.5, 0.5], [0.6, 0.4]])).tolist() == ["pneumonia", "normal"]


def test_binary_threshold_and_age_band():
    c = card(
        threshold=0.2,
        thresholds={
            "recall_target": 0.2,
            "youden": 0.3,
            "recall_target_sensitivity": 0.9,
            "by_age_band": {"child": {"recall_target": 0.6}},
        },
    )
    assert c.decide([0.8, 0.2]) == Decision("pneumonia", 0.2, "pooled")
    assert c.decide([0.5, 0.5], age_band="child") == Decision("normal", 0.6, "child")
    assert c.decide([0.3, 0.7], age_band="child").label == "pneumonia"
    assert c.decide([0.8, 0.2], age_band="adult") == Decision("pneumonia", 0.2, "pooled")  # no adult point
    assert c.operating_points() == {"recall_target": 0.2, "youden": 0.3}
    assert c.binary and c.positive_index == 1


def test_multiclass_is_argmax():
    c = card(task="etiology", classes=["normal", "bacterial", "viral", "covid-19"], positive=None, threshold=0.9)
    assert c.decide([0.1, 0.2, 0.6, 0.1]) == Decision("viral", None, "argmax")
    assert not c.binary and c.positive_index is None
    assert c.prob_columns() == ["prob_normal", "prob_bacterial", "prob_viral", "prob_covid-19"]
    assert c.prob_column("viral") == "prob_viral"
    assert decide_indices(np.array([[np.nan, 0.2, 0.1, 0.0]]), c.classes, None).tolist() == [1]


def test_round_trip_and_missing_fields():
    c = card(threshold=0.3)
    assert ModelCard.from_dict(c.to_dict()) == c
    with pytest.raises(ModelError, match="lacks architecture"):
        ModelCard.from_dict({k: v for k, v in c.to_dict().items() if k != "architecture"})


def test_card_imports_without_torch():
    code = "import sys, pneumobatch.core.card, pneumobatch.evaluation.labels.join, pneumobatch.evaluation.labels.reading; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
