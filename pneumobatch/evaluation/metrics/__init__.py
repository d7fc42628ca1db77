"""Evaluation metrics: the one path from probabilities and labels to numbers.

Training (the model card's metrics and operating points) and the report call the
same functions, with scikit-learn underneath:

- :mod:`.classification`: :func:`evaluate` (everything about labelled predictions),
  :func:`subgroup_metrics`, :func:`card_metrics` (the card's compact summary) and
  :func:`summarise` (unlabelled predictions);
- :mod:`.operating_points`: rates at a threshold, and the ``recall_target`` and
  ``youden`` thresholds for a target recall given as a parameter;
- :mod:`.calibration`: reliability bins, ECE, Brier score, temperature fitting;
- :mod:`.bootstrap`: resampling and the ROC AUC of many resamples at once;
- :mod:`.common`: JSON-safe values.

No torch anywhere here: the report imports this package.
"""

#: name -> submodule; the submodules are imported on first use (PEP 562), so that importing
#: ``pneumobatch.evaluation.metrics.common`` (``predict``'s run.json) does not import scikit-learn, which
#: takes about a second.
_SUBMODULE = {
    "BOOTSTRAP_CELLS": "bootstrap",
    "BootstrapAUC": "bootstrap",
    "bootstrap_draws": "bootstrap",
    "percentile_ci": "bootstrap",
    "row_counts": "bootstrap",
    "MIN_PROBABILITY": "calibration",
    "TEMPERATURE_RANGE": "calibration",
    "fit_temperature": "calibration",
    "probability_logits": "calibration",
    "reliability": "calibration",
    "rescale_probabilities": "calibration",
    "rescale_threshold": "calibration",
    "temperature_nll": "calibration",
    "MIN_PER_CLASS": "classification",
    "blank_unsupported": "classification",
    "card_metrics": "classification",
    "evaluate": "classification",
    "subgroup_metrics": "classification",
    "summarise": "classification",
    "MAX_CURVE_POINTS": "common",
    "jsonable": "common",
    "CI_LEVEL": "operating_points",
    "MIN_PER_CLASS_PER_BAND": "operating_points",
    "RECALL_TARGET": "operating_points",
    "TARGET_RECALL": "operating_points",
    "YOUDEN": "operating_points",
    "band_thresholds": "operating_points",
    "confusion_rates": "operating_points",
    "min_positives_for": "operating_points",
    "operating_point": "operating_points",
    "select_threshold": "operating_points",
    "threshold_points": "operating_points",
}


def __getattr__(name: str):
    if name == "TARGET_SENSITIVITY":  # former name of TARGET_RECALL (the report's operating point was recall_95)
        return __getattr__("TARGET_RECALL")
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [*_SUBMODULE, "TARGET_SENSITIVITY"]
