"""The audit PDF: the three verdicts in plain words on the first page, then their tables.

Rendering only; every number comes from :func:`pneumobatch.operations.audit.run.build_audit`
(the same document is written as JSON). The page layout is the report's
(:class:`pneumobatch.evaluation.report.document.Document`), with its research-use footer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

#: What each part of the audit asks, under its verdict on the first page.
MEANING = {
    "header": (
        "Header shortcut: a classifier given only the DICOM header (manufacturer, model, station, view, "
        "photometric interpretation, transfer syntax, rows, columns, pixel spacing, bits stored) tries to "
        "predict the model's positive call, cross-validated. An AUC near 0.5 means the header tells nothing "
        "of the call; above 0.7 the calls follow the scanner or protocol, which the patients seen there may or "
        "may not explain: check the model's performance per group before trusting it."
    ),
    "invariance": (
        "Export invariance: a sample of this folder's images exported 10 ways (JPEG, PNG, DICOM, resizes, gamma, "
        "crop) and predicted again; the share called positive and the mean |dP| should move by at most 0.05 in "
        "every subgroup of 30 or more images (docs/invariance.md)."
    ),
    "applicability": (
        "Applicability: the share of images the model flagged out of distribution (the CSV's applicable column), "
        "overall and per header value (tables below)."
    ),
}


def _share(s: Mapping[str, Any]) -> str:
    if not s["n"]:
        return "-"
    low, high = s["ci"]
    return f"{s['k']}/{s['n']} = {s['rate']:.2f} ({low:.2f}-{high:.2f})"


def _number(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _header_section(pdf: Any, doc: Mapping[str, Any]) -> None:
    header = doc["header"]
    pdf.heading("Header shortcut", "h2")
    ci = header["auc_ci"]
    pdf.kv(
        [
            ("images", str(header["n"])),
            ("positive / negative calls", f"{header['positive_calls']} / {header['negative_calls']}"),
            ("cross-validated AUC", _number(header["auc"]) + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")),
            ("folds, seed", f"{header['folds'] or '-'}, {header['seed']}"),
            ("classifier", header["classifier"]),
        ]
    )
    pdf.para(
        "Per field and value: the images, the positive calls with an exact 95% interval, and the images "
        "flagged out of distribution among those the flag scored.",
        keep=True,
    )
    for field, block in doc["values"].items():
        pdf.heading(field, "h3")
        rows = [[v["value"], str(v["n"]), _share(v["positive"]), _share(v["not_applicable"])] for v in block["values"]]
        pdf.table(["value", "images", "positive calls (95% CI)", "flagged (95% CI)"], rows, [4.2, 1.1, 2.8, 2.8])
        if block["omitted_values"]:
            pdf.para(f"{block['omitted_values']} rarer values not shown (in the JSON's counts only).", "note")


def _invariance_section(pdf: Any, doc: Mapping[str, Any]) -> None:
    part = doc["invariance"]
    pdf.heading("Export invariance", "h2")
    if "skipped" in part:
        pdf.para(f"Not tested: {part['skipped']}.")
        return
    pdf.para(
        f"{part['n_images']} of the {part['files_found']} files under the folder were drawn (seed {part['sample_seed']}); "
        f"{part['unreadable']} could not be read. Rows marked OVER exceed the goal; subgroups under 30 images "
        "are shown, not judged.",
        keep=True,
    )
    rows = []
    for r in part["table"]["rows"]:
        verdict = "" if r["passes"] is None else ("ok" if r["passes"] else "OVER")
        rows.append(
            [
                r["export"],
                r["subgroup"],
                str(r["n"]),
                _number(r["share_ref"]),
                _number(r["share_export"]),
                _number(r["delta_share"]),
                _number(r["mean_abs_dp"]),
                verdict,
            ]
        )
    pdf.table(
        ["export", "subgroup", "n", "share", "exported", "change", "mean |dP|", ""],
        rows,
        [2.2, 4.0, 0.8, 1.1, 1.2, 1.1, 1.2, 0.9],
    )


def _rows_section(pdf: Any, doc: Mapping[str, Any]) -> None:
    rows = doc["rows"]
    pdf.heading("Rows of the CSV", "h2")
    reasons = ", ".join(f"{k} {v}" for k, v in rows["unreadable"].get("by_reason", {}).items())
    pdf.kv(
        [
            ("rows of the model", str(rows["model_rows"])),
            ("predicted (status ok)", str(rows["predicted"])),
            ("audited", str(rows["audited"])),
            ("path outside the source folder (never opened)", str(rows["outside_source"]["count"])),
            ("image gone", str(rows["missing"]["count"])),
            ("image unreadable", f"{rows['unreadable']['count']}{f' ({reasons})' if reasons else ''}"),
            ("image changed since predict", str(rows["changed"]["count"])),
        ]
    )


def render(doc: Mapping[str, Any], path: Path) -> None:
    """Write the audit PDF for ``doc`` (the output of :func:`~pneumobatch.operations.audit.run.build_audit`)."""
    from pneumobatch.evaluation.report.document import Document

    inputs = doc["inputs"]
    pdf = Document()
    pdf.para("pneumobatch site audit", "title")
    pdf.para(doc["research_use_only"], "warn")
    pdf.para(
        f"Model {inputs['model']} (positive call: {inputs['positive_call']}) on {inputs['predictions']}, "
        f"images read again from {inputs['source']}; {doc['rows']['audited']} images audited. Generated "
        f"{doc['generated']} by pneumobatch {doc['pneumobatch_version']}."
    )
    pdf.heading("Verdicts", "h2")
    for part, verdict in doc["verdicts"].items():
        flagged = (part == "header" and doc["header"]["tracks_header"]) or (
            part == "invariance" and bool(doc["invariance"].get("over"))
        )
        pdf.para(verdict[:1].upper() + verdict[1:], "warn" if flagged else "body")
        pdf.para(MEANING[part], "note")
    pdf.notes(doc["notes"])
    _header_section(pdf, doc)
    _invariance_section(pdf, doc)
    _rows_section(pdf, doc)
    pdf.write(
        path,
        title="pneumobatch site audit",
        subject=doc["research_use_only"],
        footer=f"pneumobatch audit \u00b7 {doc['research_use_only']}",
    )
