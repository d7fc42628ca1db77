"""Reports on a predictions CSV: a PDF, its figures as PNG files, every number as JSON.

``write_report(predictions.csv, report.pdf, labels.csv)`` writes, all derived from
the PDF path and nothing else::

    report.pdf           A4 report (reportlab)
    report.json          every number in the PDF, the curves and the join problems
    report_files/*.png   every figure of the PDF (matplotlib, 120 dpi)

With labels the report evaluates each model (per-class table, confusion matrix, ROC
and PR curves with bootstrap CIs, operating points for binary tasks, calibration,
study level, subgroups, join problems); without labels it summarises the predictions
(predicted classes, probability histogram, skipped and failed files, throughput).
A CSV holding several models gets one section per model unless ``model`` picks one.

``predictions.run.json`` and ``predictions.studies.csv`` next to the CSV are used when
present; everything else is derived from the CSV itself.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd

from pneumobatch.atomicfile import atomic_write, check_replaceable
from pneumobatch.card import ModelCard
from pneumobatch.errors import LabelError, Reason, ReportError
from pneumobatch.labels import (
    PROB_PREFIX,
    JoinResult,
    card_from_run,
    check_label_column,
    describe_model,
    detect_key,
    join_labels,
    read_labels,
    study_level,
    threshold_notes,
)
from pneumobatch.metrics import evaluate, jsonable, subgroup_metrics, summarise
from pneumobatch.outputs import file_counts, restore_formulas
from pneumobatch.subgroups import add_subgroup_columns, parse_band_defaults

log = logging.getLogger(__name__)

SCHEMA = "pneumobatch.report/1"
RESEARCH_ONLY = "Research use only \u2014 not a diagnostic device."
DPI = 120
REQUIRED_COLUMNS = ("path", "status")

__all__ = [
    "RESEARCH_ONLY",
    "ReportError",
    "ReportResult",
    "build_report",
    "output_paths",
    "write_report",
]


@dataclass
class ReportResult:
    """What :func:`write_report` wrote."""

    pdf: Path
    metrics_json: Path
    figures: list[Path]
    models: list[str]
    labelled: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [self.pdf, self.metrics_json, *self.figures]


# ------------------------------------------------------------------------- inputs


def output_paths(out_pdf: Path | str) -> tuple[Path, Path]:
    """The JSON file and the figure folder that go with ``out_pdf``."""
    out_pdf = Path(out_pdf)
    return out_pdf.with_suffix(".json"), out_pdf.with_name(out_pdf.stem + "_files")


def _sidecar(predictions_csv: Path, suffix: str) -> Path:
    return predictions_csv.with_name(predictions_csv.stem + suffix)


def _version() -> str:
    try:
        import pneumobatch

        version = getattr(pneumobatch, "__version__", None)
        if version:
            return str(version)
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            return dist_version("pneumobatch")
        except PackageNotFoundError:
            return "unknown"
    except Exception:  # a version string must never stop a report
        return "unknown"


def load_predictions(path: Path | str) -> pd.DataFrame:
    """Read a predictions CSV; ``prob_*`` and ``threshold`` become floats."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"predictions file not found: {path}")
    try:
        frame = restore_formulas(pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", encoding_errors="replace"))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReportError(f"cannot read predictions file {path}: {first}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ReportError(f"{path} is not a pneumobatch predictions CSV: no column {', '.join(missing)}")
    for col in frame.columns:
        if col.startswith(PROB_PREFIX) or col == "threshold":
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    if "model" not in frame.columns:
        frame["model"] = ""
    if "reason" not in frame.columns:
        frame["reason"] = ""
    frame["status"] = frame["status"].str.strip().str.lower()
    return frame


def _load_run(path: Path, warnings: list[str]) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.append(f"{path.name} could not be read ({e}); run details derived from the CSV")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path.name} is not a JSON object; ignored")
        return None
    return data


