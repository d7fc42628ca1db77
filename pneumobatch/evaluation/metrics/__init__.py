"""Evaluation metrics: the one path from probabilities and labels to numbers.

Training (the model card's metrics and operating points) and the report call the
same functions, with scikit-learn underneath:

- :mod:`.classification`: :func:`evaluate` (everything about labelled predictions),
  :func:`subgroup_metrics`, :func:`card_metrics` (the card's compact summary) and
  :func:`summarise` (unlabelled predictions);
- :mod:`.operating_points`: rates at a threshold, and the ``recall_target`` and
  ``youden`` thresholds for a target recall given as a parameter;
- :mod:`.multiclass`: the per-class decision offsets chosen on validation and the per-class table;
- :mod:`.hierarchy`: the fine level of a two-level model (per fine class, top-1 and top-3 accuracy);
- :mod:`.calibration`: reliability bins, ECE, Brier score, temperature fitting;
- :mod:`.bootstrap`: resampling and the ROC AUC of many resamples at once;
- :mod:`.common`: JSON-safe values.

No torch anywhere here: the report imports this package.
"""

import lazy_loader

#: submodule -> the names it gives this package. The submodules are imported on first use
#: (``lazy_loader``), so that importing ``pneumobatch.evaluation.metrics.common``
#: (``predict``'s run.json) does not import scikit-learn, which takes about a second.
_SUBMOD_ATTRS = {
    "bootstrap": ["BOOTSTRAP_CELLS", "BootstrapAUC", "bootstrap_draws", "percentile_ci", "row_counts"],
    "calibration": [
        "MIN_PROBABILITY",
        "TEMPERATURE_RANGE",
        "fit_temperature",
        "probability_logits",
        "reliability",
        "rescale_probabilities",
        "rescale_threshold",
        "temperature_nll",
    ],
    "classification": [
        "MIN_PER_CLASS",
        "blank_unsupported",
        "card_metrics",
        "evaluate",
        "subgroup_metrics",
        "summarise",
    ],
    "common": ["MAX_CURVE_POINTS", "jsonable"],
    "hierarchy": ["fine_level"],
    "multiclass": ["MIN_VAL_PER_CLASS", "balanced_offsets", "class_table", "decided"],
    "operating_points": [
        "CI_LEVEL",
        "MIN_PER_CLASS_PER_BAND",
        "RECALL_TARGET",
        "TARGET_RECALL",
        "YOUDEN",
        "band_thresholds",
        "confusion_rates",
        "min_positives_for",
        "operating_point",
        "select_threshold",
        "threshold_points",
    ],
}

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs=_SUBMOD_ATTRS)
