"""The export-invariance test: the same images exported several ways, read and predicted as ``predict`` does.

Each image is read with the product's readers, written out again in every export of
:data:`EXPORTS` (real files: PNG, JPEG, DICOM), and the originals and all exports go
through the product's own inference path (:func:`pneumobatch.model.inference.run_inference`:
readers, reduced decode, preprocessing, batching). The table (change in the share
called positive, mean |dP|, per subgroup, with intervals) is
:func:`pneumobatch.evaluation.invariance.invariance_table`.

``train`` runs it on the test split and records the table in the card; ``pneumobatch
invariance`` runs it on a sample of a site's own images; ``benchmarks/export_invariance.py``
on a manifest's test split for the shipped models.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch
from PIL import Image as PILImage

from pneumobatch.core.errors import FileRejected, Status
from pneumobatch.evaluation.invariance import invariance_table
from pneumobatch.io.discovery import FileEntry, sniff
from pneumobatch.io.readers import ReadOptions, read_image
from pneumobatch.model.inference import create_predictor, run_inference
from pneumobatch.model.registry import LoadedModel
from pneumobatch.testing.synthetic import write_cxr

log = logging.getLogger(__name__)


def _to8(pixels: np.ndarray) -> np.ndarray:
    return np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def _long_side(pixels: np.ndarray, side: int) -> PILImage.Image:
    img = PILImage.fromarray(_to8(pixels), mode="L")
    scale = side / max(img.size)
    return img.resize(
        (max(1, round(img.width * scale)), max(1, round(img.height * scale))), PILImage.Resampling.BICUBIC
    )


def _png(img: PILImage.Image, path: Path) -> Path:
    path = path.with_suffix(".png")
    img.save(path, format="PNG")
    return path


def _jpeg(side: int, quality: int) -> Callable[[np.ndarray, Path], Path]:
    def write(pixels: np.ndarray, path: Path) -> Path:
        path = path.with_suffix(".jpg")
        _long_side(pixels, side).save(path, format="JPEG", quality=quality)
        return path

    return write


def _resave224(pixels: np.ndarray, path: Path) -> Path:
    """As the RSNA normals of the training data were redistributed: 224 x 224 bilinear, RGB PNG."""
    img = PILImage.fromarray(_to8(pixels), mode="L").resize((224, 224), PILImage.Resampling.BILINEAR)
    return _png(img.convert("RGB"), path)


def _gamma(gamma: float) -> Callable[[np.ndarray, Path], Path]:
    def write(pixels: np.ndarray, path: Path) -> Path:
        return _png(PILImage.fromarray(_to8(np.clip(pixels, 0, 1) ** gamma), mode="L"), path)

    return write


def _crop(pixels: np.ndarray, path: Path) -> Path:
    """5% cut off every side."""
    h, w = pixels.shape
    dy, dx = round(0.05 * h), round(0.05 * w)
    return _png(PILImage.fromarray(_to8(pixels[dy : h - dy, dx : w - dx]), mode="L"), path)


def _dicom(window: bool) -> Callable[[np.ndarray, Path], Path]:
    """16-bit MONOCHROME2 DX at the image's full size; with ``window``, a VOI window over the 1st-99th percentile."""

    def write(pixels: np.ndarray, path: Path) -> Path:
        path = path.with_suffix(".dcm")
        stored = np.round(np.clip(pixels, 0, 1) * 65535).astype(np.uint16)
        voi = None
        if window:
            low, high = np.percentile(stored, [1, 99])
            voi = (float((low + high) / 2), float(max(high - low, 2)))
        write_cxr(path, stored, "explicit", window=voi)
        return path

    return write


@dataclass(frozen=True)
class Export:
    """One way a site may export a radiograph: a description and a writer ``(pixels, stem) -> path``."""

    description: str
    write: Callable[[np.ndarray, Path], Path]


