"""Is an image like the frontal chest radiographs a model was trained on?

The model's own features of the training images define "like", taken at several
depths: the input of its classifier layer (``head``, the penultimate features) and
the channel means and standard deviations of a few intermediate stages (edges and
textures early, anatomy later). Per layer, a PCA of the training features gives the
mean, the top ``k`` principal directions with their variances and the mean squared
residual outside them; a layer's score combines the Mahalanobis distance inside the
subspace and the residual outside it, each divided by its training mean:

    layer_score = (maha2_k / mean_train(maha2_k) + resid2 / mean_train(resid2)) / 2

Each layer's score is divided by its own high percentile on the validation images and
the image's score is the mean over layers, so no single depth dominates.

A chest film that is rotated, upside down or has inverted grey levels keeps much of a
chest's texture statistics, so distances alone pass most of them. An orientation check
adds what they miss: a logistic regression on the penultimate features, fitted on the
training images against copies of them rotated by 90, 180 and 270 degrees, flipped
upside down and grey-inverted (the model's own features tell these apart almost
perfectly). Its log-odds ``o`` of "not upright" enter the score as
``scale * exp(o - o_threshold)``, with ``o_threshold`` the 99.5th percentile on the
(upright) validation images and ``scale`` the distance score's 99th percentile there;
the image's score is the larger of the two terms, so it crosses the threshold when
either does.

The flag threshold is a high percentile (default 99th) of the validation images'
scores: about 1% of in-distribution images are flagged by construction. Penultimate features
alone miss most non-radiographs (they only encode what separates the classes); the
intermediate layers catch CT/MR/ultrasound slices and photographs (README, measured by
``benchmarks/applicability.py``).

The statistics live in ``NAME.applicability.safetensors`` beside the weights (the
card holds its SHA-256 and the threshold). ``train`` fits them on its train split and
sets the threshold on validation; ``pneumobatch fit-applicability`` recomputes them for
any model, for example on a site's own normal radiographs. Files of the earlier
single-layer method (``pca-mahalanobis+residual``, penultimate features only) still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from pneumobatch.core.errors import ModelError

METHOD = "multilayer-pca-mahalanobis"
LEGACY_METHOD = "pca-mahalanobis+residual"
HEAD = "head"  # the layer name for the input of the classifier layer (penultimate features)
DEFAULT_COMPONENTS = {HEAD: 64}  # principal directions per layer; other layers use STAGE_COMPONENTS
STAGE_COMPONENTS = 32
DEFAULT_PERCENTILE = 99.0
#: A layer keeps a residual term only if its training residual is above this share of its variance.
RESIDUAL_SHARE = 1e-6
#: Residual scales at or below this mean "no residual term" (files written before
#: RESIDUAL_SHARE stored a 1e-12 floor there).
RESIDUAL_FLOOR = 1e-9

Features = Union[Mapping[str, np.ndarray], np.ndarray]  # layer name -> (N, D); a bare array is the head

#: Percentile of the validation images' orientation log-odds that sets the check's threshold.
ORIENTATION_PERCENTILE = 99.5
#: Training images per transformation the orientation check is fitted on (a random subset).
ORIENTATION_IMAGES = 800


@dataclass
class OrientationCheck:
    """Logistic regression on the penultimate features: log-odds that an image is not upright."""

    weight: np.ndarray  # (D,), on raw features (the standardisation is folded in)
    bias: float
    log_odds_threshold: float = float("inf")
    scale: float = 1.0
    transforms: tuple[str, ...] = ()

    def log_odds(self, head: np.ndarray) -> np.ndarray:
        return np.asarray(head, dtype=np.float64) @ self.weight + self.bias

    def term(self, head: np.ndarray) -> np.ndarray:
        """The check's part of the score: ``scale`` at the check's own threshold."""
        return self.scale * np.exp(np.clip(self.log_odds(head) - self.log_odds_threshold, -50.0, 50.0))

    @classmethod
    def fit(cls, upright: np.ndarray, turned: Mapping[str, np.ndarray]) -> OrientationCheck:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        x = np.concatenate([upright, *turned.values()]).astype(np.float64)
        y = np.concatenate([np.zeros(len(upright)), np.ones(sum(len(v) for v in turned.values()))])
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(scaler.transform(x), y)
        sd = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        weight = clf.coef_[0] / sd
        bias = float(clf.intercept_[0] - (weight * scaler.mean_).sum())
        return cls(weight, bias, transforms=tuple(turned))

    def valid(self) -> bool:
        return bool(
            np.isfinite(self.weight).all()
            and np.isfinite(self.bias)
            and np.isfinite(self.log_odds_threshold)
            and self.scale > 0
        )


def _by_layer(features: Features) -> Mapping[str, np.ndarray]:
    return features if isinstance(features, Mapping) else {HEAD: features}


@dataclass
class LayerStats:
    """PCA statistics of one layer's features on the training images."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,)
    maha_scale: float = 1.0
    resid_scale: float = 1.0

    @property
    def has_residual(self) -> bool:
        """False when the PCA keeps (nearly) every dimension: the residual is rounding noise."""
        return self.resid_scale > RESIDUAL_FLOOR

    def score(self, features: np.ndarray) -> np.ndarray:
        centred = np.asarray(features, dtype=np.float64) - self.mean
        z = centred @ self.components.T
        maha2 = (z**2 / self.variances).sum(1)
        if not self.has_residual:
            return 0.5 * maha2 / self.maha_scale
        resid2 = (centred**2).sum(1) - (z**2).sum(1)
        return 0.5 * (maha2 / self.maha_scale + np.maximum(resid2, 0) / self.resid_scale)

    @classmethod
    def fit(cls, features: np.ndarray, n_components: int) -> LayerStats:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 3:
            raise ValueError("need at least 3 feature vectors to fit applicability statistics")
        mean = x.mean(0)
        centred = x - mean
        k = int(min(n_components, len(x) - 1, x.shape[1]))
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        variances = np.maximum((s[:k] ** 2) / (len(x) - 1), 1e-12)
        stats = cls(mean, vt[:k], variances)
        z = centred @ stats.components.T
        stats.maha_scale = float(max((z**2 / variances).sum(1).mean(), 1e-12))
        resid = float(((centred**2).sum(1) - (z**2).sum(1)).mean())
        total = float((centred**2).sum(1).mean())
        # no residual term when the kept directions hold (nearly) all the variance: what is
        # left is float rounding, which the float32 file would turn into huge scores
        stats.resid_scale = resid if resid > RESIDUAL_SHARE * total else 0.0
        return stats

    def valid(self) -> bool:
        return bool(
            np.isfinite(self.variances).all()
            and (self.variances > 0).all()
            and self.maha_scale > 0
            and self.resid_scale >= 0
        )


