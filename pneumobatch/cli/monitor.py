"""``pneumobatch monitor``: options (defaults from :class:`~pneumobatch.operations.monitor.run.MonitorConfig`)
and the alerts it prints; the analysis is :func:`pneumobatch.operations.monitor.run.run_monitor`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from pneumobatch.cli.common import AlertLimit, LibraryDefault, setup_logging
from pneumobatch.evaluation.labels.keys import KEY_COLUMNS

_M = "pneumobatch.operations.monitor.run:MonitorConfig"  # option defaults are the library's, read when needed


@click.command("monitor", short_help="Drift and alerts across nightly runs: PDF, JSON, Prometheus textfile.")
@click.argument("run_jsons", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    cls=LibraryDefault,
    library_default=f"{_M}.output",
    show_default=True,
    help="PDF to write; OUT.json and OUT.prom are written beside it.",
)
@click.option(
    "--baseline",
    type=click.IntRange(1),
    cls=LibraryDefault,
    library_default=f"{_M}.baseline",
    show_default=True,
    help="The first N runs form the baseline every later run is compared with.",
)
@click.option(
    "--limit",
    "limits",
    multiple=True,
    type=AlertLimit(),
    metavar="NAME=VALUE",
    help="Override an alert limit (psi, ks_d, positive_rate_change, flag_rate_change, error_rate, alpha, min_images). Repeatable.",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Labels of past nights (keyed by sop_instance_uid or study_instance_uid): adds rolling sensitivity, specificity and PPV.",
)
@click.option(
    "--key",
    type=click.Choice(KEY_COLUMNS),
    help="Column joining labels to predictions. [default: detected]",
)
@click.option("--label-column", type=str, cls=LibraryDefault, library_default=f"{_M}.label_column", show_default=True)
@click.option(
    "--window",
    type=click.IntRange(1),
    cls=LibraryDefault,
    library_default=f"{_M}.window",
    show_default=True,
    help="Runs pooled for the rolling labelled metrics.",
)
@click.option(
    "--prometheus",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Prometheus textfile to write (e.g. in node_exporter's textfile directory). [default: OUT.prom]",
)
@click.option("-q", "--quiet", is_flag=True)
def monitor_command(
    run_jsons: tuple[Path, ...],
    limits: tuple[tuple[str, float], ...],
    labels: Optional[Path],
    quiet: bool,
    **options,
) -> None:
    """Compare nightly RUN_JSONS (OUT.run.json files of predict) with a baseline; alert on drift.

    \b
    Per model and group (scanner, view, age band): PSI and KS of the scores, positive
    rate and applicability flag rate with binomial tests, new or vanished scanners,
    changed operating points, models added, removed or run with other weights;
    error rate per run. Alerts are printed, listed in the PDF and JSON, and counted in
    the Prometheus file. A run.json that is damaged or edited is left out with a note.
    No output may replace an input (exit 2).
    """
    from pneumobatch.operations.monitor.run import MonitorConfig, run_monitor

    setup_logging(0, quiet)
    result = run_monitor(MonitorConfig(run_jsons=list(run_jsons), limits=dict(limits), labels=labels, **options))
    for note in result.document["notes"]:
        click.echo(f"note: {note}", err=True)
    if not quiet:
        for alert in result.alerts:
            click.echo(f"ALERT {alert['message']}")
        click.echo(f"{len(result.alerts)} alerts; wrote {result.pdf}, {result.json} and {result.prometheus}")
