"""Nightly monitoring: what each predict run records, and drift across nights.

**Per run** (:func:`monitoring_block`, ``run.json["monitoring"]``): per model, over all
files and per acquisition group, the files by status and reason, the distribution of
the model's score (a 20-bin histogram and the 101 quantiles at 0, 0.01, ..., 1), the
positive rate at the operating point actually applied, the applicability flag rate, and
the run's images/s. The score is the model's abnormality (1 - P(normal), else
P(positive); :func:`pneumobatch.core.studies.abnormality`); a row is positive when its
predicted class is the positive class (binary) or not ``normal`` (multiclass). Groups
(:data:`DIMENSIONS`): ``scanner`` (DICOM Manufacturer / ManufacturerModelName /
StationName), ``view`` (AP/PA), ``age_band``.

**Across nights** (:func:`analyse`, ``pneumobatch monitor``): the first ``baseline``
nights are pooled into a baseline; every later night is compared with it, per model and
group, and an alert is raised when a limit of :data:`DEFAULT_LIMITS` is crossed:

- ``psi``: population stability index of the score over the baseline's deciles, above
  ``psi`` (0.25, the usual "major shift") *and* above what sampling noise alone exceeds
  with probability ``alpha`` at these counts (PSI of two samples of n and m from one
  distribution is about chi-square(B - 1) x (1/n + 1/m)); small groups otherwise drift
  by chance;
- ``ks``: two-sample Kolmogorov-Smirnov distance D of the score distributions (from the
  quantiles, so D is resolved to 0.01) at least ``ks_d`` with asymptotic p < ``alpha``;
- ``positive-rate``: the night's positive rate differs from the baseline's by at least
  ``positive_rate_change`` and an exact binomial test against the baseline rate gives
  p < ``alpha`` (the night's exact 95% interval is reported);
- ``flag-rate``: the same for the applicability flag rate (``flag_rate_change``);
- ``error-rate``: more than ``error_rate`` of the night's files are errors;
- ``new-scanner`` / ``vanished-scanner``: a scanner with at least ``min_images`` files
  tonight that the baseline never saw, or one with at least ``min_images`` files per
  baseline night on average that sent none tonight;
- ``operating-point-changed``: the model decided with other thresholds than in the last
  baseline night (a site file applied, replaced or removed): scores and positive rates
  are then not comparable with the baseline, and a new baseline should start.

Groups with fewer than ``min_images`` scored images in the night are not tested.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import LabelError, ReportError, Status
from pneumobatch.core.studies import abnormality
from pneumobatch.core.subgroups import UNKNOWN, view_group
from pneumobatch.evaluation.metrics import jsonable

MONITORING_SCHEMA_VERSION = 1
#: Quantile levels stored for each score distribution: 0, 0.01, ..., 1.
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 101)
HISTOGRAM_EDGES = np.linspace(0.0, 1.0, 21)
#: Acquisition groups every run breaks its numbers down by.
DIMENSIONS = ("scanner", "view", "age_band")
#: Scanner group of files without a DICOM header (PNG/JPEG, unreadable files).
NO_HEADER = "(no DICOM header)"
#: Alert limits; ``pneumobatch monitor --limit NAME=VALUE`` overrides them.
DEFAULT_LIMITS: dict[str, float] = {
    "psi": 0.25,
    "ks_d": 0.2,
    "positive_rate_change": 0.10,
    "flag_rate_change": 0.05,
    "error_rate": 0.05,
    "alpha": 0.001,
    "min_images": 20,
}
DEFAULT_BASELINE = 7


# ------------------------------------------------------------------- per run


def scanner_names(frame: pd.DataFrame) -> pd.Series:
    """``Manufacturer / Model / Station`` per row ("?" for an empty part); :data:`NO_HEADER` for rows
    without any of them and without a SOP Instance UID (PNG/JPEG, files whose header could not be read)."""
    parts = [
        frame[c].fillna("").astype(str) if c in frame.columns else pd.Series("", index=frame.index)
        for c in ("manufacturer", "manufacturer_model_name", "station_name")
    ]
    joined = (
        parts[0].where(parts[0] != "", "?")
        + " / "
        + parts[1].where(parts[1] != "", "?")
        + " / "
        + parts[2].where(parts[2] != "", "?")
    )
    uid = (
        frame["sop_instance_uid"].fillna("").astype(str)
        if "sop_instance_uid" in frame.columns
        else pd.Series("", index=frame.index)
    )
    return joined.where((parts[0] + parts[1] + parts[2] + uid) != "", NO_HEADER)


def group_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """The acquisition group of every row, one column per :data:`DIMENSIONS` entry."""
    views = frame["view_position"] if "view_position" in frame.columns else pd.Series("", index=frame.index)
    bands = (
        frame["age_band"].fillna("").astype(str) if "age_band" in frame.columns else pd.Series("", index=frame.index)
    )
    return pd.DataFrame(
        {
            "scanner": scanner_names(frame),
            "view": [view_group(v) for v in views.fillna("")],
            "age_band": bands.where(bands != "", UNKNOWN),
        },
        index=frame.index,
    )


def _positive(labels: pd.Series, card: ModelCard) -> Optional[pd.Series]:
    if card.binary:
        return labels == card.positive
    if "normal" in card.classes:
        return (labels != "") & (labels != "normal")
    return None


def _stats(rows: pd.DataFrame, score: pd.Series, positive: Optional[pd.Series]) -> dict[str, Any]:
    status = rows["status"].astype(str)
    ok = status == Status.OK.value
    reasons = rows.loc[~ok, "reason"].fillna("").astype(str).replace("", "(none given)")
    values = score[ok].to_numpy(dtype=np.float64)
    values = values[np.isfinite(values)]
    out: dict[str, Any] = {
        "files": int(len(rows)),
        "ok": int(ok.sum()),
        "skipped": int((status == Status.SKIPPED.value).sum()),
        "error": int((status == Status.ERROR.value).sum()),
        "by_reason": {str(k): int(v) for k, v in reasons.value_counts().items()},
        "n_scored": int(values.size),
        "histogram": np.histogram(np.clip(values, 0, 1), bins=HISTOGRAM_EDGES)[0],
        "quantiles": np.quantile(values, QUANTILE_LEVELS).round(6) if values.size else None,
        "mean": float(values.mean()) if values.size else None,
    }
    if positive is not None:
        n_pos = int(positive[ok].sum())
        out["n_positive"], out["positive_rate"] = n_pos, (n_pos / int(ok.sum()) if ok.any() else None)
    if "applicable" in rows.columns:
        applicable = rows.loc[ok, "applicable"].fillna("").astype(str).str.lower()
        known = applicable.isin(["true", "false"])
        if known.any():
            out["n_flagged"] = int((applicable == "false").sum())
            out["flag_rate"] = out["n_flagged"] / int(known.sum())
    if "operating_point" in rows.columns:
        points = rows.loc[ok, "operating_point"].fillna("").astype(str)
        out["operating_points"] = {str(k): int(v) for k, v in points[points != ""].value_counts().items()}
    return out


def operating_point_source(card: ModelCard) -> dict[str, Any]:
    """Where a card's thresholds came from: the shipped card or a site file (with its SHA-256)."""
    if card.site:
        return {
            "source": "site",
            "file": card.site.get("file"),
            "sha256": card.site.get("sha256"),
            "apply": card.site.get("apply"),
            "created": card.site.get("created"),
            "thresholds": card.site.get("thresholds"),
        }
    by_band = (card.thresholds or {}).get("by_age_band") or {}
    return {
        "source": "shipped",
        "threshold": card.threshold if card.binary else None,
        "thresholds": {band: point.get("recall_target") for band, point in by_band.items()},
    }


