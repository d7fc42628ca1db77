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
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from pneumobatch.errors import ModelError

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


def orientation_variants(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The wrongly presented copies of (N, 1, S, S) uint8 images the orientation check learns to catch."""
    return {
        "rotated 90": torch.rot90(images, 1, (2, 3)),
        "rotated 180": torch.rot90(images, 2, (2, 3)),
        "rotated 270": torch.rot90(images, 3, (2, 3)),
        "upside down": torch.flip(images, (2,)),
        "inverted": 255 - images,
    }


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
        return bool(np.isfinite(self.weight).all() and np.isfinite(self.bias)
                    and np.isfinite(self.log_odds_threshold) and self.scale > 0)


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
        return bool(np.isfinite(self.variances).all() and (self.variances > 0).all()
                    and self.maha_scale > 0 and self.resid_scale >= 0)


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
            "method": METHOD, "threshold": repr(self.threshold), "info": json.dumps(info),
            "layers": json.dumps({name: {"maha_scale": s.maha_scale, "resid_scale": s.resid_scale,
                                         "scale": self.scales.get(name, 1.0)} for name, s in self.layers.items()}),
        }
        if self.orientation is not None:
            o = self.orientation
            meta["orientation"] = json.dumps({"bias": o.bias, "log_odds_threshold": o.log_odds_threshold,
                                              "scale": o.scale, "transforms": list(o.transforms)})
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
                            *(fh.get_tensor(f"{name}/{key}").astype(np.float64) for key in ("mean", "components", "variances")),
                            maha_scale=float(scalars["maha_scale"]), resid_scale=float(scalars["resid_scale"]),
                        )
                        scales[name] = float(scalars["scale"])
                elif method == LEGACY_METHOD:
                    layers = {HEAD: LayerStats(
                        *(fh.get_tensor(key).astype(np.float64) for key in ("mean", "components", "variances")),
                        maha_scale=float(meta["maha_scale"]), resid_scale=float(meta["resid_scale"]),
                    )}
                    scales = {HEAD: 1.0}
                else:
                    raise ModelError(f"{path}: not an applicability file (method {METHOD} or {LEGACY_METHOD})")
                orientation = None
                if "orientation" in meta:
                    o = json.loads(meta["orientation"])
                    orientation = OrientationCheck(
                        fh.get_tensor("orientation/weight")[0].astype(np.float64), float(o["bias"]),
                        float(o["log_odds_threshold"]), float(o["scale"]), tuple(o.get("transforms", ())),
                    )
                stats = cls(layers, scales, float(meta["threshold"]), orientation)
        except (OSError, KeyError, ValueError, TypeError, AttributeError, SafetensorError) as exc:
            raise ModelError(f"{path}: unreadable applicability statistics ({exc})") from exc
        if not stats.layers or not all(s.valid() for s in stats.layers.values()) or not all(
            np.isfinite(v) and v > 0 for v in stats.scales.values()
        ) or (stats.orientation is not None and not stats.orientation.valid()):
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
        stats.orientation.log_odds_threshold = float(np.percentile(stats.orientation.log_odds(by_layer[HEAD]), ORIENTATION_PERCENTILE))
    stats.threshold = float(np.percentile(stats.score(by_layer), percentile))
    return stats.threshold


def default_layers(architecture: str, net: nn.Module) -> list[str]:
    """The layers the statistics use: the architecture's stages (models registry) and the head."""
    from pneumobatch.models import ARCHITECTURES

    stages = ARCHITECTURES[architecture].stages
    return [*(stages(net) if stages else []), HEAD]


class FeatureTap:
    """Captures the features of named layers during a forward pass.

    ``HEAD`` is the input of the classifier layer (flattened); any other name is a
    module of the network (``net.get_submodule``) whose output is summarised by its
    channel means and (population) standard deviations over the image.
    """

    def __init__(self, net: nn.Module, head: nn.Module, layers: Sequence[str]) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in layers:
            if name == HEAD:
                self._handles.append(head.register_forward_hook(self._head_hook))
                continue
            try:
                module = net.get_submodule(name)
            except AttributeError as exc:
                raise ModelError(f"applicability statistics name layer {name!r}, which the network lacks") from exc
            self._handles.append(module.register_forward_hook(self._stage_hook(name)))

    def _head_hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.features[HEAD] = torch.flatten(inputs[0], 1).detach().float().cpu()

    def _stage_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = output.detach().float()
            self.features[name] = torch.cat([x.mean((2, 3)), x.std((2, 3), correction=0)], 1).cpu()

        return hook

    def numpy(self) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in self.features.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def tap(loaded: Any, layers: Optional[Sequence[str]] = None) -> FeatureTap:
    """A FeatureTap on a loaded model: its statistics' layers, or the default ones."""
    from pneumobatch.models import ARCHITECTURES

    card, net = loaded.card, loaded.net
    if layers is None:
        layers = loaded.applicability.layer_names if loaded.applicability is not None else default_layers(card.architecture, net)
    return FeatureTap(net, ARCHITECTURES[card.architecture].head(net), layers)


@torch.no_grad()
def extract_features(loaded: Any, images: torch.Tensor, batch_size: int = 64,
                     layers: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Per-layer features of uint8 images (N, 1, S, S) already at the model's input size."""
    from pneumobatch.preprocess import normalize

    card, net = loaded.card, loaded.net.eval()
    hook = tap(loaded, layers)
    out: dict[str, list[np.ndarray]] = {}
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].float() / 255.0, card.mean, card.std)
            net(x.contiguous(memory_format=torch.channels_last))
            for name, value in hook.numpy().items():
                out.setdefault(name, []).append(value)
    finally:
        hook.close()
    return {name: np.concatenate(parts) for name, parts in out.items()}


