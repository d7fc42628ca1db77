"""Heatmaps without torch: which rows get one, their names, the overlay PNG, and maps the forward pass computed.

Where the architecture has Grad-CAM in closed form (:attr:`~pneumobatch.model.registry.Architecture.gradcam`,
EfficientNet-Lite0 at ``_conv_head``), the shipped ONNX export computes every class's map in
the forward pass (output ``gradcam``), so ``predict --heatmaps`` on the CPU costs no backward
pass, no second read of the file and no torch: each result carries its maps and its image as
displayed, and :func:`write_overlay` draws and writes the predicted class's overlay as the row
is made. Rows left without one (a resumed CSV, the Ray engine, a GPU, other architectures) get
theirs from :func:`pneumobatch.model.explain.write_heatmaps` (Captum, torch) before the CSV is
written. Both draw with :func:`scaled` and :func:`overlay`, so a heatmap is the same either way.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from PIL import Image as PILImage

from pneumobatch.core.errors import Status
from pneumobatch.io.atomicfile import atomic_write
from pneumobatch.io.predictions import HEATMAP_COLUMN

if TYPE_CHECKING:
    from pneumobatch.core.card import ModelCard

#: Long side of the overlays, in pixels (smaller images keep their size).
DISPLAY_SIDE = 1024
#: Share of each side that is the border band (markers, text, collimation sit there).
BORDER_BAND = 0.125
#: A row whose heatmap could not be made keeps its prediction and says so in ``warnings``.
HEATMAP_FAILED = "heatmap-failed"
METHOD = "gradcam"


def scaled(maps: np.ndarray, size: int) -> np.ndarray:
    """Rectified Grad-CAM maps (B, h, w) -> (B, size, size) in [0, 1]: min-max per map, then
    bilinear to the model's input size (as pytorch-grad-cam scales them)."""
    out = np.empty((len(maps), size, size), dtype=np.float32)
    for i, m in enumerate(np.asarray(maps, dtype=np.float32)):
        m = np.nan_to_num(m - m.min(), nan=0.0)
        m = m / (m.max() + 1e-7)
        img = PILImage.fromarray(np.ascontiguousarray(m), mode="F").resize((size, size), PILImage.Resampling.BILINEAR)
        out[i] = np.clip(np.asarray(img), 0.0, 1.0)
    return out


def border_share(heatmap: np.ndarray, band: float = BORDER_BAND) -> float:
    """Share of a heatmap's mass in the outer ``band`` of each side (a uniform map: 1 - (1 - 2 band)^2,
    0.4375 for 12.5%). Markers, burned-in text and collimation edges sit there, lungs rarely."""
    h, w = heatmap.shape
    bh, bw = max(1, round(h * band)), max(1, round(w * band))
    total = float(heatmap.sum())
    if total <= 0:
        return float("nan")
    inner = float(heatmap[bh : h - bh, bw : w - bw].sum())
    return (total - inner) / total