def monitoring_block(frame: pd.DataFrame, cards: Sequence[ModelCard], images_per_second: float) -> dict[str, Any]:
    """``run.json["monitoring"]`` for a predictions table (all rows, all models)."""
    groups = group_columns(frame)
    models: dict[str, Any] = {}
    for card in cards:
        mine = frame["model"].astype(str) == card.name
        rows = frame[mine]
        proba = rows[card.prob_columns()].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        score = pd.Series(abnormality(proba, card) if len(rows) else [], index=rows.index, dtype=np.float64)
        positive = _positive(rows["pred_label"].fillna("").astype(str), card)
        entry = {
            "score": f"1 - {card.prob_column('normal')}"
            if "normal" in card.classes
            else card.prob_column(card.positive or ""),
            "positive": card.positive if card.binary else ("not normal" if positive is not None else None),
            "operating_point": operating_point_source(card),
            "images_per_second": images_per_second,
            "overall": _stats(rows, score, positive),
            "by": {},
        }
        for dim in DIMENSIONS:
            keys = groups.loc[rows.index, dim]
            entry["by"][dim] = {
                str(g): _stats(rows[keys == g], score[keys == g], None if positive is None else positive[keys == g])
                for g in sorted(keys.unique())
            }
        models[card.name] = entry
    return jsonable(
        {
            "schema_version": MONITORING_SCHEMA_VERSION,
            "quantile_levels": "0, 0.01, ..., 1",
            "histogram_edges": HISTOGRAM_EDGES,
            "dimensions": list(DIMENSIONS),
            "models": models,
        }
    )


