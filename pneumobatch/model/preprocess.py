"""Turn a reader's image into a model input, driven by the model card.

The same two steps run in training and in prediction, so what the model saw when
it was trained is what it sees in a hospital's batch:

1. ``resize``: float32 [0, 1] image -> ``input_size`` x ``input_size`` (bilinear with
   antialiasing via Pillow's reducing gap; the aspect ratio is not kept, as in training).
2. ``normalize``: on the device, a batch of 1-channel images -> 3 channels,
   standardised with the card's mean and std.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image as PILImage


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a float32 2-D image to ``size`` x ``size``; returns float32 in [0, 1]."""
    img = PILImage.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    if img.size != (size, size):
        img = img.resize((size, size), PILImage.Resampling.BILINEAR, reducing_gap=2.0)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Quantise a [0, 1] image to uint8, the form inputs travel in between processes."""
    return np.round(pixels * 255.0).astype(np.uint8)


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels: int = 3) -> torch.Tensor:
    """uint8 or float batch (B, 1, H, W) -> float (B, channels, H, W) standardised."""
    x = batch.float()
    if batch.dtype == torch.uint8:
        x = x / 255.0
    x = x.expand(-1, channels, -1, -1)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
