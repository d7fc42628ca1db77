"""The monitoring PDF: alerts first, then per model the nightly series with the baseline shaded.

Rendering only; every number comes from :func:`pneumobatch.operations.monitor.analysis.analyse` (the same
document is written as JSON). Figures are drawn with matplotlib's object API (no pyplot,
no GUI backend) and embedded in memory.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence
from xml.sax.saxutils import escape

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
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    body, small = styles["BodyText"], styles["BodyText"].clone("small", fontSize=7.5, leading=9)
    story: list[Any] = [Paragraph("pneumobatch nightly monitoring", styles["Title"])]
    series = doc["series"]
    nights = series["nights"]
    n_base = len(doc["baseline"]["nights"])
    story.append(
        Paragraph(
            escape(
                f"{len(nights)} runs from {nights[0]} to {nights[-1]}; baseline: the first {n_base}. "
                "Limits: " + ", ".join(f"{k} {v:g}" for k, v in doc["limits"].items()) + "."
            ),
            body,
        )
    )
    for note in doc.get("notes", []):
        story.append(Paragraph(escape(note), small))
    alerts = doc["alerts"]
    story.append(Paragraph(f"Alerts ({len(alerts)})", styles["Heading2"]))
    if alerts:
        rows = [["night", "model", "group", "alert", "value", "limit"]] + [
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
        table = Table(
            [[Paragraph(escape(str(c)), small) for c in r] for r in rows],
            colWidths=[2.6 * cm, 2.2 * cm, 6.4 * cm, 2.4 * cm, 1.5 * cm, 1.5 * cm],
            repeatRows=1,
        )
        table.setStyle(
            TableStyle([("GRID", (0, 0), (-1, -1), 0.25, "#999999"), ("BACKGROUND", (0, 0), (-1, 0), "#eeeeee")])
        )
        story.append(table)
    else:
        story.append(Paragraph("No limit was crossed.", body))
    alert_nights = {a["night"] for a in alerts}
    width = A4[0] - 3.6 * cm

    def figure(*args: Any, **kwargs: Any) -> None:
        story.append(Image(_figure(*args, **kwargs), width=width, height=width * 2.6 / 7.2))

    story.append(Paragraph("Runs", styles["Heading2"]))
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
        story.append(Paragraph(escape(f"Model {model}"), styles["Heading2"]))
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
        scores = [None] * n_base + [d.get("drift_score") for d in doc["drift"].get(model, [])]
        figure(scores, nights, n_base, f"{model}: drift score (largest PSI of any group)", "PSI", alert_nights)
        perf = (doc.get("labelled") or {}).get("models", {}).get(model)
        if perf:
            story.append(Spacer(1, 6))
            story.append(
                Paragraph(
                    escape(f"Labelled nights (rolling window of {doc['labelled']['window']} runs)"), styles["Heading3"]
                )
            )
            rows = [["night", "labelled", "sensitivity (95% CI)", "specificity (95% CI)", "PPV (95% CI)"]]
            for r in perf:
                if not r.get("labelled"):
                    continue
                rows.append(
                    [r["night"], str(r["window_labelled"]), *(_ci(r[k]) for k in ("sensitivity", "specificity", "ppv"))]
                )
            table = Table([[Paragraph(escape(str(c)), small) for c in r] for r in rows], repeatRows=1)
            table.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.25, "#999999")]))
            story.append(table)
    SimpleDocTemplate(
        str(path), pagesize=A4, leftMargin=1.8 * cm, rightMargin=1.8 * cm, title="pneumobatch monitoring"
    ).build(story)


def _ci(p: Mapping[str, Any]) -> str:
    if p.get("value") is None:
        return "-"
    return f"{p['value']:.3f} ({p['ci'][0]:.3f}-{p['ci'][1]:.3f}), {p['k']}/{p['n']}"