#: The exports of the test (issue 24's list), by name.
EXPORTS: dict[str, Export] = {
    "resave224": Export("224 x 224 bilinear, RGB PNG (the RSNA normals' redistribution)", _resave224),
    "jpeg320-q60": Export("long side 320 px, JPEG quality 60", _jpeg(320, 60)),
    "jpeg512-q75": Export("long side 512 px, JPEG quality 75", _jpeg(512, 75)),
    "jpeg1024-q95": Export("long side 1024 px, JPEG quality 95", _jpeg(1024, 95)),
    "png8": Export("8-bit PNG, full size", lambda p, s: _png(PILImage.fromarray(_to8(p), mode="L"), s)),
    "dicom16": Export("16-bit DICOM, full size, no VOI window", _dicom(window=False)),
    "dicom16-voi": Export("16-bit DICOM, full size, VOI window over the 1st-99th percentile", _dicom(window=True)),
    "gamma0.8": Export("gamma 0.8, 8-bit PNG", _gamma(0.8)),
    "gamma1.2": Export("gamma 1.2, 8-bit PNG", _gamma(1.2)),
    "crop5": Export("5% cut off every side, 8-bit PNG", _crop),
}


def _entry(path: Path) -> FileEntry:
    st = path.stat()
    return FileEntry(path, path.name, st.st_size, st.st_mtime_ns)


def write_exports(
    paths: Sequence[Path], folder: Path, exports: Sequence[str], options: ReadOptions
) -> tuple[list[Optional[dict[str, Path]]], int]:
    """Every image of ``paths`` written in each of ``exports`` under ``folder``; None where the
    original cannot be read. Returns the files per image and how many could not be read."""
    out: list[Optional[dict[str, Path]]] = []
    failed = 0
    full = ReadOptions(max_pixels=options.max_pixels, include_lateral=True, body_parts=options.body_parts)
    for i, path in enumerate(paths):
        try:
            pixels = read_image(Path(path), sniff(Path(path)), full).pixels
        except (FileRejected, OSError):
            out.append(None)
            failed += 1
            continue
        files = {}
        for name in exports:
            (folder / name).mkdir(parents=True, exist_ok=True)
            files[name] = EXPORTS[name].write(pixels, folder / name / f"{i:06d}")
        out.append(files)
    return out, failed


#: Subgroups of a site's images when no table gives them: from the readers' header values.
HEADER_SUBGROUPS = {"view_position": "view", "age_band": "age_band", "manufacturer": "manufacturer"}


