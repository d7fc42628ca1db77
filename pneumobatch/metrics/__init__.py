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

from pneumobatch.metrics.bootstrap import BOOTSTRAP_CELLS, BootstrapAUC, bootstrap_draws, percentile_ci, row_counts
from pneumobatch.metrics.calibration import (
    MIN_PROBABILITY,
    TEMPERATURE_RANGE,
    fit_temperature,
    probability_logits,
    reliability,
    rescale_probabilities,
    rescale_threshold,
    temperature_nll,
)
from pneumobatch.metrics.classification import (
    MIN_PER_CLASS,
    blank_unsupported,
    card_metrics,
    evaluate,
    subgroup_metrics,
    summarise,
)
from pneumobatch.metrics.common import MAX_CURVE_POINTS, jsonable
from pneumobatch.metrics.operating_points import (
    CI_LEVEL,
    MIN_PER_CLASS_PER_BAND,
    RECALL_TARGET,
    TARGET_RECALL,
    YOUDEN,
    band_thresholds,
    confusion_rates,
    min_positives_for,
    operating_point,
    select_threshold,
    threshold_points,
)

#: Former name of :data:`TARGET_RECALL` (the report's operating point was ``recall_95``).
TARGET_SENSITIVITY = TARGET_RECALL

__all__ = [
    "CI_LEVEL",
    "MIN_PER_CLASS_PER_BAND",
    "MIN_PROBABILITY",
    "band_thresholds",
    "min_positives_for",
    "probability_logits",
    "rescale_probabilities",
    "rescale_threshold",
    "BOOTSTRAP_CELLS",
    "MAX_CURVE_POINTS",
    "MIN_PER_CLASS",
    "RECALL_TARGET",
    "TARGET_RECALL",
    "TARGET_SENSITIVITY",
    "TEMPERATURE_RANGE",
    "YOUDEN",
    "BootstrapAUC",
    "blank_unsupported",
    "bootstrap_draws",
    "card_metrics",
    "confusion_rates",
    "evaluate",
    "fit_temperature",
    "jsonable",
    "operating_point",
    "percentile_ci",
    "reliability",
    "row_counts",
    "select_threshold",
    "subgroup_metrics",
    "summarise",
    "temperature_nll",
    "threshold_points",
]
