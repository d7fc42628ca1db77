"""Joining labels to one model's predictions, at file and at study level.

Nothing is dropped silently: labels that do not map to a class, predictions without a
label, labels without a prediction, labelled files that were skipped or failed, and
conflicting duplicate labels are all counted in the :class:`JoinResult`, with examples.
Failures a user must fix (missing column, nothing matches) raise
:class:`~pneumobatch.core.errors.LabelError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import LabelError
from pneumobatch.core.studies import STUDY_COLUMNS, aggregate_studies
from pneumobatch.core.tasks import Task
from pneumobatch.evaluation.labels.cards import card_task
from pneumobatch.evaluation.labels.keys import (
    STUDY_KEYS,
    column_list,
    detect_key,
    normalise_keys,
    study_column,
    suffix_matches,
)

#: How study predictions are made from images when predictions.studies.csv is missing.
STUDY_RULE_NOTE = (
    "study predictions computed here from the images (predictions.studies.csv not found): "
    "the most abnormal image of each study, as predict does"
)
#: How many examples of each join problem are kept.
MAX_EXAMPLES = 10
#: Label-file columns are kept in :attr:`JoinResult.rows` under this prefix.
LABEL_PREFIX = "labels."
#: Column names a labels file may use instead of ``label``, suggested in errors.
_LABEL_LIKE = ("label", "finding", "findings", "class", "diagnosis", "coarse", "target")


def study_predictions(rows: pd.DataFrame, model: ModelCard) -> pd.DataFrame:
    """Study-level predictions of one model from its file rows, by predict's rule
    (:func:`pneumobatch.core.studies.aggregate_studies`); only studies with a predicted image.
    Stands in for ``predictions.studies.csv`` when it is missing."""
    by = study_column(rows)
    if by is None:
        return pd.DataFrame(columns=STUDY_COLUMNS + model.prob_columns() + ["threshold"])
    studies = aggregate_studies(rows, [model], by=by)
    return studies[studies["n_images"] > 0].reset_index(drop=True)


@dataclass
class Problem:
    """One kind of join problem: how many, a few examples, and a breakdown."""

    title: str
    count: int = 0
    examples: list[str] = field(default_factory=list)
    breakdown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "count": int(self.count),
            "examples": list(self.examples),
            "breakdown": {str(k): int(v) for k, v in self.breakdown.items()},
        }


PROBLEM_TITLES = {
    "unmapped_labels": "labels that map to no class of the task",
    "labels_without_prediction": "labels with no prediction",
    "unlabelled_predictions": "predictions with no label",
    "labelled_not_ok": "labelled files that were skipped or failed",
    "conflicting_labels": "keys labelled twice with different classes (left out)",
    "duplicate_labels": "keys labelled twice with the same class (counted once)",
    "empty_keys": "label rows with an empty key (left out)",
    "missing_probabilities": "predictions marked ok but without probabilities (left out)",
    "conflicting_study_labels": "studies whose images carry different classes (left out)",
}


@dataclass
class JoinResult:
    """Labelled predictions of one model and everything that did not join.

    ``rows`` holds one row per matched prediction: the prediction columns, ``y_true``
    (class name), ``y_pred`` (class name) and the labels file's other columns under
    the prefix ``labels.``.
    """

    model: ModelCard
    key: str
    level: str  # "file" or "study"
    label_column: str
    rows: pd.DataFrame
    n_label_rows: int
    n_prediction_rows: int
    problems: dict[str, Problem]
    notes: list[str] = field(default_factory=list)
    label_columns: list[str] = field(default_factory=list)

    @property
    def n_matched(self) -> int:
        return len(self.rows)

    @property
    def y_true(self) -> np.ndarray:
        return self.rows["y_true"].to_numpy(dtype=object)

    @property
    def y_pred(self) -> np.ndarray:
        return self.rows["y_pred"].to_numpy(dtype=object)

    @property
    def proba(self) -> np.ndarray:
        return self.rows[self.model.prob_columns()].to_numpy(dtype=np.float64)

    def column(self, name: str) -> pd.Series:
        """A labels-file column (preferred) or prediction column of the matched rows."""
        if LABEL_PREFIX + name in self.rows.columns:
            return self.rows[LABEL_PREFIX + name]
        if name in self.rows.columns and name not in ("y_true", "y_pred", "_key"):
            return self.rows[name]
        raise LabelError(
            f"no column {name!r} to group by; labels file columns: {', '.join(self.label_columns) or '(none)'}"
        )

    def problems_dict(self) -> dict[str, dict[str, Any]]:
        return {name: p.to_dict() for name, p in self.problems.items()}

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "level": self.level,
            "label_column": self.label_column,
            "n_label_rows": int(self.n_label_rows),
            "n_prediction_rows": int(self.n_prediction_rows),
            "n_matched": int(self.n_matched),
            "problems": self.problems_dict(),
            "notes": list(self.notes),
        }


def _problem(name: str) -> Problem:
    return Problem(PROBLEM_TITLES[name])


def _examples(values: Iterable[Any], limit: int) -> list[str]:
    out: list[str] = []
    for v in values:
        if len(out) >= limit:
            break
        out.append(str(v))
    return out


def check_label_column(labels: pd.DataFrame, label_column: str) -> None:
    """Raise :class:`LabelError` naming the columns when ``label_column`` is missing."""
    if label_column in labels.columns:
        return
    source = labels.attrs.get("source", "labels file")
    like = [c for c in labels.columns if str(c).lower() in _LABEL_LIKE]
    hint = f"; try --label-column {like[0]}" if like else "; name it with --label-column"
    raise LabelError(
        f"labels file {source} has no label column {label_column!r} (columns: {column_list(labels)}){hint}"
    )


def _columns_that_map_more(
    labels: pd.DataFrame, exclude: Sequence[str], task: Task, than: int
) -> list[tuple[str, int]]:
    """Other columns of ``labels`` whose values map to more of ``task``'s classes than ``than``
    rows, most first: a labels file often has one column per task (``label``, ``etiology``)."""
    found = []
    for column in labels.columns:
        if column in exclude:
            continue
        values = labels[column].fillna("").astype(str)
        if values.nunique() > 200:  # ids, paths, dates: not labels
            continue
        n = int(_map_classes(values, task).notna().sum())
        if n > than:
            found.append((str(column), n))
    return sorted(found, key=lambda cn: -cn[1])


def _map_classes(values: pd.Series, task: Task) -> pd.Series:
    mapping = {v: task.map_label(v) for v in values.unique()}
    return values.map(mapping)


def prediction_classes(rows: pd.DataFrame, model: ModelCard) -> tuple[np.ndarray, int]:
    """Predicted class per row: the CSV's ``pred_label``, else derived; and how many derived."""
    derived = model.decide_many(rows[model.prob_columns()].to_numpy(dtype=np.float64))
    if "pred_label" not in rows.columns:
        return derived, len(rows)
    given = _map_classes(rows["pred_label"].fillna("").astype(str), card_task(model))
    missing = given.isna().to_numpy()
    return np.where(missing, derived, given.to_numpy(dtype=object)), int(missing.sum())


