"""The fine level of a two-level model (:mod:`pneumobatch.core.hierarchy`): per fine class, top-1 and top-3.

A predictions CSV keeps, per image, the fine class below the coarse decision (``fine_label``)
and the three most probable fine classes (``fine_top3``), not every fine probability. So the
fine level has per-class recall and precision with exact intervals and F1 with bootstrap ones
(:func:`.multiclass.class_table`, without AUC), the balanced accuracy, top-1 accuracy (the
``fine_label``) and top-3 accuracy (the truth among ``fine_top3``) with exact (Clopper-Pearson)
95% intervals, and the confusion matrix of ``fine_label``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from pneumobatch.evaluation.metrics.common import jsonable
from pneumobatch.evaluation.metrics.intervals import exact_interval
from pneumobatch.evaluation.metrics.multiclass import class_table


def _accuracy(hits: int, n: int) -> dict[str, Any]:
    return {"n": int(n), "hits": int(hits), "accuracy": hits / n if n else None, "ci": exact_interval(hits, n)}


def fine_level(
    truth: Sequence[str],
    pred: Sequence[Optional[str]],
    top: Sequence[Optional[Sequence[str]]],
    classes: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-level metrics of images with true fine class ``truth``, predicted ``pred`` (None: no usable
    prediction, left out) and top fine classes ``top`` (None: none usable, left out of top-3).

    ``classes`` holds every value of ``truth`` and ``pred``; their order is that of the table and
    the confusion matrix (rows true, columns predicted).
    """
    classes = [str(c) for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    truth = [str(t) for t in truth]
    if not len(truth) == len(pred) == len(top):
        raise ValueError(f"{len(truth)} true fine classes, {len(pred)} predicted, {len(top)} top lists")
    used = [i for i, p in enumerate(pred) if p is not None]
    y = np.array([index[truth[i]] for i in used], dtype=np.int64)
    yp = np.array([index[str(pred[i])] for i in used], dtype=np.int64)
    table = class_table(None, y, yp, classes, n_bootstrap=n_bootstrap, seed=seed)
    per_class = [{k: v for k, v in row.items() if k not in ("auc", "auc_ci")} for row in table["per_class"]]
    ranked = [i for i, t in enumerate(top) if t is not None]
    top_hits = sum(truth[i] in top[i] for i in ranked)
    k = len(classes)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y, yp), 1)
    row = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(row > 0, counts / np.where(row > 0, row, 1), np.nan)
    return jsonable(
        {
            "n": len(used),
            "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
            "top1": _accuracy(int((y == yp).sum()), len(used)),
            "top3": _accuracy(int(top_hits), len(ranked)),
            "balanced_accuracy": table["balanced_accuracy"],
            "balanced_accuracy_ci": table["balanced_accuracy_ci"],
            "per_class": per_class,
            "confusion_matrix": {"labels": classes, "counts": counts, "row_normalised": normalised},
            "n_bootstrap": table["n_bootstrap"],
        }
    )
