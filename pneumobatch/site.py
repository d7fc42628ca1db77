"""Site calibration: fit a model's temperature and operating points to a site's labelled sample.

``pneumobatch calibrate`` (:func:`calibrate`) joins a site's labels to a predictions CSV
(:func:`pneumobatch.labels.join_labels`), refits temperature scaling on the
probabilities predict wrote (:mod:`pneumobatch.metrics`), chooses the threshold
reaching the target sensitivity and Youden's J, pooled and per age band when the model
card has age-band operating points, with bootstrap 95% intervals
(:func:`pneumobatch.metrics.evaluate`), and writes a small versioned JSON site file.

``predict --site`` loads it with :func:`site_card`: the model's card with the site's
temperature and thresholds and a ``site`` provenance field, so that predict, the study
table, the report and everything else decide by the one rule of
:class:`~pneumobatch.card.ModelCard`. A site file is refused (:class:`SiteError`, exit
code 2) for another model name or other weights (SHA-256).

Rules, stated in the site file:

- A band gets its own site threshold with at least
  :data:`~pneumobatch.metrics.MIN_PER_CLASS_PER_BAND` labelled images of each class; below,
  it keeps the shipped band threshold, carried over to the new temperature so that it
  makes the same decisions as before.
- Small samples: with fewer than :func:`~pneumobatch.metrics.min_positives_for`
  positives (72 for a 95% target) even a sample in which every positive is detected
  cannot show the target is met (the exact 95% interval's lower bound stays below it);
  calibrate says so, pooled and per band, but still writes the file.
"""

from __future__ import annotations

import dataclasses
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
from pneumobatch.atomicfile import atomic_write
from pneumobatch.card import ModelCard
from pneumobatch.errors import LabelError, OutputExists, SiteError
from pneumobatch.labels import card_from_run, join_labels, read_labels
from pneumobatch.metrics import (
    MIN_PER_CLASS_PER_BAND as MIN_PER_CLASS,
)
from pneumobatch.metrics import (
    band_thresholds,
    confusion_rates,
    evaluate,
    fit_temperature,
    jsonable,
    min_positives_for,
    probability_logits,
    rescale_probabilities,
    rescale_threshold,
    select_threshold,
)
from pneumobatch.subgroups import UNKNOWN

log = logging.getLogger(__name__)

SITE_FORMAT = "pneumobatch-site"
SITE_SCHEMA_VERSION = 1
#: Operating points a site file can apply: the target-sensitivity threshold or Youden's J.
APPLY_CHOICES = {"target": "recall_target", "youden": "youden"}


@dataclass
class CalibrateConfig:
    """Options of ``pneumobatch calibrate``."""

    predictions: Path
    labels: Path
    output: Path = Path("site.json")
    model: Optional[str] = None  # needed when the CSV holds several models
    key: Optional[str] = None
    label_column: str = "label"
    target_sensitivity: float = 0.95
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


def _exact_ci(k: int, n: int) -> Optional[list[float]]:
    """Clopper-Pearson 95% interval: unlike the bootstrap's, not collapsed to a point at 0% or 100%."""
    from scipy.stats import binomtest

    if not n:
        return None
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def _exact_intervals(counts: dict[str, Any]) -> dict[str, Optional[list[float]]]:
    """Exact intervals of the sensitivity and specificity of a point's tp/fn/tn/fp."""
    return {
        "sensitivity_ci_exact": _exact_ci(counts["tp"], counts["tp"] + counts["fn"]),
        "specificity_ci_exact": _exact_ci(counts["tn"], counts["tn"] + counts["fp"]),
    }


