"""Turn a reader's image into a model input, driven by the model card.

The same steps run in training and in prediction, so what the model saw when it was
trained is what it sees in a hospital's batch:

1. ``equalize`` (cards whose ``preprocessing`` asks for it): global histogram
   equalisation by rank at the decoded resolution, so that any monotone grey-level
   mapping of an export (gamma, a VOI window, contrast, bit depth) gives the same
   input: the export's grey levels carry no information the model could learn to
   read instead of the lungs.
2. ``resize``: float32 [0, 1] image -> ``input_size`` x ``input_size`` (bilinear with
   antialiasing via Pillow's reducing gap; the aspect ratio is not kept, as in training).
3. ``normalize``: on the device, a batch of 1-channel images -> 3 channels,
   standardised with the card's mean and std.

Steps 1 and 2 are :func:`prepare`, driven by an :class:`InputSpec` derived from the card
(:func:`input_spec`); a card without ``preprocessing`` (written before this field existed: the weights shipped until now) is resized only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from PIL import Image as PILImage

if TYPE_CHECKING:  # torch only where a batch is normalised: the reading side stays torch-free
    import torch


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a float32 2-D image to ``size`` x ``size``; returns float32 in [0, 1]."""
    img = PILImage.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    if img.size != (size, size):
        img = img.resize((size, size), PILImage.Resampling.BILINEAR, reducing_gap=2.0)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


#: ``preprocessing["intensity"]`` values a card may name.
INTENSITY_STEPS = ("none", "equalize")


@dataclass(frozen=True, order=True)
class InputSpec:
    """What a model's input is made of: its side and whether grey levels are equalised.

    Models with the same spec share one decoded input per image in a batch."""

    size: int
    equalize: bool = False

    @property
    def key(self) -> str:
        """A name for the spec in column names (Ray Data) and logs: ``192`` or ``192-eq``."""
        return f"{self.size}-eq" if self.equalize else str(self.size)


def input_spec(card: Any) -> InputSpec:
    """The :class:`InputSpec` of a model card (``input_size`` and ``preprocessing``)."""
    steps: Mapping[str, Any] = getattr(card, "preprocessing", None) or {}
    return InputSpec(int(card.input_size), steps.get("intensity") == "equalize")


#: Grey levels :func:`equalize` tells apart (12 bits: finer than any 8-bit export, as fine as CR/DX data).
EQUALIZE_LEVELS = 4096


def _levels(values: np.ndarray) -> np.ndarray:
    """Grey levels (0 .. :data:`EQUALIZE_LEVELS` - 1, intp) of float32 [0, 1] values."""
    # a full-size radiograph is millions of pixels: in place, and to indices through uint16
    # (numpy casts float32 to uint16 and uint16 to intp several times faster than float32 to intp)
    scaled = np.asarray(values, dtype=np.float32) * np.float32(EQUALIZE_LEVELS - 1)
    scaled += np.float32(0.5)
    return np.clip(scaled, 0, EQUALIZE_LEVELS - 1, out=scaled).astype(np.uint16).astype(np.intp)


def _mid_ranks(counts: np.ndarray, n: int) -> np.ndarray:
    """Per grey level, the share of ``n`` pixels darker than it plus half the share at it."""
    return ((np.cumsum(counts) - 0.5 * counts) / n).astype(np.float32)


def equalize(pixels: np.ndarray) -> np.ndarray:
    """Global histogram equalisation by mid-rank: float32 [0, 1] image -> float32 in (0, 1).

    Every pixel becomes the share of pixels darker than it plus half the share equal to
    it (grey levels binned to :data:`EQUALIZE_LEVELS`), so the result depends on the
    order of the grey levels only: a monotone mapping of the input (gamma, a window,
    contrast) changes nothing beyond the binning."""
    levels = _levels(pixels)
    return _mid_ranks(np.bincount(levels.ravel(), minlength=EQUALIZE_LEVELS), levels.size)[levels]


#: Pixels :func:`value_counts` counts at a time: their index copy (intp) stays in the CPU's cache.
_COUNT_CHUNK = 1 << 18


def value_counts(index: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount(index.ravel(), minlength)``, counted a quarter-million pixels at a time: bincount
    copies its input to intp first, and for a full-size radiograph (5 million uint16 pixels) that
    copy, not the counting, is most of the time (2x faster on this machine)."""
    flat = index.reshape(-1)
    if flat.size <= _COUNT_CHUNK:
        return np.bincount(flat, minlength=minlength)
    counts = np.zeros(max(minlength, int(flat.max()) + 1), dtype=np.intp)
    for start in range(0, flat.size, _COUNT_CHUNK):
        part = np.bincount(flat[start : start + _COUNT_CHUNK])
        counts[: len(part)] += part
    return counts


def equalize_table(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """:func:`equalize` of the image ``table[index]``, computed per stored value: the levels of the
    table's values, their counts from the stored values' histogram, and one gather of the
    result; the same values, without building the image or binning its millions of pixels."""
    levels = _levels(table)
    per_value = value_counts(index, len(table))
    counts = np.bincount(levels, weights=per_value, minlength=EQUALIZE_LEVELS).astype(np.int64)  # exact integers
    return np.take(_mid_ranks(counts, index.size)[levels], index)  # take: faster than indexing, same values


def prepare_image(image: Any, spec: InputSpec) -> np.ndarray:
    """:func:`prepare` of a reader's :class:`~pneumobatch.io.readers.base.Image`; one the reader
    left as ``table[index]`` is equalised per stored value (:func:`equalize_table`, the same
    input to the last bit)."""
    if image.pixels is None and spec.equalize:
        return to_uint8(resize(equalize_table(image.table, image.index), spec.size))
    return prepare(image.display_pixels(), spec)


def prepare(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A reader's float32 [0, 1] image -> the model's uint8 (size, size) input (steps 1 and 2;
    grey levels are equalised at the decoded resolution, before the resize, so that an
    export's gamma or window is undone before any pixels are averaged)."""
    if spec.equalize:
        pixels = equalize(pixels)
    return to_uint8(resize(pixels, spec.size))


def display_image(pixels: np.ndarray, side: int) -> np.ndarray:
    """A reader's float32 [0, 1] image as uint8 grey levels, aspect ratio kept, long side at most
    ``side`` (what heatmaps are drawn over: the whole image, as the model's input covers it)."""
    h, w = pixels.shape[:2]
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = PILImage.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    if img.size != size:
        img = img.resize(size, PILImage.Resampling.BILINEAR, reducing_gap=2.0)
    return to_uint8(np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Quantise a [0, 1] image to uint8, the form inputs travel in between processes."""
    return np.round(pixels * 255.0).astype(np.uint8)


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels: int = 3) -> torch.Tensor:
    """uint8 or float batch (B, 1, H, W) -> float (B, channels, H, W) standardised."""
    import torch

    x = batch.float()
    if batch.dtype == torch.uint8:
        x = x / 255.0
    x = x.expand(-1, channels, -1, -1)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
