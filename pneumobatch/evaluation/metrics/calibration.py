"""Calibration: reliability-diagram bins, expected calibration error, Brier score, temperature.

The reliability binning behind the expected calibration error is computed here
(scikit-learn's ``calibration_curve`` drops empty bins and gives no counts); the Brier
score is scikit-learn's. Temperature scaling (Guo et al. 2017) fits one scalar
dividing the logits so that the negative log-likelihood of the labels is least; the
one-dimensional minimisation is SciPy's bounded Brent method, no torch needed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss

from pneumobatch.evaluation.metrics.common import finite_or_none, ratio

#: Temperatures outside this range are clipped: beyond it the fit describes a broken model.
TEMPERATURE_RANGE = (0.05, 20.0)


def reliability(y_pos: np.ndarray, prob: np.ndarray, n_bins: int) -> dict[str, Any]:
    """ECE, Brier score and ``n_bins`` uniform bins (count, mean predicted, fraction positive)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    sum_p = np.bincount(which, weights=prob, minlength=n_bins)
    sum_y = np.bincount(which, weights=y_pos.astype(float), minlength=n_bins)
    n = len(prob)
    bins = []
    for i in range(n_bins):
        c = int(counts[i])
        bins.append(
            {
                "lo": float(edges[i]),
                "hi": float(edges[i + 1]),
                "count": c,
                "mean_predicted": ratio(sum_p[i], c),
                "fraction_positive": ratio(sum_y[i], c),
            }
        )
    ece = float(np.abs(sum_y - sum_p).sum() / n) if n else None
    brier = finite_or_none(brier_score_loss(y_pos, np.clip(prob, 0.0, 1.0), pos_label=True)) if n else None
    return {"ece": ece, "brier": brier, "bins": bins}


def temperature_nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z_max = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - z_max).sum(axis=1)) + z_max[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(z)), np.asarray(targets, dtype=np.int64)]))


def fit_temperature(logits: Any, targets: Any) -> float:
    """Temperature scaling: the scalar T minimising the NLL of ``softmax(logits / T)``.

    ``logits`` (n, k) and ``targets`` (n,) class indices: numpy arrays or CPU tensors.
    The result lies in :data:`TEMPERATURE_RANGE`.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    best = minimize_scalar(
        lambda log_t: temperature_nll(logits, targets, math.exp(log_t)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(min(max(math.exp(best.x), TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1]))


#: Probabilities are clipped to at least this before taking logarithms.
MIN_PROBABILITY = 1e-6


def probability_logits(proba: np.ndarray) -> np.ndarray:
    """Logits (up to a constant per row) of probabilities that were ``softmax(z / T)``: ``z / T``."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), MIN_PROBABILITY, 1.0))


def rescale_probabilities(proba: np.ndarray, scale: float) -> np.ndarray:
    """Probabilities at temperature ``T * scale`` from probabilities at temperature ``T``."""
    from scipy.special import softmax

    return softmax(probability_logits(proba) / scale, axis=1)


def rescale_threshold(threshold: float, scale: float) -> float:
    """The binary threshold that, on probabilities rescaled by ``scale``, makes the same
    decisions as ``threshold`` did before (temperature scaling keeps the order)."""
    t = min(max(float(threshold), MIN_PROBABILITY), 1.0 - MIN_PROBABILITY)
    return float(1.0 / (1.0 + ((1.0 - t) / t) ** (1.0 / scale)))
