"""A decision rule fair to every class, and the per-class table that judges it.

The argmax of probabilities that carry the training priors starves the classes the priors
are against (version 0.3's etiology model called 121 of 162 pediatric bacterial pneumonias
viral). :func:`balanced_offsets` chooses one additive offset per class on the log
probabilities, on the validation split, to maximise the smallest per-class recall, then the
balanced accuracy (mean per-class recall), over the classes with at least
:data:`MIN_VAL_PER_CLASS` validation images: no class is given up for a better mean. Classes
with fewer keep offset 0, because a handful of images cannot choose a rule. The card
stores the offsets (``decision.log_offsets``) and :func:`pneumobatch.core.card.decide_indices`
applies them everywhere.

:func:`class_table` gives, per class, recall and precision with exact (Clopper-Pearson) 95%
intervals, F1 and one-vs-rest AUC with bootstrap intervals, and the balanced accuracy and
macro AUC with bootstrap intervals.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from pneumobatch.core.card import decide_indices
from pneumobatch.evaluation.metrics.bootstrap import bootstrap_draws, percentile_ci
from pneumobatch.evaluation.metrics.common import finite_or_none
from pneumobatch.evaluation.metrics.intervals import exact_interval

#: A class needs this many validation images to take part in choosing the offsets.
MIN_VAL_PER_CLASS = 10
#: The offsets tried for each class (log scale), and the rounds of coordinate ascent.
OFFSET_GRID = np.round(np.arange(-4.0, 4.0001, 0.1), 2)
ROUNDS = 4


def _fairness(y: np.ndarray, pred: np.ndarray, judged: Sequence[int]) -> tuple[float, float]:
    """(smallest recall, mean recall) over the judged classes: what the offsets maximise, in that order."""
    recalls = [(pred[y == k] == k).mean() for k in judged]
    return float(np.min(recalls)), float(np.mean(recalls))


def balanced_offsets(
    proba: np.ndarray, targets: np.ndarray, classes: Sequence[str], min_per_class: int = MIN_VAL_PER_CLASS
) -> dict[str, Any]:
    """Log offsets per class maximising the smallest validation recall, then the balanced accuracy,
    of the judged classes (coordinate ascent on a grid, the first class fixed at 0; ties keep the
    offset nearest 0). Returns the card's
    ``decision`` entry: rule, offsets, the classes judged, and the validation balanced accuracy
    and per-class recall under the argmax and under the offsets."""
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    k = len(classes)
    counts = np.bincount(y, minlength=k)
    judged = [c for c in range(k) if counts[c] >= min_per_class]
    offsets = np.zeros(k)
    log_p = np.log(np.clip(proba, 1e-12, 1.0))
    not_judged = {classes[c]: int(counts[c]) for c in range(k) if c not in judged}
    if len(judged) < 2:
        note = f"fewer than two classes with >= {min_per_class} validation images: the argmax"
        return {"rule": "argmax", "note": note, "not_judged": not_judged}

    def score(o: np.ndarray) -> tuple[float, float]:
        return _fairness(y, np.argmax(log_p + o, axis=1), judged)

    best = score(offsets)
    for _ in range(ROUNDS):
        improved = False
        for c in (c for c in judged if c != 0):  # the first class (normal) is the reference
            trial = offsets.copy()
            results = []
            for value in OFFSET_GRID:
                trial[c] = value
                results.append((score(trial), -abs(value), value))
            s, _, value = max(results)
            if s > best:
                best, offsets[c], improved = s, value, True
        if not improved:
            break
    argmax = np.argmax(proba, axis=1)
    chosen = np.argmax(log_p + offsets, axis=1)

    def recalls(pred: np.ndarray) -> dict[str, Optional[float]]:
        return {classes[c]: float((pred[y == c] == c).mean()) if counts[c] else None for c in range(k)}

    return {
        "rule": "log-offsets",
        "log_offsets": [float(v) for v in offsets],
        "chosen_on": "validation",
        "objective": f"the smallest recall, then the mean recall (balanced accuracy), of the classes with >= "
        f"{min_per_class} validation images",
        "judged_classes": [classes[c] for c in judged],
        "not_judged": not_judged,
        "val_balanced_accuracy": {"argmax": _fairness(y, argmax, judged)[1], "offsets": best[1]},
        "val_smallest_recall": {"argmax": _fairness(y, argmax, judged)[0], "offsets": best[0]},
        "val_recall": {"argmax": recalls(argmax), "offsets": recalls(chosen)},
    }


def _auc(y: np.ndarray, score: np.ndarray) -> Optional[float]:
    from sklearn.metrics import roc_auc_score

    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, score))


def _f1(y: np.ndarray, pred: np.ndarray, c: int) -> float:
    tp = np.sum((pred == c) & (y == c))
    denom = np.sum(pred == c) + np.sum(y == c)
    return float(2 * tp / denom) if denom else float("nan")


def class_table(
    proba: Optional[np.ndarray],
    targets: np.ndarray,
    pred: np.ndarray,
    classes: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-class recall, precision (exact 95% CIs), F1 and AUC (bootstrap 95% CIs); balanced accuracy
    and macro AUC (bootstrap 95% CIs) over the classes present. ``targets``/``pred`` are indices;
    ``proba`` None (a level whose probabilities are not all known, such as the fine classes of a
    predictions CSV, which keeps the top three): no AUC."""
    proba = None if proba is None else np.asarray(proba, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    k = len(classes)
    present = [c for c in range(k) if (y == c).any()]
    n = len(y)
    boot: dict[str, list[float]] = {"balanced_accuracy": [], "macro_auc": []}
    for c in range(k):
        boot[f"f1_{c}"], boot[f"auc_{c}"] = [], []
    if n_bootstrap > 0 and n:
        for draws in bootstrap_draws(n, n_bootstrap, seed):
            for idx in draws:
                yy, pp = y[idx], pred[idx]
                here = [c for c in present if (yy == c).any()]
                if len(here) == len(present):
                    boot["balanced_accuracy"].append(_fairness(yy, pp, here)[1])
                aucs = []
                for c in present:
                    boot[f"f1_{c}"].append(_f1(yy, pp, c))
                    a = None if proba is None else _auc(yy == c, proba[idx, c])
                    boot[f"auc_{c}"].append(np.nan if a is None else a)
                    aucs.append(np.nan if a is None else a)
                if aucs and not np.isnan(aucs).any():
                    boot["macro_auc"].append(float(np.mean(aucs)))

    def ci(key: str) -> Optional[list[float]]:
        values = np.asarray(boot[key], dtype=np.float64)
        values = values[np.isfinite(values)]
        return percentile_ci(values, 0.95)[0] if len(values) else None

    rows = []
    for c in range(k):
        support = int((y == c).sum())
        called = int((pred == c).sum())
        hits = int(((y == c) & (pred == c)).sum())
        auc = _auc(y == c, proba[:, c]) if support and proba is not None else None
        rows.append(
            {
                "class": classes[c],
                "support": support,
                "n_predicted": called,
                "recall": hits / support if support else None,
                "recall_ci": exact_interval(hits, support),
                "precision": hits / called if called else None,
                "precision_ci": exact_interval(hits, called),
                "f1": finite_or_none(_f1(y, pred, c)) if support or called else None,
                "f1_ci": ci(f"f1_{c}") if support else None,
                "auc": auc,
                "auc_ci": ci(f"auc_{c}") if auc is not None else None,
            }
        )
    aucs = [r["auc"] for r in rows if r["auc"] is not None]
    return {
        "n": n,
        "per_class": rows,
        "balanced_accuracy": _fairness(y, pred, present)[1] if present else None,
        "balanced_accuracy_ci": ci("balanced_accuracy"),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "macro_auc_ci": ci("macro_auc"),
        "n_bootstrap": int(n_bootstrap),
    }


def decided(proba: np.ndarray, classes: Sequence[str], decision: Optional[dict]) -> np.ndarray:
    """Class indices by a card's ``decision`` entry (argmax when it has no offsets)."""
    offsets = (decision or {}).get("log_offsets")
    return decide_indices(proba, classes, None, None, offsets)
