"""Augmentation for the training loop, in two parts.

- :func:`export_round_trip` (per image, on the CPU, before the model's own preprocessing):
  sends an image through a random export of the kind the sources went through (resolution
  round trips with several interpolations, JPEG recompression, a crop, blur, noise), so
  that how a source was exported says nothing about the label. Every training image goes
  through the other sources' pipelines; :func:`prepare_batch` then runs ``predict``'s
  own :func:`~pneumobatch.model.preprocess.prepare` on the result.
- :func:`augment` (batched, on the training device): radiograph-safe geometry and
  brightness/contrast.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from pneumobatch.model.preprocess import InputSpec, prepare

#: What :func:`augment` does, as the model card records it.
AUGMENTATION = "rotation ±15°, zoom ±10%, shift ±5%, brightness/contrast ±20%"

#: Interpolations an export may have used (Pillow's; the box filter is OpenCV's INTER_AREA).
_RESAMPLING = (
    Image.Resampling.NEAREST,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.BOX,
    Image.Resampling.LANCZOS,
)
#: Range of the long side an export is resized to (log-uniform).
EXPORT_SIDES = (160, 1024)
#: What :func:`export_round_trip` does, as the model card records it.
EXPORT_AUGMENTATION = (
    "export round trips: crop up to 8% per side (p 0.5); long side 160-1024 px, log-uniform, by nearest, "
    "bilinear, bicubic, box or Lanczos, with or without antialiasing (p 0.8); Gaussian blur radius 0-1.2 px "
    "(p 0.25); Gaussian noise sigma up to 3/255 (p 0.25); JPEG q40-95 (p 0.6)"
)


def export_round_trip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random export of an 8-bit (H, W) image; returns float32 [0, 1] as a reader would.

    The steps and their probabilities are :data:`EXPORT_AUGMENTATION`. A greyscale
    image's RGB round trip is the identity in Pillow, so it is not simulated.
    """
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L")
    w, h = img.size
    if rng.random() < 0.5:
        left, top, right, bottom = rng.uniform(0, 0.08, 4)
        box = (round(w * left), round(h * top), w - round(w * right), h - round(h * bottom))
        if box[2] - box[0] >= 16 and box[3] - box[1] >= 16:
            img = img.crop(box)
            w, h = img.size
    if rng.random() < 0.8:
        side = math.exp(rng.uniform(math.log(EXPORT_SIDES[0]), math.log(EXPORT_SIDES[1])))
        scale = side / max(w, h)
        size = (max(16, round(w * scale)), max(16, round(h * scale)))
        method = _RESAMPLING[int(rng.integers(len(_RESAMPLING)))]
        if method != Image.Resampling.NEAREST and rng.random() < 0.5:
            # no antialiasing: what a plain cv2.resize(INTER_LINEAR) of a large image does
            arr = torch.from_numpy(np.asarray(img, dtype=np.float32))[None, None]
            mode = "bicubic" if method == Image.Resampling.BICUBIC else "bilinear"
            out = F.interpolate(arr, size=(size[1], size[0]), mode=mode, align_corners=False, antialias=False)
            img = Image.fromarray(out[0, 0].clamp(0, 255).round().to(torch.uint8).numpy(), mode="L")
        else:
            img = img.resize(size, method)
    if rng.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.2))))
    if rng.random() < 0.25:
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(0, 3), (img.size[1], img.size[0]))
        img = Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8), mode="L")
    if rng.random() < 0.6:
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=int(rng.integers(40, 96)))
        buffer.seek(0)
        img = Image.open(buffer).convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


def prepare_batch(
    raw: Sequence[np.ndarray], indices: Sequence[int], spec: InputSpec, rng: np.random.Generator
) -> torch.Tensor:
    """uint8 model inputs (B, 1, S, S) for ``raw[i]`` of ``indices``, each through one random export."""
    return torch.from_numpy(np.stack([prepare(export_round_trip(raw[i], rng), spec) for i in indices])[:, None])


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
