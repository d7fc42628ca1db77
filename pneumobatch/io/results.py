"""FileResult: what happened to one file in a run (its status and reason, or its probabilities and applicability)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from pneumobatch.core.errors import Status
from pneumobatch.io.discovery import FileEntry

log = logging.getLogger(__name__)


@dataclass
class FileResult:
    """What happened to one file; ``probs`` maps model name -> class probabilities."""

    entry: FileEntry
    status: Status
    reason: str = ""
    detail: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    #: model name -> applicability score (models with applicability statistics only)
    ood_scores: dict[str, float] = field(default_factory=dict)
    #: model name -> whether the image is applicable: the model layer's decision
    #: (``ApplicabilityStats.flag``) for each score in ``ood_scores``
    applicable: dict[str, bool] = field(default_factory=dict)
    #: model name -> Grad-CAM maps of every class (C, h, w) at the card's layer, where the forward
    #: pass computed them in closed form (:mod:`pneumobatch.model.heatmaps`)
    cams: dict[str, np.ndarray] = field(default_factory=dict)
    #: the image as displayed (uint8, long side at most ``ReadOptions.display_side``) when asked for
    display: Optional[np.ndarray] = None
