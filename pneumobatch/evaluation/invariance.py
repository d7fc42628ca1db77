"""Export invariance: how much a model's output moves when the same images are exported another way.

Inputs are, per model, the probabilities of the same images as they are (the reference)
and after each export (:mod:`pneumobatch.training.invariance` makes the exports and runs
the model), with the images' subgroups. For each export and subgroup the table gives

- ``share_ref`` / ``share_export``: the share of images called each class (binary: the
  positive class) by the card's rule, and ``delta_share``, the largest change over the
  classes, with a paired bootstrap 95% interval;
- ``mean_abs_dp``: the mean over images of the total-variation distance between the two
  probability vectors (binary: ``|dP(positive)|``), with its bootstrap interval, and
  ``max_abs_dp``.

A subgroup with at least :data:`MIN_IMAGES` images passes when both ``|delta_share|`` and
``mean_abs_dp`` are at most :data:`GOAL` (the goal of issue 24; the card records it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import pandas as pd

#: Largest change in the share called positive and mean |dP| a subgroup may show.
GOAL = 0.05
#: Subgroups with fewer images are reported but not judged.
MIN_IMAGES = 30
#: Bootstrap resamples of the intervals.
N_BOOTSTRAP = 1000


def _class_shares(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    return np.array([(labels == c).mean() if len(labels) else np.nan for c in classes])


def invariance_rows(
    classes: Sequence[str],
    positive: Optional[str],
    ref_proba: np.ndarray,
    ref_labels: np.ndarray,
    export_proba: np.ndarray,
    export_labels: np.ndarray,
    seed: int = 0,
) -> dict[str, Any]:
    """One cell of the table: the same images' reference and exported probabilities (n, classes) and labels."""
    n = len(ref_labels)
    shown = [positive] if positive in classes else list(classes)
    ref_share, exp_share = _class_shares(ref_labels, shown), _class_shares(export_labels, shown)
    delta = exp_share - ref_share
    worst = int(np.nanargmax(np.abs(delta))) if n else 0
    dp = 0.5 * np.abs(np.asarray(export_proba, float) - np.asarray(ref_proba, float)).sum(axis=1)
    out: dict[str, Any] = {
        "n": int(n),
        "class": shown[worst],
        "share_ref": float(ref_share[worst]) if n else None,
        "share_export": float(exp_share[worst]) if n else None,
        "delta_share": float(delta[worst]) if n else None,
        "mean_abs_dp": float(dp.mean()) if n else None,
        "max_abs_dp": float(dp.max()) if n else None,
    }
    if n >= 2:
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, n, size=(N_BOOTSTRAP, n))
        ref_hit = (ref_labels == shown[worst]).astype(float)
        exp_hit = (export_labels == shown[worst]).astype(float)
        boot_delta = (exp_hit[draws] - ref_hit[draws]).mean(axis=1)
        boot_dp = dp[draws].mean(axis=1)
        out["delta_share_ci"] = [float(v) for v in np.percentile(boot_delta, [2.5, 97.5])]
        out["mean_abs_dp_ci"] = [float(v) for v in np.percentile(boot_dp, [2.5, 97.5])]
    out["judged"] = n >= MIN_IMAGES
    out["passes"] = None if not out["judged"] else bool(abs(out["delta_share"]) <= GOAL and out["mean_abs_dp"] <= GOAL)
    return out


def invariance_table(
    classes: Sequence[str],
    positive: Optional[str],
    reference: tuple[np.ndarray, np.ndarray],
    exports: Mapping[str, tuple[np.ndarray, np.ndarray]],
    subgroups: pd.DataFrame,
) -> dict[str, Any]:
    """The table of one model: ``reference`` and each of ``exports`` are (proba, labels) of the same images.

    ``subgroups`` has one row per image and a column per grouping (e.g. ``source``,
    ``age_band``, ``view``); every value of every column is a subgroup, and ``all`` is one.
    Returns ``{"goal": ..., "rows": [...], "worst": ..., "passes": bool}``; each row names
    its export and subgroup.
    """
    ref_proba, ref_labels = reference
    rows = []
    groups: list[tuple[str, np.ndarray]] = [("all", np.ones(len(ref_labels), dtype=bool))]
    for column in subgroups.columns:
        values = subgroups[column].astype(str).to_numpy()
        for value in sorted(set(values)):
            if value and value.lower() not in ("nan", "none", "unknown"):
                groups.append((f"{column}={value}", values == value))
    for name, (proba, labels) in exports.items():
        for group, mask in groups:
            row = invariance_rows(classes, positive, ref_proba[mask], ref_labels[mask], proba[mask], labels[mask])
            rows.append({"export": name, "subgroup": group, **row})
    judged = [r for r in rows if r["judged"]]
    worst = max(judged, key=lambda r: max(abs(r["delta_share"]), r["mean_abs_dp"]), default=None)
    return {
        "goal": {"max_abs_delta_share": GOAL, "max_mean_abs_dp": GOAL, "min_images": MIN_IMAGES},
        "rows": rows,
        "worst": worst,
        "passes": all(r["passes"] for r in judged) if judged else None,
    }


def format_table(table: Mapping[str, Any], subgroups: str = "all") -> list[str]:
    """Plain-text lines of a table's rows (``subgroups``: ``all`` rows only, or ``every``)."""
    lines = [f"{'export':<14} {'subgroup':<44} {'n':>5} {'ref':>6} {'export':>6} {'delta':>7} {'mean|dP|':>8}  "]
    for r in table["rows"]:
        if subgroups == "all" and r["subgroup"] != "all":
            continue
        verdict = "" if r["passes"] is None else ("ok" if r["passes"] else "OVER")
        lines.append(
            f"{r['export']:<14} {r['subgroup'][:44]:<44} {r['n']:>5} {r['share_ref']:>6.3f} {r['share_export']:>6.3f} "
            f"{r['delta_share']:>+7.3f} {r['mean_abs_dp']:>8.3f}  {verdict}"
        )
    return lines
