"""Checks a training run can start, made in seconds before any image is decoded.

``pneumobatch train`` runs them first; a library caller of
:func:`pneumobatch.training.loop.train` can too, and gets the same errors: an existing
model without ``overwrite`` or ``resume``, a --device this machine lacks, missing --init
weights, an output folder that cannot be written.
"""

from __future__ import annotations

import os
from pathlib import Path

from pneumobatch.core.errors import ModelError, OutputError, OutputExists
from pneumobatch.training.config import TrainConfig


def check_train_inputs(config: TrainConfig, overwrite: bool = False) -> None:
    """Raise the package's error for what would stop ``config`` before or early in training."""
    from pneumobatch.model.device import resolve_device  # torch: only once a run is wanted

    out_dir, name = Path(config.out_dir), config.name
    if (out_dir / f"{name}.safetensors").exists() and not overwrite and not config.resume:
        raise OutputExists(
            f"{out_dir / name}.safetensors exists; pass --overwrite to replace it or --name for another name"
        )
    resolve_device(config.device)
    if config.init not in ("imagenet", "random") and not Path(config.init).is_file():
        raise ModelError(f"--init {config.init}: no such weights file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {out_dir}: permission denied")
