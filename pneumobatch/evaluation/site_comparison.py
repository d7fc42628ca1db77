"""The shipped and a site's decision rules side by side on the same labelled images (report and calibrate)."""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from pneumobatch.core.card import ModelCard
from pneumobatch.core.site import apply_site, shipped_card
from pneumobatch.core.subgroups import UNKNOWN
from pneumobatch.evaluation.metrics import (
    confusion_rates,
    rescale_probabilities,
)
from pneumobatch.evaluation.metrics.intervals import exact_intervals

log = logging.getLogger(__name__)


def compare_operating_points(
    y_true: np.ndarray,
    proba: np.ndarray,
    age_bands: np.ndarray,
    run_card: ModelCard,
    site: Optional[dict[str, Any]] = None,
) -> Optional[dict[str, Any]]:
    """The shipped and the site decision rules side by side on the same labelled images.

    ``proba`` are the probabilities predict wrote with ``run_card`` (shipped, or with a
    site file applied); ``site`` is a site file (:func:`load_site`) to compare with, else the
    one the predictions were made with. Each rule decides as predict does (its age band's
    threshold where the image's band is known and the rule has one, else its pooled
    threshold) on the probabilities rescaled to its own temperature, so the comparison
    holds whichever of the two made the CSV. Sensitivity and specificity come with exact
    (Clopper-Pearson) 95% intervals, overall and per age band. None when there is no site
    rule or the model is not binary.
    """
    if not run_card.binary:
        return None
    shipped = shipped_card(run_card)
    if site is not None:
        local = apply_site(shipped, site)
    elif run_card.site:
        local = run_card
    else:
        return None
    y_pos = np.asarray(y_true) == run_card.positive
    bands = np.asarray([str(b) if str(b) not in ("", "nan", "None") else UNKNOWN for b in age_bands], dtype=object)
    present = sorted(set(bands), key=lambda b: (b == UNKNOWN, b))
    rules = []
    for name, card in (("shipped", shipped), ("site", local)):
        own = rescale_probabilities(proba, card.temperature / run_card.temperature)
        pred = card.decide_many(own, bands) == run_card.positive
        rows = []
        for where in ["all", *(present if len(present) > 1 else [])]:
            mask = np.ones(len(bands), bool) if where == "all" else bands == where
            rates = confusion_rates(y_pos[mask], pred[mask])
            applied = {card.threshold_for(b) for b in (present if where == "all" else [where])}
            rows.append(
                {
                    "where": where,
                    "n_positive": int(y_pos[mask].sum()),
                    "n_negative": int((~y_pos[mask]).sum()),
                    **rates,
                    "thresholds": [{"threshold": t, "operating_point": op} for t, op in sorted(applied)],
                    **exact_intervals(rates),
                }
            )
        rules.append({"rule": name, "temperature": float(card.temperature), "rows": rows})
    notes = [
        "each rule applies its age band's threshold where the image's band is known and it has one, else its pooled "
        "threshold, on the probabilities at its own temperature; intervals are exact (Clopper-Pearson) 95%"
    ]
    fitted = (site or run_card.site or {}).get("fitted_on") or {}
    counts = {c: int((np.asarray(y_true) == c).sum()) for c in run_card.classes}
    if fitted.get("n") == len(y_pos) and fitted.get("counts") == counts:
        notes.append(
            "these labelled images look like the sample the site file was fitted on (same size and class counts): "
            "the site rule's figures are then in-sample and optimistic; judge it on images it was not fitted on"
        )
    source = site.get("_path") if site is not None else run_card.site.get("file")
    return {"site_file": source, "rules": rules, "notes": notes}
