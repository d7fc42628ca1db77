"""Batched, radiograph-safe augmentation for the training loop (on the training device)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: What :func:`augment` does, as the model card records it.
AUGMENTATION = "rotation ±15°, zoom ±10%, shift ±5%, brightness/contrast ±20%"


def augment(x: torch.Tensor, generator: torch.Generator, hflip: bool) -> torch.Tensor:
    """Radiograph-safe augmentation of a float batch (B, 1, H, W) in [0, 1].

    Per image: rotation within ±15°, zoom within ±10 %, shift within ±5 %,
    brightness and contrast within ±20 %, optional horizontal flip.
    """
    b = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator).to(x.device)

    angle = uniform(-15, 15) * math.pi / 180
    scale = uniform(0.9, 1.1)
    tx, ty = uniform(-0.05, 0.05), uniform(-0.05, 0.05)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if hflip:
        flip = torch.rand(b, generator=generator).to(x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    brightness = uniform(0.8, 1.2).view(-1, 1, 1, 1)
    contrast = uniform(0.8, 1.2).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * brightness).clamp(0, 1)
