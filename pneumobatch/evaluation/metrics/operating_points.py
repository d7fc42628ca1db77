"""Operating points of a binary score: the rates at a threshold, and the thresholds worth showing.

One rule picks thresholds for training (written into the model card) and for the
report (computed on the evaluated data): on the full ROC curve
(``drop_intermediate=False``, so every distinct score is a candidate),

- ``recall_target``: the highest threshold whose sensitivity reaches the target recall
  (so specificity is as high as that allows); with a ``margin_level`` (training), the
  highest threshold at which the exact one-sided lower confidence bound of the
  sensitivity (Clopper-Pearson at that level) reaches the target, so that a threshold
  chosen on a validation split of a hundred positives still reaches the target on new
  images of the same kind with that confidence, not half the time;
- ``youden``: the threshold maximising sensitivity + specificity - 1 (ties, up to
  rounding: the highest threshold).

A case is positive when its score is at or above the threshold
(:func:`pneumobatch.core.card.is_positive`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_curve

from pneumobatch.core.card import RECALL_TARGET, TARGET_RECALL, YOUDEN, is_positive
from pneumobatch.evaluation.metrics.common import finite_or_none, ratio


def confusion_rates(y_pos: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Counts, sensitivity, specificity, PPV, NPV, F1 and accuracy of boolean predictions.

    A rate whose denominator is zero (no positives, nothing predicted positive...) is None.
    """
    y_pos = np.asarray(y_pos, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    tn, fp, fn, tp = confusion_matrix(y_pos, pred, labels=[False, True]).ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        ppv, sens, f1, _ = precision_recall_fscore_support(
            y_pos, pred, average="binary", pos_label=True, zero_division=np.nan
        )
    return {
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
        "sensitivity": finite_or_none(sens),
        "specificity": ratio(tn, tn + fp),
        "ppv": finite_or_none(ppv),
        "npv": ratio(tn, tn + fn),
        "f1": finite_or_none(f1),
        "accuracy": ratio(tp + tn, len(y_pos)),
    }


def operating_point(
    y_pos: np.ndarray, score: np.ndarray, threshold: float, name: str, note: str = ""
) -> dict[str, Any]:
    """Counts, sensitivity, specificity, PPV, NPV and F1 when ``score >= threshold``."""
    return {
        "name": name,
        "threshold": finite_or_none(threshold),
        **confusion_rates(y_pos, is_positive(score, threshold)),
        "note": note,
    }


def sensitivity_lower_bound(detected: np.ndarray, positives: int, level: float) -> np.ndarray:
    """Exact (Clopper-Pearson) one-sided ``level`` lower confidence bounds of ``detected / positives``."""
    from scipy.stats import beta

    detected = np.asarray(detected, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(1.0 - level, detected, positives - detected + 1.0)
    return np.where(detected > 0, np.nan_to_num(bound, nan=0.0), 0.0)


def select_threshold(
    y_pos: np.ndarray,
    score: np.ndarray,
    target_recall: float = TARGET_RECALL,
    margin_level: Optional[float] = None,
) -> dict[str, Any]:
    """The ``recall_target`` and ``youden`` thresholds with their sensitivity and specificity.

    Keys as in the model card: ``recall_target``, ``recall_target_sensitivity``,
    ``recall_target_specificity``, ``youden``, ``youden_sensitivity``,
    ``youden_specificity`` (the ``recall_target*`` ones are None when no threshold
    reaches ``target_recall``). With ``margin_level``, ``recall_target`` is the highest
    threshold whose sensitivity's one-sided lower bound at that level reaches the target
    (``recall_target_lower_bound`` records it); when no threshold can (too few
    positives), the plain rule applies and ``recall_target_margin`` says so. Raises
    ValueError unless both classes are present.
    """
    y_pos = np.asarray(y_pos, dtype=bool)
    if y_pos.all() or not y_pos.any():
        raise ValueError("choosing a threshold needs both classes")
    fpr, tpr, thr = roc_curve(y_pos, score, drop_intermediate=False)
    finite = np.isfinite(thr)
    out: dict[str, Any] = {}
    reach = np.flatnonzero((tpr >= target_recall) & finite)
    lower = None
    if margin_level is not None:
        positives = int(y_pos.sum())
        lower = sensitivity_lower_bound(np.round(tpr * positives), positives, margin_level)
        with_margin = np.flatnonzero((lower >= target_recall) & finite)
        out["recall_target_margin"] = (
            f"one-sided {margin_level:g} lower bound of validation sensitivity >= {target_recall:g}"
            if with_margin.size
            else f"none: {positives} validation positives cannot show sensitivity >= {target_recall:g} "
            f"at {margin_level:g} confidence; plain target"
        )
        if with_margin.size:
            reach = with_margin
    # thresholds decrease along the curve: the first reaching the target is the highest
    first = int(reach[0]) if reach.size else None
    j = np.where(finite, tpr - fpr, -np.inf)
    best = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
    for name, i in ((RECALL_TARGET, first), (YOUDEN, best)):
        out[name] = None if i is None else float(thr[i])
        out[f"{name}_sensitivity"] = None if i is None else float(tpr[i])
        out[f"{name}_specificity"] = None if i is None else float(1 - fpr[i])
    if lower is not None:
        out[f"{RECALL_TARGET}_lower_bound"] = None if first is None else float(lower[first])
    return out


def threshold_points(
    y_pos: np.ndarray,
    score: np.ndarray,
    shipped: Optional[float],
    card_thresholds: Mapping[str, float],
    target_recall: float = TARGET_RECALL,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The report's operating points and notes: shipped, recall_target, youden, card_*."""
    notes: list[str] = []
    points: list[dict[str, Any]] = []
    if shipped is not None:
        points.append(operating_point(y_pos, score, shipped, "shipped", "threshold in the model"))
    if y_pos.all() or not y_pos.any():
        notes.append("operating points need both classes in the labels; only the shipped one is shown")
        return points, notes
    chosen = select_threshold(y_pos, score, target_recall)
    if chosen[RECALL_TARGET] is not None:
        points.append(
            operating_point(
                y_pos,
                score,
                chosen[RECALL_TARGET],
                RECALL_TARGET,
                f"highest threshold with sensitivity >= {target_recall:g} here",
            )
        )
    points.append(operating_point(y_pos, score, chosen[YOUDEN], YOUDEN, "maximises sensitivity + specificity - 1 here"))
    for name, t in card_thresholds.items():
        if t is None or not math.isfinite(float(t)):
            continue
        points.append(operating_point(y_pos, score, float(t), f"card_{name}", "threshold chosen on validation data"))
    return points, notes


#: An age band gets its own operating point only with at least this many images of each class.
MIN_PER_CLASS_PER_BAND = 10


def band_thresholds(
    y_pos: np.ndarray,
    scores: np.ndarray,
    bands: np.ndarray,
    target_recall: float,
    min_per_class: int = MIN_PER_CLASS_PER_BAND,
    band_targets: Optional[Mapping[str, float]] = None,
    margin_level: Optional[float] = None,
) -> dict[str, dict[str, Any]]:
    """Operating points per age band, for bands with at least ``min_per_class`` images of each class.

    Each band's ``recall_target`` reaches ``band_targets[band]`` where given, else ``target_recall``
    (with ``margin_level``, as :func:`select_threshold`); the point records its ``target_recall``.
    """
    from pneumobatch.core.subgroups import AGE_BANDS

    y_pos = np.asarray(y_pos).astype(bool)
    out = {}
    for band in AGE_BANDS:
        mask = np.asarray(bands) == band
        if y_pos[mask].sum() >= min_per_class and (~y_pos[mask]).sum() >= min_per_class:
            target = float((band_targets or {}).get(band, target_recall))
            point = select_threshold(y_pos[mask], scores[mask], target, margin_level)
            point["target_recall"] = target
            point["n_positive"], point["n_negative"] = int(y_pos[mask].sum()), int((~y_pos[mask]).sum())
            out[band] = point
    return out


#: Two-sided level of the intervals behind :func:`min_positives_for` (95% intervals).
CI_LEVEL = 0.95


def min_positives_for(target_recall: float, level: float = CI_LEVEL) -> int:
    """Fewest positives with which a sample can show ``sensitivity >= target``.

    With n positives all detected, the exact (Clopper-Pearson) two-sided ``level``
    interval of the sensitivity has lower bound ``((1 - level) / 2) ** (1 / n)``; below
    the returned n that bound stays under the target whatever the model does (for a 95%
    target: 72 positives; for 90%: 36).
    """
    import math

    if not 0.0 < target_recall < 1.0:
        return 1
    return int(math.ceil(math.log((1.0 - level) / 2.0) / math.log(target_recall)))
