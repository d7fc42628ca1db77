"""Training a two-level model (:mod:`pneumobatch.core.hierarchy`): the network's outputs are the
fine classes; the coarse logits are their log-sum-exp per parent.

The loss is the coarse cross-entropy (class-weighted where ``--balance weights`` says so,
exactly as a one-level model's) plus the negative log-likelihood of the image's fine class
*given* its coarse class, ``-(z_j - c_parent(j))``: the coarse level learns what it always
did, and the fine head only learns how to share a coarse class's probability among its
organisms. :class:`CoarseLogits` wraps the network wherever training scores coarse
classes (validation, model selection, temperature, operating points, metrics).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from pneumobatch.core.hierarchy import Hierarchy, build, patient_key
from pneumobatch.core.tasks import Task


def coarse_logits(fine: torch.Tensor, parents: torch.Tensor, n_coarse: int) -> torch.Tensor:
    """``c_k = logsumexp`` of the fine logits below ``k`` (N, K)."""
    return torch.stack([torch.logsumexp(fine[:, parents == k], dim=1) for k in range(n_coarse)], dim=1)


def fine_nll(
    fine: torch.Tensor, coarse: torch.Tensor, fine_targets: torch.Tensor, parents: torch.Tensor
) -> torch.Tensor:
    """Mean ``-log P(fine | coarse)`` of the targets."""
    rows = torch.arange(len(fine_targets), device=fine.device)
    return -(fine[rows, fine_targets] - coarse[rows, parents[fine_targets]]).mean()


class CoarseLogits(nn.Module):
    """A two-level network seen as a one-level one: its coarse logits."""

    def __init__(self, net: nn.Module, tree: Hierarchy) -> None:
        super().__init__()
        self.net = net
        self.n_coarse = len(tree.coarse)
        self.register_buffer("parents", torch.as_tensor(tree.parent_index), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return coarse_logits(self.net(x).float(), self.parents, self.n_coarse)


def hierarchy_of(frame: pd.DataFrame, task: Task) -> Optional[Hierarchy]:
    """The fine classes the fallback rule gives for a hierarchical task's labelled rows, else None."""
    if not task.hierarchical:
        return None
    rows = [
        (str(c), o if isinstance(o, str) and o else None, str(s), str(p))
        for c, o, s, p in zip(frame["cls"], frame["organism"], frame["split"], frame["patient"])
    ]
    return build(task.classes, rows)


def fine_targets(frame: pd.DataFrame, tree: Hierarchy) -> torch.Tensor:
    """Each row's fine class index."""
    index = {name: j for j, name in enumerate(tree.fine)}
    return torch.tensor(
        [
            index[tree.fine_class(str(c), o if isinstance(o, str) and o else None)]
            for c, o in zip(frame["cls"], frame["organism"])
        ],
        dtype=torch.long,
    )


def fine_metrics(fine_probs: np.ndarray, frame: pd.DataFrame, tree: Hierarchy, coarse_pred: np.ndarray) -> dict:
    """Fine-level test figures: top-1 accuracy of the fine label predict writes (the most probable fine
    class below the coarse decision ``coarse_pred``, indices), top-3 accuracy of the three most probable
    fine classes, and recall / precision / count per fine class."""
    truth = fine_targets(frame, tree).numpy()
    order = np.argsort(-fine_probs, axis=1)
    index = {name: j for j, name in enumerate(tree.fine)}
    top1 = np.array([index[tree.best_below(p, tree.coarse[int(k)])] for p, k in zip(fine_probs, coarse_pred)])
    per_class = {}
    for j, name in enumerate(tree.fine):
        n = int((truth == j).sum())
        called = int((top1 == j).sum())
        hit = int(((truth == j) & (top1 == j)).sum())
        per_class[name] = {
            "parent": tree.parent[j],
            "n": n,
            "recall": hit / n if n else None,
            "precision": hit / called if called else None,
        }
    return {
        "n": int(len(truth)),
        "top1_accuracy": float((top1 == truth).mean()) if len(truth) else None,
        "top3_accuracy": float((order[:, :3] == truth[:, None]).any(axis=1).mean()) if len(truth) else None,
        "per_class": per_class,
    }


def counts_by_fine(frames: Sequence[tuple[str, pd.DataFrame]], tree: Hierarchy) -> dict:
    """Images and patients per fine class and split (the card's ``hierarchy.counts``)."""
    out: dict = {}
    for split, frame in frames:
        targets = fine_targets(frame, tree).numpy()
        patients = frame["patient"].astype(str).to_numpy()
        for j, name in enumerate(tree.fine):
            rows = targets == j
            ids = {patient_key(p, i) for i, p in zip(np.flatnonzero(rows), patients[rows])}
            out.setdefault(name, {})[split] = {"images": int(rows.sum()), "patients": len(ids)}
    return out


def organism_counts(frame: pd.DataFrame, tree: Hierarchy) -> dict:
    """Every organism the labels name: its coarse class, patients per split and the fine class it got
    (its own, or the fallback): what the fallback rule decided, for the card."""
    out: dict = {}
    named = frame[frame["organism"].astype(str).str.len() > 0]
    for (cls, org), rows in named.groupby(["cls", "organism"]):
        entry = {"coarse": str(cls), "fine_class": tree.fine_class(str(cls), str(org))}
        for split in ("train", "val", "test"):
            part = rows[rows["split"] == split]
            entry[split] = len({patient_key(p, i) for i, p in zip(part.index, part["patient"].astype(str))})
        out[str(org)] = entry
    return out