def _point(ev: dict[str, Any], name: str, n_pos: int, n_neg: int) -> dict[str, Any]:
    p = next(p for p in ev["operating_points"] if p["name"] == name)
    keep = ("threshold", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "ppv", "npv", "tp", "fp", "tn", "fn")
    return {**{k: p.get(k) for k in keep}, "n_positive": n_pos, "n_negative": n_neg, **_exact_intervals(p)}


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
    """Target-sensitivity and Youden thresholds on these rows, with bootstrap intervals."""
    pos = card.positive_index
    y_pos = y_true == card.positive
    chosen = {k: _off_the_sample(v, proba[:, pos]) for k, v in select_threshold(y_pos, proba[:, pos], target).items()}
    ev = evaluate(
        list(y_true), proba, card.classes, positive=card.positive, threshold=chosen["recall_target"],
        card_thresholds={"youden": chosen["youden"]}, n_bootstrap=n_bootstrap, seed=seed,
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
    target_sensitivity: float = 0.95,
    apply: str = "target",
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], list[str]]:
    """The site document for one binary model's predictions ``rows`` and ``labels``, and warnings."""
    if not card.binary:
        raise LabelError(f"calibrate chooses thresholds for binary models; {card.name} ({card.task}) predicts the most probable class")
    if apply not in APPLY_CHOICES:
        raise SiteError(f"unknown operating point {apply!r}: choose {' or '.join(APPLY_CHOICES)}")
    join = join_labels(rows, labels, card, key=key, label_column=label_column)
    y_true = join.y_true
    y_pos = y_true == card.positive
    if y_pos.all() or not y_pos.any():
        raise LabelError(f"calibrate needs labelled images of both classes; the {join.n_matched} matched are all {y_true[0]}")
    warnings: list[str] = []
    proba = join.proba
    targets = np.asarray([card.classes.index(c) for c in y_true])
    scale = fit_temperature(probability_logits(proba), targets)
    site_proba = rescale_probabilities(proba, scale)
    before = evaluate(list(y_true), proba, card.classes, positive=card.positive, threshold=card.threshold, n_bootstrap=0)
    pooled = _fit_points(y_true, site_proba, card, target_sensitivity, n_bootstrap, seed)
    after = evaluate(list(y_true), site_proba, card.classes, positive=card.positive, n_bootstrap=0)
    shipped = {k: before["operating_points"][0].get(k) for k in ("threshold", "sensitivity", "specificity", "ppv", "npv")}
    if (w := _small_sample(int(y_pos.sum()), target_sensitivity, "pooled")) is not None:
        warnings.append(w)

    by_band: dict[str, Any] = {}
    card_bands = (card.thresholds or {}).get("by_age_band") or {}
    if card_bands:
        if join.level != "file" or "age_band" not in join.rows.columns:
            warnings.append("age bands: the labels join at study level or the CSV has no age_band; bands keep the shipped thresholds")
            bands = np.full(len(y_true), UNKNOWN, dtype=object)
        else:
            bands = join.rows["age_band"].fillna("").astype(str).to_numpy()
        fitted = band_thresholds(y_pos, site_proba[:, card.positive_index], bands, target_sensitivity)
        for band, shipped_point in card_bands.items():
            in_band = bands == band
            n_pos, n_neg = int((y_pos & in_band).sum()), int((~y_pos & in_band).sum())
            if band in fitted:
                entry = _fit_points(y_true[in_band], site_proba[in_band], card, target_sensitivity, n_bootstrap, seed)
                by_band[band] = {"source": "site", **entry}
                if (w := _small_sample(n_pos, target_sensitivity, f"age band {band}")) is not None:
                    warnings.append(w)
            else:
                kept = {name: shipped_point.get(k, shipped_point.get("recall_target")) for name, k in APPLY_CHOICES.items()}
                carried = {name: rescale_threshold(float(t), scale) for name, t in kept.items() if t is not None}
                by_band[band] = {
                    "source": "shipped", "n_positive": n_pos, "n_negative": n_neg,
                    "target": {"threshold": carried.get("target")}, "youden": {"threshold": carried.get("youden")},
                    "note": f"fewer than {MIN_PER_CLASS} labelled images of each class: the shipped threshold, "
                    "carried over to the site temperature (same decisions as before)",
                }
                warnings.append(f"age band {band}: {n_pos} positives / {n_neg} negatives, fewer than {MIN_PER_CLASS} of each: shipped threshold kept")

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
        "model": {"name": card.name, "task": card.task, "classes": list(card.classes), "positive": card.positive,
                  "weights_sha256": card.weights_sha256},
        "fitted_on": {
            "n": int(join.n_matched),
            "counts": counts,
            "by_age_band": {str(b): int(n) for b, n in pd.Series(rows_used.get("age_band", pd.Series(dtype=str))).fillna("").astype(str).value_counts().items()},
            "date_range": {
                "source": "modification times of the labelled files",
                "first": _iso(mtimes.min()) if len(mtimes) else None,
                "last": _iso(mtimes.max()) if len(mtimes) else None,
            },
            "previous_site_sha256": card.site.get("sha256") if card.site else None,
            "label_source": {"key": join.key, "level": join.level, "label_column": join.label_column,
                             "n_label_rows": int(join.n_label_rows),
                             "problems": {k: v["count"] for k, v in join.problems_dict().items() if v["count"]}},
        },
        "target_sensitivity": float(target_sensitivity),
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
            "min_positives_for_target": min_positives_for(target_sensitivity),
            "bootstrap": {"n_resamples": int(n_bootstrap), "seed": int(seed), "level": 0.95},
        },
        "warnings": warnings,
    }
    return jsonable(site), warnings


def _iso(ns: float) -> str:
    return datetime.fromtimestamp(float(ns) / 1e9, timezone.utc).date().isoformat()


# ----------------------------------------------------------------------- the command


