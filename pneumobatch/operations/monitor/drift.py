"""Drift statistics between two score distributions, and between two rates.

The numbers :func:`pneumobatch.operations.monitor.analysis.analyse` compares a night with its
baseline by, computed from what each run stores (:mod:`pneumobatch.operations.monitor.record`):
:class:`Distribution` pools nights' quantiles; :func:`ks_distance` and :func:`psi` compare two
distributions, :func:`psi_noise` says how much PSI sampling noise alone reaches, and
:func:`rate_change` tests a night's rate against the baseline's (exact binomial test, exact 95%
interval of :func:`pneumobatch.evaluation.metrics.intervals.exact_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pneumobatch.evaluation.metrics.intervals import exact_interval


def _cdf(quantiles: Sequence[float], x: np.ndarray) -> np.ndarray:
    """Empirical CDF at ``x`` read off the stored quantiles (resolution 0.01)."""
    q = np.maximum.accumulate(np.asarray(quantiles, dtype=np.float64))
    below = np.searchsorted(q, x, side="right")  # quantile points <= x
    return np.where(below == 0, 0.0, (below - 1) / (len(q) - 1))


@dataclass
class Distribution:
    """A score distribution pooled from one or more nights' quantiles (a count-weighted mixture)."""

    parts: list[tuple[int, list[float]]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(n for n, _ in self.parts)

    def add(self, stats: Mapping[str, Any]) -> None:
        if stats.get("quantiles") and stats.get("n_scored"):
            self.parts.append((int(stats["n_scored"]), list(stats["quantiles"])))

    def cdf(self, x: np.ndarray) -> np.ndarray:
        total = self.n
        return sum(n * _cdf(q, x) for n, q in self.parts) / total if total else np.zeros_like(x)

    def points(self) -> np.ndarray:
        return np.unique(np.concatenate([np.asarray(q, dtype=np.float64) for _, q in self.parts]))


def ks_distance(night: Distribution, base: Distribution) -> tuple[float, float]:
    """Kolmogorov-Smirnov D between two distributions and its asymptotic p-value."""
    from scipy.special import kolmogorov

    grid = np.unique(np.r_[night.points(), base.points()])
    d = float(np.abs(night.cdf(grid) - base.cdf(grid)).max())
    n, m = night.n, base.n
    return d, float(kolmogorov(d * math.sqrt(n * m / (n + m))))


def psi(night: Distribution, base: Distribution, bins: int = 10) -> tuple[float, int]:
    """Population stability index over the baseline's deciles (tied edges merged), and the bin count."""
    grid = base.points()
    base_cdf = base.cdf(grid)
    inner = np.unique(np.interp(np.arange(1, bins) / bins, base_cdf, grid))
    edges_b = np.r_[0.0, base.cdf(inner), 1.0]
    edges_n = np.r_[0.0, night.cdf(inner), 1.0]
    expected = np.clip(np.diff(edges_b), 1e-4, None)
    actual = np.clip(np.diff(edges_n), 1e-4, None)
    return float(((actual - expected) * np.log(actual / expected)).sum()), len(expected)


def psi_noise(n: int, m: int, n_bins: int, alpha: float) -> float:
    """PSI that two samples of one distribution exceed with probability ``alpha``."""
    from scipy.stats import chi2

    return float(chi2.ppf(1.0 - alpha, max(n_bins - 1, 1)) * (1.0 / n + 1.0 / m))


def rate_change(k: int, n: int, k0: int, n0: int) -> dict[str, Any]:
    """A night's rate k/n (n > 0) against the baseline's k0/n0: exact binomial test and the night's
    exact 95% interval (Clopper-Pearson depends on k and n only, not on the tested rate)."""
    from scipy.stats import binomtest

    p0 = k0 / n0
    test = binomtest(k, n, min(max(p0, 1e-12), 1 - 1e-12))
    return {
        "rate": k / n,
        "baseline_rate": p0,
        "change": k / n - p0,
        "ci": exact_interval(k, n),
        "p_value": float(test.pvalue),
    }
