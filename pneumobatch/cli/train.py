"""``pneumobatch train``, ``retune``, ``fit-applicability`` and ``models``: the commands that make
or inspect model weights. Options default to :class:`~pneumobatch.training.config.TrainConfig`;
the work is :mod:`pneumobatch.training`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from pneumobatch.cli.common import (
    RECALL_RANGE,
    BandTargetRecall,
    DefaultAgeBand,
    LibraryChoice,
    LibraryDefault,
    option_group,
    setup_logging,
)
from pneumobatch.core.errors import ModelError
from pneumobatch.core.tasks import TASKS
from pneumobatch.training.config import BALANCE_CHOICES, DEFAULT_OUT_DIR, TrainConfig


@click.command("models", short_help="List installed models with task, classes and test AUC.")
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of NAME.safetensors + NAME.json (default: the shipped weights/).",
)
def models_command(weights_dir: Optional[Path]) -> None:
    """List the installed models with their task, classes and test metrics."""
    from pneumobatch.model.store import DEFAULT_MODEL, default_weights_dir, list_models

    cards = list_models(weights_dir)
    if not cards:
        raise ModelError(f"no models in {weights_dir or default_weights_dir()}")
    for card in cards:
        test = card.metrics.get("test", {})
        auc = f"test AUC {test['auc']:.3f}" if "auc" in test else "no test metrics"
        default = " (default)" if card.name == DEFAULT_MODEL else ""
        click.echo(
            f"{card.name}{default}: task {card.task}, classes {', '.join(card.classes)}; {card.architecture} @ {card.input_size}px; {auc}"
        )


@click.command("fit-applicability", short_help="Fit a model's applicability (out-of-distribution) statistics.")
@click.argument("model")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where MODEL is looked up (default: the shipped weights/).",
)
@click.option(
    "--class", "only_class", help="Fit on images of this class only (e.g. normal: a site's normal radiographs)."
)
@click.option(
    "--percentile",
    type=click.FloatRange(50, 100),
    cls=LibraryDefault,
    library_default="pneumobatch.training.applicability:fit_from_manifest.percentile",
    show_default=True,
    help="Validation-score percentile used as the flag threshold.",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    cls=LibraryDefault,
    library_default="pneumobatch.training.applicability:fit_from_manifest.workers",
    show_default=True,
)
def fit_applicability_command(
    model: str, manifest: Path, weights_dir: Optional[Path], only_class: Optional[str], percentile: float, workers: int
) -> None:
    """Fit MODEL's applicability statistics on MANIFEST's train split; threshold on its val split.

    Writes NAME.applicability.safetensors beside the weights and records it (SHA-256,
    threshold) in NAME.json; predict then adds ood_score and applicable to every row.
    """
    from pneumobatch.model.applicability.features import attach
    from pneumobatch.model.onnx import export_for_onnx_runtime
    from pneumobatch.model.registry import load_model
    from pneumobatch.training.applicability import fit_from_manifest

    loaded = load_model(model, weights_dir, statistics=False)  # the statistics are being replaced
    stats, info = fit_from_manifest(
        loaded, manifest, percentile=percentile, workers=workers, only_class=only_class, progress=click.echo
    )
    path = attach(loaded, stats, info)
    export_for_onnx_runtime(loaded)  # the statistics' layers are outputs of the export predict runs
    click.echo(
        f"wrote {path}; threshold {stats.threshold:.3f} ({percentile:g}th percentile of {info['n_val']} validation images)"
    )


_T = TrainConfig  # option defaults are the library's, defined once

#: the manifest's columns, as train and retune read them
_MANIFEST_COLUMNS = option_group(
    click.option(
        "--label-column",
        default=_T.label_column,
        show_default=True,
        help="Manifest column holding the label or hierarchical finding.",
    ),
    click.option(
        "--split-column",
        default=_T.split_column,
        show_default=True,
        help="Manifest column with train/val/test; without it a patient-grouped stratified split is made.",
    ),
    click.option(
        "--patient-column",
        default=_T.patient_column,
        show_default=True,
        help="Manifest column grouping images of one patient (no patient on two sides of a split).",
    ),
    click.option(
        "--group-column",
        default=_T.group_column,
        show_default=True,
        help="Manifest column to report test metrics by (e.g. source, site).",
    ),
)
_RECALL_MARGIN = click.option(
    "--recall-margin-level",
    type=click.FloatRange(0, 1, max_open=True),
    default=_T.recall_margin_level,
    show_default=True,
    help="Operating points with a margin: the threshold where validation sensitivity's exact one-sided lower "
    "bound at this confidence reaches the target (0: where the sensitivity itself does).",
)
_BAND_TARGET_RECALL = click.option(
    "--band-target-recall",
    multiple=True,
    type=BandTargetRecall(),
    metavar="BAND=RECALL",
    help="That age band's operating point aims at RECALL on validation instead (e.g. adult=0.90). Repeatable.",
)
_DEVICE_AND_WORKERS = option_group(
    click.option("--device", default=_T.device, show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option(
        "--workers", type=click.IntRange(1), default=_T.workers, show_default=True, help="Processes decoding images."
    ),
)


@click.command("train", short_help="Train a model from a manifest CSV or class folders.")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--task",
    type=click.Choice([*TASKS, "custom"]),
    default=_T.task,
    show_default=True,
    help="Which classes to learn; findings map to them by rule.",
)
@click.option("--name", help="Model name (files NAME.safetensors/NAME.json). Default: the task name.")
@click.option(
    "-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT_DIR, show_default=True
)
@_MANIFEST_COLUMNS
@click.option(
    "--arch",
    "architecture",
    default=_T.architecture,
    show_default=True,
    help="Architecture (see --help for the list in the README).",
)
@click.option(
    "--init", default=_T.init, show_default=True, help="imagenet, random, or a .safetensors of the same architecture."
)
@click.option("--input-size", type=click.IntRange(32, 1024), default=_T.input_size, show_default=True)
@click.option("--batch-size", type=click.IntRange(2, 4096), default=_T.batch_size, show_default=True)
@click.option(
    "--head-epochs",
    type=click.IntRange(0),
    default=_T.head_epochs,
    show_default=True,
    help="Stage 1: epochs training the classifier head alone (pretrained init only).",
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    default=_T.epochs,
    show_default=True,
    help="Stage 2: epochs fine-tuning the whole network (at most).",
)
@click.option(
    "--patience",
    type=click.IntRange(1),
    default=_T.patience,
    show_default=True,
    help="Early stopping: epochs without validation-AUC gain.",
)
@click.option("--lr", type=float, default=_T.lr, show_default=True)
@click.option(
    "--balance",
    type=click.Choice(BALANCE_CHOICES),
    default=_T.balance,
    show_default=True,
    help="Imbalance handling: source = sample classes equally and sources within a class by the square root of their size; weights = class-weighted loss.",
)
@click.option(
    "--default-age-band",
    multiple=True,
    type=DefaultAgeBand(),
    metavar="PATTERN=child|adult",
    help="Age band for images without an age whose --group-column value matches PATTERN (glob, case-insensitive). Repeatable.",
)
@click.option(
    "--age-column",
    default=_T.age_column,
    show_default=True,
    help="Manifest column with the age in years (age bands: child < 18 <= adult).",
)
@click.option(
    "--view-column",
    default=_T.view_column,
    show_default=True,
    help="Manifest column with the view (AP/PA), for per-view metrics.",
)
@click.option(
    "--sex-column", default=_T.sex_column, show_default=True, help="Manifest column with the sex, for per-sex metrics."
)
@click.option(
    "--hflip/--no-hflip",
    default=_T.hflip,
    show_default=True,
    help="Random horizontal flips (off: the heart's side is anatomy).",
)
@click.option(
    "--target-recall",
    type=RECALL_RANGE,
    default=_T.target_recall,
    show_default=True,
    help="Sensitivity the shipped threshold must reach on validation.",
)
@_BAND_TARGET_RECALL
@_RECALL_MARGIN
@click.option(
    "--equalize/--no-equalize",
    default=_T.equalize,
    show_default=True,
    help="Histogram-equalise grey levels before the resize (recorded in the card; predict does the same).",
)
@click.option(
    "--export-augment/--no-export-augment",
    default=_T.export_augment,
    show_default=True,
    help="Send every training image through a random export (resolution round trip, JPEG, crop, blur, noise).",
)
@click.option(
    "--consistency",
    type=click.FloatRange(0),
    default=_T.consistency,
    show_default=True,
    help="Weight of a consistency term: each image through two random exports per step and their probabilities "
    "pulled together (Jensen-Shannon); about twice the time per epoch. 0: off.",
)
@click.option(
    "--invariance-test/--no-invariance-test",
    default=_T.invariance_test,
    show_default=True,
    help="After training, the export-invariance test on the test split (a few minutes), recorded in the card.",
)
@click.option(
    "--exclude-group",
    multiple=True,
    metavar="PATTERN",
    help="Leave the images whose --group-column value matches PATTERN (glob) out of every split "
    "(leave-one-source-out). Repeatable.",
)
@click.option(
    "--precision",
    type=LibraryChoice("pneumobatch.model.device", "PRECISIONS"),
    default=_T.precision,
    show_default=True,
    help="auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), fp32 elsewhere.",
)
@click.option("--seed", type=int, default=_T.seed, show_default=True)
@_DEVICE_AND_WORKERS
@click.option("--resume", is_flag=True, help="Continue from NAME.checkpoint.pt in the output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model of the same name.")
@click.option("-v", "--verbose", count=True)
def train_command(data: Path, name: Optional[str], out_dir: Path, overwrite: bool, verbose: int, **options) -> None:
    """Train a model from DATA: a manifest CSV or a class-per-folder tree.

    \b
    Manifest: columns path (relative to the CSV), a label column (class name or
    hierarchical finding such as Pneumonia/Viral/COVID-19), optional split and
    patient id. Folder tree: DATA/CLASS/* or DATA/{train,val,test}/CLASS/*.
    """
    from pneumobatch.training.loop import train
    from pneumobatch.training.preflight import check_train_inputs

    setup_logging(verbose, False)
    name = name or options["task"]
    config = TrainConfig(data=data, out_dir=out_dir, name=name, **options)
    check_train_inputs(config, overwrite=overwrite)
    card = train(config, progress=click.echo)
    test = card.metrics.get("test", {})
    click.echo(f"wrote {out_dir / name}.safetensors and {out_dir / name}.json")
    if test:
        parts = [f"test AUC {test.get('auc', float('nan')):.4f}"]
        if "sensitivity" in test:
            parts.append(
                f"sensitivity {test['sensitivity']:.3f} / specificity {test['specificity']:.3f} at threshold {card.threshold:.3f}"
            )
        click.echo("; ".join(parts))


@click.command("retune", short_help="Choose a trained model's temperature and operating points again (no training).")
@click.argument("model")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where MODEL is looked up (default: the shipped weights/).",
)
@_MANIFEST_COLUMNS
@click.option(
    "--default-age-band",
    multiple=True,
    type=DefaultAgeBand(),
    metavar="PATTERN=child|adult",
    help="As for train. Repeatable.",
)
@click.option(
    "--target-recall",
    type=RECALL_RANGE,
    default=_T.target_recall,
    show_default=True,
    help="Sensitivity the pooled threshold must reach on validation.",
)
@_BAND_TARGET_RECALL
@_RECALL_MARGIN
@_DEVICE_AND_WORKERS
def retune_command(model: str, data: Path, weights_dir: Optional[Path], **options) -> None:
    """Choose MODEL's temperature and operating points (decision offsets) again on DATA's validation split.

    DATA is the manifest the model was trained on (same splits, same leakage rules); the
    test split is evaluated at the new points. The weights and applicability statistics
    stay as they are; the model card is rewritten (metrics, thresholds, and a
    training.retuned entry saying when and with which targets).
    """
    from pneumobatch.training.operating_points import retune

    setup_logging(0, False)
    config = TrainConfig(data=data, out_dir=weights_dir or Path("."), name=model, **options)
    card = retune(model, config, weights_dir, progress=click.echo)
    points = card.thresholds.get("by_age_band") or {}
    bands = "; ".join(f"{b} {p['recall_target']:.4f} (target {p['target_recall']:g})" for b, p in points.items())
    if card.threshold is None:  # a multi-class model: its decision offsets were chosen again
        offsets = ", ".join(f"{c} {v:+.1f}" for c, v in zip(card.classes, card.log_offsets or []))
        click.echo(
            f"rewrote the card of {card.name}: decision {card.decision.get('rule')}"
            + (f" ({offsets})" if offsets else "")
        )
        return
    click.echo(
        f"rewrote the card of {card.name}: pooled threshold {card.threshold:.4f}" + (f"; {bands}" if bands else "")
    )
