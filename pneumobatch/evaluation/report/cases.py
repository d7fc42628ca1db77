"""Cases to look at: the images behind one model's numbers, chosen from its predictions.

With labels (an image-level join), the most confident mistakes, by the calls the evaluation
counts (the CSV's ``pred_label``, else the card's decision):

- binary: ``false-negative`` (label positive, called negative), lowest P(positive) first,
  and ``false-positive`` (label negative, called positive), highest P(positive) first;
- multiclass: ``misclassified``, highest P(predicted class) first.

Without labels: ``highest``, the highest P(positive) first (multiclass: P(predicted class)),
and ``near-threshold``, the smallest distance to the operating point first: ``|P(positive) -
threshold|`` with the threshold of the card's rule for the row's age band
(:meth:`~pneumobatch.core.card.ModelCard.threshold_for`); multiclass, the smallest margin
between the two most probable classes. The two lists may share an image. Ties keep the
CSV's order.

A case's ``heatmap`` is the CSV's ``heatmap`` cell (``predict --heatmaps``: a PNG relative
to the CSV's folder) when :func:`heatmap_file` accepts it, else None. The cell is untrusted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pneumobatch.core.card import ModelCard
from pneumobatch.evaluation.labels.join import prediction_classes
from pneumobatch.io.predictions import HEATMAP_COLUMN, cell_text, heatmap_file

#: Kinds of case, in the order the report shows them, with their headings.
KINDS = {
    "false-negative": "False negatives",
    "false-positive": "False positives",
    "misclassified": "Misclassified",
    "highest": "Highest probability",
    "near-threshold": "Closest to the operating point",
}


def _order(values: np.ndarray, descending: bool) -> np.ndarray:
    """Row order by ``values`` (NaN last), ties in CSV order."""
    key = np.where(np.isnan(values), np.inf, -values if descending else values)
    return np.argsort(key, kind="stable")


def _case(row: pd.Series, kind: str, probability: float, of: str, threshold: Optional[float]) -> dict[str, Any]:
    label = row.get("y_true")
    return {
        "path": str(row["path"]),
        "kind": kind,
        "probability": round(float(probability), 6),
        "probability_of": of,
        "threshold": None if threshold is None else round(float(threshold), 6),
        "label": None if label is None or pd.isna(label) else str(label),
        "pred_label": str(row["y_pred"]),
        "heatmap_cell": row.get(HEATMAP_COLUMN),
    }


def pick_cases(rows: pd.DataFrame, card: ModelCard, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` cases of each kind from one model's predicted rows (``y_true`` present: labelled)."""
    if n <= 0 or rows.empty:
        return []
    rows = rows.reset_index(drop=True)
    if "y_pred" not in rows.columns:
        rows = rows.assign(y_pred=prediction_classes(rows, card)[0])
    proba = rows[card.prob_columns()].to_numpy(dtype=np.float64)
    pred = rows["y_pred"].astype(str).to_numpy()
    bands = rows["age_band"].fillna("").astype(str) if "age_band" in rows.columns else pd.Series("", index=rows.index)
    thresholds = np.array([card.threshold_for(b or None)[0] for b in bands]) if card.binary else None
    picks: list[tuple[str, np.ndarray, np.ndarray, str]] = []  # kind, rows in order, probabilities, of class
    if card.binary:
        p = proba[:, card.positive_index]
        of = str(card.positive)
        if "y_true" in rows.columns:
            truth = rows["y_true"].astype(str).to_numpy()
            is_pos, called_pos = truth == card.positive, pred == card.positive
            for kind, mask, descending in (
                ("false-negative", is_pos & ~called_pos, False),
                ("false-positive", ~is_pos & called_pos, True),
            ):
                idx = np.flatnonzero(mask)
                picks.append((kind, idx[_order(p[idx], descending)], p, of))
        else:
            picks.append(("highest", _order(p, True), p, of))
            picks.append(("near-threshold", _order(np.abs(p - thresholds), False), p, of))
    else:
        classes = list(card.classes)
        pred_idx = np.array([classes.index(c) if c in classes else -1 for c in pred])
        p_pred = np.where(pred_idx >= 0, proba[np.arange(len(rows)), np.maximum(pred_idx, 0)], np.nan)
        if "y_true" in rows.columns:
            idx = np.flatnonzero(rows["y_true"].astype(str).to_numpy() != pred)
            picks.append(("misclassified", idx[_order(p_pred[idx], True)], p_pred, ""))
        else:
            top2 = -np.sort(-np.nan_to_num(proba, nan=-np.inf), axis=1)[:, :2]
            picks.append(("highest", _order(p_pred, True), p_pred, ""))
            picks.append(("near-threshold", _order(top2[:, 0] - top2[:, 1], False), p_pred, ""))
    cases = []
    for kind, order, probs, of in picks:
        for i in order[:n]:
            row = rows.iloc[int(i)]
            threshold = thresholds[i] if thresholds is not None else None
            cases.append(_case(row, kind, probs[i], of or str(row["y_pred"]), threshold))
    return cases


def cases_section(rows: pd.DataFrame, card: ModelCard, n: int, csv_folder: Path) -> dict[str, Any]:
    """The report's ``cases`` of one model: the kinds shown, the cases, and how many heatmap
    cells were refused (named outside the CSV's folder, not a file, too large)."""
    labelled = "y_true" in rows.columns
    if card.binary:
        kinds = ["false-negative", "false-positive"] if labelled else ["highest", "near-threshold"]
    else:
        kinds = ["misclassified"] if labelled else ["highest", "near-threshold"]
    cases = pick_cases(rows, card, n)
    refused = 0
    for case in cases:
        cell = cell_text(case.pop("heatmap_cell"))
        accepted = bool(cell) and heatmap_file(cell, csv_folder) is not None
        refused += bool(cell) and not accepted
        case["heatmap"] = cell if accepted else None
    return {
        "n": int(n),
        "labelled": labelled,
        "kinds": kinds,
        "counts": {k: sum(c["kind"] == k for c in cases) for k in kinds},
        "cases": cases,
        "refused_heatmaps": int(refused),
        "note": None,
    }
