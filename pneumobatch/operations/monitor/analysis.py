"""Monitoring across nights: drift of each night against a baseline, alerts, and labelled nights.

**Across nights** (:func:`analyse`, ``pneumobatch monitor``): the run.json files predict
wrote (their ``monitoring`` block, :mod:`pneumobatch.operations.monitor.record`) are read
as :class:`Night` s; the first ``baseline`` nights are pooled into a baseline; every later
night is compared with it, per model and group, and an alert is raised when a limit of
:data:`DEFAULT_LIMITS` is crossed (statistics in :mod:`pneumobatch.operations.monitor.drift`):

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
  are then not comparable with the baseline, and a new baseline should start;
- ``model-added`` / ``model-removed``: a model ran tonight that did not run in the last
  baseline night, or the other way round (a model added, dropped or switched for another);
- ``weights-changed``: the model of that name ran with other weights (SHA-256) than in the
  last baseline night that ran it;
- ``classes-changed``: the model of that name predicts other classes than in the last
  baseline night that ran it (a 4-class etiology model replaced by the 5-class one with
  ``fungal``): its class shares are not comparable with the baseline's.

Class shares (``series.models[m].class_share``, and ``fine_share`` for two-level models):
the share of each night's predicted images given each class, from the run's
``class_counts``. A class the night's model does not have gets no value (None, a gap in the
plot), never 0: "0% fungal" would claim the old model could have said fungal. Nights whose
run.json predates class counts have no values either.

A run.json that is not one predict wrote (edited by hand, damaged) is left out with a note
saying what is wrong (:func:`pneumobatch.operations.monitor.schema.night_problem`).

Groups with fewer than ``min_images`` scored images in the night are not tested.

**Labelled nights** (:func:`labelled_performance`): when labels arrive, sensitivity,
specificity and PPV per night and over a rolling window, from each night's predictions CSV.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pneumobatch.core.errors import LabelError, ModelError, ReportError
from pneumobatch.evaluation.metrics import jsonable
from pneumobatch.evaluation.metrics.intervals import exact_interval
from pneumobatch.operations.monitor.drift import Distribution, ks_distance, psi, psi_noise, rate_change
from pneumobatch.operations.monitor.record import DIMENSIONS, UNUSABLE_FINE, positive_mask
from pneumobatch.operations.monitor.schema import night_problem

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
        return predictions_path(self.path)

    def weights(self, model: str) -> Optional[str]:
        """The SHA-256 of the weights ``model`` ran with (None when run.json does not say)."""
        for entry in self.run.get("models") or []:
            if entry.get("name") == model:
                sha = entry.get("weights_sha256") or (entry.get("card") or {}).get("weights_sha256")
                return sha.lower() if isinstance(sha, str) else None
        return None

    def classes(self, model: str) -> Optional[list[str]]:
        """The classes ``model`` predicted this night: its monitoring entry's, else its card's in run.json
        (a run.json older than class counts), else None."""
        entry = self.monitoring.get("models", {}).get(model) or {}
        if isinstance(entry.get("classes"), list):
            return [str(c) for c in entry["classes"]]
        for run_model in self.run.get("models") or []:
            if run_model.get("name") == model:
                card = run_model.get("card") if isinstance(run_model.get("card"), dict) else {}
                classes = card.get("classes", run_model.get("classes"))
                return [str(c) for c in classes] if isinstance(classes, list) else None
        return None


def _shares(nights: Sequence[Night], model: str, key: str, classes_key: str) -> dict[str, list[Optional[float]]]:
    """Per class, its share of each night's predicted images (``key``: class_counts or fine_counts);
    None where the night's model lacks the class or the run.json has no counts."""
    per_night = []
    for n in nights:
        m = n.monitoring.get("models", {}).get(model) or {}
        counts = (m.get("overall") or {}).get(key)
        known = n.classes(model) if classes_key == "classes" else m.get(classes_key)
        if counts is not None and known is not None:
            known = [*known, UNUSABLE_FINE] if key == "fine_counts" else known
        per_night.append((counts, known))
    names = list(dict.fromkeys(c for counts, known in per_night if counts is not None and known for c in known))
    if key == "fine_counts" and not any(counts and counts.get(UNUSABLE_FINE) for counts, _ in per_night):
        names = [c for c in names if c != UNUSABLE_FINE]
    out: dict[str, list[Optional[float]]] = {}
    for name in names:
        values: list[Optional[float]] = []
        for counts, known in per_night:
            total = sum(counts.values()) if counts else 0
            values.append(
                counts.get(name, 0) / total if counts is not None and known and name in known and total else None
            )
        out[name] = values
    return out


def predictions_path(run_json: Path) -> Path:
    """The predictions CSV a run.json belongs to (``X.run.json`` -> ``X.csv``)."""
    run_json = Path(run_json)
    name = run_json.name
    stem = name[: -len(".run.json")] if name.endswith(".run.json") else run_json.stem
    return run_json.with_name(stem + ".csv")


