"""Exact (Clopper-Pearson) 95% intervals for proportions: the one copy calibrate, the report and monitor use."""

from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger(__name__)


def exact_interval(k: int, n: int) -> Optional[list[float]]:
    """Clopper-Pearson 95% interval: unlike the bootstrap's, not collapsed to a point at 0% or 100%."""
    from scipy.stats import binomtest

    if not n:
        return None
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def exact_intervals(counts: dict[str, Any]) -> dict[str, Optional[list[float]]]:
    """Exact intervals of the sensitivity and specificity of a point's tp/fn/tn/fp."""
    return {
        "sensitivity_ci_exact": exact_interval(counts["tp"], counts["tp"] + counts["fn"]),
        "specificity_ci_exact": exact_interval(counts["tn"], counts["tn"] + counts["fp"]),
    }
