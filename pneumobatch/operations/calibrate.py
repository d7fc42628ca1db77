"""Site calibration: fit a model's temperature and operating points to a site's labelled sample.

``pneumobatch calibrate`` (:func:`calibrate`) joins a site's labels to a predictions CSV
(:func:`pneumobatch.evaluation.labels.join.join_labels`), refits temperature scaling on the
probabilities predict wrote (:mod:`pneumobatch.evaluation.metrics`), chooses the threshold
reaching the target recall (sensitivity) and Youden's J, pooled and per age band when the model
card has age-band operating points, with bootstrap 95% intervals
(:func:`pneumobatch.evaluation.metrics.evaluate`), and writes a small versioned JSON site file.

``predict --site`` loads it with :func:`site_card`: the model's card with the site's
temperature and thresholds and a ``site`` provenance field, so that predict, the study
table, the report and everything else decide by the one rule of
:class:`~pneumobatch.core.card.ModelCard`. A site file is refused (:class:`SiteError`, exit
code 2) for another model name or other weights (SHA-256).

Rules, stated in the site file:

- A band gets its own site threshold with at least
  :data:`~pneumobatch.evaluation.metrics.MIN_PER_CLASS_PER_BAND` labelled images of each class; below,
  it keeps the shipped band threshold, carried over to the new temperature so that it
  makes the same decisions as before.
- Small samples: with fewer than :func:`~pneumobatch.evaluation.metrics.min_positives_for`
  positives (72 for a 95% target) even a sample in which every positive is detected
  cannot show the target is met (the exact 95% interval's lower bound stays below it);
  calibrate says so, pooled and per band, but still writes the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pneumobatch import __version__
from pneumobatch.core.card import RECALL_TARGET, ModelCard, validate_card
from pneumobatch.core.errors import LabelError, ModelError, OutputExists, SiteError
from pneumobatch.core.files import LABELS_FILE_LIMIT, RUN_JSON_LIMIT, FileReadError, read_small_file
from pneumobatch.core.site import APPLY_CHOICES, SITE_FORMAT, SITE_SCHEMA_VERSION, site_problem
from pneumobatch.core.subgroups import UNKNOWN
from pneumobatch.evaluation.labels.cards import card_from_run
from pneumobatch.evaluation.labels.join import join_labels
from pneumobatch.evaluation.labels.reading import read_labels
from pneumobatch.evaluation.metrics import MIN_PER_CLASS_PER_BAND as MIN_PER_CLASS
from pneumobatch.evaluation.metrics import (
    band_thresholds,
    evaluate,
    fit_temperature,
    jsonable,
    min_positives_for,
    probability_logits,
    rescale_probabilities,
    rescale_threshold,
    select_threshold,
)
from pneumobatch.evaluation.metrics.intervals import exact_intervals
from pneumobatch.io.atomicfile import atomic_write

log = logging.getLogger(__name__)


@dataclass
class CalibrateConfig:
    """Options of ``pneumobatch calibrate``."""

    predictions: Path
    labels: Path
    output: Path = Path("site.json")
    model: Optional[str] = None  # needed when the CSV holds several models
    key: Optional[str] = None
    label_column: str = "label"
    target_recall: float = 0.95
    apply: str = "target"  # target | youden
    n_bootstrap: int = 1000
    seed: int = 0
    overwrite: bool = False


@dataclass
class CalibrateResult:
    output: Path
    site: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- fitting


def _point(ev: dict[str, Any], name: str, n_pos: int, n_neg: int) -> dict[str, Any]:
    p = next(p for p in ev["operating_points"] if p["name"] == name)
    keep = (
        "threshold",
        "sensitivity",
        "sensitivity_ci",
        "specificity",
        "specificity_ci",
        "ppv",
        "npv",
        "tp",
        "fp",
        "tn",
        "fn",
    )
    return {**{k: p.get(k) for k in keep}, "n_positive": n_pos, "n_negative": n_neg, **exact_intervals(p)}


def _off_the_sample(threshold: Optional[float], scores: np.ndarray) -> Optional[float]:
    """Halfway from ``threshold`` (one image's score) to the next lower score of the sample.

    It makes the same decisions on the sample, but no longer sits on an image's
    probability, which predict recomputes from the logits at the site temperature and the
    CSV rounds to 6 decimals: on the threshold itself, that image could fall either side.
    """
    if threshold is None:
        return None
    scores = np.asarray(scores)
    lower = scores[scores < threshold]
    return float((threshold + lower.max()) / 2) if len(lower) else float(threshold)


def _fit_points(
    y_true: np.ndarray, proba: np.ndarray, card: ModelCard, target: float, n_bootstrap: int, seed: int
) -> dict[str, Any]:
    """Target-recall (sensitivity) and Youden thresholds on these rows, with bootstrap intervals."""
    pos = card.positive_index
    y_pos = y_true == card.positive
    chosen = {k: _off_the_sample(v, proba[:, pos]) for k, v in select_threshold(y_pos, proba[:, pos], target).items()}
    ev = evaluate(
        list(y_true),
        proba,
        card.classes,
        positive=card.positive,
        threshold=chosen["recall_target"],
        card_thresholds={"youden": chosen["youden"]},
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    n_pos, n_neg = int(y_pos.sum()), int((~y_pos).sum())
    return {"target": _point(ev, "shipped", n_pos, n_neg), "youden": _point(ev, "card_youden", n_pos, n_neg)}


def _small_sample(n_pos: int, target: float, where: str) -> Optional[str]:
    need = min_positives_for(target)
    if n_pos >= need:
        return None
    return (
        f"{where}: {n_pos} positives are too few to show {target:.0%} sensitivity: with fewer than {need}, "
        f"even if every positive is detected the exact 95% interval's lower bound is below {target:.0%}"
    )


def fit_site(
    rows: pd.DataFrame,
    labels: pd.DataFrame,
    card: ModelCard,
    *,
    key: Optional[str] = None,
    label_column: str = "label",
    target_recall: float = 0.95,
    apply: str = "target",
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], list[str]]:
    """The site document for one binary model's predictions ``rows`` and ``labels``, and warnings."""
    if not card.binary:
        raise LabelError(
            f"calibrate chooses thresholds for binary models; {card.name} ({card.task}) predicts the most probable class"
        )
    if apply not in APPLY_CHOICES:
        raise SiteError(f"unknown operating point {apply!r}: choose {' or '.join(APPLY_CHOICES)}")
    join = join_labels(rows, labels, card, key=key, label_column=label_column)
    y_true = join.y_true
    y_pos = y_true == card.positive
    if y_pos.all() or not y_pos.any():
        raise LabelError(
            f"calibrate needs labelled images of both classes; the {join.n_matched} matched are all {y_true[0]}"
        )
    warnings: list[str] = []
    proba = join.proba
    targets = np.asarray([card.classes.index(c) for c in y_true])
    scale = fit_temperature(probability_logits(proba), targets)
    site_proba = rescale_probabilities(proba, scale)
    before = evaluate(
        list(y_true), proba, card.classes, positive=card.positive, threshold=card.threshold, n_bootstrap=0
    )
    pooled = _fit_points(y_true, site_proba, card, target_recall, n_bootstrap, seed)
    after = evaluate(list(y_true), site_proba, card.classes, positive=card.positive, n_bootstrap=0)
    shipped = {
        k: before["operating_points"][0].get(k) for k in ("threshold", "sensitivity", "specificity", "ppv", "npv")
    }
    if (w := _small_sample(int(y_pos.sum()), target_recall, "pooled")) is not None:
        warnings.append(w)

    by_band: dict[str, Any] = {}
    card_bands = (card.thresholds or {}).get("by_age_band") or {}
    if card_bands:
        if join.level != "file" or "age_band" not in join.rows.columns:
            warnings.append(
                "age bands: the labels join at study level or the CSV has no age_band; bands keep the shipped thresholds"
            )
            bands = np.full(len(y_true), UNKNOWN, dtype=object)
        else:
            bands = join.rows["age_band"].fillna("").astype(str).to_numpy()
        fitted = band_thresholds(y_pos, site_proba[:, card.positive_index], bands, target_recall)
        for band, shipped_point in card_bands.items():
            in_band = bands == band
            n_pos, n_neg = int((y_pos & in_band).sum()), int((~y_pos & in_band).sum())
            if band in fitted:
                entry = _fit_points(y_true[in_band], site_proba[in_band], card, target_recall, n_bootstrap, seed)
                by_band[band] = {"source": "site", **entry}
                if (w := _small_sample(n_pos, target_recall, f"age band {band}")) is not None:
                    warnings.append(w)
            else:
                kept = {
                    name: shipped_point.get(k, shipped_point.get("recall_target")) for name, k in APPLY_CHOICES.items()
                }
                carried = {name: rescale_threshold(float(t), scale) for name, t in kept.items() if t is not None}
                by_band[band] = {
                    "source": "shipped",
                    "n_positive": n_pos,
                    "n_negative": n_neg,
                    "target": {"threshold": carried.get("target")},
                    "youden": {"threshold": carried.get("youden")},
                    "note": f"fewer than {MIN_PER_CLASS} labelled images of each class: the shipped threshold, "
                    "carried over to the site temperature (same decisions as before)",
                }
                warnings.append(
                    f"age band {band}: {n_pos} positives / {n_neg} negatives, fewer than {MIN_PER_CLASS} of each: shipped threshold kept"
                )

    if card.site:
        warnings.append(
            f"these predictions were made with site file {card.site.get('file')}: the new file replaces it, "
            "and bands it does not refit keep that file's thresholds"
        )
    rows_used = join.rows
    mtimes = pd.to_numeric(rows_used.get("file_mtime_ns", pd.Series(dtype=str)), errors="coerce").dropna()
    counts = {c: int((y_true == c).sum()) for c in card.classes}
    site = {
        "format": SITE_FORMAT,
        "schema_version": SITE_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pneumobatch_version": __version__,
        "model": {
            "name": card.name,
            "task": card.task,
            "classes": list(card.classes),
            "positive": card.positive,
            "weights_sha256": card.weights_sha256,
        },
        "fitted_on": {
            "n": int(join.n_matched),
            "counts": counts,
            "by_age_band": {
                str(b): int(n)
                for b, n in pd.Series(rows_used.get("age_band", pd.Series(dtype=str)))
                .fillna("")
                .astype(str)
                .value_counts()
                .items()
            },
            "date_range": {
                "source": "modification times of the labelled files",
                "first": _iso(mtimes.min()) if len(mtimes) else None,
                "last": _iso(mtimes.max()) if len(mtimes) else None,
            },
            "previous_site_sha256": card.site.get("sha256") if card.site else None,
            "label_source": {
                "key": join.key,
                "level": join.level,
                "label_column": join.label_column,
                "n_label_rows": int(join.n_label_rows),
                "problems": {k: v["count"] for k, v in join.problems_dict().items() if v["count"]},
            },
        },
        # the target recall; the site file's key keeps its first name so that files already written still load
        "target_sensitivity": float(target_recall),
        "apply": apply,
        "temperature": {
            "shipped": float(card.temperature),
            "site": float(card.temperature) * scale,
            "scale": scale,
            "ece_before": before["calibration"]["classes"][card.positive]["ece"],
            "ece_after": after["calibration"]["classes"][card.positive]["ece"],
            "log_loss_before": before["calibration"]["log_loss"],
            "log_loss_after": after["calibration"]["log_loss"],
        },
        "shipped_on_site_data": {**shipped, "note": "the shipped pooled threshold and temperature on these images"},
        "operating_points": {"pooled": {"source": "site", **pooled}, "by_age_band": by_band},
        "rules": {
            "band_min_per_class": MIN_PER_CLASS,
            "min_positives_for_target": min_positives_for(target_recall),
            "bootstrap": {"n_resamples": int(n_bootstrap), "seed": int(seed), "level": 0.95},
        },
        "warnings": warnings,
    }
    return jsonable(site), warnings


def _iso(ns: float) -> str:
    return datetime.fromtimestamp(float(ns) / 1e9, timezone.utc).date().isoformat()


# ----------------------------------------------------------------------- the command


def _run_card(predictions: Path, name: str) -> ModelCard:
    """The model card predict stored in ``PREDICTIONS.run.json`` for model ``name``, checked as a
    card read from disk is (:func:`~pneumobatch.core.card.validate_card`): a hand-edited run.json
    (a negative temperature, a band without its threshold, ``models`` not a list) is refused with
    :class:`LabelError`, never fitted on nor written into a site file."""
    run_path = predictions.with_name(predictions.stem + ".run.json")
    try:
        raw = read_small_file(run_path, limit=RUN_JSON_LIMIT, what="run.json")
    except FileReadError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            raise LabelError(f"{run_path} not found: calibrate needs the model card predict stores there") from None
        raise LabelError(str(e)) from e
    try:
        run = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LabelError(f"cannot read {run_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    models = run.get("models") if isinstance(run, dict) else None
    if not isinstance(models, list):
        raise LabelError(f"{run_path} is not a run.json of pneumobatch predict (no list of models); predict again")
    for entry in models:
        if not isinstance(entry, dict) or entry.get("name") != name:
            continue
        stored = entry.get("card")
        if stored is None:
            break
        try:
            validate_card(stored)
            card = card_from_run(entry)
        except (ModelError, TypeError, ValueError) as e:
            raise LabelError(f"{run_path}: the model card of {name} is not usable: {e}; predict again") from e
        if card is None:
            break
        for band, point in ((card.thresholds or {}).get("by_age_band") or {}).items():
            if not isinstance(point, dict) or point.get(RECALL_TARGET) is None:
                raise LabelError(
                    f"{run_path}: the model card of {name} has no {RECALL_TARGET} threshold for age band "
                    f"{band}; predict again"
                )
        return card
    raise LabelError(f"{run_path} holds no model card for {name} (written by an older pneumobatch? predict again)")


def calibrate(config: CalibrateConfig) -> CalibrateResult:
    """``pneumobatch calibrate``: fit and write a site file (never over an existing one without ``overwrite``)."""
    from pneumobatch.io.predictions import load_predictions

    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise OutputExists(f"{output} exists; pass --overwrite to replace it")
    frame = load_predictions(config.predictions)
    names = [n for n in dict.fromkeys(frame["model"].astype(str)) if n]
    if config.model is None and len(names) != 1:
        raise SiteError(f"{config.predictions} holds models {', '.join(names) or '(none)'}: choose one with --model")
    name = config.model or names[0]
    if name not in names:
        raise SiteError(f"no model {name!r} in {config.predictions} (models: {', '.join(names) or 'none'})")
    card = _run_card(Path(config.predictions), name)
    rows = frame[frame["model"] == name]
    shas = {s for s in rows.get("weights_sha256", pd.Series(dtype=str)).astype(str) if s}
    if shas - {card.weights_sha256}:
        raise LabelError(
            f"{config.predictions} holds rows of {name} from other weights than its run.json; predict again"
        )
    labels = read_labels(config.labels)
    site, warnings = fit_site(
        rows,
        labels,
        card,
        key=config.key,
        label_column=config.label_column,
        target_recall=config.target_recall,
        apply=config.apply,
        n_bootstrap=config.n_bootstrap,
        seed=config.seed,
    )
    try:
        label_bytes = read_small_file(config.labels, limit=LABELS_FILE_LIMIT, what="labels file")
    except FileReadError as e:
        raise LabelError(str(e)) from e
    site["fitted_on"]["label_source"]["file"] = Path(config.labels).name
    site["fitted_on"]["label_source"]["sha256"] = hashlib.sha256(label_bytes).hexdigest()
    site["fitted_on"]["predictions"] = Path(config.predictions).name
    # what predict --site and report --site would refuse is never written (a last check: the card is checked above)
    if (problem := site_problem(site, output)) is not None:
        raise LabelError(f"calibrate made a site file that cannot be applied, so wrote none: {problem}")
    atomic_write(output, json.dumps(site, indent=2, allow_nan=False) + "\n")
    return CalibrateResult(output, site, warnings)


# ------------------------------------------------------------------------ applying