def join_labels(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    model: ModelCard,
    *,
    key: Optional[str] = None,
    label_column: str = "label",
    studies: Optional[pd.DataFrame] = None,
    max_examples: int = MAX_EXAMPLES,
) -> JoinResult:
    """Join labels to one model's predictions.

    ``predictions`` are that model's file-level rows (all statuses). A study-level key
    joins ``studies`` (that model's rows of ``predictions.studies.csv``; aggregated
    from the file rows when ``None``). Raises :class:`LabelError` when the key or
    label column is missing or when no label joins a usable prediction.
    """
    key = detect_key(labels, predictions, key)
    check_label_column(labels, label_column)
    source = labels.attrs.get("source", "labels file")
    level = "study" if key in STUDY_KEYS else "file"
    problems = {name: _problem(name) for name in PROBLEM_TITLES if name != "conflicting_study_labels"}
    notes: list[str] = []

    # ---- labels: key, class
    lab = labels.copy()
    lab["_key"] = normalise_keys(lab[key], key)
    lab["_label"] = lab[label_column].fillna("").astype(str)
    empty = lab["_key"] == ""
    problems["empty_keys"].count = int(empty.sum())
    problems["empty_keys"].examples = [f"row {i + 2}" for i in np.flatnonzero(empty.to_numpy())[:max_examples]]
    lab = lab[~empty]

    # ---- predictions at the level of the key
    files = predictions.copy()
    files["status"] = files["status"].fillna("").astype(str)
    files["reason"] = files["reason"].fillna("").astype(str) if "reason" in files.columns else ""
    files["_key"] = normalise_keys(files[key], key) if key in files.columns else ""
    if level == "study":
        if studies is None or key not in studies.columns:
            pred = study_predictions(predictions, model)
            notes.append(STUDY_RULE_NOTE)
        else:
            pred = studies.copy()
        pred["_key"] = normalise_keys(pred[key], key)
        has_probs = pred[model.prob_columns()].notna().all(axis=1) if model.prob_columns() else False
        pred["status"] = np.where(has_probs, "ok", "skipped")  # studies without a predicted image
    else:
        pred = files
    pred_keys = set(pred["_key"]) | set(files["_key"])
    pred_keys.discard("")

    # ---- paths written relative to another folder: match on trailing folders
    if key == "path" and not (set(lab["_key"]) & pred_keys):
        rewrite = suffix_matches(lab["_key"], pred_keys)
        if rewrite:
            example = next(iter(rewrite.items()))
            notes.append(
                f"no path matched exactly; {len(rewrite)} matched after dropping leading folders "
                f"(e.g. {example[0]!r} -> {example[1]!r})"
            )
            lab["_key"] = lab["_key"].map(lambda k: rewrite.get(k, k))

    label_keys = set(lab["_key"])
    if not label_keys & pred_keys:
        lab_ex = lab["_key"].iloc[0] if len(lab) else "(none)"
        pred_ex = next(iter(sorted(pred_keys)), "(none)")
        raise LabelError(
            f"no {key} in {source} matches the predictions of model {model.name}: "
            f"e.g. labels have {lab_ex!r}, predictions {pred_ex!r} "
            f"({len(label_keys)} label keys, {len(pred_keys)} prediction keys); "
            "check the key column or choose another with --key"
        )

    # ---- map labels to classes
    lab["y_true"] = _map_classes(lab["_label"], card_task(model))
    unmapped = lab[lab["y_true"].isna()]
    p = problems["unmapped_labels"]
    p.count = len(unmapped)
    p.breakdown = {(v if v else "(empty)"): int(n) for v, n in unmapped["_label"].value_counts().head(20).items()}
    p.examples = _examples((f"{k}: {v!r}" for k, v in zip(unmapped["_key"], unmapped["_label"])), max_examples)
    mapped = lab[lab["y_true"].notna()]
    better = (
        _columns_that_map_more(lab[list(labels.columns)], [key, label_column], card_task(model), len(mapped))
        if len(unmapped)
        else []
    )
    if better:
        notes.append(
            f"{len(unmapped)} of {len(lab)} labels in column {label_column!r} map to no class of task {model.task}; "
            + ", ".join(f"column {c!r} maps {n}" for c, n in better)
            + f" (--label-column {better[0][0]})"
        )

    # ---- duplicate keys
    n_classes = mapped.groupby("_key")["y_true"].nunique()
    conflicting = set(n_classes.index[n_classes > 1])
    counts = mapped["_key"].value_counts()
    dup = counts[(counts > 1) & ~counts.index.isin(conflicting)]
    problems["conflicting_labels"].count = len(conflicting)
    problems["conflicting_labels"].examples = _examples(sorted(conflicting), max_examples)
    problems["duplicate_labels"].count = len(dup)
    problems["duplicate_labels"].examples = _examples(dup.index, max_examples)
    mapped = mapped[~mapped["_key"].isin(conflicting)].drop_duplicates("_key")

    # ---- labels with no prediction / labelled files that were not predicted
    ok = pred[pred["status"].astype(str) == "ok"]
    ok_keys = set(ok["_key"])
    not_ok = files[(files["status"].astype(str) != "ok") & files["_key"].isin(set(mapped["_key"]) - ok_keys)]
    if level == "study":
        not_ok = not_ok[~not_ok["_key"].isin(ok_keys)]
    first_per_key = not_ok.drop_duplicates("_key")
    p = problems["labelled_not_ok"]
    p.count = len(first_per_key)
    outcome = first_per_key["status"].astype(str) + ": " + first_per_key["reason"].replace("", "(no reason)")
    p.breakdown = {str(k): int(n) for k, n in outcome.value_counts().items()}
    p.examples = _examples((f"{k} ({o})" for k, o in zip(first_per_key["_key"], outcome)), max_examples)
    missing = set(mapped["_key"]) - pred_keys
    problems["labels_without_prediction"].count = len(missing)
    problems["labels_without_prediction"].examples = _examples(sorted(missing), max_examples)

    # ---- predictions with no label (any label row counts, even one that does not map)
    unlabelled = ok[~ok["_key"].isin(label_keys)]
    problems["unlabelled_predictions"].count = int(unlabelled["_key"].nunique())
    problems["unlabelled_predictions"].examples = _examples(unlabelled["_key"].drop_duplicates(), max_examples)

    # ---- matched rows
    extra = [c for c in labels.columns if c != key]
    keep = mapped[["_key", "y_true", *extra]].rename(columns={c: LABEL_PREFIX + c for c in extra})
    rows = ok.merge(keep, on="_key", how="inner")
    no_prob = (
        rows[model.prob_columns()].isna().any(axis=1) if model.prob_columns() else pd.Series(True, index=rows.index)
    )
    problems["missing_probabilities"].count = int(no_prob.sum())
    problems["missing_probabilities"].examples = _examples(rows.loc[no_prob, "_key"], max_examples)
    rows = rows[~no_prob].reset_index(drop=True)
    if rows.empty:
        if mapped.empty and problems["unmapped_labels"].count:
            seen = list(problems["unmapped_labels"].breakdown.items())[:5]
            why = (
                f"none of the labels in column {label_column!r} maps to the classes of task "
                f"{model.task} ({', '.join(model.classes)}); values seen: "
                + ", ".join(f"{v!r} ({n})" for v, n in seen)
                + (
                    f"; column {better[0][0]!r} maps {better[0][1]}: try --label-column {better[0][0]}"
                    if better
                    else ""
                )
            )
        elif problems["labelled_not_ok"].count:
            why = f"all {problems['labelled_not_ok'].count} labelled files were skipped or failed"
        else:
            why = "no labelled prediction has probabilities"
        raise LabelError(f"no labelled predictions for model {model.name}: {why}")
    y_pred, n_derived = prediction_classes(rows, model)
    rows["y_pred"] = y_pred
    if n_derived:
        notes.append(f"{n_derived} predictions had no usable pred_label; derived from the probabilities")
    if labels.attrs.get("encoding") not in (None, "utf-8-sig", "utf-16"):
        notes.append(f"labels file read as {labels.attrs['encoding']} (not UTF-8)")
    return JoinResult(
        model=model,
        key=key,
        level=level,
        label_column=label_column,
        rows=rows,
        n_label_rows=len(labels),
        n_prediction_rows=int(len(ok)),
        problems=problems,
        notes=notes,
        label_columns=extra,
    )


