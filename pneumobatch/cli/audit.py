"""``pneumobatch audit``: a site's own shortcut check on a predict run (defaults from
:class:`~pneumobatch.operations.audit.run.AuditConfig`); the work is
:func:`pneumobatch.operations.audit.run.run_audit`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from pneumobatch.cli.common import LibraryDefault, setup_logging
from pneumobatch.core.errors import EXIT_FILE_ERRORS

_A = "pneumobatch.operations.audit.run:AuditConfig"  # option defaults are the library's, read when needed


@click.command("audit", short_help="Does the header or the export predict the model's calls? PDF and JSON.")
@click.argument("predictions", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("source", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    cls=LibraryDefault,
    library_default=f"{_A}.output",
    show_default=True,
    help="PDF to write; OUT.json is written beside it. Never inside SOURCE.",
)
@click.option(
    "-m",
    "--model",
    type=str,
    cls=LibraryDefault,
    library_default=f"{_A}.model",
    show_default=True,
    help="Model audited.",
)
@click.option(
    "--run-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The run.json of PREDICTIONS. [default: PREDICTIONS' OUT.run.json]",
)
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the model is looked up for the invariance test (default: the shipped weights/).",
)
@click.option(
    "--sample",
    type=click.IntRange(1),
    cls=LibraryDefault,
    library_default=f"{_A}.sample",
    show_default=True,
    help="Files of SOURCE drawn at random for the export-invariance test.",
)
@click.option(
    "--no-invariance", is_flag=True, help="Skip the export-invariance test (it predicts each sample image 11 times)."
)
@click.option("--seed", type=int, cls=LibraryDefault, library_default=f"{_A}.seed", show_default=True)
@click.option(
    "--workers", type=click.IntRange(0), cls=LibraryDefault, library_default=f"{_A}.workers", show_default=True
)
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("-q", "--quiet", is_flag=True)
@click.option("-v", "--verbose", count=True)
def audit_command(
    predictions: Path,
    source: Path,
    no_invariance: bool,
    quiet: bool,
    verbose: int,
    weights_dir: Optional[Path],
    **options,
) -> None:
    """Audit PREDICTIONS (a predict CSV, with its OUT.run.json) against the SOURCE folder it was
    made from: how well the DICOM header alone predicts the model's positive calls
    (cross-validated AUC, positive rate per header value), export invariance on a sample of
    SOURCE's images, and the share flagged out of distribution per header value. Reads the
    images again; changes nothing and writes nothing inside SOURCE. Exit 1 when some
    predicted images could not be read again (counted in the JSON).
    """
    from pneumobatch.operations.audit.run import AuditConfig, run_audit

    setup_logging(verbose, quiet)
    config = AuditConfig(
        predictions=predictions, source=source, invariance=not no_invariance, weights_dir=weights_dir, **options
    )
    result = run_audit(config, progress=(lambda s: None) if quiet else lambda s: click.echo(s, err=True))
    if not quiet:
        for verdict in result.document["verdicts"].values():
            click.echo(verdict)
        for note in result.document["notes"]:
            click.echo(f"note: {note}", err=True)
        click.echo(f"wrote {result.pdf} and {result.json}")
    if result.not_read:
        click.echo(f"{result.not_read} predicted images could not be read again (see {result.json})", err=True)
        raise click.exceptions.Exit(EXIT_FILE_ERRORS)