def fit_features(loaded: Any, train_images: torch.Tensor, val_images: torch.Tensor,
                 percentile: float = DEFAULT_PERCENTILE) -> ApplicabilityStats:
    """Fit on training images, scale and threshold on validation images (uint8, model input size)."""
    layers = default_layers(loaded.card.architecture, loaded.net)
    train_features = extract_features(loaded, train_images, layers=layers)
    stats = fit(train_features)
    stats.orientation = fit_orientation(loaded, train_images, train_features[HEAD])
    calibrate(stats, extract_features(loaded, val_images, layers=layers), percentile)
    return stats


def fit_orientation(loaded: Any, images: torch.Tensor, upright_head: np.ndarray, per_transform: int = ORIENTATION_IMAGES,
                    seed: int = 0) -> OrientationCheck:
    """The orientation check, fitted on ``images`` (upright) and turned copies of a random subset of them."""
    pick = torch.from_numpy(np.random.default_rng(seed).permutation(len(images))[:per_transform])
    turned = {name: extract_features(loaded, variant, layers=[HEAD])[HEAD]
              for name, variant in orientation_variants(images[pick]).items()}
    return OrientationCheck.fit(upright_head, turned)


def summary(stats: ApplicabilityStats, percentile: float, **fitted: Any) -> dict[str, Any]:
    """What the card records about the statistics."""
    out = {"method": METHOD, "layers": stats.layer_names, "components": {n: int(len(s.variances)) for n, s in stats.layers.items()},
           "percentile": percentile, "threshold": stats.threshold, **fitted}
    if stats.orientation is not None:
        out["orientation_check"] = {
            "transforms": list(stats.orientation.transforms), "layer": HEAD,
            "log_odds_threshold": stats.orientation.log_odds_threshold, "percentile": ORIENTATION_PERCENTILE,
        }
    return out


def fit_from_manifest(
    loaded: Any, manifest: Path, *, percentile: float = DEFAULT_PERCENTILE,
    workers: int = 2, only_class: Optional[str] = None, progress=lambda s: None,
) -> tuple[ApplicabilityStats, dict[str, Any]]:
    """Fit on the manifest's train split, set the threshold on its validation split.

    ``only_class`` restricts both to images of one class (e.g. a site's ``normal``
    radiographs). Returns the statistics and a summary for the model card.
    """
    from pneumobatch.train import TrainConfig, decode_split, load_labels, remove_leakage

    card = loaded.card
    config = TrainConfig(data=manifest, out_dir=manifest.parent, name=card.name, task=card.task)
    frame, task, _ = load_labels(config)
    frame, _ = remove_leakage(frame)
    if only_class:
        frame = frame[frame["cls"] == only_class]
    parts = {}
    for split in ("train", "val"):
        part = frame[frame["split"] == split]
        if len(part) < 10:
            raise ModelError(f"{manifest}: the {split} split has {len(part)} usable images; at least 10 are needed")
        progress(f"decoding {len(part)} {split} images")
        dataset, _ = decode_split(part, task, card.input_size, workers)
        parts[split] = dataset.images
    progress("fitting the statistics (features of every image at several depths)")
    stats = fit_features(loaded, parts["train"], parts["val"], percentile)
    info = summary(stats, percentile, fitted_on=str(manifest), **{"class": only_class or "all"},
                   n_train=int(len(parts["train"])), n_val=int(len(parts["val"])))
    return stats, info


def attach(loaded: Any, stats: ApplicabilityStats, info: dict[str, Any]) -> Path:
    """Write ``NAME.applicability.safetensors`` beside the weights and record it in the card.

    The card's ``applicability`` entry holds the file name, its SHA-256 (checked on
    every load), the threshold and how it was fitted. Returns the statistics' path.
    """
    from pneumobatch.atomicfile import atomic_write
    from pneumobatch.models import sha256_file, write_card

    card = loaded.card
    path = loaded.weights_path.with_name(f"{card.name}.applicability.safetensors")
    atomic_write(path, lambda tmp: stats.save(tmp, info))  # also sets the mode (safetensors writes 0600)
    card.applicability = {**info, "file": path.name, "sha256": sha256_file(path), "threshold": stats.threshold}
    loaded.applicability = stats
    write_card(card, loaded.weights_path.with_suffix(".json"))
    return path