def jet(values: np.ndarray) -> np.ndarray:
    """The JET colour map (MATLAB's: dark blue, cyan, yellow, red, dark red) of values in [0, 1], RGB in [0, 255]."""
    v = np.asarray(values, dtype=np.float32)[..., None]
    centres = np.asarray([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0) * 255.0


def overlay(display: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """RGB uint8: the grey image with the heatmap in colour (JET), opaque where the map is high and
    clear where it is low, so the radiograph stays readable under a cold map."""
    h, w = display.shape
    heat = np.asarray(PILImage.fromarray(heatmap.astype(np.float32), mode="F").resize((w, h), PILImage.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    alpha = (0.65 * heat)[..., None]
    grey = display[..., None].astype(np.float32)
    return np.round(grey * (1 - alpha) + jet(heat) * alpha).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(rgb, mode="RGB").save(buffer, format="PNG", compress_level=1)  # fast: 1/5 of level 6's time
    return buffer.getvalue()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def heatmap_name(row: dict[str, Any]) -> str:
    """The overlay's file name for a CSV row: from the row's file path, size, modification time,
    model and weights (never from header text), so a changed file or model gets a new name."""
    key = "\0".join(str(row.get(k, "")) for k in ("path", "file_size", "file_mtime_ns", "model", "weights_sha256"))
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    stem = _UNSAFE.sub("_", str(row.get("path", ""))).strip("._")[-80:] or "image"
    model = _UNSAFE.sub("_", str(row.get("model", ""))).strip("._")[:40] or "model"
    return f"{stem}-{digest}-{model}.png"


def wanted(card: ModelCard, label: str, mode: str) -> bool:
    """Whether a row predicted ``label`` by ``card`` gets a heatmap in ``mode`` (:data:`pneumobatch.io.predictions.HEATMAP_MODES`)."""
    return label in card.classes and (mode == "all" or card.is_finding(label))


@dataclass
class HeatmapCounts:
    written: int = 0
    kept: int = 0
    failed: int = 0


def _written(path: Path) -> bool:
    """Whether an overlay of this name is already there (written atomically: complete, or absent)."""
    return path.is_file() and not path.is_symlink()


def row_heatmap(row: dict[str, Any], folder: Path) -> str:
    """A row's heatmap path as the CSV holds it: relative to the CSV's folder."""
    return f"{folder.name}/{heatmap_name(row)}"


def write_overlay(
    row: dict[str, Any], card: ModelCard, cams: Optional[np.ndarray], display: Optional[np.ndarray], folder: Path
) -> bool:
    """Draw and write a row's overlay from maps the forward pass computed (``cams``: every class's,
    (C, h, w)) and sets its ``heatmap`` cell; False (nothing written) when the result has none."""
    if cams is None or display is None or row.get("status") != Status.OK.value:
        return False
    heat = scaled(cams[[card.output_index(row["pred_label"], row.get("fine_label"))]], int(card.input_size))[0]
    atomic_write(folder / heatmap_name(row), png_bytes(overlay(display, heat)))
    row[HEATMAP_COLUMN] = row_heatmap(row, folder)
    return True


#: rows still without a heatmap: file path -> [(row of the frame, model name, class index)]
Todo = dict[str, list[tuple[int, str, int]]]


def layer_name(card: ModelCard) -> str:
    """The layer a card's heatmaps come from, for run.json: its ``explain.layer``, else the one its
    export computes maps at (the architecture's default, ``onnx.gradcam_layer``), else ``default``."""
    return str((card.explain or {}).get("layer") or (card.onnx or {}).get("gradcam_layer") or "default")


def open_folder(folder: Path) -> None:
    """Create the heatmaps folder (never through a link, never over a file)."""
    from pneumobatch.core.errors import OutputError

    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputError(f"{folder} is not a folder this run may write heatmaps into")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write heatmaps into {folder}: {exc.strerror or exc}") from exc


def plan(frame: Any, cards: dict[str, ModelCard], folder: Path, mode: str) -> tuple[Todo, HeatmapCounts]:
    """Set the ``heatmap`` cell (in place) of every row that wants one (:func:`wanted`) and whose overlay
    is in ``folder`` under its name (:func:`heatmap_name`: same file, size, time, model and weights:
    written by this run or the run it resumes), empty the others; return the rows still without one."""
    if HEATMAP_COLUMN not in frame.columns:
        frame[HEATMAP_COLUMN] = ""
    col = frame.columns.get_loc(HEATMAP_COLUMN)
    todo: Todo = {}
    counts = HeatmapCounts()
    for i, row in enumerate(frame.to_dict("records")):
        frame.iat[i, col] = ""
        card = cards.get(str(row["model"]))
        label = str(row["pred_label"])
        if row["status"] != Status.OK.value or card is None or not wanted(card, label, mode):
            continue
        if _written(folder / heatmap_name(row)):
            frame.iat[i, col] = row_heatmap(row, folder)
            counts.kept += 1
        else:
            todo.setdefault(str(row["path"]), []).append(
                (i, card.name, card.output_index(label, row.get("fine_label")))
            )
    return todo, counts


def mark_failed(frame: Any, jobs: list[tuple[int, str, int]], counts: HeatmapCounts) -> None:
    """Rows whose heatmap could not be made: ``heatmap-failed`` in ``warnings``."""
    col = frame.columns.get_loc("warnings")
    for i, _, _ in jobs:
        frame.iat[i, col] = " ".join(str(frame.iat[i, col]).split() + [HEATMAP_FAILED])
        counts.failed += 1


def computes_maps(model: Any) -> bool:
    """Whether a model's forward pass gives Grad-CAM maps (an ONNX export with the ``gradcam`` output)."""
    from pneumobatch.model.runtime import GRADCAM_OUTPUT, OnnxModel

    return isinstance(model, OnnxModel) and GRADCAM_OUTPUT in (model.card.onnx or {}).get("outputs", [])
