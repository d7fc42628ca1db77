"""PredictConfig: every option of ``pneumobatch predict`` and its default, defined once (no torch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """Options of ``pneumobatch predict``; the CLI's defaults are these."""

    inputs: Sequence[Path]
    output: Path = Path("predictions.csv")
    models: Sequence[str] = ()  # names or paths; empty: the default model
    weights_dir: Optional[Path] = None
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"  # CPU forward pass: auto (ONNX Runtime when installed, fp32), torch or onnxruntime
    batch_size: Optional[int] = None  # None: 16, or 64 on CUDA (inference.default_split)
    workers: Optional[int] = None  # None: from the machine's cores (inference.default_split)
    threads: Optional[int] = None  # torch threads of this process; None: from the machine's cores
    resume: bool = False
    overwrite: bool = False
    study_from: str = "file"
    include_lateral: bool = False
    max_pixels: int = 64_000_000
    include_patient_id: bool = False
    chest_terms: Sequence[str] = ()  # a site's extra words for the chest (body-part gate)
    not_chest_terms: Sequence[str] = ()  # a site's extra words for other body parts
    follow_external_links: bool = False  # follow links leading outside the input folders
    skip_ood: bool = False  # inapplicable images become skipped rows (out-of-distribution)
    site: Optional[Path] = None  # a site file from ``calibrate``: its model decides with the site's operating points
    engine: str = "local"  # local: this machine; ray: a Ray cluster (pneumobatch.engines)
    ray_address: Optional[str] = None  # None: $RAY_ADDRESS, else a Ray started for this run
    ray_actors: Optional[int] = None  # model actors; None: one per GPU of the cluster, else 1
    heatmaps: Optional[str] = None  # positive or all: Grad-CAM overlays in OUT.heatmaps/ (pneumobatch.model.explain)
    relative_to: Optional[Path] = None  # CSV paths relative to this folder (predict --spool: the spool), not the inputs
