"""Reports on a predictions CSV: a PDF, its figures as PNG files, every number as JSON.

``write_report(ReportOptions(predictions, output, labels))`` writes, all derived from
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

The package, in the order data flows:

- :mod:`.options`: :class:`ReportOptions` (the one list of what can be asked) and
  :class:`ReportResult`;
- :mod:`.inputs`: reading the predictions CSV, run.json, the studies CSV, ``--where``;
- :mod:`.build`: the document model, every number as one JSON-ready dict
  (metrics from :mod:`pneumobatch.evaluation.metrics`);
- :mod:`.figures`: matplotlib figures; :mod:`.pdf`: the reportlab document;
- :mod:`.write`: :func:`write_report`, atomic writes of PDF, JSON and figures.

Names are imported on first use, so the CLI reads :class:`ReportOptions` without
loading scikit-learn, matplotlib or reportlab; torch is never imported.
"""

from __future__ import annotations

import importlib
from typing import Any

from pneumobatch.core.errors import ReportError
from pneumobatch.evaluation.report.options import RESEARCH_ONLY, SCHEMA, ReportOptions, ReportResult, output_paths

_LAZY = {
    "build_report": "pneumobatch.evaluation.report.build",
    "DERIVED_SUBGROUPS": "pneumobatch.evaluation.report.build",
    "load_predictions": "pneumobatch.evaluation.report.inputs",
    "select_labels": "pneumobatch.evaluation.report.inputs",
    "render_figures": "pneumobatch.evaluation.report.figures",
    "write_report": "pneumobatch.evaluation.report.write",
}

__all__ = [
    "RESEARCH_ONLY",
    "SCHEMA",
    "ReportError",
    "ReportOptions",
    "ReportResult",
    "output_paths",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
