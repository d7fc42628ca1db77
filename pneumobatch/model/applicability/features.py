"""Applicability features: the torch hooks that read a network's stage and head activations, and fitting from them.

The statistics themselves (numpy and safetensors only) live in :mod:`pneumobatch.model.applicability.stats`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pneumobatch.core.errors import ModelError
from pneumobatch.model.applicability.stats import (
    DEFAULT_PERCENTILE,
    HEAD,
    ORIENTATION_IMAGES,
    ApplicabilityStats,
    OrientationCheck,
    calibrate,
    fit,
)


def orientation_variants(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The wrongly presented copies of (N, 1, S, S) uint8 images the orientation check learns to catch."""
    return {
        "rotated 90": torch.rot90(images, 1, (2, 3)),
        "rotated 180": torch.rot90(images, 2, (2, 3)),
        "rotated 270": torch.rot90(images, 3, (2, 3)),
        "upside down": torch.flip(images, (2,)),
        "inverted": 255 - images,
    }


def default_layers(architecture: str, net: nn.Module) -> list[str]:
    """The layers the statistics use: the architecture's stages (models registry) and the head."""
    from pneumobatch.model.registry import ARCHITECTURES

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
    from pneumobatch.model.registry import ARCHITECTURES

    card, net = loaded.card, loaded.net
    if layers is None:
        layers = (
            loaded.applicability.layer_names
            if loaded.applicability is not None
            else default_layers(card.architecture, net)
        )
    return FeatureTap(net, ARCHITECTURES[card.architecture].head(net), layers)


@torch.no_grad()
def extract_features(
    loaded: Any, images: torch.Tensor, batch_size: int = 64, layers: Optional[Sequence[str]] = None
) -> dict[str, np.ndarray]:
    """Per-layer features of uint8 images (N, 1, S, S) already at the model's input size."""
    from pneumobatch.model.preprocess import normalize

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


def fit_features(
    loaded: Any, train_images: torch.Tensor, val_images: torch.Tensor, percentile: float = DEFAULT_PERCENTILE
) -> ApplicabilityStats:
    """Fit on training images, scale and threshold on validation images (uint8, model input size)."""
    layers = default_layers(loaded.card.architecture, loaded.net)
    train_features = extract_features(loaded, train_images, layers=layers)
    stats = fit(train_features)
    stats.orientation = fit_orientation(loaded, train_images, train_features[HEAD])
    calibrate(stats, extract_features(loaded, val_images, layers=layers), percentile)
    return stats


def fit_orientation(
    loaded: Any, images: torch.Tensor, upright_head: np.ndarray, per_transform: int = ORIENTATION_IMAGES, seed: int = 0
) -> OrientationCheck:
    """The orientation check, fitted on ``images`` (upright) and turned copies of a random subset of them."""
    pick = torch.from_numpy(np.random.default_rng(seed).permutation(len(images))[:per_transform])
    turned = {
        name: extract_features(loaded, variant, layers=[HEAD])[HEAD]
        for name, variant in orientation_variants(images[pick]).items()
    }
    return OrientationCheck.fit(upright_head, turned)


def attach(loaded: Any, stats: ApplicabilityStats, info: dict[str, Any]) -> Path:
    """Write ``NAME.applicability.safetensors`` beside the weights and record it in the card.

    The card's ``applicability`` entry holds the file name, its SHA-256 (checked on
    every load), the threshold and how it was fitted. Returns the statistics' path.
    """
    from pneumobatch.io.atomicfile import atomic_write
    from pneumobatch.model.registry import sha256_file, write_card

    card = loaded.card
    path = loaded.weights_path.with_name(f"{card.name}.applicability.safetensors")
    atomic_write(path, lambda tmp: stats.save(tmp, info))  # also sets the mode (safetensors writes 0600)
    card.applicability = {**info, "file": path.name, "sha256": sha256_file(path), "threshold": stats.threshold}
    loaded.applicability = stats
    write_card(card, loaded.weights_path.with_suffix(".json"))
    return path
