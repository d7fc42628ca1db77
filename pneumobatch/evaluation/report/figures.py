"""The report's figures (matplotlib, no pyplot: no global state, no GUI backend).

Each figure is drawn from the document model (:mod:`.build`) into a PNG at :data:`DPI`;
:func:`render_figures` records their paths in the document for the PDF and the JSON.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from pneumobatch.core.card import RECALL_TARGET, YOUDEN

#: Resolution of the PNG figures (the PDF scales them to this).
DPI = 120


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        fig.clear()
    return path


def fmt(value: Any, digits: int = 3) -> str:
    """A number as the report prints it: thousands separators for counts, "n/a" for None."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{value:,}"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def fmt_ci(ci: Any, digits: int = 3) -> str:
    """A confidence interval as "(lo–hi)", or "" when there is none."""
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


def _fig_fine_confusion(fine: dict[str, Any], title: str, path: Path) -> Path:
    """One panel for the many fine classes: shaded by the fraction of the true class, counts written."""
    cm = fine["confusion_matrix"]
    classes = cm["labels"]
    k = len(classes)
    counts = np.array(cm["counts"], dtype=float)
    shown = np.array([[np.nan if v is None else v for v in row] for row in cm["row_normalised"]], dtype=float)
    size = 2.4 + 0.42 * k
    fig = _new_figure(size + 1.2, size)
    ax = fig.subplots()
    ax.imshow(np.nan_to_num(shown), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j] or i == j:
                dark = np.isfinite(shown[i, j]) and shown[i, j] > 0.6
                colour = "white" if dark else "black"
                ax.text(j, i, f"{int(counts[i, j]):,}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), classes, fontsize=7)
    ax.set_xlabel("predicted (fine_label)", fontsize=8)
    ax.set_ylabel("true (fallback rule)", fontsize=8)
    ax.set_title("counts, shaded by the fraction of the true class", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _unit_square(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Axes of a curve between rates: both from 0 to 1 (with a hair of margin), small labels."""
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=9)


def _fig_roc(ev: dict[str, Any], title: str, path: Path) -> Path:
    fig = _new_figure(3.7, 3.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    for i, (cls, roc) in enumerate(ev["roc"].items()):
        if roc.get("auc") is None:
            continue
        label = f"{cls}: {roc['auc']:.3f} {fmt_ci(roc.get('auc_ci'))}"
        ax.plot(roc["fpr"], roc["tpr"], color=_COLOURS[i % len(_COLOURS)], lw=1.5, label=label)
    markers = {"shipped": "o", RECALL_TARGET: "s", YOUDEN: "^"}
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
    _unit_square(ax, "1 - specificity (false positive rate)", "sensitivity (true positive rate)", title)
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
    _unit_square(ax, "recall (sensitivity)", "precision (PPV)", title)
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
            label=f"{cls}: ECE {fmt(c['ece'])}",
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
        if section.get("fine"):
            figs["fine_confusion"] = _fig_fine_confusion(
                section["fine"], f"{name}: confusion matrix, fine classes", folder / f"{slug}_fine_confusion.png"
            )
        study = (section.get("study") or {}).get("evaluation")
        if study:
            figs["study_roc"] = _fig_roc(study, f"{name}: ROC, studies", folder / f"{slug}_study_roc.png")
        section["figures"] = {k: f"{folder.name}/{p.name}" for k, p in figs.items()}
        written.extend(figs.values())
    return written
