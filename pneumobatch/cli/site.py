"""``pneumobatch calibrate``: options (defaults from :class:`~pneumobatch.operations.calibrate.CalibrateConfig`,
read when the command runs: that module imports scikit-learn) and the summary of the site file
it wrote; the fitting is :func:`pneumobatch.operations.calibrate.calibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from pneumobatch.cli.common import LibraryDefault, setup_logging
from pneumobatch.core.site import APPLY_CHOICES
from pneumobatch.evaluation.labels.keys import KEY_COLUMNS

_C = "pneumobatch.operations.calibrate:CalibrateConfig"  # option defaults are the library's, read when needed


@click.command("calibrate", short_help="Fit temperature and operating points to a site's labelled sample.")
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--labels",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The site's labels CSV (same format as for report).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    cls=LibraryDefault,
    library_default=f"{_C}.output",
    show_default=True,
    help="Site file to write.",
)
@click.option("-m", "--model", help="Model to calibrate. [default: the only one in the CSV]")
@click.option(
    "--key",
    type=click.Choice(KEY_COLUMNS),
    help="Column joining labels to predictions. [default: detected]",
)
@click.option("--label-column", type=str, cls=LibraryDefault, library_default=f"{_C}.label_column", show_default=True)
@click.option(
    "--target-sensitivity",
    "target_recall",
    type=click.FloatRange(0.5, 1.0, max_open=True),
    cls=LibraryDefault,
    library_default=f"{_C}.target_recall",
    show_default=True,
    help="Sensitivity the site threshold must reach on the sample.",
)
@click.option(
    "--apply",
    "apply",
    type=click.Choice(list(APPLY_CHOICES)),
    cls=LibraryDefault,
    library_default=f"{_C}.apply",
    show_default=True,
    help="Operating point predict --site applies: the target-sensitivity threshold or Youden's J.",
)
@click.option(
    "--bootstrap",
    "n_bootstrap",
    type=click.IntRange(0),
    cls=LibraryDefault,
    library_default=f"{_C}.n_bootstrap",
    show_default=True,
    help="Bootstrap resamples for the 95% intervals.",
)
@click.option("--seed", type=int, cls=LibraryDefault, library_default=f"{_C}.seed", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing site file.")
@click.option("-q", "--quiet", is_flag=True)
def calibrate_command(
    predictions: Path,
    labels: Path,
    output: Path,
    model: Optional[str],
    key: Optional[str],
    label_column: str,
    target_recall: float,
    apply: str,
    n_bootstrap: int,
    seed: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Fit MODEL's temperature and thresholds to a site's labelled PREDICTIONS; write a site file.

    \b
    Then: pneumobatch predict FOLDER --site site.json ...
    The site file is refused for another model or other weights (exit code 2).
    """
    from pneumobatch.operations.calibrate import CalibrateConfig, calibrate

    setup_logging(0, quiet)
    result = calibrate(
        CalibrateConfig(
            predictions=predictions,
            labels=labels,
            output=output,
            model=model,
            key=key,
            label_column=label_column,
            target_recall=target_recall,
            apply=apply,
            n_bootstrap=n_bootstrap,
            seed=seed,
            overwrite=overwrite,
        )
    )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not quiet:
        click.echo(site_summary(result.site))
        click.echo(f"wrote {result.output}")


def site_summary(site: dict) -> str:
    """A few lines a user reads after calibrate: temperature and each chosen point with its intervals."""

    def point(p: dict) -> str:
        if p.get("sensitivity") is None:
            return f"threshold {p['threshold']:.4f}"

        def ci(what: str) -> str:
            boot, exact = p.get(f"{what}_ci"), p.get(f"{what}_ci_exact")
            parts = [
                f"bootstrap {boot[0]:.3f}-{boot[1]:.3f}" if boot else "",
                f"exact {exact[0]:.3f}-{exact[1]:.3f}" if exact else "",
            ]
            return f" ({'; '.join(x for x in parts if x)})" if any(parts) else ""

        return (
            f"threshold {p['threshold']:.4f}: sensitivity {p['sensitivity']:.3f}{ci('sensitivity')}, "
            f"specificity {p['specificity']:.3f}{ci('specificity')}"
        )

    t = site["temperature"]
    counts = ", ".join(f"{c} {n}" for c, n in site["fitted_on"]["counts"].items())
    lines = [
        f"{site['model']['name']}: {site['fitted_on']['n']} labelled images ({counts}); "
        f"temperature {t['shipped']:.3f} -> {t['site']:.3f} (log loss {t['log_loss_before']:.3f} -> {t['log_loss_after']:.3f}, "
        f"ECE {t['ece_before']:.3f} -> {t['ece_after']:.3f})"
    ]
    shipped = site["shipped_on_site_data"]
    if shipped.get("sensitivity") is not None:
        lines.append(
            f"  shipped pooled threshold {shipped['threshold']:.4f} at temperature {t['shipped']:.3f}: "
            f"sensitivity {shipped['sensitivity']:.3f}, specificity {shipped['specificity']:.3f}"
        )
    points = site["operating_points"]
    for where, p in [("pooled", points["pooled"]), *points["by_age_band"].items()]:
        label = f"{where} ({p['source']})"
        lines.append(f"  {label}: {site['target_sensitivity']:.0%} target, {point(p['target'])}")
        lines.append(f"  {label}: Youden, {point(p['youden'])}")
    lines.append(f"  predict --site applies: {site['apply']}")
    return "\n".join(lines)
