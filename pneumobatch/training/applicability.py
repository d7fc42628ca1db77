"""Fitting a trained model's applicability statistics from a manifest (``pneumobatch fit-applicability``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pneumobatch.core.errors import ModelError
from pneumobatch.model.applicability.features import fit_features
from pneumobatch.model.applicability.stats import DEFAULT_PERCENTILE, ApplicabilityStats, summary


def fit_from_manifest(
    loaded: Any,
    manifest: Path,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    workers: int = 2,
    only_class: Optional[str] = None,
    progress=lambda s: None,
) -> tuple[ApplicabilityStats, dict[str, Any]]:
    """Fit on the manifest's train split, set the threshold on its validation split.

    ``only_class`` restricts both to images of one class (e.g. a site's ``normal``
    radiographs). Returns the statistics and a summary for the model card.
    """
    from pneumobatch.training.config import TrainConfig
    from pneumobatch.training.train import decode_split, load_labels, remove_leakage

    card = loaded.card
    config = TrainConfig(data=manifest, out_dir=manifest.parent, name=card.name, task=card.task)
    frame, task, _ = load_labels(config)
    frame, _ = remove_leakage(frame)
    if only_class:
        frame = frame[frame["cls"] == only_class]
    parts = {}
    for split in ("train", "val"):
        part = frame[frame["split"] == split]
        if len(part) < 10:
            raise ModelError(f"{manifest}: the {split} split has {len(part)} usable images; at least 10 are needed")
        progress(f"decoding {len(part)} {split} images")
        dataset, _ = decode_split(part, task, card.input_size, workers)
        parts[split] = dataset.images
    progress("fitting the statistics (features of every image at several depths)")
    stats = fit_features(loaded, parts["train"], parts["val"], percentile)
    info = summary(
        stats,
        percentile,
        fitted_on=str(manifest),
        **{"class": only_class or "all"},
        n_train=int(len(parts["train"])),
        n_val=int(len(parts["val"])),
    )
    return stats, info
