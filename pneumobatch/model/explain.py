"""What a model looked at: Grad-CAM by backward pass (Captum), for the heatmaps the forward pass did not give.

A heatmap is the Grad-CAM of one class (Selvaraju et al., ICCV 2017) at the layer the
model card names (``explain.layer``; else the architecture's last convolutional features,
:attr:`~pneumobatch.model.registry.Architecture.cam_layer`), computed on exactly the input
the model was given (:func:`~pneumobatch.model.preprocess.prepare`), scaled to [0, 1] per
image, and laid over the whole image as read (aspect ratio kept: the input is the whole
image squeezed to a square, so the map is stretched back the same way).

``predict --heatmaps positive`` explains the rows whose decision is a finding
(:meth:`~pneumobatch.core.card.ModelCard.is_finding`: the positive class of the pneumonia
model, any class but normal of the etiology model), ``all`` every row with a prediction; the
class explained is always the predicted one. Most heatmaps come from the forward pass
(:mod:`pneumobatch.model.heatmaps`); :func:`write_heatmaps` makes the rest after every file
has its row, over the whole CSV about to be written, so a resumed run (or a run resumed
with ``--heatmaps`` on a finished CSV) writes the missing heatmaps only.
This module needs torch (gradients); the rest of ``predict`` does not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from pneumobatch.core.errors import ModelError, Status
from pneumobatch.io.atomicfile import atomic_write
from pneumobatch.io.predictions import HEATMAP_COLUMN
from pneumobatch.model.heatmaps import (
    DISPLAY_SIDE,
    HeatmapCounts,
    Todo,
    heatmap_name,
    mark_failed,
    open_folder,
    overlay,
    png_bytes,
    row_heatmap,
    scaled,
)
from pneumobatch.model.preprocess import InputSpec, input_spec, normalize
from pneumobatch.model.registry import ARCHITECTURES

if TYPE_CHECKING:
    import pandas as pd

    from pneumobatch.core.card import ModelCard
    from pneumobatch.io.discovery import FileEntry
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.model.registry import LoadedModel

log = logging.getLogger(__name__)


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
        x = normalize(torch.from_numpy(np.asarray(inputs)).to(self.device), self.card.mean, self.card.std)
        target = torch.as_tensor(list(classes), dtype=torch.long, device=self.device)
        with torch.enable_grad():
            cam = self._cam.attribute(x, target=target, relu_attributions=True).detach().float()
        return scaled(cam[:, 0].cpu().numpy(), int(x.shape[-1]))


def write_heatmaps(
    frame: pd.DataFrame,
    todo: Todo,
    models: Sequence[LoadedModel],
    entries: Sequence[FileEntry],
    folder: Path,
    options: ReadOptions,
    counts: HeatmapCounts,
    *,
    device: torch.device,
    workers: int,
    threads: int,
    batch_size: int = 16,
) -> None:
    """Make the heatmaps :func:`~pneumobatch.model.heatmaps.plan` found missing (in place): the files
    read again in ``workers`` processes, the models' inputs rebuilt, Grad-CAM of the predicted class
    (Captum), the overlays written atomically and their cells set. A row whose file cannot be read
    again keeps its prediction, no heatmap and ``heatmap-failed`` in ``warnings``."""
    import dataclasses

    from pneumobatch.model.decoding import decode_in_processes

    if not todo:
        return
    open_folder(folder)
    by_name = {m.card.name: m for m in models}
    needed = [e for e in entries if e.relpath in todo]
    names = {n for jobs in todo.values() for _, n, _ in jobs}
    specs = sorted({input_spec(by_name[n].card) for n in names})
    cams = {n: GradCam(by_name[n], device) for n in names}
    log.info("heatmaps: %d images to explain again (%d already written)", len(needed), counts.kept)
    options = dataclasses.replace(options, display_side=DISPLAY_SIDE)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for items, inputs, ok in decode_in_processes(needed, specs, options, workers=workers, chunk=batch_size):
            _explain_chunk(frame, items, inputs, ok, needed, todo, cams, folder, counts)
    finally:
        torch.set_num_threads(previous)


def _explain_chunk(
    frame: pd.DataFrame,
    items: list[dict[str, Any]],
    inputs: dict[InputSpec, np.ndarray],
    ok: list[int],
    entries: Sequence[FileEntry],
    todo: Todo,
    cams: dict[str, GradCam],
    folder: Path,
    counts: HeatmapCounts,
) -> None:
    position = {item_index: row for row, item_index in enumerate(ok)}  # item -> row of the stacked inputs
    col = frame.columns.get_loc(HEATMAP_COLUMN)
    for name, cam in cams.items():
        jobs = [
            (k, i, c)
            for k, item in enumerate(items)
            for i, n, c in todo[entries[item["index"]].relpath]
            if n == name and k in position
        ]
        if not jobs:
            continue
        maps = cam(inputs[input_spec(cam.card)][[position[k] for k, _, _ in jobs]], [c for _, _, c in jobs])
        for (k, i, _), heat in zip(jobs, maps):
            row = frame.iloc[i].to_dict()
            atomic_write(folder / heatmap_name(row), png_bytes(overlay(items[k]["display"], heat)))
            frame.iat[i, col] = row_heatmap(row, folder)
            counts.written += 1
    for k, item in enumerate(items):
        if item["status"] is not Status.OK or k not in position:
            path = entries[item["index"]].relpath
            log.warning("heatmap of %s not written: %s", path, item["detail"] or item["reason"])
            mark_failed(frame, todo[path], counts)
