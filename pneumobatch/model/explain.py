"""What a model looked at: Grad-CAM heatmaps (Captum) and the PNG overlays ``predict --heatmaps`` writes.

A heatmap is the Grad-CAM of one class (Selvaraju et al., ICCV 2017) at the layer the
model card names (``explain.layer``; else the architecture's last convolutional features,
:attr:`~pneumobatch.model.registry.Architecture.cam_layer`), computed on exactly the input
the model was given (:func:`~pneumobatch.model.preprocess.prepare`), scaled to [0, 1] per
image, and laid over the whole image as read (aspect ratio kept: the input is the whole
image squeezed to a square, so the map is stretched back the same way).

``predict --heatmaps positive`` explains the rows whose decision is a finding
(:meth:`~pneumobatch.core.card.ModelCard.is_finding`: the positive class of the pneumonia
model, any class but normal of the etiology model), ``all`` every row with a prediction; the
class explained is always the predicted one. :func:`write_heatmaps` runs after every file
has its row, over the whole CSV about to be written, so a resumed run (or a run resumed
with ``--heatmaps`` on a finished CSV) writes the missing heatmaps only.
This module needs torch (gradients); the rest of ``predict`` does not.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

from pneumobatch.core.errors import ModelError, OutputError, Status
from pneumobatch.io.atomicfile import atomic_write
from pneumobatch.io.predictions import HEATMAP_COLUMN, HEATMAP_MODES
from pneumobatch.model.preprocess import InputSpec, input_spec, normalize
from pneumobatch.model.registry import ARCHITECTURES

if TYPE_CHECKING:
    import pandas as pd

    from pneumobatch.core.card import ModelCard
    from pneumobatch.io.discovery import FileEntry
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.model.registry import LoadedModel

log = logging.getLogger(__name__)

#: Long side of the overlays, in pixels (smaller images keep their size).
DISPLAY_SIDE = 1024
#: Share of each side that is the border band (markers, text, collimation sit there).
BORDER_BAND = 0.125
#: A row whose heatmap could not be made keeps its prediction and says so in ``warnings``.
HEATMAP_FAILED = "heatmap-failed"
METHOD = "gradcam"


def cam_layer_name(card: ModelCard) -> str:
    """The module heatmaps are computed at: the card's ``explain.layer``, else the architecture's."""
    name = str((card.explain or {}).get("layer") or "")
    if not name:
        arch = ARCHITECTURES.get(card.architecture)
        name = arch.cam_layer if arch is not None else ""
    if not name:
        raise ModelError(f"model {card.name}: no layer for heatmaps (set explain.layer in its card)")
    return name


def cam_layer(net: torch.nn.Module, card: ModelCard) -> torch.nn.Module:
    name = cam_layer_name(card)
    try:
        return net.get_submodule(name)
    except AttributeError:
        raise ModelError(f"model {card.name}: heatmap layer {name!r} is not a module of its network") from None


class GradCam:
    """Grad-CAM of one network at its card's layer (Captum's ``LayerGradCam``), for batches of uint8
    model inputs; the maps are pytorch-grad-cam's ``GradCAM`` ones (tests/model/test_explain.py)."""

    def __init__(self, model: LoadedModel, device: torch.device) -> None:
        from captum.attr import LayerGradCam

        self.card = model.card
        self.net = model.net.to(device).eval()
        self.device = device
        self.layer = cam_layer_name(model.card)
        target = cam_layer(self.net, model.card)
        # Grad-CAM needs the gradient at the target layer only: with the weights below it frozen,
        # backward stops there instead of running down the whole network (2x faster on a CPU; the
        # same maps)
        if any(True for _ in target.parameters()):
            for p in self.net.parameters():
                p.requires_grad_(False)
            for p in target.parameters():
                p.requires_grad_(True)
        self._cam = LayerGradCam(self.net, target)

    def __call__(self, inputs: np.ndarray, classes: Sequence[int]) -> np.ndarray:
        """Heatmaps (B, S, S) in [0, 1] of ``classes[i]`` for each uint8 input (B, 1, S, S): the
        rectified Grad-CAM, min-max scaled per image, resized (bilinear) to the input's size."""
        from captum.attr import LayerAttribution

        x = normalize(torch.from_numpy(np.asarray(inputs)).to(self.device), self.card.mean, self.card.std)
        target = torch.as_tensor(list(classes), dtype=torch.long, device=self.device)
        with torch.enable_grad():
            cam = self._cam.attribute(x, target=target, relu_attributions=True).detach().float()
        cam = cam - cam.amin(dim=(2, 3), keepdim=True)
        cam = cam / (cam.amax(dim=(2, 3), keepdim=True) + 1e-7)
        size = tuple(x.shape[-2:])
        maps = LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")[:, 0]
        return np.nan_to_num(maps.cpu().numpy(), nan=0.0).clip(0.0, 1.0)


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
    import io

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
    """Whether a row predicted ``label`` by ``card`` gets a heatmap in ``mode`` (:data:`HEATMAP_MODES`)."""
    return label in card.classes and (mode == "all" or card.is_finding(label))


@dataclass
class HeatmapCounts:
    written: int = 0
    kept: int = 0
    failed: int = 0


