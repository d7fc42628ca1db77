"""``pneumobatch invariance``: does a model give the same answer when a site's images are exported another way?

Options default to :class:`~pneumobatch.training.invariance.InvarianceConfig` (read when the
command runs: that module imports torch); the work is
:func:`pneumobatch.training.invariance.site_invariance`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from pneumobatch.cli.common import LibraryDefault, setup_logging
from pneumobatch.core.errors import EXIT_FILE_ERRORS

_I = "pneumobatch.training.invariance:InvarianceConfig"


@click.command("invariance", short_help="Export-invariance test on a sample of a site's own images.")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    cls=LibraryDefault,
    library_default=f"{_I}.output",
    show_default=True,
    help="JSON table to write.",
)
@click.option("-m", "--model", "models", multiple=True, help="Model to test; repeat for several. [default: pneumonia]")
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where model names are looked up (default: the shipped weights/).",
)
@click.option(
    "--sample",
    type=click.IntRange(1),
    cls=LibraryDefault,
    library_default=f"{_I}.sample",
    show_default=True,
    help="Images drawn at random from FOLDER.",
)
@click.option(
    "--export",
    "exports",
    multiple=True,
    help="Only these exports (repeatable; see docs/invariance.md). [default: all]",
)
@click.option("--seed", type=int, cls=LibraryDefault, library_default=f"{_I}.seed", show_default=True)
@click.option(
    "--workers", type=click.IntRange(0), cls=LibraryDefault, library_default=f"{_I}.workers", show_default=True
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("-v", "--verbose", count=True)
def invariance_command(
    folder: Path,
    models: tuple[str, ...],
    exports: tuple[str, ...],
    verbose: int,
    weights_dir: Optional[Path],
    **options,
) -> None:
    """Export each of a sample of FOLDER's images several ways (224-px RGB resave, JPEG at
    320/512/1024 px, 8-bit PNG, 16-bit DICOM with and without a VOI window, gamma 0.8/1.2,
    a 5% crop), predict originals and exports as predict does, and report per model, export
    and subgroup (view, age band, manufacturer) the change in the share called positive and
    the mean |dP|. Exit 1 when a subgroup of 30 images or more moves by more than 0.05.
    """
    from pneumobatch.evaluation.invariance import GOAL, format_table
    from pneumobatch.training.invariance import EXPORTS, InvarianceConfig, site_invariance

    setup_logging(verbose, False)
    config = InvarianceConfig(
        folder=folder,
        models=models or InvarianceConfig.models,
        exports=exports or tuple(EXPORTS),
        weights_dir=weights_dir,
        **options,
    )
    result = site_invariance(config, progress=click.echo)
    failed = False
    for name in config.models:
        table = result[name]
        click.echo(f"\n{name}: |change in share called| and mean |dP| <= {GOAL} for subgroups of >= 30 images")
        click.echo("\n".join(format_table(table)))
        for row in table["rows"]:
            if row["passes"] is False and row["subgroup"] != "all":
                click.echo(f"  over: {row['export']} {row['subgroup']} (n={row['n']})")
        failed |= table["passes"] is False
    click.echo(f"wrote {config.output}")
    if failed:
        raise click.exceptions.Exit(EXIT_FILE_ERRORS)