# ------------------------------------------------------------------ drift statistics


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
    """A night's rate k/n against the baseline's k0/n0: exact binomial test and the night's 95% interval."""
    from scipy.stats import binomtest

    p0 = k0 / n0
    test = binomtest(k, n, min(max(p0, 1e-12), 1 - 1e-12))
    ci = test.proportion_ci(confidence_level=0.95, method="exact")
    return {
        "rate": k / n,
        "baseline_rate": p0,
        "change": k / n - p0,
        "ci": [float(ci.low), float(ci.high)],
        "p_value": float(test.pvalue),
    }


# --------------------------------------------------------------------------- nights


@dataclass
class Night:
    """One predict run: its run.json and when it started."""

    path: Path
    run: dict[str, Any]

    @property
    def started(self) -> str:
        return str(self.run.get("started") or "")

    @property
    def label(self) -> str:
        return self.started[:19].replace("T", " ") or self.path.name

    @property
    def monitoring(self) -> dict[str, Any]:
        return self.run["monitoring"]

    @property
    def predictions(self) -> Path:
        name = self.path.name
        stem = name[: -len(".run.json")] if name.endswith(".run.json") else self.path.stem
        return self.path.with_name(stem + ".csv")


def load_nights(paths: Sequence[Path | str]) -> tuple[list[Night], list[str]]:
    """Readable run.json files with a monitoring block, oldest first, and notes on the others."""
    nights, notes = [], []
    for path in map(Path, paths):
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            notes.append(f"{path}: not readable JSON ({type(e).__name__}); left out")
            continue
        if not isinstance(run, dict) or not isinstance(run.get("monitoring"), dict):
            notes.append(f"{path}: no monitoring block (a run.json of an older pneumobatch?); left out")
            continue
        nights.append(Night(path, run))
    nights.sort(key=lambda n: (n.started, str(n.path)))
    return nights, notes


def _sum(stats: Sequence[Mapping[str, Any]], key: str) -> int:
    return int(sum(s.get(key) or 0 for s in stats))


def _compare(
    night_stats: Mapping[str, Any], base_stats: Sequence[Mapping[str, Any]], limits: Mapping[str, float]
) -> dict[str, Any]:
    """Drift numbers of one group tonight against its baseline, and which limits they cross."""
    night, base = Distribution(), Distribution()
    night.add(night_stats)
    for s in base_stats:
        base.add(s)
    out: dict[str, Any] = {"n": night.n, "baseline_n": base.n, "alerts": []}
    alpha, min_n = limits["alpha"], int(limits["min_images"])
    if night.n < min_n or base.n < min_n:
        out["note"] = f"fewer than {min_n} scored images tonight or in the baseline: not tested"
        return out
    value, n_bins = psi(night, base)
    noise = psi_noise(night.n, base.n, n_bins, alpha)
    out["psi"], out["psi_noise"] = value, noise
    if value > max(limits["psi"], noise):
        out["alerts"].append(("psi", value, max(limits["psi"], noise)))
    d, p = ks_distance(night, base)
    out["ks_d"], out["ks_p"] = d, p
    if d >= limits["ks_d"] and p < alpha:
        out["alerts"].append(("ks", d, limits["ks_d"]))
    for what, k_key, n_key, limit in (
        ("positive-rate", "n_positive", "ok", "positive_rate_change"),
        ("flag-rate", "n_flagged", "ok", "flag_rate_change"),
    ):
        if k_key not in night_stats or not any(k_key in s for s in base_stats):
            continue
        k, n = int(night_stats[k_key]), int(night_stats[n_key])
        k0, n0 = _sum(base_stats, k_key), _sum([s for s in base_stats if k_key in s], n_key)
        if n and n0:
            change = rate_change(k, n, k0, n0)
            out[what.replace("-", "_")] = change
            if abs(change["change"]) >= limits[limit] and change["p_value"] < alpha:
                out["alerts"].append((what, change["change"], limits[limit]))
    return out