def _written(path: Path) -> bool:
    """Whether an overlay of this name is already there (written atomically: complete, or absent)."""
    return path.is_file() and not path.is_symlink()


def write_heatmaps(
    frame: pd.DataFrame,
    models: Sequence[LoadedModel],
    entries: Sequence[FileEntry],
    out_csv: Path,
    folder: Path,
    mode: str,
    options: ReadOptions,
    *,
    reuse: bool,
    device: torch.device,
    workers: int,
    threads: int,
    batch_size: int = 16,
    progress: Optional[Callable[[int, int], None]] = None,
) -> HeatmapCounts:
    """Fill ``frame``'s :data:`HEATMAP_COLUMN` (in place) for the rows that want a heatmap: with
    ``reuse`` (``--resume``) an overlay already in ``folder`` under the row's name
    (:func:`heatmap_name`: same file, size, time, model and weights) is kept; the others are
    made (the file read again, the model's input rebuilt, Grad-CAM of the predicted class, the
    overlay written atomically). A row whose file cannot be read again keeps its prediction, no
    heatmap and ``heatmap-failed`` in ``warnings``; other rows' cells are emptied."""
    from pneumobatch.model.decoding import decode_in_processes

    if mode not in HEATMAP_MODES:
        raise ModelError(f"--heatmaps must be one of {', '.join(HEATMAP_MODES)}, not {mode!r}")
    counts = HeatmapCounts()
    if HEATMAP_COLUMN not in frame.columns:
        frame[HEATMAP_COLUMN] = ""
    by_name = {m.card.name: m for m in models}
    base = out_csv.parent
    todo: dict[str, list[tuple[int, str, int]]] = {}  # path -> [(frame row, model, class index)]
    col = frame.columns.get_loc(HEATMAP_COLUMN)
    for i, row in enumerate(frame.to_dict("records")):
        frame.iat[i, col] = ""
        model = by_name.get(str(row["model"]))
        if row["status"] != Status.OK.value or model is None or not wanted(model.card, str(row["pred_label"]), mode):
            continue
        rel = f"{folder.name}/{heatmap_name(row)}"
        if reuse and _written(base / rel):
            frame.iat[i, col] = rel
            counts.kept += 1
            continue
        todo.setdefault(str(row["path"]), []).append((i, model.card.name, model.card.classes.index(row["pred_label"])))
    if not todo:
        return counts
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputError(f"{folder} is not a folder this run may write heatmaps into")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write heatmaps into {folder}: {exc.strerror or exc}") from exc
    wanted_entries = [e for e in entries if e.relpath in todo]
    specs = sorted({input_spec(by_name[name].card) for jobs in todo.values() for _, name, _ in jobs})
    cams = {name: GradCam(by_name[name], device) for name in {n for jobs in todo.values() for _, n, _ in jobs}}
    log.info("heatmaps: %d images to explain (%d already written)", len(wanted_entries), counts.kept)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    done = 0
    try:
        chunks = decode_in_processes(
            wanted_entries, specs, options, workers=workers, chunk=batch_size, display_side=DISPLAY_SIDE
        )
        for items, inputs, ok in chunks:
            _explain_chunk(frame, items, inputs, ok, wanted_entries, todo, cams, base, folder, counts)
            done += len(items)
            if progress:
                progress(done, len(wanted_entries))
    finally:
        torch.set_num_threads(previous)
    return counts


def _fail(frame: pd.DataFrame, jobs: Sequence[tuple[int, str, int]], counts: HeatmapCounts) -> None:
    col = frame.columns.get_loc("warnings")
    for i, _, _ in jobs:
        words = str(frame.iat[i, col]).split()
        frame.iat[i, col] = " ".join(words + [HEATMAP_FAILED])
        counts.failed += 1


def _explain_chunk(
    frame: pd.DataFrame,
    items: list[dict[str, Any]],
    inputs: dict[InputSpec, np.ndarray],
    ok: list[int],
    entries: Sequence[FileEntry],
    todo: dict[str, list[tuple[int, str, int]]],
    cams: dict[str, GradCam],
    base: Path,
    folder: Path,
    counts: HeatmapCounts,
) -> None:
    position = {item_index: row for row, item_index in enumerate(ok)}  # item -> row of the stacked inputs
    col = frame.columns.get_loc(HEATMAP_COLUMN)
    for name, cam in cams.items():
        spec = input_spec(cam.card)
        jobs = [
            (k, i, c)
            for k, item in enumerate(items)
            for i, n, c in todo[entries[item["index"]].relpath]
            if n == name and k in position
        ]
        if not jobs:
            continue
        maps = cam(inputs[spec][[position[k] for k, _, _ in jobs]], [c for _, _, c in jobs])
        for (k, i, _), heat in zip(jobs, maps):
            row = frame.iloc[i].to_dict()
            rel = f"{folder.name}/{heatmap_name(row)}"
            atomic_write(base / rel, png_bytes(overlay(items[k]["display"], heat)))
            frame.iat[i, col] = rel
            counts.written += 1
    for k, item in enumerate(items):
        if item["status"] is not Status.OK or k not in position:
            log.warning(
                "heatmap of %s not written: %s", entries[item["index"]].relpath, item["detail"] or item["reason"]
            )
            _fail(frame, todo[entries[item["index"]].relpath], counts)
