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
  (metrics from :mod:`pneumobatch.evaluation.metrics`), with :mod:`.cases`, the cases to look at;
- :mod:`.thumbnails`: their thumbnails (heatmap or image, in memory, for the PDF only);
- :mod:`.figures`: matplotlib figures; :mod:`.pdf`: the report's sections, laid out with
  :mod:`.document` (the reportlab layer it shares with the monitoring PDF);
- :mod:`.write`: :func:`write_report`, atomic writes of PDF, JSON and figures.

Names are imported on first use, so the CLI reads :class:`ReportOptions` without
loading scikit-learn, matplotlib or reportlab; torch is never imported.
"""

from __future__ import annotations

import lazy_loader

from pneumobatch.core.errors import ReportError
from pneumobatch.evaluation.report.options import RESEARCH_ONLY, SCHEMA, ReportOptions, ReportResult, output_paths

#: submodule -> the names it gives this package, imported on first use (``lazy_loader``).
_SUBMOD_ATTRS = {
    "build": ["DERIVED_SUBGROUPS", "build_report"],
    "inputs": ["select_labels"],
    "figures": ["render_figures"],
    "write": ["write_report"],
}

__getattr__, _, _lazy_all = lazy_loader.attach(__name__, submod_attrs=_SUBMOD_ATTRS)

__all__ = ["RESEARCH_ONLY", "SCHEMA", "ReportError", "ReportOptions", "ReportResult", "output_paths", *_lazy_all]
