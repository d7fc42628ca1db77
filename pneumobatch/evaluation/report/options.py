"""What a report is asked for (:class:`ReportOptions`) and what it wrote (:class:`ReportResult`).

Light on purpose (no pandas, scikit-learn, matplotlib or reportlab): the CLI reads its
option defaults from :class:`ReportOptions` when it starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pneumobatch.core.card import TARGET_RECALL
from pneumobatch.evaluation.labels.join import MAX_EXAMPLES

SCHEMA = "pneumobatch.report/1"  # the report JSON's format name (not a module path): never changes with the code layout
RESEARCH_ONLY = "Research use only \u2014 not a diagnostic device."


@dataclass
class ReportOptions:
    """Options of ``pneumobatch report``: one report on one predictions CSV.

    ``output`` is the PDF; ``<stem>.json`` and ``<stem>_files/*.png`` go beside it.
    Without ``labels`` the report summarises the predictions; ``model=None`` reports
    every model in the CSV, one section each. ``run_json`` and ``studies_csv`` default
    to the files predict writes beside the CSV. ``cases`` is how many cases to look at of
    each kind (:mod:`.cases`; 0: none), their images found under ``images`` or run.json's roots.
    """

    predictions: Path
    output: Path = Path("report.pdf")
    labels: Optional[Path] = None
    key: Optional[str] = None  # one of labels.keys.KEY_COLUMNS; None: detected
    label_column: str = "label"
    model: Optional[str] = None
    by: Sequence[str] = ()
    where: Sequence[str] = ()
    default_age_band: Sequence[str] = ()
    n_bootstrap: int = 1000
    seed: int = 0
    target_recall: float = TARGET_RECALL
    site: Optional[Path] = None  # a site file (calibrate): its operating points beside the shipped ones
    run_json: Optional[Path] = None
    studies_csv: Optional[Path] = None
    max_examples: int = MAX_EXAMPLES
    cases: int = 8  # cases to look at, of each kind (0: no such page)
    images: Optional[Path] = None  # the folder the CSV's paths are relative to; None: run.json's roots

    def __post_init__(self) -> None:
        self.predictions = Path(self.predictions)
        self.output = Path(self.output)
        for name in ("labels", "site", "run_json", "studies_csv", "images"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        self.by = [str(b) for b in self.by]
        self.where = list(self.where)
        self.default_age_band = list(self.default_age_band)

    @property
    def run_path(self) -> Path:
        """run.json used for run details and model cards."""
        return self.run_json or sidecar(self.predictions, ".run.json")

    @property
    def studies_path(self) -> Path:
        """Study-level predictions CSV."""
        return self.studies_csv or sidecar(self.predictions, ".studies.csv")


@dataclass
class ReportResult:
    """What :func:`~pneumobatch.evaluation.report.write_report` wrote."""

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


def output_paths(out_pdf: Path | str) -> tuple[Path, Path]:
    """The JSON file and the figure folder that go with ``out_pdf``."""
    out_pdf = Path(out_pdf)
    return out_pdf.with_suffix(".json"), out_pdf.with_name(out_pdf.stem + "_files")


def sidecar(predictions_csv: Path, suffix: str) -> Path:
    """A file predict writes beside its CSV (``.run.json``, ``.studies.csv``)."""
    return predictions_csv.with_name(predictions_csv.stem + suffix)
