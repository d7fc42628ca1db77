"""``pneumobatch report``: options (defaults from :class:`~pneumobatch.evaluation.report.options.ReportOptions`)
and the lines it prints; the report is :func:`pneumobatch.evaluation.report.write_report`."""

from __future__ import annotations

from pathlib import Path

import click

from pneumobatch.cli.common import RECALL_RANGE, DefaultAgeBand, setup_logging
from pneumobatch.evaluation.labels.keys import KEY_COLUMNS
from pneumobatch.evaluation.report.options import ReportOptions

_R = ReportOptions  # option defaults are the library's, defined once


@click.command("report", short_help="Evaluate predictions against labels: PDF + JSON.")
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Labels CSV; without it a summary report (distribution, reasons, throughput).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=_R.output,
    show_default=True,
    help="PDF to write; REPORT.json and REPORT_files/*.png are written beside it.",
)
@click.option("--key", type=click.Choice(KEY_COLUMNS), help="Column joining labels to predictions. [default: detected]")
@click.option(
    "--label-column",
    default=_R.label_column,
    show_default=True,
    help="Labels column: class names or hierarchical findings (e.g. Pneumonia/Viral/COVID-19).",
)
@click.option(
    "-m", "--model", help="Report on this model (name, or task when one model has it). [default: each model in turn]"
)
@click.option("--by", multiple=True, help="Subgroup table by this labels column (e.g. --by view --by sex); repeatable.")
@click.option(
    "--where",
    multiple=True,
    metavar="COLUMN=VALUE",
    help="Use only label rows where COLUMN equals VALUE (e.g. --where split=test); repeatable.",
)
@click.option(
    "--default-age-band",
    multiple=True,
    type=DefaultAgeBand(),
    metavar="PATTERN=child|adult",
    help="For --by age_band: the band of rows without an age whose source matches PATTERN. Repeatable.",
)
@click.option(
    "--target-recall",
    type=RECALL_RANGE,
    default=_R.target_recall,
    show_default=True,
    help="Sensitivity the recall_target operating point must reach on these data.",
)
@click.option(
    "--site",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Site file from `pneumobatch calibrate`: its operating points side by side with the shipped ones (predictions made with predict --site are compared without it).",
)
@click.option(
    "--bootstrap",
    "n_bootstrap",
    type=click.IntRange(0),
    default=_R.n_bootstrap,
    show_default=True,
    help="Bootstrap resamples for 95% confidence intervals (0: none).",
)
@click.option("--seed", type=int, default=_R.seed, show_default=True)
@click.option(
    "--cases",
    type=click.IntRange(0, 100),
    default=_R.cases,
    show_default=True,
    help="Cases to look at, of each kind, as thumbnails (labels: most confident false negatives and false "
    "positives; none: highest probability and nearest the threshold); 0: no such page.",
)
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder the CSV's paths are relative to, for the thumbnails. [default: the input folders in run.json]",
)
@click.option("-q", "--quiet", is_flag=True)
def report_command(predictions: Path, quiet: bool, **options) -> None:
    """Evaluate PREDICTIONS (a CSV from predict) against labels; write PDF + JSON.

    \b
    Per class: precision, recall (sensitivity), specificity, F1, support; confusion
    matrix; ROC with AUC and bootstrap 95% CI; precision-recall; operating points
    (shipped threshold, --target-recall sensitivity, Youden); calibration (reliability,
    ECE, Brier); study-level metrics; optional subgroups. Labels that match no
    prediction, and predictions without a label, are counted and listed, never
    silently dropped.
    """
    from pneumobatch.evaluation.report import write_report

    setup_logging(0, quiet)
    result = write_report(ReportOptions(predictions=predictions, **options))
    if not quiet:
        for warning in result.warnings:
            click.echo(f"note: {warning}", err=True)
        click.echo(
            f"wrote {result.pdf} and {result.metrics_json} ({len(result.figures)} figures) in {result.seconds:.1f}s"
        )