def _alert(night: Night, model: str, dim: str, group: str, kind: str, value: float, limit: float) -> dict[str, Any]:
    where = "all files" if dim == "overall" else f"{dim} {group}"
    if kind == "operating-point-changed":
        what = "temperature or thresholds differ from the baseline's (site file applied, changed or removed)"
    elif kind == "new-scanner":
        what = f"new scanner, {value:.0f} files (none in the baseline)"
    elif kind == "vanished-scanner":
        what = f"no files tonight (baseline: {value:.1f} per run)"
    else:
        what = f"{kind} {value:+.3f} (limit {limit:.3f})"
    return {
        "night": night.label,
        "run_json": str(night.path),
        "model": model,
        "dimension": dim,
        "group": group,
        "kind": kind,
        "value": value,
        "limit": limit,
        "message": f"{night.label} {model} {where}: {what}",
    }


def analyse(
    nights: Sequence[Night], baseline: int = DEFAULT_BASELINE, limits: Optional[Mapping[str, float]] = None
) -> dict[str, Any]:
    """Time series, drift against the baseline and alerts for run.json files (oldest first)."""
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    if len(nights) < 2:
        raise ReportError(f"monitoring needs at least two runs with a monitoring block, got {len(nights)}")
    baseline = max(1, min(int(baseline), len(nights) - 1))
    base_nights, later = nights[:baseline], nights[baseline:]
    models = list(dict.fromkeys(m for n in nights for m in n.monitoring.get("models", {})))
    series: dict[str, Any] = {
        "nights": [n.label for n in nights],
        "run_json": [str(n.path) for n in nights],
        "files": [],
        "errors": [],
        "images_per_second": [],
        "models": {},
    }
    for n in nights:
        counts = n.run.get("counts") or {}
        series["files"].append(counts.get("files"))
        series["errors"].append(counts.get("error"))
        series["images_per_second"].append(n.run.get("images_per_second"))
    alerts: list[dict[str, Any]] = []
    drift: dict[str, Any] = {}
    for model in models:
        per_night = [n.monitoring.get("models", {}).get(model) for n in nights]
        series["models"][model] = {
            "positive_rate": [m["overall"].get("positive_rate") if m else None for m in per_night],
            "flag_rate": [m["overall"].get("flag_rate") if m else None for m in per_night],
            "median_score": [
                m["overall"]["quantiles"][50] if m and m["overall"].get("quantiles") else None for m in per_night
            ],
            "by_scanner_positive_rate": {},
        }
        base_models = [m for m in per_night[:baseline] if m]
        drift[model] = []
        for n, m in zip(later, per_night[baseline:]):
            if m is None:
                continue
            night_drift: dict[str, Any] = {"night": n.label, "run_json": str(n.path), "groups": {}}
            tested = [("overall", "all", m["overall"], [b["overall"] for b in base_models])]
            for dim in DIMENSIONS:
                for group, stats in (m.get("by", {}).get(dim) or {}).items():
                    tested.append(
                        (
                            dim,
                            group,
                            stats,
                            [b["by"][dim][group] for b in base_models if group in b.get("by", {}).get(dim, {})],
                        )
                    )
            for dim, group, stats, base_stats in tested:
                result = _compare(stats, base_stats, limits)
                night_drift["groups"].setdefault(dim, {})[group] = result
                alerts += [_alert(n, model, dim, group, *a) for a in result["alerts"]]
            alerts += _scanner_changes(n, model, m, base_models, limits)
            if base_models and m.get("operating_point") != base_models[-1].get("operating_point"):
                alerts.append(_alert(n, model, "overall", "all", "operating-point-changed", 1, 0))
            scores = [
                g.get("psi") for d in night_drift["groups"].values() for g in d.values() if g.get("psi") is not None
            ]
            night_drift["drift_score"] = max(scores) if scores else None
            drift[model].append(night_drift)
        scanners = sorted({s for m in per_night if m for s in m.get("by", {}).get("scanner", {})})
        for s in scanners:
            series["models"][model]["by_scanner_positive_rate"][s] = [
                (m["by"]["scanner"].get(s) or {}).get("positive_rate") if m else None for m in per_night
            ]
    for n in later:
        counts = n.run.get("counts") or {}
        files, errors = counts.get("files") or 0, counts.get("error") or 0
        if files and errors / files > limits["error_rate"]:
            alerts.append(_alert(n, "(all)", "overall", "all", "error-rate", errors / files, limits["error_rate"]))
    for a in alerts:
        for k in ("value", "limit"):
            a[k] = float(a[k])
    return jsonable(
        {
            "baseline": {"nights": [n.label for n in base_nights], "run_json": [str(n.path) for n in base_nights]},
            "limits": limits,
            "series": series,
            "drift": drift,
            "alerts": alerts,
        }
    )