@dataclass
class ApplicabilityStats:
    """Per-layer statistics, each layer's validation scale, and the flag threshold."""

    layers: dict[str, LayerStats]
    scales: dict[str, float] = field(default_factory=dict)  # layer -> divisor (its validation percentile)
    threshold: float = float("inf")
    orientation: Optional[OrientationCheck] = None  # files written before it have none

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def score(self, features: Features) -> np.ndarray:
        """Applicability score per image (about 1 for a typical training image; higher is less alike)."""
        by_layer = _by_layer(features)
        distance = self.distance(by_layer)
        if self.orientation is None:
            return distance
        return np.maximum(distance, self.orientation.term(by_layer[HEAD]))

    def distance(self, features: Features) -> np.ndarray:
        """The feature-distance part of the score: the mean over layers of the scaled layer scores."""
        by_layer = _by_layer(features)
        per_layer = [stats.score(by_layer[name]) / self.scales.get(name, 1.0) for name, stats in self.layers.items()]
        return np.mean(per_layer, axis=0)

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """True where an image is applicable (score within the threshold)."""
        return np.asarray(scores) <= self.threshold

    def save(self, path: Path, info: dict[str, Any]) -> None:
        from safetensors.numpy import save_file

        tensors = {}
        for name, stats in self.layers.items():
            tensors[f"{name}/mean"] = stats.mean.astype(np.float32)
            tensors[f"{name}/components"] = stats.components.astype(np.float32)
            tensors[f"{name}/variances"] = stats.variances.astype(np.float32)
        if self.orientation is not None:
            tensors["orientation/weight"] = self.orientation.weight.astype(np.float32)[None]
        meta = {
            "method": METHOD,
            "threshold": repr(self.threshold),
            "info": json.dumps(info),
            "layers": json.dumps(
                {
                    name: {
                        "maha_scale": s.maha_scale,
                        "resid_scale": s.resid_scale,
                        "scale": self.scales.get(name, 1.0),
                    }
                    for name, s in self.layers.items()
                }
            ),
        }
        if self.orientation is not None:
            o = self.orientation
            meta["orientation"] = json.dumps(
                {
                    "bias": o.bias,
                    "log_odds_threshold": o.log_odds_threshold,
                    "scale": o.scale,
                    "transforms": list(o.transforms),
                }
            )
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> ApplicabilityStats:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                method = meta.get("method")
                if method == METHOD:
                    layers, scales = {}, {}
                    for name, scalars in json.loads(meta["layers"]).items():
                        layers[name] = LayerStats(
                            *(
                                fh.get_tensor(f"{name}/{key}").astype(np.float64)
                                for key in ("mean", "components", "variances")
                            ),
                            maha_scale=float(scalars["maha_scale"]),
                            resid_scale=float(scalars["resid_scale"]),
                        )
                        scales[name] = float(scalars["scale"])
                elif method == LEGACY_METHOD:
                    layers = {
                        HEAD: LayerStats(
                            *(fh.get_tensor(key).astype(np.float64) for key in ("mean", "components", "variances")),
                            maha_scale=float(meta["maha_scale"]),
                            resid_scale=float(meta["resid_scale"]),
                        )
                    }
                    scales = {HEAD: 1.0}
                else:
                    raise ModelError(f"{path}: not an applicability file (method {METHOD} or {LEGACY_METHOD})")
                orientation = None
                if "orientation" in meta:
                    o = json.loads(meta["orientation"])
                    orientation = OrientationCheck(
                        fh.get_tensor("orientation/weight")[0].astype(np.float64),
                        float(o["bias"]),
                        float(o["log_odds_threshold"]),
                        float(o["scale"]),
                        tuple(o.get("transforms", ())),
                    )
                stats = cls(layers, scales, float(meta["threshold"]), orientation)
        except (OSError, KeyError, ValueError, TypeError, AttributeError, SafetensorError) as exc:
            raise ModelError(f"{path}: unreadable applicability statistics ({exc})") from exc
        if (
            not stats.layers
            or not all(s.valid() for s in stats.layers.values())
            or not all(np.isfinite(v) and v > 0 for v in stats.scales.values())
            or (stats.orientation is not None and not stats.orientation.valid())
        ):
            raise ModelError(f"{path}: applicability statistics out of range")
        return stats


