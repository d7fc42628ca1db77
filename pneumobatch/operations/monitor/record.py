"""What each predict run records for monitoring: the ``run.json["monitoring"]`` block.

:func:`monitoring_block` (called by :func:`pneumobatch.predict.run_predict`) gives, per model,
over all files and per acquisition group, the files by status and reason, the distribution of
the model's score (a 20-bin histogram and the 101 quantiles at 0, 0.01, ..., 1), the
positive rate at the operating point actually applied, the applicability flag rate, and
the run's images/s. The score is the model's abnormality (1 - P(normal), else
P(positive); :func:`pneumobatch.core.studies.abnormality`); a row is positive when its
predicted class is the positive class (binary) or not ``normal`` (multiclass,
:func:`positive_mask`). Groups (:data:`DIMENSIONS`): ``scanner`` (DICOM Manufacturer /
ManufacturerModelName / StationName), ``view`` (AP/PA), ``age_band``.

Over all files (not per group) each model also records its ``classes`` and how many predicted
images got each (``overall.class_counts``); a two-level model adds its ``fine_classes`` and
``overall.fine_counts`` (the ``fine_label`` cells; one that is not a fine class below its
``pred_label`` is counted under :data:`UNUSABLE_FINE`).

The record is kept apart from the analysis across nights
(:mod:`pneumobatch.operations.monitor.analysis`) because predict writes it on every run,
and ``pneumobatch monitor`` only reads it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import Status
from pneumobatch.core.hierarchy import FINE_LABEL
from pneumobatch.core.studies import abnormality
from pneumobatch.core.subgroups import UNKNOWN, view_group
from pneumobatch.evaluation.metrics import jsonable

if TYPE_CHECKING:  # pandas is imported where it is used: predict starts its workers without it
    import pandas as pd

MONITORING_SCHEMA_VERSION = 1
#: Quantile levels stored for each score distribution: 0, 0.01, ..., 1.
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 101)
HISTOGRAM_EDGES = np.linspace(0.0, 1.0, 21)
#: Acquisition groups every run breaks its numbers down by.
DIMENSIONS = ("scanner", "view", "age_band")
#: Scanner group of files without a DICOM header (PNG/JPEG, unreadable files).
NO_HEADER = "(no DICOM header)"
#: Key of ``fine_counts`` for predicted rows whose ``fine_label`` is empty, unknown or not below ``pred_label``.
UNUSABLE_FINE = "(unusable fine_label)"


def scanner_names(frame: pd.DataFrame) -> pd.Series:
    """``Manufacturer / Model / Station`` per row ("?" for an empty part); :data:`NO_HEADER` for rows
    without any of them and without a SOP Instance UID (PNG/JPEG, files whose header could not be read)."""
    import pandas as pd

    parts = [
        frame[c].fillna("").astype(str) if c in frame.columns else pd.Series("", index=frame.index)
        for c in ("manufacturer", "manufacturer_model_name", "station_name")
    ]
    joined = (
        parts[0].where(parts[0] != "", "?")
        + " / "
        + parts[1].where(parts[1] != "", "?")
        + " / "
        + parts[2].where(parts[2] != "", "?")
    )
    uid = (
        frame["sop_instance_uid"].fillna("").astype(str)
        if "sop_instance_uid" in frame.columns
        else pd.Series("", index=frame.index)
    )
    return joined.where((parts[0] + parts[1] + parts[2] + uid) != "", NO_HEADER)


def group_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """The acquisition group of every row, one column per :data:`DIMENSIONS` entry."""
    import pandas as pd

    views = frame["view_position"] if "view_position" in frame.columns else pd.Series("", index=frame.index)
    bands = (
        frame["age_band"].fillna("").astype(str) if "age_band" in frame.columns else pd.Series("", index=frame.index)
    )
    return pd.DataFrame(
        {
            "scanner": scanner_names(frame),
            "view": [view_group(v) for v in views.fillna("")],
            "age_band": bands.where(bands != "", UNKNOWN),
        },
        index=frame.index,
    )


def positive_mask(labels: pd.Series, card: ModelCard) -> Optional[pd.Series]:
    """Which predicted (or true) labels count as positive; None for a multiclass model without ``normal``."""
    if card.binary:
        return labels == card.positive
    if "normal" in card.classes:
        return (labels != "") & (labels != "normal")
    return None


def _stats(rows: pd.DataFrame, score: pd.Series, positive: Optional[pd.Series]) -> dict[str, Any]:
    status = rows["status"].astype(str)
    ok = status == Status.OK.value
    reasons = rows.loc[~ok, "reason"].fillna("").astype(str).replace("", "(none given)")
    values = score[ok].to_numpy(dtype=np.float64)
    values = values[np.isfinite(values)]
    out: dict[str, Any] = {
        "files": int(len(rows)),
        "ok": int(ok.sum()),
        "skipped": int((status == Status.SKIPPED.value).sum()),
        "error": int((status == Status.ERROR.value).sum()),
        "by_reason": {str(k): int(v) for k, v in reasons.value_counts().items()},
        "n_scored": int(values.size),
        "histogram": np.histogram(np.clip(values, 0, 1), bins=HISTOGRAM_EDGES)[0],
        "quantiles": np.quantile(values, QUANTILE_LEVELS).round(6) if values.size else None,
        "mean": float(values.mean()) if values.size else None,
    }
    if positive is not None:
        n_pos = int(positive[ok].sum())
        out["n_positive"], out["positive_rate"] = n_pos, (n_pos / int(ok.sum()) if ok.any() else None)
    if "applicable" in rows.columns:
        applicable = rows.loc[ok, "applicable"].fillna("").astype(str).str.lower()
        known = applicable.isin(["true", "false"])
        if known.any():
            out["n_flagged"] = int((applicable == "false").sum())
            out["flag_rate"] = out["n_flagged"] / int(known.sum())
    if "operating_point" in rows.columns:
        points = rows.loc[ok, "operating_point"].fillna("").astype(str)
        out["operating_points"] = {str(k): int(v) for k, v in points[points != ""].value_counts().items()}
    return out


def class_counts(rows: pd.DataFrame, card: ModelCard) -> dict[str, Any]:
    """``class_counts`` (and for a two-level model ``fine_counts``) of a model's predicted rows: every
    class of the card, 0 where none was predicted; a label the card does not have is not counted."""
    import pandas as pd

    ok = rows[rows["status"].astype(str) == Status.OK.value]
    labels = ok["pred_label"].fillna("").astype(str) if "pred_label" in ok.columns else pd.Series("", index=ok.index)
    counts = labels.value_counts()
    out: dict[str, Any] = {"class_counts": {c: int(counts.get(c, 0)) for c in card.classes}}
    tree = card.tree
    if tree is not None:
        fine = ok[FINE_LABEL].fillna("").astype(str) if FINE_LABEL in ok.columns else pd.Series("", index=ok.index)
        below = dict(zip(tree.fine, tree.parent))
        usable = pd.Series([below.get(f) == lab for f, lab in zip(fine, labels)], index=ok.index, dtype=bool)
        known = labels.isin(card.classes)
        fine_counts = fine[usable].value_counts()
        out["fine_counts"] = {f: int(fine_counts.get(f, 0)) for f in tree.fine}
        out["fine_counts"][UNUSABLE_FINE] = int((known & ~usable).sum())
    return out


def operating_point_source(card: ModelCard) -> dict[str, Any]:
    """Where a card's thresholds came from: the shipped card or a site file (with its SHA-256)."""
    if card.site:
        return {
            "source": "site",
            "file": card.site.get("file"),
            "sha256": card.site.get("sha256"),
            "apply": card.site.get("apply"),
            "created": card.site.get("created"),
            "thresholds": card.site.get("thresholds"),
        }
    by_band = (card.thresholds or {}).get("by_age_band") or {}
    return {
        "source": "shipped",
        "threshold": card.threshold if card.binary else None,
        "thresholds": {band: point.get("recall_target") for band, point in by_band.items()},
    }


