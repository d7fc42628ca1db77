"""The fine level of a two-level model's labelled predictions: each image's true fine class, and
what its CSV row says below the coarse decision.

Truth: the card's fallback rule (:meth:`~pneumobatch.core.hierarchy.Hierarchy.fine_class`) on the
image's class and the organism its finding names (:meth:`~pneumobatch.core.tasks.Task.organism`):
``Pneumonia/Bacterial/Streptococcus`` is ``Streptococcus`` when that is a fine class of the model,
else ``other bacterial``. A fine class the rule gives but the model lacks (``other bacterial`` of a
model whose training images named every organism) is kept, after the model's own: the model can
never be right on those images, and the report counts them as misses rather than hide them.

Prediction: the ``fine_label`` and ``fine_top3`` cells, which are untrusted. A ``fine_label`` that is
empty, not a fine class of the card, or not below the row's coarse decision leaves the row out of the
fine level; a ``fine_top3`` that is not exactly the top fine classes (one ``name probability`` pair
per part, distinct fine classes of the card, as many as predict writes) leaves it out of top-3.
Both are counted, with the rows' keys as examples (never the cells themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pandas as pd

from pneumobatch.core.hierarchy import TOP_K, Hierarchy, other, parse_top_text
from pneumobatch.evaluation.labels.cards import card_task
from pneumobatch.evaluation.labels.join import LABEL_PREFIX, MAX_EXAMPLES, JoinResult, Problem
from pneumobatch.io.predictions import FINE_LABEL, FINE_TOP

FINE_PROBLEMS = {
    "unusable_fine_label": f"rows whose {FINE_LABEL} is empty, not a fine class, or not below pred_label (left out)",
    "malformed_fine_top3": f"rows whose {FINE_TOP} does not list the top fine classes (left out of top-3)",
}


@dataclass
class FineJoin:
    """The fine level of one join's rows (in the order of ``join.rows``)."""

    classes: list[str]  # the card's fine classes in output order, then any the labels need that it lacks
    parents: list[str]  # the coarse class of each of ``classes``
    truth: list[str]  # true fine class per row
    pred: list[Optional[str]]  # fine_label per row; None where unusable
    top: list[Optional[list[str]]]  # fine classes of fine_top3 per row; None where malformed
    problems: dict[str, Problem]
    notes: list[str] = field(default_factory=list)


def _cells(rows: pd.DataFrame, column: str) -> list[str]:
    if column not in rows.columns:
        return [""] * len(rows)
    return rows[column].fillna("").astype(str).str.strip().tolist()


def _top_names(cell: str, tree: Hierarchy) -> Optional[list[str]]:
    """The fine classes a ``fine_top3`` cell lists, or None unless it is well formed."""
    parts = [p for p in cell.split(";") if p.strip()]
    names = [name for name, _ in parse_top_text(cell)]
    expected = min(TOP_K, len(tree.fine))
    if len(parts) != expected or len(names) != expected or len(set(names)) != expected:
        return None
    return names if set(names) <= set(tree.fine) else None


def fine_join(join: JoinResult, tree: Hierarchy, max_examples: int = MAX_EXAMPLES) -> FineJoin:
    """True and predicted fine classes of an image-level join of a two-level model."""
    rows = join.rows
    task = card_task(join.model)
    findings: list[Any] = (
        rows[LABEL_PREFIX + join.label_column].tolist()
        if LABEL_PREFIX + join.label_column in rows.columns
        else [None] * len(rows)
    )
    truth = [tree.fine_class(str(c), task.organism(f)) for c, f in zip(join.y_true, findings)]
    below = {c: {f for f, p in zip(tree.fine, tree.parent) if p == c} for c in tree.coarse}
    keys = rows["_key"].astype(str).tolist() if "_key" in rows.columns else [str(i) for i in range(len(rows))]
    problems = {name: Problem(title) for name, title in FINE_PROBLEMS.items()}

    def count(name: str, kind: str, key: str) -> None:
        p = problems[name]
        p.count += 1
        p.breakdown[kind] = p.breakdown.get(kind, 0) + 1
        if len(p.examples) < max_examples:
            p.examples.append(key)

    pred: list[Optional[str]] = []
    for cell, decided, key in zip(_cells(rows, FINE_LABEL), join.y_pred, keys):
        if not cell:
            count("unusable_fine_label", "empty", key)
        elif cell not in tree.fine:
            count("unusable_fine_label", "not a fine class of the model", key)
        elif cell not in below.get(str(decided), set()):
            count("unusable_fine_label", "not below pred_label", key)
        else:
            pred.append(cell)
            continue
        pred.append(None)
    top: list[Optional[list[str]]] = []
    for cell, key in zip(_cells(rows, FINE_TOP), keys):
        names = _top_names(cell, tree)
        if names is None:
            count("malformed_fine_top3", "empty" if not cell else "malformed", key)
        top.append(names)

    classes, parents = list(tree.fine), list(tree.parent)
    lacking = sorted(set(truth) - set(classes), key=truth.index)
    for name in lacking:
        classes.append(name)
        parents.append(next(c for c in tree.coarse if other(c) == name))
    notes = []
    n = len(rows)
    if lacking:
        counts = ", ".join(f"{name} {truth.count(name):,}" for name in lacking)
        notes.append(
            f"the fallback rule puts images in fine classes the model does not have ({counts}): "
            "they count as misses at the fine level"
        )
    if (p := problems["unusable_fine_label"]).count:
        why = ", ".join(f"{kind} {k:,}" for kind, k in p.breakdown.items())
        notes.append(f"{p.count:,} of {n:,} rows have an unusable {FINE_LABEL} ({why}): left out of the fine level")
    if (p := problems["malformed_fine_top3"]).count:
        notes.append(f"{p.count:,} of {n:,} rows have a malformed or empty {FINE_TOP}: left out of top-3 accuracy")
    return FineJoin(classes, parents, truth, pred, top, problems, notes)
