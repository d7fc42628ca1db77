"""The model card of each model in a predictions CSV, for evaluating it against labels.

predict stores the card in run.json (:func:`card_from_run`); for older files the card
is rebuilt from the CSV and the older run.json entry (:func:`describe_model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import pandas as pd

from pneumobatch.core.card import PROB_PREFIX, ModelCard
from pneumobatch.core.tasks import TASKS, Task, task_from_card


def _first_value(rows: pd.DataFrame, column: str) -> str:
    if column not in rows.columns:
        return ""
    values = rows[column].fillna("").astype(str).str.strip()
    values = values[values != ""]
    return str(values.iloc[0]) if len(values) else ""


def describe_model(rows: pd.DataFrame, run_model: Optional[Mapping[str, Any]] = None) -> ModelCard:
    """The card of one model in a predictions CSV written without a full card in its run.json.

    ``run_model`` is that model's entry of an older ``predictions.run.json`` when there is
    one; the CSV fills in what it lacks (classes from the ``prob_`` columns with values,
    the threshold from the ``threshold`` column). A run.json holding the card itself is
    read by :func:`card_from_run` instead.
    """
    run_model = dict(run_model or {})
    name = _first_value(rows, "model") or str(run_model.get("name") or "model")
    task_name = _first_value(rows, "task") or str(run_model.get("task") or "custom")
    classes = [str(c) for c in run_model.get("classes") or []]
    if not classes:
        classes = [c[len(PROB_PREFIX) :] for c in rows.columns if c.startswith(PROB_PREFIX) and rows[c].notna().any()]
    if not classes and task_name in TASKS:
        classes = list(TASKS[task_name].classes)
    if task_name in TASKS and set(classes) <= set(TASKS[task_name].classes):
        # in the task's order; a subset is an older card of the task (4-class etiology, before fungal)
        classes = [c for c in TASKS[task_name].classes if c in classes]
    task = task_from_card(task_name, classes)
    positive = run_model.get("positive") or task.positive
    if len(classes) != 2 or positive not in classes:
        positive = None
    threshold: Optional[float] = None
    if "threshold" in rows.columns:
        values = pd.to_numeric(rows["threshold"], errors="coerce").dropna()
        if len(values):
            threshold = float(values.mode().iloc[0])
    if threshold is None and run_model.get("threshold") is not None:
        threshold = float(run_model["threshold"])
    if positive is None:
        threshold = None
    return ModelCard(
        name=name,
        task=task.name,
        classes=classes,
        architecture=str(run_model.get("architecture") or ""),
        input_size=int(run_model.get("input_size") or 0),
        mean=[],
        std=[],
        positive=positive,
        threshold=threshold,
        thresholds=dict(run_model.get("thresholds") or {}),
        weights_sha256=_first_value(rows, "weights_sha256") or str(run_model.get("weights_sha256") or ""),
    )


def card_from_run(run_model: Optional[Mapping[str, Any]]) -> Optional[ModelCard]:
    """The card predict stored in run.json (``models[i]["card"]``), or None for older files."""
    stored = (run_model or {}).get("card")
    return ModelCard.from_dict(dict(stored)) if isinstance(stored, Mapping) else None


def threshold_notes(rows: pd.DataFrame) -> list[str]:
    """A note when one model's CSV rows carry several thresholds (files from several runs)."""
    if "threshold" not in rows.columns:
        return []
    values = pd.to_numeric(rows["threshold"], errors="coerce").dropna()
    if values.nunique() > 1:
        return [f"several thresholds in the CSV; the most common, {float(values.mode().iloc[0]):g}, is used"]
    return []


def card_task(card: ModelCard) -> Task:
    """The task (with its label mapping) of a card."""
    return task_from_card(card.task, list(card.classes))