def monitoring_block(frame: pd.DataFrame, cards: Sequence[ModelCard], images_per_second: float) -> dict[str, Any]:
    """``run.json["monitoring"]`` for a predictions table (all rows, all models)."""
    import pandas as pd

    groups = group_columns(frame)
    models: dict[str, Any] = {}
    for card in cards:
        mine = frame["model"].astype(str) == card.name
        rows = frame[mine]
        proba = rows[card.prob_columns()].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        score = pd.Series(abnormality(proba, card) if len(rows) else [], index=rows.index, dtype=np.float64)
        positive = positive_mask(rows["pred_label"].fillna("").astype(str), card)
        entry = {
            "score": f"1 - {card.prob_column('normal')}"
            if "normal" in card.classes
            else card.prob_column(card.positive or ""),
            "positive": card.positive if card.binary else ("not normal" if positive is not None else None),
            "operating_point": operating_point_source(card),
            "images_per_second": images_per_second,
            "classes": list(card.classes),
            **({"fine_classes": list(card.tree.fine)} if card.tree is not None else {}),
            "overall": {**_stats(rows, score, positive), **class_counts(rows, card)},
            "by": {},
        }
        for dim in DIMENSIONS:
            keys = groups.loc[rows.index, dim]
            entry["by"][dim] = {
                str(g): _stats(rows[keys == g], score[keys == g], None if positive is None else positive[keys == g])
                for g in sorted(keys.unique())
            }
        models[card.name] = entry
    return jsonable(
        {
            "schema_version": MONITORING_SCHEMA_VERSION,
            "quantile_levels": "0, 0.01, ..., 1",
            "histogram_edges": HISTOGRAM_EDGES,
            "dimensions": list(DIMENSIONS),
            "models": models,
        }
    )