def measure_invariance(
    models: Sequence[LoadedModel],
    paths: Sequence[Path],
    subgroups: Optional[pd.DataFrame] = None,
    *,
    age_bands: Optional[Sequence[Any]] = None,
    exports: Sequence[str] = tuple(EXPORTS),
    device: Optional[torch.device] = None,
    workers: int = 1,
    batch_size: int = 16,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """The export-invariance table of each model on the images ``paths`` (one row of ``subgroups`` each).

    The originals and their exports are predicted in one pass through the product's
    inference path; decisions use each card's rule with ``age_bands`` (the same band for
    an image and its exports). Without ``subgroups`` (a site's own folder), the
    subgroups and age bands are the originals' header values (:data:`HEADER_SUBGROUPS`). Images that cannot be read, and exports ``predict`` would
    not score (an error row), are left out of that export's comparison and counted.
    Returns ``{model name: table}`` plus ``exports`` (descriptions) and ``n_images``.
    """
    unknown = [e for e in exports if e not in EXPORTS]
    if unknown:
        raise ValueError(f"unknown exports {unknown}; known: {', '.join(EXPORTS)}")
    device = device or torch.device("cpu")
    options = ReadOptions(min_side=max(m.card.input_size for m in models))
    bands = np.asarray(age_bands if age_bands is not None else [None] * len(paths), dtype=object)
    with tempfile.TemporaryDirectory(prefix="pneumobatch-invariance-") as tmp:
        progress(f"writing {len(exports)} exports of {len(paths)} images")
        files, unreadable = write_exports(paths, Path(tmp), exports, options)
        keep = np.array([f is not None for f in files], dtype=bool)
        order = [Path(p) for p, k in zip(paths, keep) if k]
        for name in exports:
            order += [f[name] for f in files if f is not None]
        progress(f"predicting {len(order)} files (originals and exports)")
        predictor = create_predictor(list(models), device, "auto", "auto")
        results = list(
            run_inference([_entry(p) for p in order], predictor, options, batch_size=batch_size, workers=workers)
        )
    n = int(keep.sum())
    if subgroups is None:
        meta = [r.meta for r in results[:n]]
        frame = pd.DataFrame({label: [str(m.get(key) or "") for m in meta] for key, label in HEADER_SUBGROUPS.items()})
        kept_bands = np.asarray([m.get("age_band") or None for m in meta], dtype=object)
        if age_bands is not None:
            kept_bands = bands[keep]
    else:
        frame = subgroups.reset_index(drop=True)[keep].reset_index(drop=True)
        kept_bands = bands[keep]
    out: dict[str, Any] = {
        "exports": {name: EXPORTS[name].description for name in exports},
        "n_images": n,
        "unreadable": unreadable,
    }
    for model in models:
        card = model.card
        proba = np.full((len(results), len(card.classes)), np.nan)
        for i, r in enumerate(results):
            if r.status is Status.OK and card.name in r.probs:
                proba[i] = card.class_probs(r.probs[card.name])
        ref = proba[:n]
        scored_ref = ~np.isnan(ref).any(axis=1)
        per_export = {}
        left_out = {}
        for k, name in enumerate(exports):
            p = proba[n * (k + 1) : n * (k + 2)]
            ok = scored_ref & ~np.isnan(p).any(axis=1)
            left_out[name] = int((~ok).sum())
            per_export[name] = (ok, p)
        # one common set of images for every export, so the rows compare like with like
        common = np.logical_and.reduce([ok for ok, _ in per_export.values()]) if per_export else scored_ref
        ref_labels = card.decide_many(ref[common], kept_bands[common])
        table = invariance_table(
            card.classes,
            card.positive if card.binary else None,
            (ref[common], ref_labels),
            {name: (p[common], card.decide_many(p[common], kept_bands[common])) for name, (_, p) in per_export.items()},
            frame[common].reset_index(drop=True),
        )
        table["not_scored"] = left_out
        out[card.name] = table
    return out


def sample_files(root: Path, sample: int, seed: int = 0) -> tuple[list[Path], int]:
    """Up to ``sample`` readable-looking files under ``root`` (discovery as ``predict`` walks), drawn
    at random with ``seed``; returns them (sorted) and how many files were found."""
    from pneumobatch.io.discovery import walk

    found = sorted(entry.path for _, entry in walk([root]) if entry.problem is None)
    total = len(found)
    if total > sample:
        rng = np.random.default_rng(seed)
        found = sorted(found[i] for i in rng.choice(total, sample, replace=False))
    return found, total


@dataclass
class InvarianceConfig:
    """Options of ``pneumobatch invariance``: a sample of a site's own images, exported and predicted again."""

    folder: Path
    output: Path = Path("invariance.json")
    models: tuple[str, ...] = ("pneumonia",)
    weights_dir: Optional[Path] = None
    sample: int = 200
    exports: tuple[str, ...] = tuple(EXPORTS)
    seed: int = 0
    workers: int = 1
    overwrite: bool = False


def sample_invariance(
    config: InvarianceConfig, progress: Callable[[str], None] = lambda s: None, models: Sequence[LoadedModel] = ()
) -> dict[str, Any]:
    """The table of each model on a sample of ``config.folder`` (``config.output`` is not written):
    what ``pneumobatch invariance`` writes and ``pneumobatch audit`` includes. Subgroups are the
    images' header values (view, age band, manufacturer). ``models`` already loaded are used
    instead of loading ``config.models``."""
    from pneumobatch.core.errors import OptionError
    from pneumobatch.model.registry import load_model

    unknown = [e for e in config.exports if e not in EXPORTS]
    if unknown:
        raise OptionError(f"--export {unknown[0]}: not an export (use {', '.join(EXPORTS)})")
    models = list(models) or [load_model(name, config.weights_dir) for name in config.models]
    files, found = sample_files(Path(config.folder), config.sample, config.seed)
    if not files:
        raise OptionError(f"{config.folder}: no files to test")
    progress(f"{len(files)} of {found} files under {config.folder}")
    result = measure_invariance(models, files, exports=config.exports, workers=config.workers, progress=progress)
    result["folder"] = str(config.folder)
    result["files_found"] = found
    result["sample_seed"] = config.seed
    return result


def site_invariance(config: InvarianceConfig, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """``pneumobatch invariance``: :func:`sample_invariance` written to ``config.output`` (JSON;
    never over an existing file without ``overwrite``)."""
    import json

    from pneumobatch.core.errors import OutputExists
    from pneumobatch.io.atomicfile import atomic_write

    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise OutputExists(f"{output} exists; pass --overwrite to replace it")
    result = sample_invariance(config, progress)
    atomic_write(output, json.dumps(result, indent=1, allow_nan=False, default=str) + "\n")
    return result
