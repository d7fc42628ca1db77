"""Fitting a trained model's applicability statistics on training data.

:func:`fit_training_applicability` is the end of ``train`` (train split, threshold on
validation, recorded in the card); :func:`fit_from_manifest` is ``pneumobatch
fit-applicability`` for a model already trained, reading the manifest with the same
loaders as training (:mod:`pneumobatch.training.data`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from pneumobatch.core.errors import ModelError
from pneumobatch.model.applicability.features import attach, fit_features
from pneumobatch.model.applicability.stats import DEFAULT_PERCENTILE, ApplicabilityStats, summary
from pneumobatch.model.onnx import export_for_onnx_runtime
from pneumobatch.model.preprocess import input_spec
from pneumobatch.model.registry import LoadedModel
from pneumobatch.training.data import Dataset, decode_splits, load_labels, remove_leakage


def fit_training_applicability(
    loaded: LoadedModel, train_set: Dataset, val_set: Dataset, progress: Callable[[str], None]
) -> None:
    """Applicability statistics on the train split, threshold on validation; recorded in the card."""
    progress("fitting applicability statistics (train split; threshold on validation)")
    fitted = fit_features(loaded, train_set.images, val_set.images)
    info = summary(
        fitted,
        DEFAULT_PERCENTILE,
        fitted_on="train split (threshold: val split)",
        **{"class": "all"},
        n_train=len(train_set.images),
        n_val=len(val_set.images),
    )
    attach(loaded, fitted, info)
    export_for_onnx_runtime(loaded)  # the statistics' layers are outputs of the export


def fit_from_manifest(
    loaded: LoadedModel,
    manifest: Path,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    workers: int = 2,
    only_class: Optional[str] = None,
    progress: Callable[[str], None] = lambda s: None,
) -> tuple[ApplicabilityStats, dict[str, Any]]:
    """Fit on the manifest's train split, set the threshold on its validation split.

    The manifest is read as ``train`` reads it (its default columns; the model's task),
    with the same leakage rules. ``only_class`` restricts both splits to images of one
    class (e.g. a site's ``normal`` radiographs). Returns the statistics and a summary
    for the model card.
    """
    card = loaded.card
    frame, task, _ = load_labels(manifest, card.task)
    frame, _ = remove_leakage(frame)
    if only_class:
        frame = frame[frame["cls"] == only_class]

    def at_least_ten(split: str, rows: pd.DataFrame) -> None:
        if len(rows) < 10:
            raise ModelError(f"{manifest}: the {split} split has {len(rows)} usable images; at least 10 are needed")

    parts, _ = decode_splits(frame, task, input_spec(card), workers, ("train", "val"), progress, at_least_ten)
    train_images, val_images = parts["train"].images, parts["val"].images
    progress("fitting the statistics (features of every image at several depths)")
    stats = fit_features(loaded, train_images, val_images, percentile)
    info = summary(
        stats,
        percentile,
        fitted_on=str(manifest),
        **{"class": only_class or "all"},
        n_train=int(len(train_images)),
        n_val=int(len(val_images)),
    )
    return stats, info
