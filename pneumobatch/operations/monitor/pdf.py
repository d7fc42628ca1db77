"""The monitoring PDF: alerts first, then per model the nightly series with the baseline shaded.

Rendering only; every number comes from :func:`pneumobatch.operations.monitor.analysis.analyse` (the same
document is written as JSON). Figures are drawn with matplotlib's object API (no pyplot,
no GUI backend) and embedded in memory; the page layout is the report's
(:class:`pneumobatch.evaluation.report.document.Document`), without its research-use footer.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

DPI = 110


def _figure(
    series: Sequence[Optional[float]] | Mapping[str, Sequence[Optional[float]]],
    nights: Sequence[str],
    n_baseline: int,
    title: str,
    ylabel: str,
    alert_nights: Sequence[str] = (),
) -> io.BytesIO:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 2.6), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(nights)))
    lines = series if isinstance(series, Mapping) else {"": series}
    for name, values in lines.items():
        y = [float("nan") if v is None else float(v) for v in values]
        ax.plot(x, y, marker="o", markersize=3, label=name[:40] or None)
    ax.axvspan(-0.5, n_baseline - 0.5, color="0.9", label="baseline")
    for i, night in enumerate(nights):
        if night in alert_nights:
            ax.axvline(i, color="#c03030", linestyle="--", linewidth=1)
    ax.set_xticks(x, [n[:10] for n in nights], rotation=45, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if len(lines) > 1:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    return buffer


def render(doc: Mapping[str, Any], path: Path) -> None:
    """Write the monitoring PDF for ``doc`` (the output of :func:`pneumobatch.operations.monitor.analysis.analyse` plus notes)."""
    from pneumobatch.evaluation.report.document import Document

    pdf = Document(dpi=DPI)
    pdf.para("pneumobatch nightly monitoring", "title")
    series = doc["series"]
    nights = series["nights"]
    n_base = len(doc["baseline"]["nights"])
    pdf.para(
        f"{len(nights)} runs from {nights[0]} to {nights[-1]}; baseline: the first {n_base}. "
        "Limits: " + ", ".join(f"{k} {v:g}" for k, v in doc["limits"].items()) + "."
    )
    for note in doc.get("notes", []):
        pdf.para(note, "note")
    alerts = doc["alerts"]
    pdf.heading(f"Alerts ({len(alerts)})", "h2")
    if alerts:
        rows = [
            [
                a["night"],
                a["model"],
                a["group"] if a["dimension"] == "overall" else f"{a['dimension']}: {a['group']}",
                a["kind"],
                f"{a['value']:.3f}",
                f"{a['limit']:.3f}",
            ]
            for a in alerts[:200]
        ]
        pdf.table(["night", "model", "group", "alert", "value", "limit"], rows, [2.6, 2.2, 5.2, 3.6, 1.5, 1.5])
    else:
        pdf.para("No limit was crossed.")
    alert_nights = {a["night"] for a in alerts}

    def figure(*args: Any, **kwargs: Any) -> None:
        pdf.figure(_figure(*args, **kwargs), max_height=pdf.width)

    pdf.heading("Runs", "h2")
    figure(
        {"files": series["files"], "errors": series["errors"]},
        nights,
        n_base,
        "Files and errors per run",
        "files",
        alert_nights,
    )
    figure(series["images_per_second"], nights, n_base, "Throughput", "images/s")
    for model, s in series["models"].items():
        pdf.heading(f"Model {model}", "h2")
        figure(
            s["positive_rate"],
            nights,
            n_base,
            f"{model}: positive rate at the operating point",
            "positive rate",
            alert_nights,
        )
        figure(s["median_score"], nights, n_base, f"{model}: median score", "score")
        if s["by_scanner_positive_rate"]:
            figure(
                s["by_scanner_positive_rate"],
                nights,
                n_base,
                f"{model}: positive rate per scanner",
                "positive rate",
                alert_nights,
            )
        if s.get("class_share"):
            figure(s["class_share"], nights, n_base, f"{model}: share of predicted images per class", "share")
        if s.get("fine_share"):
            figure(s["fine_share"], nights, n_base, f"{model}: share of predicted images per fine class", "share")
        # one value per night: a model that did not run on a night (added, dropped) has no drift entry for it
        by_run = {d["run_json"]: d.get("drift_score") for d in doc["drift"].get(model, [])}
        scores = [by_run.get(run) if i >= n_base else None for i, run in enumerate(series["run_json"])]
        figure(scores, nights, n_base, f"{model}: drift score (largest PSI of any group)", "PSI", alert_nights)
        perf = (doc.get("labelled") or {}).get("models", {}).get(model)
        if perf:
            pdf.heading(f"Labelled nights (rolling window of {doc['labelled']['window']} runs)", "h3")
            rows = [
                [r["night"], str(r["window_labelled"]), *(_ci(r[k]) for k in ("sensitivity", "specificity", "ppv"))]
                for r in perf
                if r.get("labelled")
            ]
            pdf.table(["night", "labelled", "sensitivity (95% CI)", "specificity (95% CI)", "PPV (95% CI)"], rows, None)
    pdf.write(path, title="pneumobatch monitoring")


def _ci(p: Mapping[str, Any]) -> str:
    if p.get("value") is None:
        return "-"
    return f"{p['value']:.3f} ({p['ci'][0]:.3f}-{p['ci'][1]:.3f}), {p['k']}/{p['n']}"
