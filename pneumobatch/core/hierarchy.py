"""Two-level classes: coarse classes (the card's ``classes``) and fine ones (the organism) below them.

A hierarchical model's network has one output per *fine* class; each fine class has one
coarse parent. Its probabilities are

- coarse: ``P(k) = softmax(c / T)_k`` with ``c_k = logsumexp_{j in k} z_j`` (``z`` the fine
  logits, ``T`` the card's temperature: calibration acts on the coarse level only);
- fine: ``P(j) = P(parent(j)) * softmax_{j' in parent(j)}(z)_j``,

so the fine probabilities below a coarse class sum to its probability exactly (up to
rounding), and a coarse class with one fine class gives it all its probability. A model
card records the fine classes, their parents and the fallback rule in ``hierarchy``
(:meth:`Hierarchy.to_dict`); a card without one is a one-level model and nothing here
applies to it.

The fallback rule: an organism (the finding's level below the coarse class, e.g.
``Pneumonia/Bacterial/Streptococcus``) is a fine class of its own when the training split
has at least :data:`MIN_TRAIN_PATIENTS` patients with it and the validation split at
least :data:`MIN_VAL_PATIENTS`; every other image of that coarse class (organism not
named, or too rare to learn) belongs to ``other <coarse>``. A coarse class with no named
organism (``normal``, ``covid-19``) is its own single fine class.

numpy only: predict's torch-free path, the report and push use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

MIN_TRAIN_PATIENTS = 3
MIN_VAL_PATIENTS = 1
OTHER = "other"
#: How many fine classes ``fine_top3`` lists.
TOP_K = 3
#: The CSV columns of a two-level model's fine level (predictions and studies): the fine class
#: below ``pred_label``, its probability, and the ``TOP_K`` most probable fine classes (:func:`top_text`).
FINE_LABEL, FINE_PROB, FINE_TOP = "fine_label", "fine_prob", "fine_top3"
FINE_COLUMNS = [FINE_LABEL, FINE_PROB, FINE_TOP]
FALLBACK_RULE = (
    f"an organism is a fine class of its own when the training split has >= {MIN_TRAIN_PATIENTS} patients "
    f"and the validation split >= {MIN_VAL_PATIENTS} with it (images without a patient id count one each); "
    f"every other image of a coarse class (organism not named or too rare) is '{OTHER} <coarse>'; a coarse class "
    "without named organisms is its own fine class"
)


def patient_key(patient: str, row: object) -> str:
    """Who an image counts as when patients are counted: its patient id, or, without one, the image
    itself (``row``: its row's key), so images without a patient id count one each."""
    return patient or f"#{row}"


def other(coarse: str) -> str:
    """The fallback fine class of a coarse class."""
    return f"{OTHER} {coarse}"


def organism(levels: Sequence[str]) -> Optional[str]:
    """The organism of a finding's levels (``["Pneumonia", "Bacterial", "Streptococcus"]`` ->
    ``Streptococcus``), as written, or None when the finding names none."""
    parts = [str(p).strip() for p in levels if str(p).strip()]
    if len(parts) >= 3 and parts[0].lower() == "pneumonia":
        return parts[-1]
    return None


@dataclass(frozen=True)
class Hierarchy:
    """Fine classes in output order, each with its coarse parent (one of the card's classes)."""

    coarse: tuple[str, ...]
    fine: tuple[str, ...]
    parent: tuple[str, ...]  # parent[j] is the coarse class of fine[j]
    rule: str = FALLBACK_RULE

    def __post_init__(self) -> None:
        if len(self.fine) != len(self.parent) or len(set(self.fine)) != len(self.fine):
            raise ValueError("hierarchy: fine classes must be unique and have one parent each")
        if set(self.parent) != set(self.coarse):
            raise ValueError("hierarchy: every coarse class needs a fine class and every parent must be a class")

    @classmethod
    def from_dict(cls, coarse: Sequence[str], data: dict[str, Any]) -> Hierarchy:
        return cls(tuple(coarse), tuple(data["fine"]), tuple(data["parent"]), str(data.get("rule", FALLBACK_RULE)))

    def to_dict(self) -> dict[str, Any]:
        return {"fine": list(self.fine), "parent": list(self.parent), "rule": self.rule}

    @property
    def parent_index(self) -> np.ndarray:
        """Index into ``coarse`` of each fine class's parent."""
        return np.array([self.coarse.index(p) for p in self.parent], dtype=np.int64)

    def fine_class(self, coarse: str, organism_name: Optional[str]) -> str:
        """The fine class of an image of class ``coarse`` whose finding names ``organism_name``."""
        if organism_name is not None:
            for name, parent in zip(self.fine, self.parent):
                if parent == coarse and name.lower() == organism_name.lower():
                    return name
        if coarse in self.fine:
            return coarse
        return other(coarse)

    def coarse_logits(self, fine_logits: np.ndarray) -> np.ndarray:
        """``c_k = logsumexp`` of the fine logits below ``k``: the coarse level's logits (n, K)."""
        z = np.asarray(fine_logits, dtype=np.float64)
        out = np.full((z.shape[0], len(self.coarse)), -np.inf)
        for k, j in _groups(self.parent_index, len(self.coarse)):
            m = z[:, j].max(axis=1, keepdims=True)
            out[:, k] = (m + np.log(np.exp(z[:, j] - m).sum(axis=1, keepdims=True)))[:, 0]
        return out

    def probabilities(self, fine_logits: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Coarse (n, K) and fine (n, F) probabilities of fine logits (n, F); see the module docstring."""
        z = np.asarray(fine_logits, dtype=np.float64).reshape(-1, len(self.fine))
        c = self.coarse_logits(z)
        scaled = c / float(temperature)
        e = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        coarse = e / e.sum(axis=1, keepdims=True)
        parents = self.parent_index
        within = np.exp(z - c[:, parents])  # softmax within each parent
        return coarse, coarse[:, parents] * within

    def coarse_of(self, fine_probs: np.ndarray) -> np.ndarray:
        """Coarse probabilities (n, K): the sums of the fine ones below each class."""
        p = np.asarray(fine_probs, dtype=np.float64).reshape(-1, len(self.fine))
        out = np.zeros((p.shape[0], len(self.coarse)))
        np.add.at(out.T, self.parent_index, p.T)
        return out

    def ranked(self, fine_probs: Sequence[float], k: int = TOP_K) -> list[tuple[str, float]]:
        """The ``k`` most probable fine classes of one image, most probable first."""
        p = np.asarray(fine_probs, dtype=np.float64)
        order = np.argsort(-p, kind="stable")[:k]
        return [(self.fine[i], float(p[i])) for i in order]

    def best_below(self, fine_probs: Sequence[float], coarse: str) -> str:
        """The most probable fine class below ``coarse`` (the fine label that goes with a coarse decision)."""
        p = np.asarray(fine_probs, dtype=np.float64)
        members = [j for j, parent in enumerate(self.parent) if parent == coarse]
        return self.fine[max(members, key=lambda j: p[j])]


def _groups(parents: np.ndarray, n_coarse: int) -> list[tuple[int, np.ndarray]]:
    return [(k, np.flatnonzero(parents == k)) for k in range(n_coarse)]


def build(coarse: Sequence[str], rows: Sequence[tuple[str, Optional[str], str, str]]) -> Hierarchy:
    """The hierarchy the fallback rule gives for labelled rows ``(coarse, organism, split, patient)``.

    Coarse classes keep their order; below each, named organisms (sorted), then ``other <coarse>``
    when any training image falls back to it, or the coarse class itself when none is named.
    """
    patients: dict[tuple[str, str, str], set[str]] = {}
    for i, (cls, org, split, patient) in enumerate(rows):
        if org is not None:
            patients.setdefault((cls, org.strip(), split), set()).add(patient_key(patient, i))
    kept = {
        (cls, org)
        for (cls, org, split) in patients
        if len(patients.get((cls, org, "train"), ())) >= MIN_TRAIN_PATIENTS
        and len(patients.get((cls, org, "val"), ())) >= MIN_VAL_PATIENTS
    }
    fine: list[str] = []
    parent: list[str] = []
    for cls in coarse:
        named = sorted({org for c, org in kept if c == cls}, key=str.lower)
        falls_back = any(
            c == cls and split == "train" and (org is None or (c, org.strip()) not in kept) for c, org, split, _ in rows
        )
        if not named:
            fine.append(cls)
        else:
            fine += named
            if falls_back:
                fine.append(other(cls))
        parent += [cls] * (len(fine) - len(parent))
    return Hierarchy(tuple(coarse), tuple(fine), tuple(parent))


def top_text(ranked: Sequence[tuple[str, float]]) -> str:
    """The CSV cell of ``fine_top3``: ``name probability`` pairs separated by ``; ``."""
    return "; ".join(f"{name} {p:.6f}" for name, p in ranked)


def parse_top_text(text: str) -> list[tuple[str, float]]:
    """The pairs of a ``fine_top3`` cell (an untrusted CSV cell: anything malformed is left out)."""
    out = []
    for part in str(text or "").split(";"):
        name, _, value = part.strip().rpartition(" ")
        try:
            p = float(value)
        except ValueError:
            continue
        if name and np.isfinite(p) and 0.0 <= p <= 1.0:
            out.append((name, p))
    return out
