"""Is an image like the frontal chest radiographs a model was trained on?

The model's own penultimate features (the input of its classifier layer) of the
training images define "like". The statistics are a PCA of those features: the
mean, the top ``k`` principal directions with their variances, and the mean squared
residual outside them. An image's score combines its Mahalanobis distance inside the
PCA subspace and its residual outside it, each divided by its mean on the training
images, so a typical training image scores about 1:

    score = (maha2_k / mean_train(maha2_k) + resid2 / mean_train(resid2)) / 2

The flag threshold is a high percentile (default 99th) of the validation images'
scores, so about 1% of in-distribution images are flagged by construction; the
README gives the measured rates on test chest images and on non-chest images.

The statistics live in ``NAME.applicability.safetensors`` beside the weights (the
card holds its SHA-256 and the threshold); ``pneumobatch fit-applicability``
computes them for any model, for example on a site's own normal radiographs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from pneumobatch.errors import ModelError

METHOD = "pca-mahalanobis+residual"
DEFAULT_COMPONENTS = 64
DEFAULT_PERCENTILE = 99.0


@dataclass
class ApplicabilityStats:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,)
    maha_scale: float
    resid_scale: float
    threshold: float = float("inf")

    def score(self, features: np.ndarray) -> np.ndarray:
        centred = np.asarray(features, dtype=np.float64) - self.mean
        z = centred @ self.components.T
        maha2 = (z**2 / self.variances).sum(1)
        resid2 = (centred**2).sum(1) - (z**2).sum(1)
        return 0.5 * (maha2 / self.maha_scale + np.maximum(resid2, 0) / self.resid_scale)

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """True where an image is applicable (score within the threshold)."""
        return np.asarray(scores) <= self.threshold

    def save(self, path: Path, info: dict[str, Any]) -> None:
        from safetensors.numpy import save_file

        tensors = {
            "mean": self.mean.astype(np.float32), "components": self.components.astype(np.float32),
            "variances": self.variances.astype(np.float32),
        }
        meta = {"method": METHOD, "maha_scale": repr(self.maha_scale), "resid_scale": repr(self.resid_scale),
                "threshold": repr(self.threshold), "info": json.dumps(info)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> ApplicabilityStats:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                if meta.get("method") != METHOD:
                    raise ModelError(f"{path}: not an applicability file of method {METHOD}")
                stats = cls(
                    mean=fh.get_tensor("mean").astype(np.float64),
                    components=fh.get_tensor("components").astype(np.float64),
                    variances=fh.get_tensor("variances").astype(np.float64),
                    maha_scale=float(meta["maha_scale"]), resid_scale=float(meta["resid_scale"]),
                    threshold=float(meta["threshold"]),
                )
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise ModelError(f"{path}: unreadable applicability statistics ({exc})") from exc
        if not (np.isfinite(stats.variances).all() and (stats.variances > 0).all() and stats.maha_scale > 0 and stats.resid_scale > 0):
            raise ModelError(f"{path}: applicability statistics out of range")
        return stats


def fit(train_features: np.ndarray, n_components: int = DEFAULT_COMPONENTS) -> ApplicabilityStats:
    """PCA statistics of in-distribution features (rows = images)."""
    x = np.asarray(train_features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError("need at least 3 feature vectors to fit applicability statistics")
    mean = x.mean(0)
    centred = x - mean
    k = int(min(n_components, len(x) - 1, x.shape[1]))
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    variances = np.maximum((s[:k] ** 2) / (len(x) - 1), 1e-12)
    stats = ApplicabilityStats(mean, vt[:k], variances, 1.0, 1.0)
    z = centred @ stats.components.T
    stats.maha_scale = float(max((z**2 / variances).sum(1).mean(), 1e-12))
    stats.resid_scale = float(max(((centred**2).sum(1) - (z**2).sum(1)).mean(), 1e-12))
    return stats


def calibrate(stats: ApplicabilityStats, val_features: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
    """Set the threshold to a percentile of validation scores; returns it."""
    stats.threshold = float(np.percentile(stats.score(val_features), percentile))
    return stats.threshold


class FeatureHook:
    """Captures the input of a network's classifier layer (its penultimate features)."""

    def __init__(self, head: nn.Module) -> None:
        self.features: Optional[torch.Tensor] = None
        self._handle = head.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.features = torch.flatten(inputs[0], 1).detach().float().cpu()

    def close(self) -> None:
        self._handle.remove()


@torch.no_grad()
def extract_features(loaded: Any, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Penultimate features of uint8 images (N, 1, S, S) already at the model's input size."""
    from pneumobatch.models import ARCHITECTURES
    from pneumobatch.preprocess import normalize

    card, net = loaded.card, loaded.net.eval()
    hook = FeatureHook(ARCHITECTURES[card.architecture].head(net))
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].float() / 255.0, card.mean, card.std)
            net(x.contiguous(memory_format=torch.channels_last))
            out.append(hook.features.numpy())
    finally:
        hook.close()
    return np.concatenate(out) if out else np.zeros((0, 0))


def fit_from_manifest(
    loaded: Any, manifest: Path, *, percentile: float = DEFAULT_PERCENTILE, n_components: int = DEFAULT_COMPONENTS,
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
        parts[split] = extract_features(loaded, dataset.images)
    stats = fit(parts["train"], n_components)
    calibrate(stats, parts["val"], percentile)
    info = {
        "method": METHOD, "components": int(len(stats.variances)), "percentile": percentile,
        "threshold": stats.threshold, "fitted_on": str(manifest), "class": only_class or "all",
        "n_train": int(len(parts["train"])), "n_val": int(len(parts["val"])),
    }
    return stats, info


def attach(loaded: Any, stats: ApplicabilityStats, info: dict[str, Any]) -> Path:
    """Write ``NAME.applicability.safetensors`` beside the weights and record it in the card.

    The card's ``applicability`` entry holds the file name, its SHA-256 (checked on
    every load), the threshold and how it was fitted. Returns the statistics' path.
    """
    from pneumobatch.atomicfile import atomic_write
    from pneumobatch.models import sha256_file

    card = loaded.card
    path = loaded.weights_path.with_name(f"{card.name}.applicability.safetensors")
    atomic_write(path, lambda tmp: stats.save(tmp, info))  # also sets the mode (safetensors writes 0600)
    card.applicability = {**info, "file": path.name, "sha256": sha256_file(path), "threshold": stats.threshold}
    atomic_write(loaded.weights_path.with_suffix(".json"), json.dumps(card.to_dict(), indent=2) + "\n")
    return path
