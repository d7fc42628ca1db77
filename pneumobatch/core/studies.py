"""Study-level predictions: one rule, used by predict (``OUT.studies.csv``) and the report.

Radiologists read studies, and flag one when any image is abnormal. A study therefore
takes the probabilities of its most abnormal predicted (``ok``) image: the highest
1 - P(normal) when the model has a ``normal`` class, else the highest P(positive), else
the highest top probability; its class follows from the card's decision rule
(:meth:`pneumobatch.core.card.ModelCard.decide`). Ties go to the first image in file order.
A two-level model's study also takes that image's ``fine_label`` and ``fine_top3``: the fine
class that goes with the study's class is the one of the image that decided it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pneumobatch.core.card import PROB_PREFIX, ModelCard
from pneumobatch.core.errors import Status
from pneumobatch.core.hierarchy import FINE_COLUMNS, FINE_LABEL

if TYPE_CHECKING:  # pandas is imported where it is used: predict starts its workers without it
    import pandas as pd

#: Columns of a study table, in order; ``prob_<class>`` columns and ``threshold`` follow.
STUDY_COLUMNS = ["study", "study_instance_uid", "model", "task", "n_images", "n_files", "key_image", "pred_label"]


def abnormality(proba: np.ndarray, card: ModelCard) -> np.ndarray:
    """How abnormal each image is, for choosing a study's key image."""
    if "normal" in card.classes:
        return 1.0 - proba[:, card.classes.index("normal")]
    if card.positive in card.classes:
        return proba[:, card.classes.index(card.positive)]
    return proba.max(axis=1)


def _first_filled(values: np.ndarray) -> str:
    """The first non-empty text of ``values`` (strings already, NaN as "")."""
    return next((v for v in values if v), "")


def _texts(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A column as an array of str, missing cells as "" (an absent column: all "")."""
    if column not in frame.columns:
        return np.full(len(frame), "", dtype=object)
    return frame[column].fillna("").astype(str).to_numpy()


def aggregate_studies(frame: pd.DataFrame, cards: Sequence[ModelCard], by: str = "study") -> pd.DataFrame:
    """One row per (study, model) of file rows whose ``by`` column is filled.

    ``n_images`` counts the study's predicted images, ``n_files`` all its files. The
    probabilities (floats; NaN for a study without a predicted image) are those of
    ``key_image``, and so are ``fine_label`` and ``fine_top3`` (columns present when the frame
    has them; filled for two-level models). ``threshold`` is the card's (NaN for multiclass models).

    The columns are converted once for the whole frame and each study only indexes them,
    so a night of many thousands of studies takes seconds, not minutes.
    """
    import pandas as pd

    by_name = {c.name: c for c in cards}
    prob_cols = [c for c in frame.columns if str(c).startswith(PROB_PREFIX)]
    keys = frame[by].fillna("").astype(str) if by in frame.columns else pd.Series("", index=frame.index)
    filled = (keys != "").to_numpy()
    sub = frame[filled]
    grouped = sub.groupby([keys[filled], "model"], sort=False).indices
    status_ok = _texts(sub, "status") == Status.OK.value
    paths, uids, tasks = _texts(sub, "path"), _texts(sub, "study_instance_uid"), _texts(sub, "task")
    bands = _texts(sub, "age_band")  # "" where unknown or absent: the card's pooled point
    not_applicable = np.char.lower(_texts(sub, "applicable").astype(str)) == "false"
    fine_cells = {c: _texts(sub, c) for c in FINE_COLUMNS} if FINE_LABEL in frame.columns else {}
    thresholds = pd.to_numeric(sub["threshold"], errors="coerce").to_numpy() if "threshold" in sub.columns else None
    numeric: dict[str, np.ndarray] = {}  # model -> its probability columns as floats (NaN: not a number)

    rows: list[dict[str, Any]] = []
    for (study, model), index in sorted(
        grouped.items(), key=lambda item: item[1][0]
    ):  # first appearance, as sort=False
        card = by_name.get(model)
        row: dict[str, Any] = {
            "study": study,
            "study_instance_uid": _first_filled(uids[index]),  # "" where the column is absent
            "model": model,
            "task": card.task if card is not None else _first_filled(tasks[index]),
            "n_images": 0,
            "n_files": len(index),
            "key_image": "",
            "pred_label": "",
        }
        if card is not None:
            row["threshold"] = card.threshold if card.binary else np.nan
            cols = card.prob_columns()
            ok = index[status_ok[index]]
            if all(c in sub.columns for c in cols):
                if model not in numeric:
                    numeric[model] = sub[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
                proba = numeric[model][ok]
                usable = ~np.isnan(proba).any(axis=1)
                ok, proba = ok[usable], proba[usable]
                row["n_images"] = len(ok)
                if len(ok):
                    best = int(np.argmax(abnormality(proba, card)))
                    row["key_image"] = paths[ok[best]]
                    decision = card.decide(proba[best], bands[ok[best]] or None)
                    row["pred_label"] = decision.label
                    if decision.threshold is not None:
                        row["threshold"] = decision.threshold
                    row.update(dict(zip(cols, proba[best])))
                    if card.hierarchy and fine_cells:
                        row.update({c: fine_cells[c][ok[best]] for c in FINE_COLUMNS})
                if "applicable" in sub.columns:
                    row["n_not_applicable"] = int(not_applicable[ok].sum())
        elif thresholds is not None:
            row["threshold"] = thresholds[index[0]]
        rows.append(row)
    columns = (
        STUDY_COLUMNS
        + prob_cols
        + (FINE_COLUMNS if fine_cells else [])
        + ["threshold"]
        + (["n_not_applicable"] if "applicable" in frame.columns else [])
    )
    out = pd.DataFrame(rows, columns=columns)
    for col in prob_cols + ["threshold"]:
        out[col] = pd.to_numeric(out[col], errors="coerce")
    for col in FINE_COLUMNS if fine_cells else []:  # text: "" for a one-level model's study
        out[col] = ["" if pd.isna(v) else str(v) for v in out[col]]
    return out