def _load_studies(path: Path, warnings: list[str]) -> Optional[pd.DataFrame]:
    if not path.is_file():
        return None
    try:
        frame = restore_formulas(pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="replace"))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        warnings.append(f"{path.name} could not be read ({e}); study predictions aggregated here")
        return None
    if "study_instance_uid" not in frame.columns:
        warnings.append(f"{path.name} has no study_instance_uid column; ignored")
        return None
    for col in frame.columns:
        if col.startswith(PROB_PREFIX) or col in ("threshold", "n_images"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def _reasons_by_status(by_reason: Any) -> dict[str, dict[str, int]]:
    """``{status: {reason: n}}`` from run.json's flat ``{reason: n}`` (or nested form)."""
    if not isinstance(by_reason, dict):
        return {}
    out: dict[str, dict[str, int]] = {}
    for reason, n in by_reason.items():
        if isinstance(n, dict):  # already nested
            out.setdefault(str(reason), {}).update({str(k): v for k, v in n.items()})
            continue
        try:
            status = Reason(reason).status.value
        except ValueError:
            status = "other"
        out.setdefault(status, {})[str(reason)] = n
    return out


def _elapsed(run: dict[str, Any]) -> Optional[float]:
    """Seconds spent predicting: run.json's ``seconds``, else finished - started."""
    if isinstance(run.get("seconds"), (int, float)):
        return float(run["seconds"])
    try:
        start = datetime.fromisoformat(str(run["started"]))
        end = datetime.fromisoformat(str(run["finished"]))
        return (end - start).total_seconds()
    except (KeyError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------------ compute


def _group_values(values: pd.Series) -> list[str]:
    text = values.fillna("").astype(str).str.strip()
    return text.where(text != "", "(missing)").tolist()


def _unlabelled_groups(ok: pd.DataFrame, column: str, classes: Sequence[str]) -> dict[str, Any]:
    values = pd.Series(_group_values(ok[column]), index=ok.index)
    groups = []
    for value, idx in values.groupby(values).groups.items():
        preds = ok.loc[idx, "pred_label"].astype(str) if "pred_label" in ok else pd.Series([], dtype=str)
        counts = preds.value_counts()
        groups.append(
            {
                "value": str(value),
                "n": int(len(idx)),
                "prediction_counts": {c: int(counts.get(c, 0)) for c in classes},
            }
        )
    groups.sort(key=lambda g: (-g["n"], g["value"]))
    return {"groups": groups[:30], "n_groups": len(groups), "omitted_groups": max(0, len(groups) - 30)}


def _pick_model(model: str, names: list[str], preds: pd.DataFrame, source: Path) -> str:
    """A model by name, or by task when exactly one model in the CSV has that task."""
    if model in names:
        return model
    if "task" in preds.columns:
        by_task = sorted(set(preds.loc[preds["task"] == model, "model"]))
        if len(by_task) == 1:
            return by_task[0]
    raise ReportError(f"model {model!r} is not in {source.name} (models: {', '.join(names) or 'none'})")


def select_labels(labels: pd.DataFrame, where: Sequence[str]) -> pd.DataFrame:
    """Keep the label rows matching every ``COLUMN=VALUE`` (e.g. ``split=test``), case-insensitively."""
    for condition in where:
        column, sep, value = str(condition).partition("=")
        column = column.strip()
        if not sep or not column:
            raise LabelError(f"--where takes COLUMN=VALUE, not {condition!r}")
        if column not in labels.columns:
            raise LabelError(f"--where: labels have no column {column!r} (columns: {', '.join(labels.columns)})")
        labels = labels[labels[column].str.lower() == value.strip().lower()]
        if labels.empty:
            raise LabelError(f"--where {condition}: no label rows match")
    return labels


#: ``--by`` columns derived from age, view and sex columns when absent (see :mod:`pneumobatch.subgroups`).
DERIVED_SUBGROUPS = {"age_band", "view_group", "sex_group"}


def build_report(
    predictions_csv: Path | str,
    labels_csv: Path | str | None = None,
    *,
    key: Optional[str] = None,
    label_column: str = "label",
    model: Optional[str] = None,
    by: Sequence[str] = (),
    where: Sequence[str] = (),
    default_age_band: Sequence[str] = (),
    n_bootstrap: int = 1000,
    seed: int = 0,
    run_json: Path | str | None = None,
    studies_csv: Path | str | None = None,
    max_examples: int = 10,
) -> dict[str, Any]:
    """Every number of the report as one JSON-ready dict (no files written)."""
    predictions_csv = Path(predictions_csv)
    warnings: list[str] = []
    preds = load_predictions(predictions_csv)
    run_path = Path(run_json) if run_json else _sidecar(predictions_csv, ".run.json")
    studies_path = Path(studies_csv) if studies_csv else _sidecar(predictions_csv, ".studies.csv")
    run = _load_run(run_path, warnings)
    studies_all = _load_studies(studies_path, warnings)
    labels = read_labels(labels_csv) if labels_csv is not None else None
    if labels is not None and where:
        labels = select_labels(labels, where)
        warnings.append(f"labels restricted to {' and '.join(where)}: {len(labels)} rows")
    by = [str(b) for b in by]
    if set(by) & DERIVED_SUBGROUPS:
        # age_band / view_group / sex_group: from age, view and sex columns (and the
        # age-band defaults per source), on whichever side has them
        try:
            defaults = parse_band_defaults(default_age_band)
        except ValueError as exc:
            raise LabelError(str(exc)) from None
        if labels is not None:
            labels = add_subgroup_columns(labels, defaults)
        if labels is None or not set(by) & DERIVED_SUBGROUPS <= set(labels.columns):
            preds = add_subgroup_columns(preds, defaults)
    for col in by:
        in_labels = labels is not None and col in labels.columns
        if not in_labels and col not in preds.columns:
            where = "labels file or predictions" if labels is not None else "predictions (no labels given)"
            raise LabelError(f"--by {col}: no such column in the {where}")

    run_models = {str(m.get("name")): m for m in (run or {}).get("models", []) if isinstance(m, dict)}
    names = [n for n in dict.fromkeys(preds["model"].tolist())]
    if names == [""]:
        only = list(run_models)[:1]
        preds["model"] = only[0] if only else "model"
        names = [preds["model"].iloc[0]]
    if not names:
        names = list(run_models)
    if model is not None:
        names = [_pick_model(model, names, preds, predictions_csv)]

    run = run or {}
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
        "report_pneumobatch_version": _version(),
        "research_use_only": RESEARCH_ONLY,
        "inputs": {
            "predictions": str(predictions_csv),
            "labels": str(labels_csv) if labels_csv is not None else None,
            "run_json": str(run_path) if run else None,
            "studies_csv": str(studies_path) if studies_all is not None else None,
            "key": key,
            "label_column": label_column,
            "by": by,
            "n_bootstrap": n_bootstrap,
            "seed": seed,
        },
        "run": {
            "pneumobatch_version": run.get("pneumobatch_version"),
            "started": run.get("started"),
            "finished": run.get("finished"),
            "elapsed_s": _elapsed(run),
            "roots": run.get("roots"),
            "device": run.get("device"),
            "images_per_second": run.get("images_per_second"),
            "counts": run.get("counts") or file_counts(preds),
            "counts_source": "run.json" if run.get("counts") else "predictions CSV",
        },
        "labelled": labels is not None,
        "models": [],
        "warnings": warnings,
    }
    if not run:
        warnings.append(f"{run_path.name} not found: run details derived from the CSV")

    if labels is not None:  # column problems are the same for every model: fail once, early
        key = detect_key(labels, preds, key)
        check_label_column(labels, label_column)
    failures: list[LabelError] = []
    for name in names:
        rows = preds[preds["model"] == name]
        info = card_from_run(run_models.get(name)) or describe_model(rows, run_models.get(name))
        prob_columns = info.prob_columns()
        ok = rows[rows["status"] == "ok"]
        if prob_columns and all(c in ok.columns for c in prob_columns):
            ok = ok[ok[prob_columns].notna().all(axis=1)]
            proba = ok[prob_columns].to_numpy(dtype=np.float64)
        else:
            proba = None
        section: dict[str, Any] = {
            "name": info.name,
            "task": info.task,
            "classes": list(info.classes),
            "positive": info.positive,
            "threshold": info.threshold,
            "weights_sha256": info.weights_sha256,
            "card_thresholds": info.operating_points(),
            "notes": threshold_notes(rows),
            "counts": file_counts(rows),
            "summary": summarise(
                rows["status"].tolist(),
                rows["reason"].tolist(),
                ok["pred_label"].tolist() if "pred_label" in ok else [],
                proba,
                info.classes,
                positive=info.positive,
                threshold=info.threshold,
                images_per_second=run.get("images_per_second"),
                elapsed_s=_elapsed(run),
            ),
            "join": None,
            "evaluation": None,
            "study": None,
            "subgroups": {},
            "label_error": None,
            "figures": {},
        }
        doc["models"].append(section)
        studies = None
        if studies_all is not None:
            studies = studies_all
            if "model" in studies.columns and (studies["model"] != "").any():
                studies = studies[studies["model"] == name]
        if labels is None:
            for col in by:
                section["subgroups"][col] = _unlabelled_groups(ok, col, info.classes)
            continue
        try:
            join = join_labels(
                rows,
                labels,
                info,
                key=key,
                label_column=label_column,
                studies=studies,
                max_examples=max_examples,
            )
        except LabelError as e:  # nothing joined for this model; others may still join
            failures.append(e)
            section["label_error"] = str(e)
            continue
        section["join"] = join.summary()
        section["evaluation"] = _evaluate(join, info, n_bootstrap, seed)
        if join.level == "file":
            study_join = study_level(join, studies, rows, max_examples=max_examples)
            if study_join is not None:
                section["study"] = {
                    "source": "image labels",
                    "join": study_join.summary(),
                    "evaluation": _evaluate(study_join, info, n_bootstrap, seed),
                }
        for col in by:
            section["subgroups"][col] = subgroup_metrics(
                _group_values(join.column(col)),
                join.y_true,
                join.proba,
                info.classes,
                y_pred=join.y_pred,
                positive=info.positive,
                threshold=info.threshold,
                n_bootstrap=n_bootstrap,
                seed=seed,
            )
    if labels is not None and names and len(failures) == len(names):
        raise failures[0]
    return jsonable(doc)


def _evaluate(join: JoinResult, info: ModelCard, n_bootstrap: int, seed: int) -> dict[str, Any]:
    return evaluate(
        join.y_true,
        join.proba,
        info.classes,
        y_pred=join.y_pred,
        positive=info.positive,
        threshold=info.threshold,
        card_thresholds=info.operating_points(),
        n_bootstrap=n_bootstrap,
        seed=seed,
    )


# ------------------------------------------------------------------------ figures


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        fig.clear()
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{value:,}"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def _ci(ci: Any, digits: int = 3) -> str:
    if not ci:
        return ""
    return f"({ci[0]:.{digits}f}\u2013{ci[1]:.{digits}f})"


_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _fig_confusion(ev: dict[str, Any], title: str, path: Path) -> Path:
    cm = ev["confusion_matrix"]
    classes = cm["labels"]
    k = len(classes)
    size = 2.2 + 0.55 * k
    fig = _new_figure(2 * size + 0.6, size)
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("counts", "row_normalised"), ("counts", "fraction of true class")):
        data = np.array([[np.nan if v is None else v for v in row] for row in cm[key]], dtype=float)
        shown = data if key == "row_normalised" else data / max(np.nanmax(data), 1)
        ax.imshow(np.nan_to_num(shown), cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                v = data[i, j]
                text = "n/a" if not np.isfinite(v) else (f"{int(v):,}" if key == "counts" else f"{v:.2f}")
                dark = np.isfinite(shown[i, j]) and shown[i, j] > 0.6
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(k), classes, rotation=30 if k > 2 else 0, ha="right" if k > 2 else "center", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _fig_roc(ev: dict[str, Any], title: str, path: Path) -> Path:
    fig = _new_figure(3.7, 3.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    for i, (cls, roc) in enumerate(ev["roc"].items()):
        if roc.get("auc") is None:
            continue
        label = f"{cls}: {roc['auc']:.3f} {_ci(roc.get('auc_ci'))}"
        ax.plot(roc["fpr"], roc["tpr"], color=_COLOURS[i % len(_COLOURS)], lw=1.5, label=label)
    markers = {"shipped": "o", "recall_95": "s", "youden": "^"}
    for p in ev.get("operating_points", []):
        if p["name"] in markers and p["sensitivity"] is not None and p["specificity"] is not None:
            ax.plot(
                1 - p["specificity"],
                p["sensitivity"],
                markers[p["name"]],
                color="k",
                ms=6,
                mfc="none",
                label=f"{p['name']} (t={p['threshold']:.3g})",
            )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)", fontsize=8)
    ax.set_ylabel("sensitivity (true positive rate)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=6.5, title="AUC (95% CI)", title_fontsize=6.5, framealpha=0.85)
    return _save(fig, path)


def _fig_pr(ev: dict[str, Any], title: str, path: Path) -> Path:
    fig = _new_figure(3.7, 3.6)
    ax = fig.subplots()
    for i, (cls, pr) in enumerate(ev["pr"].items()):
        if pr.get("average_precision") is None:
            continue
        colour = _COLOURS[i % len(_COLOURS)]
        ax.plot(
            pr["recall"],
            pr["precision"],
            color=colour,
            lw=1.5,
            label=f"{cls}: AP {pr['average_precision']:.3f} (prev. {pr['prevalence']:.2f})",
        )
        ax.axhline(pr["prevalence"], color=colour, lw=0.8, ls=":")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("recall (sensitivity)", fontsize=8)
    ax.set_ylabel("precision (PPV)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=6.5, framealpha=0.85)
    return _save(fig, path)


def _fig_calibration(ev: dict[str, Any], title: str, path: Path) -> Path:
    cal = ev["calibration"]
    fig = _new_figure(5.6, 5.0)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    series = list(cal["classes"].items())
    if "top_label" in cal:
        series.append(("top label (confidence)", cal["top_label"]))
    width = 1.0 / cal["n_bins"] / (len(series) + 1)
    for i, (cls, c) in enumerate(series):
        colour = "k" if cls.startswith("top label") else _COLOURS[i % len(_COLOURS)]
        bins = [b for b in c["bins"] if b["count"]]
        top.plot(
            [b["mean_predicted"] for b in bins],
            [b["fraction_positive"] for b in bins],
            "o-",
            color=colour,
            ms=3,
            lw=1.2,
            label=f"{cls}: ECE {_fmt(c['ece'])}",
        )
        bottom.bar(
            [b["lo"] + (i + 0.5) * width for b in c["bins"]],
            [b["count"] for b in c["bins"]],
            width=width,
            color=colour,
            alpha=0.7,
        )
    top.set_xlim(0, 1)
    top.set_ylim(-0.01, 1.01)
    top.set_ylabel("observed fraction", fontsize=8)
    top.tick_params(labelsize=8)
    top.legend(loc="upper left", fontsize=7, framealpha=0.85)
    top.set_title(title, fontsize=10)
    bottom.set_xlabel("predicted probability", fontsize=8)
    bottom.set_ylabel("count", fontsize=8)
    bottom.tick_params(labelsize=8)
    return _save(fig, path)


def _fig_summary(summary: dict[str, Any], title: str, path: Path) -> Path:
    fig = _new_figure(7.0, 3.2)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.4])
    counts = summary["prediction_counts"]
    left.bar(range(len(counts)), list(counts.values()), color=_COLOURS[: len(counts)] or None)
    left.set_xticks(range(len(counts)), list(counts), rotation=30 if len(counts) > 2 else 0, fontsize=8)
    left.set_ylabel("images", fontsize=8)
    left.set_title("predicted class", fontsize=9)
    left.tick_params(labelsize=8)
    hist = summary["probability_histogram"]
    edges = np.asarray(hist["edges"], dtype=float)
    for i, (cls, c) in enumerate(hist["counts"].items()):
        right.stairs(c, edges, color=_COLOURS[i % len(_COLOURS)], lw=1.3, label=f"P({cls})")
    if summary.get("threshold") is not None:
        right.axvline(summary["threshold"], color="k", ls="--", lw=1, label=f"threshold {summary['threshold']:.3g}")
    right.set_xlabel("probability", fontsize=8)
    right.set_ylabel("images", fontsize=8)
    right.set_title("probability histogram", fontsize=9)
    right.tick_params(labelsize=8)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def render_figures(doc: dict[str, Any], folder: Path) -> list[Path]:
    """Draw every figure of ``doc`` into ``folder``; records the relative paths in ``doc``."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    for section in doc["models"]:
        slug = _slug(section["name"])
        while slug in used:
            slug += "_"
        used.add(slug)
        figs: dict[str, Path] = {}
        name = section["name"]
        ev = section.get("evaluation")
        if not ev:
            figs["summary"] = _fig_summary(section["summary"], f"{name}: predictions", folder / f"{slug}_summary.png")
        if ev:
            figs["confusion"] = _fig_confusion(ev, f"{name}: confusion matrix", folder / f"{slug}_confusion.png")
            figs["roc"] = _fig_roc(ev, f"{name}: ROC", folder / f"{slug}_roc.png")
            figs["pr"] = _fig_pr(ev, f"{name}: precision-recall", folder / f"{slug}_pr.png")
            figs["calibration"] = _fig_calibration(ev, f"{name}: calibration", folder / f"{slug}_calibration.png")
        study = (section.get("study") or {}).get("evaluation")
        if study:
            figs["study_roc"] = _fig_roc(study, f"{name}: ROC, studies", folder / f"{slug}_study_roc.png")
        section["figures"] = {k: f"{folder.name}/{p.name}" for k, p in figs.items()}
        written.extend(figs.values())
    return written


# ---------------------------------------------------------------------------- PDF


def _styles():
    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet

    base = getSampleStyleSheet()
    return {
        "title": base["Title"],
        "h1": ParagraphStyle("h1", parent=base["Heading1"], fontSize=15, spaceBefore=4, spaceAfter=6),
        "h2": ParagraphStyle("h2", parent=base["Heading2"], fontSize=12, spaceBefore=10, spaceAfter=4),
        "h3": ParagraphStyle("h3", parent=base["Heading3"], fontSize=10, spaceBefore=6, spaceAfter=3),
        "body": ParagraphStyle("body", parent=base["BodyText"], fontSize=9, leading=11.5, spaceAfter=4),
        "note": ParagraphStyle(
            "note", parent=base["BodyText"], fontSize=8, leading=10, textColor=colors.HexColor("#444444")
        ),
        "warn": ParagraphStyle(
            "warn",
            parent=base["BodyText"],
            fontSize=10,
            leading=13,
            textColor=colors.HexColor("#a01010"),
            fontName="Helvetica-Bold",
        ),
        "td": ParagraphStyle("td", parent=base["BodyText"], fontSize=7.5, leading=9),
        "th": ParagraphStyle("th", parent=base["BodyText"], fontSize=7.5, leading=9, fontName="Helvetica-Bold"),
        "mono": ParagraphStyle("mono", parent=base["BodyText"], fontSize=7, leading=9, fontName="Courier"),
    }


def _esc(value: Any) -> str:
    return escape(str(value))


class _Pdf:
    """Builds the platypus story for one report document."""

    def __init__(self, doc: dict[str, Any], figure_root: Path) -> None:
        from reportlab.lib.pagesizes import A4
        from reportlab.lib.units import cm

        self.doc = doc
        self.root = figure_root
        self.styles = _styles()
        self.story: list[Any] = []
        self.pending: list[Any] = []
        self.width = A4[0] - 3.6 * cm
        self.page = A4
        self.margin = 1.8 * cm

    # --- primitives: headings are held back and kept on the page of what follows
    def _add(self, *flowables: Any) -> None:
        from reportlab.platypus import KeepTogether

        if self.pending:
            self.story.append(KeepTogether([*self.pending, flowables[0]]))
            self.story.extend(flowables[1:])
            self.pending = []
        else:
            self.story.extend(flowables)

    def para(self, text: str, style: str = "body", raw: bool = False, keep: bool = False) -> None:
        """A paragraph; ``keep`` holds it on the page of what follows (an intro line)."""
        from reportlab.platypus import Paragraph

        flowable = Paragraph(text if raw else _esc(text), self.styles[style])
        if keep:
            self.pending.append(flowable)
        else:
            self._add(flowable)

    def heading(self, text: str, style: str = "h2") -> None:
        from reportlab.platypus import Paragraph

        self.pending.append(Paragraph(_esc(text), self.styles[style]))

    def table(
        self,
        header: Sequence[str],
        rows: Sequence[Sequence[Any]],
        widths: Sequence[float],
        mono: Sequence[int] = (),
    ) -> None:
        from reportlab.lib import colors
        from reportlab.platypus import Paragraph, Spacer, Table, TableStyle

        total = sum(widths)
        widths = [w / total * self.width for w in widths]
        data = []
        if header:
            data.append([Paragraph(_esc(h), self.styles["th"]) for h in header])
        for row in rows:
            data.append([Paragraph(_esc(c), self.styles["mono" if j in mono else "td"]) for j, c in enumerate(row)])
        if not data:
            return
        t = Table(data, colWidths=widths, repeatRows=1 if header else 0, hAlign="LEFT")
        style = [
            ("GRID", (0, 0), (-1, -1), 0.3, colors.HexColor("#bbbbbb")),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ("TOPPADDING", (0, 0), (-1, -1), 2),
            ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
        ]
        if header:
            style.append(("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8eef6")))
        t.setStyle(TableStyle(style))
        self._add(t, Spacer(1, 6))

    def kv(self, pairs: Sequence[tuple[str, Any]]) -> None:
        self.table([], [[k, v] for k, v in pairs], [1, 3.2])

    def _image(self, rel: str, max_width: float, max_height: float) -> Any:
        from reportlab.lib.utils import ImageReader
        from reportlab.platypus import Image

        path = self.root / rel
        w, h = ImageReader(str(path)).getSize()
        width = min(max_width, w * 72.0 / DPI)
        height = width * h / w
        if height > max_height:
            height = max_height
            width = height * w / h
        return Image(str(path), width=width, height=height)

    def figure(self, rel: Optional[str], max_height: float = 330) -> None:
        from reportlab.platypus import Spacer

        if rel:
            self._add(self._image(rel, self.width, max_height), Spacer(1, 6))

    def figures(self, rels: Sequence[Optional[str]], max_height: float = 300) -> None:
        """Figures side by side, each in an equal share of the text width."""
        from reportlab.platypus import Spacer, Table, TableStyle

        rels = [r for r in rels if r]
        if not rels:
            return
        cell = self.width / len(rels)
        t = Table([[self._image(r, cell - 4, max_height) for r in rels]], colWidths=[cell] * len(rels))
        t.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0)]))
        self._add(t, Spacer(1, 6))

    def notes(self, notes: Sequence[str]) -> None:
        for n in notes:
            self.para(f"Note: {n}", "note")

    # --- sections
    def header(self) -> None:
        d = self.doc
        run = d["run"]
        inputs = d["inputs"]
        self.para("pneumobatch report", "title")
        self.para(RESEARCH_ONLY + " Results describe these data only and must not guide patient care.", "warn")
        kind = "evaluation against labels" if d["labelled"] else "summary of predictions (no labels given)"
        roots = run.get("roots") or ["unknown (no run.json)"]
        elapsed = run.get("elapsed_s")
        ips = run.get("images_per_second")
        self.heading("Run", "h2")
        self.kv(
            [
                ("report", kind),
                ("generated", d["generated"]),
                ("predictions file", inputs["predictions"]),
                ("labels file", inputs["labels"] or "none"),
                ("dataset roots", "; ".join(str(r) for r in roots)),
                ("predictions made by", f"pneumobatch {run.get('pneumobatch_version') or 'unknown'}"),
                ("report made by", f"pneumobatch {d['report_pneumobatch_version']}"),
                ("run started / finished", f"{run.get('started') or 'unknown'} / {run.get('finished') or 'unknown'}"),
                ("device", run.get("device") or "unknown"),
                (
                    "throughput",
                    (f"{ips:.1f} images/s" if ips else "unknown") + (f" ({elapsed:,.0f} s in all)" if elapsed else ""),
                ),
            ]
        )
        counts = run["counts"]
        self.heading(f"Files (from {run['counts_source']})", "h3")
        rows = [["files", _fmt(counts.get("files")), ""], ["ok (predicted)", _fmt(counts.get("ok")), ""]]
        by_status = _reasons_by_status(counts.get("by_reason"))
        for status in ("skipped", "error", "other"):
            reasons = by_status.get(status, {})
            if status == "other" and not reasons:
                continue
            detail = ", ".join(f"{r}: {_fmt(n)}" for r, n in reasons.items())
            rows.append([status, _fmt(counts.get(status, "")) if status != "other" else "", detail])
        self.table(["outcome", "files", "by reason"], rows, [1.2, 0.8, 4])
        self.heading("Models", "h3")
        self.table(
            ["model", "task", "classes", "threshold", "weights sha256"],
            [
                [
                    m["name"],
                    m["task"],
                    ", ".join(m["classes"]),
                    _fmt(m["threshold"]),
                    (m["weights_sha256"] or "unknown")[:12],
                ]
                for m in d["models"]
            ],
            [1.6, 0.9, 2.0, 0.8, 1.2],
        )
        if len(d["models"]) > 1:
            self.para("Each model has its own section below.", "note")
        self.notes(d.get("warnings", []))

    def model_section(self, m: dict[str, Any]) -> None:
        from reportlab.platypus import PageBreak

        self.story.append(PageBreak())
        self.heading(f"Model {m['name']}", "h1")
        cards = ", ".join(f"{k} {v:.3g}" for k, v in m["card_thresholds"].items()) or "none recorded"
        self.kv(
            [
                ("task", f"{m['task']} (classes: {', '.join(m['classes'])})"),
                ("positive class", m["positive"] or "none (multiclass: argmax)"),
                ("shipped threshold", _fmt(m["threshold"])),
                ("validation thresholds", cards),
                (
                    "weights sha256",
                    f"{(m['weights_sha256'] or 'unknown')[:12]}  (full: {m['weights_sha256'] or 'unknown'})",
                ),
            ]
        )
        c = m["counts"]
        reasons = "; ".join(
            f"{s} {', '.join(f'{r}: {n:,}' for r, n in rs.items())}" for s, rs in c["by_reason"].items()
        )
        self.para(
            f"Files for this model: {c['files']:,}; ok {c['ok']:,}; skipped {c['skipped']:,}; "
            f"errors {c['error']:,}" + (f" ({reasons})" if reasons else "") + ".",
        )
        self.notes(m.get("notes", []))
        if m.get("label_error"):
            self.para(f"No evaluation: {m['label_error']}", "warn")
        if m.get("evaluation"):
            self.evaluation(m, m["evaluation"], m["join"], "image" if m["join"]["level"] == "file" else "study")
            if m.get("study"):
                self.study(m)
            for col, sg in m["subgroups"].items():
                self.subgroups(m, col, sg)
            self.join_problems(m["join"], m.get("study"))
            self.heading("Predictions", "h2")
            self.summary(m, figure=False)
        else:
            self.summary(m, figure=True)
            for col, sg in m["subgroups"].items():
                self.unlabelled_subgroups(m, col, sg)

    def evaluation(
        self, m: dict[str, Any], ev: dict[str, Any], join: dict[str, Any], level: str, compact: bool = False
    ) -> None:
        """Metrics of one join; ``compact`` (study level) shows fewer figures."""
        units = "studies" if level == "study" else "images"
        if not compact:
            self.heading(f"Evaluation ({level} level)", "h2")
        counts = ", ".join(f"{c} {n:,}" for c, n in ev["class_counts"].items())
        self.para(
            f"{ev['n']:,} labelled {units} joined on <b>{_esc(join['key'])}</b>, label column "
            f"<b>{_esc(join['label_column'])}</b>; true classes: {_esc(counts)}.",
            raw=True,
        )
        auc_name = "AUC" if ev["positive"] else "macro AUC (one-vs-rest)"
        self.para(
            f"<b>Accuracy {_fmt(ev['accuracy'])}, balanced accuracy {_fmt(ev['balanced_accuracy'])}, "
            f"{auc_name} {_fmt(ev['macro_auc'])} {_ci(ev['macro_auc_ci'])}</b>",
            raw=True,
            keep=True,
        )
        rows = []
        for pc in ev["per_class"]:
            cls = pc["class"]
            roc = ev["roc"].get(cls)
            pr = ev["pr"].get(cls)
            auc = f"{_fmt(roc['auc'])} {_ci(roc.get('auc_ci'))}" if roc else f"as {ev['positive']}"
            rows.append(
                [
                    cls,
                    _fmt(pc["support"]),
                    _fmt(pc["n_predicted"]),
                    _fmt(pc["precision"]),
                    _fmt(pc["recall"]),
                    _fmt(pc["specificity"]),
                    _fmt(pc["f1"]),
                    auc,
                    _fmt(pr["average_precision"]) if pr else "",
                ]
            )
        for name, avg in (("macro avg", ev["macro_avg"]), ("weighted avg", ev["weighted_avg"])):
            rows.append(
                [
                    name,
                    _fmt(ev["n"]),
                    "",
                    _fmt(avg["precision"]),
                    _fmt(avg["recall"]),
                    _fmt(avg["specificity"]),
                    _fmt(avg["f1"]),
                    "",
                    "",
                ]
            )
        self.table(
            [
                "class",
                "n true",
                "n pred",
                "precision (PPV)",
                "sensitivity (recall)",
                "specificity",
                "F1",
                "AUC (95% CI)",
                "AP",
            ],
            rows,
            [1.3, 0.7, 0.7, 0.85, 0.9, 0.85, 0.6, 1.45, 0.6],
        )
        figs = m["figures"]
        if compact:
            cm = ev["confusion_matrix"]
            rows = [
                [cls, *(f"{c:,} ({f:.2f})" if f is not None else f"{c:,}" for c, f in zip(counts_row, norm_row))]
                for cls, counts_row, norm_row in zip(cm["labels"], cm["counts"], cm["row_normalised"])
            ]
            self.heading("Confusion matrix: count (fraction of true class)", "h3")
            self.table(["true \\ predicted", *cm["labels"]], rows, [1.4, *([1.0] * len(cm["labels"]))])
            self.figures([figs.get("study_roc"), None])
        else:
            self.figure(figs.get("confusion"), max_height=260)
            self.figures([figs.get("roc"), figs.get("pr")])
        if ev["operating_points"]:
            self.heading(f"Operating points ({ev['positive']} = positive)", "h3")
            rows = [
                [
                    p["name"],
                    _fmt(p["threshold"], 4),
                    f"{_fmt(p['sensitivity'])} {_ci(p.get('sensitivity_ci'))}",
                    f"{_fmt(p['specificity'])} {_ci(p.get('specificity_ci'))}",
                    _fmt(p["ppv"]),
                    _fmt(p["npv"]),
                    _fmt(p["f1"]),
                    f"{p['tp']:,} / {p['fp']:,} / {p['tn']:,} / {p['fn']:,}",
                ]
                for p in ev["operating_points"]
            ]
            self.table(
                [
                    "point",
                    "threshold",
                    "sensitivity (95% CI)",
                    "specificity (95% CI)",
                    "PPV",
                    "NPV",
                    "F1",
                    "TP / FP / TN / FN",
                ],
                rows,
                [1.05, 0.75, 1.45, 1.45, 0.55, 0.55, 0.5, 1.5],
            )
            self.para(
                "shipped: the model's threshold; recall_95: highest threshold reaching sensitivity 0.95 on these "
                "data (chosen on the evaluated data, so optimistic); youden: maximises sensitivity + specificity "
                "- 1 here; card_*: thresholds chosen on the model's validation data. A case is called positive "
                "when its probability is at or above the threshold.",
                "note",
            )
        if not compact:
            cal = ev["calibration"]
            self.heading("Calibration", "h3")
            self.figure(figs.get("calibration"), max_height=300)
            rows = [[cls, _fmt(c["ece"]), _fmt(c["brier"])] for cls, c in cal["classes"].items()]
            if "top_label" in cal:
                rows.append(["top label (confidence)", _fmt(cal["top_label"]["ece"]), ""])
                rows.append(["all classes (multiclass Brier)", "", _fmt(cal.get("brier_multiclass"))])
            rows.append(["log loss", "", _fmt(cal.get("log_loss"))])
            self.table(["probability of", f"ECE ({cal['n_bins']} bins)", "Brier score"], rows, [2.5, 1.2, 1.2])
        self.notes(ev.get("notes", []) + join.get("notes", []))
        bs = ev.get("bootstrap", {})
        if bs.get("n_resamples"):
            self.para(
                f"95% confidence intervals: percentile bootstrap, {bs['n_resamples']:,} resamples of the "
                f"{units}, seed {bs['seed']}.",
                "note",
            )

    def study(self, m: dict[str, Any]) -> None:
        st = m["study"]
        self.heading("Study level", "h2")
        self.para(
            "Each study carries the class its labelled images agree on; its prediction is the study "
            "prediction of predict (that of its most abnormal image).",
            "note",
        )
        self.evaluation(m, st["evaluation"], st["join"], "study", compact=True)
        conflict = st["join"]["problems"].get("conflicting_study_labels", {})
        if conflict.get("count"):
            self.para(
                f"{conflict['count']:,} studies left out: their images carry different classes "
                f"(e.g. {', '.join(conflict['examples'][:3])}).",
                "note",
            )

    def subgroups(self, m: dict[str, Any], col: str, sg: dict[str, Any]) -> None:
        self.heading(f"Subgroups by {col}", "h2")
        binary = m["positive"] is not None
        rows = []
        for g in sg["groups"]:
            flag = " *" if g["small"] else ""
            if binary:
                rows.append(
                    [
                        g["value"] + flag,
                        _fmt(g["n"]),
                        _fmt(g.get("n_positive")),
                        f"{_fmt(g['auc'])} {_ci(g['auc_ci'])}",
                        _fmt(g.get("sensitivity")),
                        _fmt(g.get("specificity")),
                        _fmt(g.get("ppv")),
                        _fmt(g.get("npv")),
                    ]
                )
            else:
                rows.append(
                    [
                        g["value"] + flag,
                        _fmt(g["n"]),
                        f"{_fmt(g['auc'])} {_ci(g['auc_ci'])}",
                        _fmt(g["accuracy"]),
                        _fmt(g["balanced_accuracy"]),
                    ]
                )
        if binary:
            header = [col, "n", "n positive", "AUC (95% CI)", "sensitivity", "specificity", "PPV", "NPV"]
            widths = [1.6, 0.7, 0.8, 1.6, 0.9, 0.9, 0.6, 0.6]
        else:
            header = [col, "n", "macro AUC (95% CI)", "accuracy", "balanced accuracy"]
            widths = [2.0, 0.8, 1.8, 1.0, 1.2]
        self.table(header, rows, widths)
        extra = "Sensitivity and specificity at the shipped threshold. " if binary else ""
        omitted = (
            f" {sg['omitted_groups']} smaller groups ({sg['omitted_n']:,} rows) not shown."
            if sg["omitted_groups"]
            else ""
        )
        self.para(f"{extra}* fewer than 30 samples: interpret with care.{omitted}", "note")

    def unlabelled_subgroups(self, m: dict[str, Any], col: str, sg: dict[str, Any]) -> None:
        self.heading(f"Predictions by {col}", "h2")
        classes = m["classes"]
        rows = [
            [g["value"], _fmt(g["n"]), *(_fmt(g["prediction_counts"].get(c, 0)) for c in classes)] for g in sg["groups"]
        ]
        self.table([col, "n", *(f"pred {c}" for c in classes)], rows, [2.0, 0.8, *([1.0] * len(classes))])

    def join_problems(self, join: dict[str, Any], study: Optional[dict[str, Any]]) -> None:
        self.heading("Join problems", "h2")
        self.para(
            f"Labels file: {join['n_label_rows']:,} rows; predictions with status ok: {join['n_prediction_rows']:,}; "
            f"matched: {join['n_matched']:,}.",
            keep=True,
        )
        rows = []
        problems = dict(join["problems"])
        if study:
            problems.update(study["join"]["problems"])
        for p in problems.values():
            if not p["count"]:
                continue
            breakdown = ", ".join(f"{k} ({v:,})" for k, v in list(p["breakdown"].items())[:6])
            rows.append([p["title"], _fmt(p["count"]), "; ".join(p["examples"][:4]), breakdown])
        if rows:
            self.table(["problem", "count", "examples", "by value / reason"], rows, [2.0, 0.6, 2.6, 1.6])
        else:
            self.para("None: every label matched a prediction and every prediction has a label.", "note")

    def summary(self, m: dict[str, Any], figure: bool) -> None:
        s = m["summary"]
        if figure:
            self.heading("Predictions (no labels)", "h2")
        n_pred = sum(s["prediction_counts"].values())
        rows = [
            [c, _fmt(n), _fmt(s["prediction_fractions"].get(c)), _fmt(s["mean_probability"].get(c))]
            for c, n in s["prediction_counts"].items()
        ]
        self.table(["predicted class", "images", "fraction", "mean probability"], rows, [2, 1, 1, 1.2])
        if s.get("near_threshold") is not None and n_pred:
            self.para(f"{s['near_threshold']:,} of {n_pred:,} predictions lie within 0.05 of the threshold.", "note")
        if figure:
            self.figure(m["figures"].get("summary"), max_height=260)
            reasons = s["reason_counts"]
            rows = [[status, r, _fmt(n)] for status, rs in reasons.items() for r, n in rs.items()]
            if rows:
                self.heading("Skipped and failed files", "h3")
                self.table(["status", "reason", "files"], rows, [1, 2, 1])
            ips = s.get("images_per_second")
            self.para(f"Throughput: {ips:.1f} images/s." if ips else "Throughput: unknown (no run.json).", "body")

    def build(self, out: Path) -> None:
        from reportlab.platypus import SimpleDocTemplate, Spacer

        def footer(canvas, doc) -> None:
            canvas.saveState()
            canvas.setFont("Helvetica", 7)
            canvas.setFillGray(0.35)
            canvas.drawString(self.margin, 0.9 * 28.35, f"pneumobatch report \u00b7 {RESEARCH_ONLY}")
            canvas.drawRightString(self.page[0] - self.margin, 0.9 * 28.35, f"page {doc.page}")
            canvas.restoreState()

        self.header()
        for m in self.doc["models"]:
            self.model_section(m)
        if self.pending:
            self._add(Spacer(1, 1))
        names = ", ".join(m["name"] for m in self.doc["models"])
        template = SimpleDocTemplate(
            str(out),
            pagesize=self.page,
            leftMargin=self.margin,
            rightMargin=self.margin,
            topMargin=1.5 * 28.35,
            bottomMargin=1.6 * 28.35,
            title=f"pneumobatch report: {names}",
            author="pneumobatch",
            subject=RESEARCH_ONLY,
        )
        template.build(self.story, onFirstPage=footer, onLaterPages=footer)


# ---------------------------------------------------------------------------- write


def _remove_stale(json_path: Path, folder: Path) -> None:
    """Delete figures a previous report at this path wrote (listed in its JSON)."""
    try:
        old = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(old, dict) or old.get("schema") != SCHEMA:
        return
    for rel in old.get("files", []):
        p = json_path.parent / str(rel)
        if p.suffix == ".png" and p.parent == folder and p.is_file():
            p.unlink()


def write_report(
    predictions_csv: Path | str,
    out_pdf: Path | str,
    labels_csv: Path | str | None = None,
    *,
    key: Optional[str] = None,
    label_column: str = "label",
    model: Optional[str] = None,
    by: Sequence[str] = (),
    where: Sequence[str] = (),
    default_age_band: Sequence[str] = (),
    n_bootstrap: int = 1000,
    seed: int = 0,
    run_json: Path | str | None = None,
    studies_csv: Path | str | None = None,
    max_examples: int = 10,
) -> ReportResult:
    """Write ``out_pdf``, ``<stem>.json`` and ``<stem>_files/*.png`` for a predictions CSV.

    With ``labels_csv`` the report evaluates each model; without, it summarises the
    predictions. ``model=None`` reports every model in the CSV, one section each.
    Raises :class:`~pneumobatch.errors.LabelError` (labels unusable or not joinable)
    and :class:`ReportError` (predictions unreadable, unknown model, bad output path).
    """
    started = time.perf_counter()
    predictions_csv = Path(predictions_csv)
    out_pdf = Path(out_pdf)
    if out_pdf.suffix.lower() != ".pdf":
        raise ReportError(f"output {out_pdf} must be a .pdf file")
    json_path, folder = output_paths(out_pdf)
    inputs = [predictions_csv, *(Path(p) for p in (labels_csv, run_json, studies_csv) if p is not None)]
    inputs += [_sidecar(predictions_csv, ".run.json"), _sidecar(predictions_csv, ".studies.csv")]
    for out in (out_pdf, json_path):
        check_replaceable(out, inputs, ReportError)
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"{folder} exists and is not a folder; choose another -o")

    doc = build_report(
        predictions_csv,
        labels_csv,
        key=key,
        label_column=label_column,
        model=model,
        by=by,
        where=where,
        default_age_band=default_age_band,
        n_bootstrap=n_bootstrap,
        seed=seed,
        run_json=run_json,
        studies_csv=studies_csv,
        max_examples=max_examples,
    )
    try:
        out_pdf.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(json_path, folder)
        figures = render_figures(doc, folder)
    except OSError as exc:
        raise ReportError(f"cannot write {out_pdf.parent}: {exc.strerror or exc}") from exc
    doc["files"] = [out_pdf.name, json_path.name, *(f"{folder.name}/{p.name}" for p in figures)]
    atomic_write(out_pdf, lambda tmp: _Pdf(doc, out_pdf.parent).build(tmp))
    doc["seconds"] = round(time.perf_counter() - started, 3)

    def dump(tmp: Path) -> None:
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")

    atomic_write(json_path, dump)
    return ReportResult(
        pdf=out_pdf,
        metrics_json=json_path,
        figures=figures,
        models=[m["name"] for m in doc["models"]],
        labelled=doc["labelled"],
        seconds=doc["seconds"],
        warnings=list(doc.get("warnings", [])),
    )