def _scanner_changes(
    night: Night,
    model: str,
    m: Mapping[str, Any],
    base_models: Sequence[Mapping[str, Any]],
    limits: Mapping[str, float],
) -> list[dict[str, Any]]:
    min_n = int(limits["min_images"])
    tonight = m.get("by", {}).get("scanner", {})
    seen: dict[str, int] = {}
    for b in base_models:
        for s, stats in b.get("by", {}).get("scanner", {}).items():
            seen[s] = seen.get(s, 0) + int(stats.get("files") or 0)
    out = []
    for s, stats in tonight.items():
        if s not in seen and int(stats.get("files") or 0) >= min_n:
            out.append(_alert(night, model, "scanner", s, "new-scanner", int(stats["files"]), min_n))
    for s, total in seen.items():
        if s not in tonight and total / max(len(base_models), 1) >= min_n:
            out.append(_alert(night, model, "scanner", s, "vanished-scanner", total / len(base_models), min_n))
    return out


# ---------------------------------------------------------------- labelled nights


def labelled_performance(
    nights: Sequence[Night],
    labels: pd.DataFrame,
    *,
    key: Optional[str] = None,
    label_column: str = "label",
    window: int = 7,
) -> dict[str, Any]:
    """Sensitivity, specificity and PPV with exact 95% intervals, per night and over the last
    ``window`` nights, for every model with a positive class, from each night's predictions CSV."""
    from scipy.stats import binomtest

    from pneumobatch.evaluation.labels.cards import card_from_run
    from pneumobatch.evaluation.labels.join import check_label_column, join_labels
    from pneumobatch.io.predictions import load_predictions

    def proportion(k: int, n: int) -> dict[str, Any]:
        if not n:
            return {"value": None, "ci": None, "k": k, "n": n}
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        return {"value": k / n, "ci": [float(ci.low), float(ci.high)], "k": k, "n": n}

    check_label_column(labels, label_column)  # a wrong column is an error, not a run of nights without labels
    out: dict[str, Any] = {"window": window, "models": {}, "notes": []}
    counts: dict[str, list[Optional[np.ndarray]]] = {}
    for night in nights:
        try:
            frame = load_predictions(night.predictions)
        except ReportError as e:
            out["notes"].append(f"{night.label}: {e}")
            frame = None
        for entry in night.run.get("models") or []:
            card = card_from_run(entry)
            if card is None or frame is None:
                continue
            c = counts.setdefault(card.name, [None] * len(nights))
            rows = frame[frame["model"] == card.name]
            try:
                join = join_labels(rows, labels, card, key=key, label_column=label_column)
            except LabelError:
                continue  # no label for this night yet
            truth, pred = _positive(pd.Series(join.y_true), card), _positive(pd.Series(join.y_pred), card)
            if truth is None:
                continue
            t, p = truth.to_numpy(), pred.to_numpy()
            c[nights.index(night)] = np.array([(t & p).sum(), (~t & p).sum(), (~t & ~p).sum(), (t & ~p).sum()])
    if not any(x is not None for per_night in counts.values() for x in per_night):
        out["notes"].append(
            f"no label of {labels.attrs.get('source', 'the labels file')} matched a prediction of these runs"
        )
    for model, per_night in counts.items():
        rows = []
        for i, night in enumerate(nights):
            recent = [x for x in per_night[max(0, i - window + 1) : i + 1] if x is not None]
            if per_night[i] is None:
                rows.append({"night": night.label, "labelled": 0})
                continue
            tp, fp, tn, fn = (int(v) for v in np.sum(recent, axis=0))
            rows.append(
                {
                    "night": night.label,
                    "labelled": int(per_night[i].sum()),
                    "window_labelled": tp + fp + tn + fn,
                    "sensitivity": proportion(tp, tp + fn),
                    "specificity": proportion(tn, tn + fp),
                    "ppv": proportion(tp, tp + fp),
                }
            )
        out["models"][model] = rows
    return jsonable(out)


