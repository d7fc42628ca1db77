"""Study-level predictions: one rule, used by predict (``OUT.studies.csv``) and the report.

Radiologists read studies, and flag one when any image is abnormal. A study therefore
takes the probabilities of its most abnormal predicted (``ok``) image: the highest
1 - P(normal) when the model has a ``normal`` class, else the highest P(positive), else
the highest top probability; its class follows from the card's decision rule
(:meth:`pneumobatch.card.ModelCard.decide`). Ties go to the first image in file order.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from pneumobatch.card import PROB_PREFIX, ModelCard
from pneumobatch.errors import Status

#: Columns of a study table, in order; ``prob_<class>`` columns and ``threshold`` follow.
STUDY_COLUMNS = ["study", "study_instance_uid", "model", "task", "n_images", "n_files", "key_image", "pred_label"]


def abnormality(proba: np.ndarray, card: ModelCard) -> np.ndarray:
    """How abnormal each image is, for choosing a study's key image."""
    if "normal" in card.classes:
        return 1.0 - proba[:, card.classes.index("normal")]
    if card.positive in card.classes:
        return proba[:, card.classes.index(card.positive)]
    return proba.max(axis=1)


def _first(values: pd.Series) -> str:
    return next((str(v) for v in values.fillna("") if str(v)), "")


def aggregate_studies(frame: pd.DataFrame, cards: Sequence[ModelCard], by: str = "study") -> pd.DataFrame:
    """One row per (study, model) of file rows whose ``by`` column is filled.

    ``n_images`` counts the study's predicted images, ``n_files`` all its files. The
    probabilities (floats; NaN for a study without a predicted image) are those of
    ``key_image``. ``threshold`` is the card's (NaN for multiclass models).
    """
    by_name = {c.name: c for c in cards}
    prob_cols = [c for c in frame.columns if str(c).startswith(PROB_PREFIX)]
    keys = frame[by].fillna("").astype(str) if by in frame.columns else pd.Series("", index=frame.index)
    rows: list[dict[str, Any]] = []
    for (study, model), group in frame[keys != ""].groupby([keys[keys != ""], "model"], sort=False):
        card = by_name.get(model)
        row: dict[str, Any] = {
            "study": study,
            "study_instance_uid": _first(group["study_instance_uid"]) if "study_instance_uid" in group else "",
            "model": model,
            "task": card.task if card is not None else _first(group["task"]) if "task" in group else "",
            "n_images": 0,
            "n_files": len(group),
            "key_image": "",
            "pred_label": "",
        }
        if card is not None:
            row["threshold"] = card.threshold if card.binary else np.nan
            cols = card.prob_columns()
            ok = group[group["status"].astype(str) == Status.OK.value]
            if all(c in ok.columns for c in cols):
                proba = ok[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
                usable = ~np.isnan(proba).any(axis=1)
                ok, proba = ok[usable], proba[usable]
                row["n_images"] = len(ok)
                if len(ok):
                    best = int(np.argmax(abnormality(proba, card)))
                    row["key_image"] = ok["path"].iloc[best]
                    band = str(ok["age_band"].iloc[best]) if "age_band" in ok.columns else None
                    decision = card.decide(proba[best], band or None)
                    row["pred_label"] = decision.label
                    if decision.threshold is not None:
                        row["threshold"] = decision.threshold
                    row.update(dict(zip(cols, proba[best])))
                if "applicable" in ok.columns:
                    row["n_not_applicable"] = int((ok["applicable"].astype(str).str.lower() == "false").sum())
        elif "threshold" in group:
            row["threshold"] = pd.to_numeric(group["threshold"].iloc[:1], errors="coerce").iloc[0]
        rows.append(row)
    columns = STUDY_COLUMNS + prob_cols + ["threshold"] + (["n_not_applicable"] if "applicable" in frame.columns else [])
    out = pd.DataFrame(rows, columns=columns)
    for col in prob_cols + ["threshold"]:
        out[col] = pd.to_numeric(out[col], errors="coerce")
    return out