def fit(train_features: Features, n_components: Optional[int] = None) -> ApplicabilityStats:
    """PCA statistics of in-distribution features (per layer; rows = images)."""
    layers = {}
    for name, x in _by_layer(train_features).items():
        k = n_components or DEFAULT_COMPONENTS.get(name, STAGE_COMPONENTS)
        layers[name] = LayerStats.fit(x, k)
    return ApplicabilityStats(layers, {name: 1.0 for name in layers})


def calibrate(stats: ApplicabilityStats, val_features: Features, percentile: float = DEFAULT_PERCENTILE) -> float:
    """Scale each layer and set the threshold from validation scores; returns the threshold."""
    by_layer = _by_layer(val_features)
    for name, layer in stats.layers.items():
        stats.scales[name] = float(max(np.percentile(layer.score(by_layer[name]), percentile), 1e-12))
    if stats.orientation is not None:
        stats.orientation.scale = float(np.percentile(stats.distance(by_layer), percentile))
        stats.orientation.log_odds_threshold = float(
            np.percentile(stats.orientation.log_odds(by_layer[HEAD]), ORIENTATION_PERCENTILE)
        )
    stats.threshold = float(np.percentile(stats.score(by_layer), percentile))
    return stats.threshold


def summary(stats: ApplicabilityStats, percentile: float, **fitted: Any) -> dict[str, Any]:
    """What the card records about the statistics."""
    out = {
        "method": METHOD,
        "layers": stats.layer_names,
        "components": {n: int(len(s.variances)) for n, s in stats.layers.items()},
        "percentile": percentile,
        "threshold": stats.threshold,
        **fitted,
    }
    if stats.orientation is not None:
        out["orientation_check"] = {
            "transforms": list(stats.orientation.transforms),
            "layer": HEAD,
            "log_odds_threshold": stats.orientation.log_odds_threshold,
            "percentile": ORIENTATION_PERCENTILE,
        }
    return out