# ------------------------------------------------------------------- Prometheus


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(nights: Sequence[Night], analysis: Mapping[str, Any]) -> str:
    """node_exporter textfile-collector metrics for the latest night (Prometheus text format 0.0.4)."""
    from datetime import datetime

    last = nights[-1]
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: Sequence[tuple[dict[str, str], Any]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if value is None:
                continue
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            number = repr(float(value))  # full precision: a timestamp must not be rounded to 6 digits
            lines.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")

    finished = last.run.get("finished")
    ts = datetime.fromisoformat(finished).timestamp() if finished else None
    counts = last.run.get("counts") or {}
    metric(
        "pneumobatch_last_success_timestamp_seconds",
        "gauge",
        "End of the latest completed predict run (Unix time).",
        [({}, ts)],
    )
    metric(
        "pneumobatch_files",
        "gauge",
        "Files in the latest run by status.",
        [({"status": s}, counts.get(s)) for s in ("ok", "skipped", "error")],
    )
    metric(
        "pneumobatch_errors", "gauge", "Files that could not be read in the latest run.", [({}, counts.get("error"))]
    )
    metric(
        "pneumobatch_images_per_second",
        "gauge",
        "Throughput of the latest run.",
        [({}, last.run.get("images_per_second"))],
    )
    models = last.monitoring.get("models", {})
    metric(
        "pneumobatch_positive_rate",
        "gauge",
        "Share of predicted images called positive at the operating point.",
        [({"model": m}, v["overall"].get("positive_rate")) for m, v in models.items()],
    )
    drift = {m: (d[-1] if d and d[-1]["run_json"] == str(last.path) else None) for m, d in analysis["drift"].items()}
    metric(
        "pneumobatch_drift_score",
        "gauge",
        "Largest PSI of any group of the latest run against the baseline.",
        [({"model": m}, d.get("drift_score") if d else None) for m, d in drift.items()],
    )
    tonight = [a for a in analysis["alerts"] if a["run_json"] == str(last.path)]
    metric("pneumobatch_alerts", "gauge", "Monitoring alerts raised for the latest run.", [({}, len(tonight))])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- the command


def parse_limits(specs: Sequence[str]) -> dict[str, float]:
    """``["psi=0.1", ...]`` -> ``{"psi": 0.1}``; :class:`OptionError` names the known limits."""
    from pneumobatch.core.errors import OptionError

    out = {}
    for spec in specs:
        name, sep, value = str(spec).partition("=")
        name = name.strip().replace("-", "_")
        try:
            if not sep or name not in DEFAULT_LIMITS:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise OptionError(
                f"--limit wants NAME=NUMBER with NAME one of {', '.join(DEFAULT_LIMITS)}, not {spec!r}"
            ) from None
    return out


@dataclass
class MonitorConfig:
    """Options of ``pneumobatch monitor``."""

    run_jsons: Sequence[Path]
    output: Path = Path("monitor.pdf")
    baseline: int = DEFAULT_BASELINE
    limits: dict[str, float] = field(default_factory=dict)
    labels: Optional[Path] = None
    key: Optional[str] = None
    label_column: str = "label"
    window: int = 7
    prometheus: Optional[Path] = None  # default: OUT.prom beside the PDF


@dataclass
class MonitorResult:
    pdf: Path
    json: Path
    prometheus: Path
    document: dict[str, Any]

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return self.document["alerts"]


def run_monitor(config: MonitorConfig) -> MonitorResult:
    """Analyse the runs and write ``OUT.pdf``, ``OUT.json`` and the Prometheus textfile (atomically)."""
    from pneumobatch.evaluation.labels.reading import read_labels
    from pneumobatch.io.atomicfile import atomic_write
    from pneumobatch.operations.monitor.pdf import render

    nights, notes = load_nights(config.run_jsons)
    if len(nights) < 2:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise ReportError(f"monitoring needs at least two runs with a monitoring block, got {len(nights)}{why}")
    document = analyse(nights, config.baseline, config.limits)
    document["notes"] = notes
    if config.labels is not None:
        document["labelled"] = labelled_performance(
            nights, read_labels(config.labels), key=config.key, label_column=config.label_column, window=config.window
        )
        document["notes"] += document["labelled"]["notes"]
    pdf = Path(config.output)
    out_json = pdf.with_suffix(".json")
    prom = Path(config.prometheus) if config.prometheus else pdf.with_suffix(".prom")
    atomic_write(out_json, json.dumps(document, indent=2) + "\n")
    atomic_write(pdf, lambda tmp: render(document, tmp))
    atomic_write(prom, prometheus_text(nights, document))
    return MonitorResult(pdf, out_json, prom, document)
