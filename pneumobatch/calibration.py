"""Temperature scaling and operating points fitted on labelled probabilities (no torch).

One implementation for the two places that fit them: ``train`` on its validation split
(raw logits) and ``calibrate`` on a site's labelled sample (the probabilities predict
wrote, see :func:`rescale_probabilities`).

- :func:`fit_temperature`: temperature scaling (Guo et al. 2017), the one scalar T
  minimising the negative log-likelihood of ``softmax(logits / T)``.
- :func:`select_threshold`: the highest threshold reaching a target sensitivity, and
  Youden's J.
- :func:`band_thresholds`: the same per age band, for bands with at least
  :data:`MIN_PER_CLASS` images of each class.
- :func:`min_positives_for`: how many positives a sample needs before it can show that a
  sensitivity target is met.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from pneumobatch.subgroups import AGE_BANDS

#: A subgroup gets its own operating point (and, in training, enters model selection)
#: only with at least this many images of each class it is scored on.
MIN_PER_CLASS = 10
#: Temperatures are kept within these bounds (a wider range only fits noise).
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: Smallest probability taken to the log when predict's rounded probabilities are rescaled.
MIN_PROBABILITY = 1e-6


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """Temperature scaling: the T in :data:`TEMPERATURE_BOUNDS` minimising the NLL of
    ``softmax(logits / T)`` against class indices ``targets``."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(targets))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / math.exp(log_t), axis=1)[rows, targets].mean())

    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    best = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(best.x))


def probability_logits(proba: np.ndarray) -> np.ndarray:
    """Logits (up to a constant per row) of probabilities that were ``softmax(z / T)``: ``z / T``."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), MIN_PROBABILITY, 1.0))


def rescale_probabilities(proba: np.ndarray, scale: float) -> np.ndarray:
    """Probabilities at temperature ``T * scale`` from probabilities at temperature ``T``."""
    return softmax(probability_logits(proba) / scale, axis=1)


def rescale_threshold(threshold: float, scale: float) -> float:
    """The binary threshold that, on probabilities rescaled by ``scale``, makes the same
    decisions as ``threshold`` did before (temperature scaling keeps the order)."""
    t = min(max(float(threshold), MIN_PROBABILITY), 1.0 - MIN_PROBABILITY)
    return float(1.0 / (1.0 + ((1.0 - t) / t) ** (1.0 / scale)))


def select_threshold(y_true: np.ndarray, scores: np.ndarray, target_recall: float) -> dict[str, float]:
    """Thresholds on the positive-class probability.

    ``recall_target``: the highest threshold whose sensitivity is at least
    ``target_recall`` (so specificity is as high as that allows); ``youden``: the
    threshold maximising sensitivity + specificity - 1. Raises ``ValueError`` unless
    ``y_true`` holds both classes.
    """
    from sklearn.metrics import roc_curve

    y_true = np.asarray(y_true).astype(int)
    if y_true.min() == y_true.max():
        raise ValueError("threshold selection needs both classes")
    fpr, tpr, thresholds = roc_curve(y_true, scores)
    thresholds = np.minimum(thresholds, 1.0)
    ok = np.flatnonzero(tpr >= target_recall)
    recall_idx = ok[0]  # roc_curve orders thresholds high -> low, tpr low -> high
    youden_idx = int(np.argmax(tpr - fpr))
    return {
        "recall_target": float(thresholds[recall_idx]),
        "recall_target_sensitivity": float(tpr[recall_idx]),
        "recall_target_specificity": float(1 - fpr[recall_idx]),
        "youden": float(thresholds[youden_idx]),
        "youden_sensitivity": float(tpr[youden_idx]),
        "youden_specificity": float(1 - fpr[youden_idx]),
    }


def band_thresholds(
    y_pos: np.ndarray, scores: np.ndarray, bands: np.ndarray, target_recall: float
) -> dict[str, dict[str, float]]:
    """Operating points per age band, for bands with at least :data:`MIN_PER_CLASS` images of each class."""
    out = {}
    for band in AGE_BANDS:
        mask = bands == band
        if (y_pos[mask]).sum() >= MIN_PER_CLASS and (~y_pos[mask]).sum() >= MIN_PER_CLASS:
            point = select_threshold(y_pos[mask], scores[mask], target_recall)
            point["n_positive"], point["n_negative"] = int(y_pos[mask].sum()), int((~y_pos[mask]).sum())
            out[band] = point
    return out


#: Two-sided level of the intervals behind :func:`min_positives_for` (95% intervals).
CI_LEVEL = 0.95


def min_positives_for(target_sensitivity: float, level: float = CI_LEVEL) -> int:
    """Fewest positives with which a sample can show ``sensitivity >= target``.

    With n positives all detected, the exact (Clopper-Pearson) two-sided ``level``
    interval of the sensitivity has lower bound ``((1 - level) / 2) ** (1 / n)``; below
    the returned n that bound stays under the target whatever the model does (for a 95%
    target: 72 positives; for 90%: 36).
    """
    if not 0.0 < target_sensitivity < 1.0:
        return 1
    return int(math.ceil(math.log((1.0 - level) / 2.0) / math.log(target_sensitivity)))