def _run_card(predictions: Path, name: str) -> ModelCard:
    run_path = predictions.with_name(predictions.stem + ".run.json")
    try:
        run = json.loads(run_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabelError(f"{run_path} not found: calibrate needs the model card predict stores there") from None
    except (OSError, ValueError) as e:
        raise LabelError(f"cannot read {run_path}: {e}") from e
    for entry in run.get("models") or [] if isinstance(run, dict) else []:
        if entry.get("name") == name and (card := card_from_run(entry)) is not None:
            return card
    raise LabelError(f"{run_path} holds no model card for {name} (written by an older pneumobatch? predict again)")


def calibrate(config: CalibrateConfig) -> CalibrateResult:
    """``pneumobatch calibrate``: fit and write a site file (never over an existing one without ``overwrite``)."""
    from pneumobatch.report import load_predictions

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
        raise LabelError(f"{config.predictions} holds rows of {name} from other weights than its run.json; predict again")
    labels = read_labels(config.labels)
    site, warnings = fit_site(
        rows, labels, card, key=config.key, label_column=config.label_column,
        target_sensitivity=config.target_sensitivity, apply=config.apply, n_bootstrap=config.n_bootstrap, seed=config.seed,
    )
    site["fitted_on"]["label_source"]["file"] = Path(config.labels).name
    site["fitted_on"]["label_source"]["sha256"] = hashlib.sha256(Path(config.labels).read_bytes()).hexdigest()
    site["fitted_on"]["predictions"] = Path(config.predictions).name
    atomic_write(output, json.dumps(site, indent=2) + "\n")
    return CalibrateResult(output, site, warnings)


# ------------------------------------------------------------------------ applying


def load_site(path: Path | str) -> dict[str, Any]:
    """Read and check a site file; :class:`SiteError` (one line) when it is not one."""
    path = Path(path)
    try:
        site = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteError(f"site file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SiteError(f"site file {path} is not readable JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not isinstance(site, dict) or site.get("format") != SITE_FORMAT:
        raise SiteError(f"{path} is not a pneumobatch site file (made by pneumobatch calibrate)")
    if site.get("schema_version") != SITE_SCHEMA_VERSION:
        raise SiteError(f"site file {path} has schema version {site.get('schema_version')!r}; this pneumobatch reads {SITE_SCHEMA_VERSION}")
    try:
        site["model"]["name"], site["temperature"]["site"], site["operating_points"]["pooled"]  # noqa: B018 - presence check
    except (KeyError, TypeError):
        raise SiteError(f"site file {path} lacks model, temperature or operating points") from None
    site["_path"] = str(path)
    site["_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return site


def apply_site(card: ModelCard, site: dict[str, Any]) -> ModelCard:
    """A copy of ``card`` deciding with the site's temperature and thresholds.

    Raises :class:`SiteError` when the site file belongs to another model or other weights.
    """
    where = site.get("_path", "site file")
    model = site.get("model") or {}
    sha = str(model.get("weights_sha256") or "")
    if model.get("name") != card.name or sha.lower() != str(card.weights_sha256).lower():
        raise SiteError(
            f"{where} was fitted for model {model.get('name')} (weights {sha[:12] or 'unknown'}), "
            f"not {card.name} (weights {str(card.weights_sha256)[:12] or 'unknown'}); calibrate again for this model"
        )
    key = APPLY_CHOICES[site.get("apply", "target")]
    points = site["operating_points"]
    pooled = points["pooled"]
    bands = {
        band: {"recall_target": p["target"]["threshold"], "youden": p["youden"]["threshold"], "source": p["source"]}
        for band, p in (points.get("by_age_band") or {}).items()
    }
    thresholds: dict[str, Any] = {
        "recall_target": pooled["target"]["threshold"],
        "youden": pooled["youden"]["threshold"],
        "target_recall": site.get("target_sensitivity"),
        "applied": key,
        "source": "site",
    }
    if bands:
        thresholds["by_age_band"] = bands
    provenance = {
        "file": where,
        "sha256": site.get("_sha256", ""),
        "created": site.get("created"),
        "apply": site.get("apply", "target"),
        "target_sensitivity": site.get("target_sensitivity"),
        "fitted_on": site.get("fitted_on"),
        "temperature": site["temperature"]["site"],
        "thresholds": {"pooled": thresholds[key], **{b: {"threshold": v[key], "source": v["source"]} for b, v in bands.items()}},
        "shipped": {"threshold": card.threshold, "temperature": card.temperature, "thresholds": card.thresholds},
    }
    return dataclasses.replace(
        card, threshold=float(thresholds[key]), thresholds=thresholds,
        temperature=float(site["temperature"]["site"]), site=provenance,
    )


def site_card(card: ModelCard, path: Path | str) -> ModelCard:
    """``card`` with the site file at ``path`` applied (the one call predict and report need)."""
    return apply_site(card, load_site(path))


def shipped_card(card: ModelCard) -> ModelCard:
    """``card`` as shipped: a site file's temperature and thresholds undone.

    Predictions made with ``predict --site`` carry the site's card in run.json, with the
    shipped threshold, thresholds and temperature kept in ``card.site["shipped"]``.
    """
    if not card.site:
        return card
    shipped = card.site.get("shipped") or {}
    return dataclasses.replace(
        card, threshold=shipped.get("threshold", card.threshold), thresholds=dict(shipped.get("thresholds") or {}),
        temperature=float(shipped.get("temperature") or card.temperature), site={},
    )


def compare_operating_points(
    y_true: np.ndarray, proba: np.ndarray, age_bands: np.ndarray, run_card: ModelCard, site: Optional[dict[str, Any]] = None,
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
            rows.append({
                "where": where, "n_positive": int(y_pos[mask].sum()), "n_negative": int((~y_pos[mask]).sum()), **rates,
                "thresholds": [{"threshold": t, "operating_point": op} for t, op in sorted(applied)],
                **_exact_intervals(rates),
            })
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
