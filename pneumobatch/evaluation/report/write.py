"""Writing a report: the PDF, its JSON and its figures, each replaced atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pneumobatch.core.errors import ReportError
from pneumobatch.evaluation.report.build import build_report
from pneumobatch.evaluation.report.figures import render_figures
from pneumobatch.evaluation.report.options import SCHEMA, ReportOptions, ReportResult, output_paths, sidecar
from pneumobatch.evaluation.report.pdf import PdfDocument
from pneumobatch.evaluation.report.thumbnails import render_thumbnails
from pneumobatch.io.atomicfile import atomic_write, check_replaceable


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


def write_report(options: ReportOptions) -> ReportResult:
    """Write ``options.output`` (PDF), ``<stem>.json`` and ``<stem>_files/*.png``.

    With ``options.labels`` the report evaluates each model; without, it summarises
    the predictions. Raises :class:`~pneumobatch.core.errors.LabelError` (labels unusable
    or not joinable) and :class:`~pneumobatch.core.errors.ReportError` (predictions
    unreadable, unknown model, bad output path). No input file is ever overwritten.
    """
    started = time.perf_counter()
    predictions_csv, out_pdf = options.predictions, options.output
    if out_pdf.suffix.lower() != ".pdf":
        raise ReportError(f"output {out_pdf} must be a .pdf file")
    json_path, folder = output_paths(out_pdf)
    given = (options.labels, options.run_json, options.studies_csv)
    inputs = [predictions_csv, *(p for p in given if p is not None)]
    inputs += [sidecar(predictions_csv, ".run.json"), sidecar(predictions_csv, ".studies.csv")]
    for out in (out_pdf, json_path):
        check_replaceable(out, inputs, ReportError)
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"{folder} exists and is not a folder; choose another -o")

    doc = build_report(options)
    try:
        out_pdf.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(json_path, folder)
        figures = render_figures(doc, folder)
    except OSError as exc:
        raise ReportError(f"cannot write {out_pdf.parent}: {exc.strerror or exc}") from exc
    doc["files"] = [out_pdf.name, json_path.name, *(f"{folder.name}/{p.name}" for p in figures)]
    thumbnails = render_thumbnails(doc, predictions_csv.parent, options.images)  # in memory: in the PDF only
    atomic_write(out_pdf, lambda tmp: PdfDocument(doc, out_pdf.parent, thumbnails).build(tmp))
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