def load_nights(paths: Sequence[Path | str]) -> tuple[list[Night], list[str]]:
    """Readable run.json files with a monitoring block, oldest first, and notes on the others."""
    from pneumobatch.core.files import RUN_JSON_LIMIT, FileReadError, read_small_file

    nights, notes = [], []
    for path in map(Path, paths):
        try:  # a regular file of at most RUN_JSON_LIMIT bytes: a FIFO or a device is left out, never waited on
            run = json.loads(read_small_file(path, limit=RUN_JSON_LIMIT, what="run.json").decode("utf-8"))
        except FileReadError as e:
            notes.append(f"{e}; left out")
            continue
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            notes.append(f"{path}: not readable JSON ({type(e).__name__}); left out")
            continue
        if not isinstance(run, dict) or run.get("monitoring") is None:
            notes.append(f"{path}: no monitoring block (a run.json of an older pneumobatch?); left out")
            continue
        problem = night_problem(run)
        if problem is not None:
            notes.append(f"{path}: {problem}; left out")
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


def _alert(
    night: Night, model: str, dim: str, group: str, kind: str, value: float, limit: float, detail: str = ""
) -> dict[str, Any]:
    where = "all files" if dim == "overall" else f"{dim} {group}"
    if kind == "operating-point-changed":
        what = "temperature or thresholds differ from the baseline's (site file applied, changed or removed)"
    elif kind == "new-scanner":
        what = f"new scanner, {value:.0f} files (none in the baseline)"
    elif kind == "vanished-scanner":
        what = f"no files tonight (baseline: {value:.1f} per run)"
    elif kind == "model-added":
        what = "model-added: it did not run in the last baseline night"
    elif kind == "model-removed":
        what = "model-removed: it ran in the last baseline night, not tonight"
    elif kind == "weights-changed":
        what = "weights-changed: other weights (SHA-256) than in the baseline"
    elif kind == "classes-changed":
        what = f"classes-changed: other classes than in the baseline ({detail}); class shares are not comparable"
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
            "class_share": _shares(nights, model, "class_counts", "classes"),
        }
        fine_share = _shares(nights, model, "fine_counts", "fine_classes")
        if fine_share:
            series["models"][model]["fine_share"] = fine_share
        base_runs = [(n, m) for n, m in zip(base_nights, per_night[:baseline]) if m]
        base_models = [m for _, m in base_runs]
        in_last_base = per_night[baseline - 1] is not None
        drift[model] = []
        for n, m in zip(later, per_night[baseline:]):
            if m is None:
                if in_last_base:
                    alerts.append(_alert(n, model, "overall", "all", "model-removed", 1, 0))
                continue
            if not in_last_base:
                alerts.append(_alert(n, model, "overall", "all", "model-added", 1, 0))
            before, now = (base_runs[-1][0].weights(model) if base_runs else None), n.weights(model)
            if before and now and before != now:
                alerts.append(_alert(n, model, "overall", "all", "weights-changed", 1, 0))
            before_classes = base_runs[-1][0].classes(model) if base_runs else None
            now_classes = n.classes(model)
            if before_classes is not None and now_classes is not None and set(before_classes) != set(now_classes):
                added = [c for c in now_classes if c not in before_classes]
                removed = [c for c in before_classes if c not in now_classes]
                detail = "; ".join(
                    part
                    for part in (
                        f"added {', '.join(map(_short, added))}" if added else "",
                        f"removed {', '.join(map(_short, removed))}" if removed else "",
                    )
                    if part
                )
                alerts.append(_alert(n, model, "overall", "all", "classes-changed", 1, 0, detail))
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


def _short(name: str, limit: int = 40) -> str:
    """A class name from a run.json, fit for a one-line message."""
    name = " ".join(str(name).split())
    return name if len(name) <= limit else name[: limit - 3] + "..."


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
    from pneumobatch.core.card import validate_card
    from pneumobatch.evaluation.labels.cards import card_from_run
    from pneumobatch.evaluation.labels.join import check_label_column, join_labels
    from pneumobatch.io.predictions import load_predictions

    def proportion(k: int, n: int) -> dict[str, Any]:
        return {"value": k / n if n else None, "ci": exact_interval(k, n), "k": k, "n": n}

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
            try:
                if entry.get("card") is not None:
                    validate_card(entry["card"])
                card = card_from_run(entry)
            except ModelError:  # the stored card was edited: its model cannot say what a positive is
                out["notes"].append(f"{night.path}: a model card in it is not valid; left out of the labelled metrics")
                continue
            if card is None or frame is None:
                continue
            c = counts.setdefault(card.name, [None] * len(nights))
            rows = frame[frame["model"] == card.name]
            try:
                join = join_labels(rows, labels, card, key=key, label_column=label_column)
            except LabelError:
                continue  # no label for this night yet
            truth, pred = positive_mask(pd.Series(join.y_true), card), positive_mask(pd.Series(join.y_pred), card)
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
