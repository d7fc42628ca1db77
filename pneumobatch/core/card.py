"""The model card and the one decision rule (no torch: the report side uses it too).

A card says what a model predicts and how its probabilities become a class:

- multiclass (or no positive class): the argmax, or, where the card's ``decision`` holds
  ``log_offsets`` (chosen on validation so that no class is starved by the priors), the
  argmax of ``log p + offset``;
- binary: the positive class when ``p(positive) >= threshold``; a card without a
  threshold uses :data:`DEFAULT_THRESHOLD`. When an age band is given and the card has
  an operating point for that band (``thresholds["by_age_band"][band]["recall_target"]``),
  that threshold is used instead.

A site calibration (:mod:`pneumobatch.operations.calibrate`) gives a card its own temperature and
thresholds; such an operating point is named ``site-pooled`` or ``site-<band>``, and
``thresholds["applied"]`` says which named threshold of a band applies (default
``recall_target``).

Everything that turns probabilities into classes (predict's CSV, study aggregation,
the report, training's validation metrics) goes through :func:`is_positive`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Sequence

import numpy as np

from pneumobatch.core.errors import ModelError
from pneumobatch.core.hierarchy import Hierarchy

#: Names of the chosen operating points (keys of ``ModelCard.thresholds``, report rows).
RECALL_TARGET, YOUDEN = "recall_target", "youden"
#: Keys of ``ModelCard.thresholds`` that training writes as thresholds; the others describe them.
OPERATING_POINTS = (RECALL_TARGET, YOUDEN)
#: Sensitivity the ``recall_target`` operating point reaches unless told otherwise
#: (``train --target-recall`` on validation data, ``report --target-recall`` on the evaluated data).
TARGET_RECALL = 0.95
#: Numeric keys of ``ModelCard.thresholds`` that are not thresholds.
NOT_THRESHOLDS = ("shipped", "target_recall")
#: Threshold of a binary card that ships none.
DEFAULT_THRESHOLD = 0.5
PROB_PREFIX = "prob_"
#: The class of a multi-class model that is no finding (the etiology task's first class).
NORMAL_CLASS = "normal"
REQUIRED_FIELDS = ("name", "task", "classes", "architecture", "input_size", "mean", "std")
#: Input sizes a card may ask for (``train --input-size`` allows 32 to 1024).
INPUT_SIZE_RANGE = (16, 2048)

_PROBABILITY = {"type": "number", "minimum": 0, "maximum": 1}
_OPERATING_POINTS = {"type": "object", "properties": {k: _PROBABILITY for k in OPERATING_POINTS}}
#: What a model card loaded for prediction must hold (JSON Schema; numbers must also be finite).
CARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [*REQUIRED_FIELDS, "weights_sha256"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "task": {"type": "string", "minLength": 1},
        "classes": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 2, "uniqueItems": True},
        "architecture": {"type": "string", "minLength": 1},
        "input_size": {"type": "integer", "minimum": INPUT_SIZE_RANGE[0], "maximum": INPUT_SIZE_RANGE[1]},
        "mean": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
        "std": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 3, "maxItems": 3},
        "positive": {"type": ["string", "null"]},
        "threshold": {"anyOf": [_PROBABILITY, {"type": "null"}]},
        "thresholds": {
            "type": "object",
            "properties": {
                **_OPERATING_POINTS["properties"],
                "by_age_band": {"type": "object", "additionalProperties": _OPERATING_POINTS},
            },
        },
        "temperature": {"type": "number", "exclusiveMinimum": 0},
        "weights_sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
        "data": {"type": "object"},
        "metrics": {"type": "object"},
        "training": {"type": "object"},
        "applicability": {"type": "object"},
        "preprocessing": {
            "type": "object",
            "properties": {"intensity": {"enum": ["none", "equalize"]}},
        },
        "onnx": {
            "type": "object",
            "properties": {
                "file": {"type": "string", "minLength": 1},
                "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                "weights_sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                "outputs": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            },
        },
        "hierarchy": {
            "type": "object",
            "properties": {
                "fine": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                    "uniqueItems": True,
                },
                "parent": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                "rule": {"type": "string"},
            },
        },
        "decision": {
            "type": "object",
            "properties": {
                "rule": {"enum": ["argmax", "log-offsets"]},
                "log_offsets": {"type": "array", "items": {"type": "number"}},
            },
        },
        "explain": {
            "type": "object",
            "properties": {
                "method": {"enum": ["gradcam"]},
                "layer": {"type": "string", "minLength": 1, "maxLength": 200},
                "sanity": {"type": "object"},
            },
        },
    },
}


def validate_card(data: Any) -> None:
    """Check a card read from disk before it is used: :data:`CARD_SCHEMA`, finite numbers,
    ``positive`` one of the classes. Raises :class:`ModelError` with one line naming the field."""
    import jsonschema

    if not isinstance(data, dict):
        raise ModelError("card: not a JSON object")
    missing = [k for k in CARD_SCHEMA["required"] if k not in data]
    if missing:
        raise ModelError(f"{missing[0]}: missing (the card lacks {', '.join(missing)})")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(CARD_SCHEMA).iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "card"
        message = error.message if len(error.message) <= 120 else error.message[:117] + "..."
        raise ModelError(f"{where}: {message}")
    thresholds = data.get("thresholds") or {}
    decisive = {
        "temperature": data.get("temperature", 1.0),
        "threshold": data.get("threshold"),
        "mean": data["mean"],
        "std": data["std"],
        **{f"thresholds/{k}": thresholds.get(k) for k in OPERATING_POINTS},
        **{
            f"thresholds/by_age_band/{band}/{k}": v.get(k)
            for band, v in (thresholds.get("by_age_band") or {}).items()
            for k in OPERATING_POINTS
        },
    }
    offsets = (data.get("decision") or {}).get("log_offsets")
    if offsets is not None:
        decisive["decision/log_offsets"] = offsets
        if len(offsets) != len(data["classes"]):
            raise ModelError(f"decision/log_offsets: {len(offsets)} offsets for {len(data['classes'])} classes")
    for where, value in decisive.items():
        if value is not None and not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
            raise ModelError(f"{where}: must be a finite number, not {value!r}")
    if data.get("positive") is not None and data["positive"] not in data["classes"]:
        raise ModelError(f"positive: {data['positive']!r} is not one of the classes")
    if data.get("hierarchy"):
        if not {"fine", "parent"} <= set(data["hierarchy"]):
            raise ModelError("hierarchy: needs 'fine' and 'parent' (or nothing, for a one-level model)")
        try:
            Hierarchy.from_dict(data["classes"], data["hierarchy"])
        except ValueError as exc:
            raise ModelError(str(exc)) from None


def prob_column(cls: str) -> str:
    """CSV column holding the probability of class ``cls``."""
    return f"{PROB_PREFIX}{cls}"


def resolve_threshold(threshold: Any) -> Any:
    """``threshold``, or :data:`DEFAULT_THRESHOLD` where it is None (scalar or per-row array)."""
    if threshold is None:
        return DEFAULT_THRESHOLD
    if isinstance(threshold, np.ndarray):
        return threshold
    return float(threshold)


def is_positive(p_positive: Any, threshold: Any) -> np.ndarray:
    """The decision rule: positive when ``p(positive) >= threshold`` (None: 0.5)."""
    return np.asarray(p_positive, dtype=np.float64) >= resolve_threshold(threshold)


def decide_indices(
    proba: np.ndarray,
    classes: Sequence[str],
    positive: Optional[str],
    threshold: Any = None,
    log_offsets: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """Predicted class index per row of ``proba`` (n, len(classes)) by the card's rule: a threshold
    (binary), else the argmax of ``log p`` plus ``log_offsets`` (none: of ``p``)."""
    proba = np.asarray(proba, dtype=np.float64).reshape(-1, len(classes))
    if len(classes) == 2 and positive in classes:
        pos = list(classes).index(positive)
        return np.where(is_positive(proba[:, pos], threshold), pos, 1 - pos)
    score = np.nan_to_num(proba, nan=-np.inf)  # missing probabilities never win
    if log_offsets is not None:  # log p, -inf where p is 0 or missing (the log only sees positive values)
        score = np.where(score > 0, np.log(np.where(score > 0, score, 1.0)), -np.inf)
        score = score + np.asarray(log_offsets, dtype=np.float64)
    return np.argmax(score, axis=1)


@dataclass(frozen=True)
class Decision:
    """A predicted class and the operating point that produced it."""

    label: str
    threshold: Optional[float]  # None for argmax decisions
    operating_point: str  # "pooled", "argmax" or an age band name; "site-" in front for a site's point


@dataclass
class ModelCard:
    """Everything needed to use a model correctly and to judge it."""

    name: str
    task: str
    classes: list[str]
    architecture: str
    input_size: int
    mean: list[float]
    std: list[float]
    positive: Optional[str] = None  # class whose probability ``threshold`` applies to
    threshold: Optional[float] = None  # shipped decision threshold (binary tasks)
    thresholds: dict[str, Any] = field(default_factory=dict)  # named operating points
    temperature: float = 1.0  # logits are divided by this before softmax
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    pneumobatch_version: str = ""
    weights_sha256: str = ""
    #: applicability statistics: file (beside the weights), sha256, threshold, flag rates
    applicability: dict[str, Any] = field(default_factory=dict)
    #: input steps beyond the resize (``{"intensity": "equalize"}``); empty: resize only (older cards)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    #: the weights exported to ONNX (``file`` beside them, its ``sha256``, the ``weights_sha256`` it was
    #: exported from and its ``outputs``: logits, then the applicability layers); empty: none shipped
    onnx: dict[str, Any] = field(default_factory=dict)
    #: heatmaps: ``method`` (gradcam), the ``layer`` they are computed at (a module name of the network;
    #: empty: the architecture's default) and the ``sanity`` figures measured on the test split
    explain: dict[str, Any] = field(default_factory=dict)
    #: two-level models: ``fine`` classes (the network's outputs, in order), each one's coarse ``parent``
    #: (one of ``classes``) and the fallback ``rule`` (:mod:`pneumobatch.core.hierarchy`); empty: one level
    hierarchy: dict[str, Any] = field(default_factory=dict)
    #: multi-class decision rule: ``rule`` (argmax or log-offsets), ``log_offsets`` per class (chosen on
    #: validation), what they were chosen for; empty: the argmax (older cards)
    decision: dict[str, Any] = field(default_factory=dict)
    #: where a site calibration came from (file, SHA-256, fitted-on data), empty when none is applied
    site: dict[str, Any] = field(default_factory=dict)
    intended_use: str = (
        "Research and quality-assurance use on frontal (PA/AP) chest radiographs. "
        "Not a medical device; not for diagnosis."
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f.name for f in fields(cls)}
        missing = set(REQUIRED_FIELDS) - set(data)
        if missing:
            raise ModelError(f"model card lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def binary(self) -> bool:
        """Two classes and a positive one: decided by a threshold."""
        return len(self.classes) == 2 and self.positive in self.classes

    @property
    def positive_index(self) -> Optional[int]:
        return self.classes.index(self.positive) if self.binary else None

    def prob_column(self, cls: str) -> str:
        return prob_column(cls)

    @property
    def tree(self) -> Optional[Hierarchy]:
        """The fine level below the classes, or None for a one-level model."""
        return Hierarchy.from_dict(self.classes, self.hierarchy) if self.hierarchy else None

    @property
    def output_classes(self) -> list[str]:
        """What the network's outputs are, in order: the fine classes of a two-level model, else ``classes``."""
        tree = self.tree
        return list(tree.fine) if tree is not None else list(self.classes)

    def output_probs(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities of the network's outputs (n, len(output_classes)) from its logits: the
        temperature-scaled softmax, or a two-level model's fine probabilities
        (:meth:`Hierarchy.probabilities`, whose sums per parent are the coarse ones)."""
        tree = self.tree
        if tree is not None:
            return tree.probabilities(logits, self.temperature)[1].astype(np.float32)
        z = np.asarray(logits, dtype=np.float32) / np.float32(self.temperature)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def class_probs(self, output_probs: np.ndarray) -> np.ndarray:
        """The probabilities of ``classes`` from those of the outputs (one row or (n, outputs))."""
        tree = self.tree
        p = np.asarray(output_probs, dtype=np.float64)
        if tree is None:
            return p
        return tree.coarse_of(p).reshape(*p.shape[:-1], len(self.classes))

    @property
    def log_offsets(self) -> Optional[list[float]]:
        offsets = (self.decision or {}).get("log_offsets")
        return [float(v) for v in offsets] if offsets is not None and not self.binary else None

    def prob_columns(self) -> list[str]:
        return [prob_column(c) for c in self.classes]

    def operating_points(self) -> dict[str, float]:
        """Named thresholds chosen on validation (``thresholds`` also holds their sensitivity,
        specificity and the target recall, which are not thresholds)."""
        return {
            str(k): float(v)
            for k, v in self.thresholds.items()
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and k not in NOT_THRESHOLDS
            and not str(k).endswith(("_sensitivity", "_specificity", "_lower_bound"))
        }

    def threshold_for(self, age_band: Optional[str] = None) -> tuple[Optional[float], str]:
        """The threshold a binary decision uses and the name of its operating point."""
        by_band = self.thresholds.get("by_age_band") or {}
        if age_band is not None and age_band in by_band:
            point = by_band[age_band]
            name = f"site-{age_band}" if point.get("source") == "site" else str(age_band)
            return float(point[self.thresholds.get("applied") or "recall_target"]), name
        name = "site-pooled" if self.thresholds.get("source") == "site" else "pooled"
        return float(resolve_threshold(self.threshold)), name

    def decide(self, probs: Sequence[float], age_band: Optional[str] = None) -> Decision:
        """The predicted class of one image's probabilities (in the order of ``classes``)."""
        probs = np.asarray(probs, dtype=np.float64)
        if not self.binary:
            offsets = self.log_offsets
            index = decide_indices(probs, self.classes, None, None, offsets)[0]
            return Decision(self.classes[int(index)], None, "argmax" if offsets is None else "log-offsets")
        threshold, point = self.threshold_for(age_band)
        pos = self.classes.index(self.positive)
        label = self.classes[pos] if is_positive(probs[pos], threshold) else self.classes[1 - pos]
        return Decision(label, threshold, point)

    def output_index(self, label: str, fine_label: Any = None) -> int:
        """The network output a row's decision is explained by: the class ``label``, or for a two-level
        model its fine class ``fine_label`` (else the first fine class below ``label``)."""
        tree = self.tree
        if tree is None:
            return self.classes.index(label)
        if (
            isinstance(fine_label, str)
            and fine_label in tree.fine
            and tree.parent[tree.fine.index(fine_label)] == label
        ):
            return tree.fine.index(fine_label)
        return tree.parent.index(label)

    def is_finding(self, label: str) -> bool:
        """Whether a predicted class is a finding (what ``predict --heatmaps positive`` explains): the
        positive class of a binary model; any class but ``normal`` of a multi-class one."""
        if self.binary:
            return label == self.positive
        return label in self.classes and label != NORMAL_CLASS

    def age_warnings(self, age_years: Optional[float]) -> list[str]:
        """``age-outside-training`` when a known age lies outside the training images' ages."""
        known = (self.data or {}).get("age_range_years")
        if age_years is None or not known:
            return []
        return ["age-outside-training"] if not known[0] <= age_years <= known[1] else []

    def decide_many(self, proba: np.ndarray, age_bands: Optional[Sequence[Any]] = None) -> np.ndarray:
        """Class names for rows of probabilities: each row's age-band operating point where
        ``age_bands`` is given and the card has one (as :meth:`decide`), else the pooled one."""
        if len(proba) == 0:
            return np.asarray([], dtype=object)
        threshold: Any = self.threshold if self.binary else None
        if self.binary and age_bands is not None:
            threshold = np.array([self.threshold_for(b)[0] for b in age_bands], dtype=np.float64)
        idx = decide_indices(proba, self.classes, self.positive, threshold, self.log_offsets)
        return np.asarray(self.classes, dtype=object)[idx]
