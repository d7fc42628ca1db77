"""Scoring a network during and after training: logits, the model-selection score, card metrics.

:func:`predict_logits` runs a network over decoded images; :func:`selection_score` is
what early stopping and the best epoch go by (pooled and within-subgroup validation
AUCs); :func:`evaluate_probs`, :func:`evaluate_subgroups` and :func:`select_threshold`
fill the card's metrics and thresholds, delegating to :mod:`pneumobatch.evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from pneumobatch.core.errors import TrainingError
from pneumobatch.core.subgroups import AGE_BANDS
from pneumobatch.core.tasks import Task
from pneumobatch.evaluation import metrics
from pneumobatch.model.device import autocast, resolve_precision
from pneumobatch.model.preprocess import normalize

#: A subgroup enters model selection and gets its own operating point only with at
#: least this many validation images of each class it is scored on.
MIN_PER_CLASS = metrics.MIN_PER_CLASS_PER_BAND


def select_threshold(
    y_true: np.ndarray, scores: np.ndarray, target_recall: float, margin_level: Optional[float] = None
) -> dict[str, float]:
    """The card's ``recall_target`` and ``youden`` thresholds (:func:`pneumobatch.evaluation.metrics.select_threshold`)."""
    try:
        return metrics.select_threshold(np.asarray(y_true).astype(bool), scores, target_recall, margin_level)
    except ValueError:
        raise TrainingError("threshold selection needs both classes in the validation split") from None


def evaluate_probs(
    probs: np.ndarray,
    targets: np.ndarray,
    task: Task,
    threshold: Optional[float],
    log_offsets: Optional[Sequence[float]] = None,
) -> dict[str, Any]:
    """The card's metrics of one split (:func:`pneumobatch.evaluation.metrics.card_metrics`)."""
    return metrics.card_metrics(probs, targets, task.classes, task.positive, threshold, log_offsets)


@torch.no_grad()
def predict_logits(
    net: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """Logits (N, classes), float32 on the CPU, of uint8 images (N, 1, S, S) normalised with ``mean``/``std``."""
    net.eval()
    out = []
    dtype = resolve_precision("auto", device)
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out.append(net(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def auc_of(logits: torch.Tensor, targets: torch.Tensor, task: Task) -> float:
    """The card's AUC of softmaxed ``logits`` (NaN where it is undefined)."""
    probs = torch.softmax(logits, 1).numpy()
    return float(evaluate_probs(probs, targets.numpy(), task, None).get("auc", float("nan")))


def scored_subsets(frame: pd.DataFrame, targets: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Row masks of the subgroups (sources, age bands) that model selection scores.

    A subgroup counts when at least two classes have ``MIN_PER_CLASS`` images in it;
    only the rows of those classes are kept, so the score is a within-group AUC.
    """
    subsets = {"all": np.ones(len(targets), dtype=bool)}
    for column in ("sg_source", "sg_age_band"):
        values = frame[column].to_numpy()
        for value in sorted(set(values) - {"unknown"}):
            in_group = values == value
            big = [c for c in range(n_classes) if ((targets == c) & in_group).sum() >= MIN_PER_CLASS]
            if len(big) >= 2:
                subsets[f"{column[3:]}={value}"] = in_group & np.isin(targets, big)
    return subsets


def _within_auc(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes present in ``mask``."""
    from sklearn.metrics import roc_auc_score

    y, p = targets[mask], probs[mask]
    aucs = [roc_auc_score(y == c, p[:, c]) for c in np.unique(y)]
    return float(np.mean(aucs)) if len(np.unique(y)) > 1 else float("nan")


def selection_score(
    probs: np.ndarray, targets: np.ndarray, subsets: dict[str, np.ndarray]
) -> tuple[float, dict[str, float]]:
    """Mean of the pooled AUC and the within-source / within-age-band AUCs.

    The pooled AUC alone rewards telling sources apart (children from adults); the
    within-group AUCs only reward telling classes apart inside one population.
    """
    parts = {name: _within_auc(probs, targets, mask) for name, mask in subsets.items()}
    finite = [v for v in parts.values() if v == v]
    return (float(np.mean(finite)) if finite else float("nan")), parts


def class_indices(names: np.ndarray, task: Task) -> np.ndarray:
    """Class names -> their indices in ``task.classes``."""
    index = {c: i for i, c in enumerate(task.classes)}
    return np.asarray([index[n] for n in names], dtype=np.int64)


def evaluate_subgroups(
    probs: np.ndarray, targets: np.ndarray, pred: np.ndarray, frame: pd.DataFrame, task: Task
) -> dict[str, Any]:
    """Per source, age band, view and sex: counts, AUC with bootstrap CI, sensitivity/specificity."""
    classes = list(task.classes)
    y_true = [classes[i] for i in targets]
    y_pred = [classes[i] for i in pred]
    binary = task.positive is not None and len(classes) == 2
    out: dict[str, Any] = {}
    for column in ("sg_source", "sg_age_band", "sg_view", "sg_sex"):
        table = metrics.subgroup_metrics(
            frame[column].tolist(),
            y_true,
            probs,
            classes,
            y_pred=y_pred,
            positive=task.positive if binary else None,
            n_bootstrap=500,
            seed=0,
        )
        if binary:  # at the operating point actually applied to each row (per age band)
            pos = classes.index(task.positive)
            values = frame[column].astype(str).to_numpy()
            for row in table["groups"]:
                mask = values == row["value"]
                rates = metrics.confusion_rates(targets[mask] == pos, pred[mask] == pos)
                row.update({k: rates[k] for k in ("sensitivity", "specificity", "ppv", "npv")})
                row["notes"] = [n for n in row.get("notes", []) if not n.startswith("no shipped threshold")] + [
                    "sensitivity, specificity, PPV, NPV at the card's operating point (its age band's when known)"
                ]
                metrics.blank_unsupported(row, task.positive, metrics.MIN_PER_CLASS)
        out[column[3:]] = table
    pairs: dict[str, Any] = {}
    if not binary and "normal" in classes:
        from sklearn.metrics import roc_auc_score

        normal = classes.index("normal")
        for band in AGE_BANDS:
            in_band = frame["sg_age_band"].to_numpy() == band
            for c, name in enumerate(classes):
                mask = in_band & np.isin(targets, [normal, c])
                n_pos, n_neg = int((targets[mask] == c).sum()), int((targets[mask] == normal).sum())
                if c == normal or n_pos == 0 or n_neg == 0:
                    continue
                entry: dict[str, Any] = {"n_normal": n_neg, f"n_{name}": n_pos}
                if min(n_pos, n_neg) >= 5:
                    entry["auc"] = float(roc_auc_score(targets[mask] == c, probs[mask, c]))
                else:
                    entry["note"] = "too few images for an AUC"
                pairs[f"{band}: normal vs {name}"] = entry
        out["normal_vs_class_by_age_band"] = pairs
    return out