def study_level(
    join: JoinResult,
    studies: Optional[pd.DataFrame],
    predictions: pd.DataFrame,
    max_examples: int = MAX_EXAMPLES,
) -> Optional[JoinResult]:
    """Study-level labelled predictions from an image-level join.

    A study's label is the class its labelled images agree on (studies whose images
    disagree are left out and counted). Its prediction comes from ``studies``
    (``predictions.studies.csv``) or is computed by :func:`study_predictions`. Returns
    ``None`` when the join is already study level or no labelled study has several
    predicted images.
    """
    if join.level != "file":
        return None
    by = study_column(join.rows)
    if by is None:
        return None
    model = join.model
    notes = ["study labels are the class shared by each study's labelled images"]
    if studies is None or by not in studies.columns or "n_images" not in studies.columns:
        studies = study_predictions(predictions, model)
        notes.append(STUDY_RULE_NOTE)
    if studies.empty:
        return None
    rows = join.rows[join.rows[by].fillna("").astype(str) != ""]
    per_study = pd.DataFrame({"_key": normalise_keys(rows[by], by).to_numpy(), "y_true": rows["y_true"].to_numpy()})
    studies = studies.assign(_key=normalise_keys(studies[by], by))
    relevant = studies[studies["_key"].isin(set(per_study["_key"]))]
    n_images = pd.to_numeric(relevant["n_images"], errors="coerce").fillna(1)
    if not (n_images > 1).any():
        return None
    n_classes = per_study.groupby("_key")["y_true"].nunique()
    conflicting = set(n_classes.index[n_classes > 1])
    labels = per_study[~per_study["_key"].isin(conflicting)].drop_duplicates("_key")
    matched = relevant.drop(columns=["y_true", "y_pred"], errors="ignore").merge(labels, on="_key", how="inner")
    matched = matched[matched[model.prob_columns()].notna().all(axis=1)].reset_index(drop=True)
    if matched.empty:
        return None
    y_pred, n_derived = prediction_classes(matched, model)
    matched["y_pred"] = y_pred
    problems = {"conflicting_study_labels": _problem("conflicting_study_labels")}
    problems["conflicting_study_labels"].count = len(conflicting)
    problems["conflicting_study_labels"].examples = _examples(sorted(conflicting), max_examples)
    if n_derived:
        notes.append(f"{n_derived} study predictions had no usable pred_label; derived from the probabilities")
    return JoinResult(
        model=model,
        key=by,
        level="study",
        label_column=join.label_column,
        rows=matched,
        n_label_rows=int(per_study["_key"].nunique()),
        n_prediction_rows=len(studies),
        problems=problems,
        notes=notes,
        label_columns=[],
    )
