"""``pneumobatch predict``: its options (defaults from :class:`~pneumobatch.predict_config.PredictConfig`),
the progress bar, the summary line and the run's exit code; the run itself is
:func:`pneumobatch.predict.run_predict`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pneumobatch.cli.common import LibraryChoice, setup_logging
from pneumobatch.core.errors import EXIT_OK
from pneumobatch.engines import ENGINES
from pneumobatch.io.predictions import HEATMAP_MODES, STUDY_FROM
from pneumobatch.predict_config import PredictConfig

_P = PredictConfig  # option defaults are the library's, defined once


@click.command("predict", short_help="Predict every file under folders; write CSV predictions.")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--spool",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Instead of INPUTS: the complete studies of a `pneumobatch listen` spool not yet predicted (marked once written).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=_P.output,
    show_default=True,
    help="File-level CSV; OUT.studies.csv and OUT.run.json are written beside it.",
)
@click.option(
    "-m",
    "--model",
    "model_names",
    multiple=True,
    help="Model name in the weights folder or path to NAME.json/NAME.safetensors; repeat for several. [default: pneumonia]",
)
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where model names are looked up (default: the shipped weights/).",
)
@click.option("--device", default=_P.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--precision",
    type=LibraryChoice("pneumobatch.model.device", "PRECISIONS"),
    default=_P.precision,
    show_default=True,
    help="auto: fp16/bf16 on CUDA, fp32 on CPU.",
)
@click.option(
    "--backend",
    type=LibraryChoice("pneumobatch.model.device", "BACKENDS"),
    default=_P.backend,
    show_default=True,
    help="CPU forward pass: auto = ONNX Runtime when installed (fp32), else PyTorch.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    default=_P.batch_size,
    help="Images per forward pass. [default: 16, or 64 on CUDA]",
)
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=_P.workers,
    help="Decoding processes. [default: one per core on the CPU (0 on a single core: the main process decodes); with a GPU all cores but one]",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=_P.threads,
    help="Torch threads of the main process. [default: a quarter of the cores on the CPU (at least 1); 1 with a GPU]",
)
@click.option("--resume", is_flag=True, help="Skip files already in OUT (same path, size and mtime) and add the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option(
    "--study-from",
    type=click.Choice(STUDY_FROM),
    default=_P.study_from,
    show_default=True,
    help="How PNG/JPEG files group into studies (DICOM uses StudyInstanceUID).",
)
@click.option(
    "--include-lateral", is_flag=True, help="Predict lateral views too (skipped with reason lateral by default)."
)
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    default=_P.max_pixels,
    show_default=True,
    help="Refuse larger images (reason too-large).",
)
@click.option("--include-patient-id", is_flag=True, help="Add a patient_id column (patient names are never written).")
@click.option(
    "--chest-term",
    "chest_terms",
    multiple=True,
    metavar="WORD",
    help="A site's word for the chest in BodyPartExamined or descriptions. Repeatable.",
)
@click.option(
    "--not-chest-term",
    "not_chest_terms",
    multiple=True,
    metavar="WORD",
    help="A site's word for another body part: such DICOMs are skipped (not-chest). Repeatable.",
)
@click.option(
    "--follow-external-links",
    is_flag=True,
    help="Follow symbolic links that lead outside the input folders (skipped as external-link by default).",
)
@click.option(
    "--skip-ood",
    is_flag=True,
    help="Turn images flagged not applicable into skipped rows (out-of-distribution) instead of predicting and flagging them.",
)
@click.option(
    "--heatmaps",
    type=click.Choice(HEATMAP_MODES),
    help="Write Grad-CAM heatmaps as PNG overlays in OUT.heatmaps/ (column heatmap): positive, for rows whose "
    "decision is a finding, or all rows with a prediction. Needs PyTorch. [default: none]",
)
@click.option(
    "--site",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Site file from `pneumobatch calibrate`: its model uses the site's temperature and operating points.",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default=_P.engine,
    show_default=True,
    help="local: this machine; ray: a Ray cluster, decoding on CPU tasks and models on GPU actors (pip install 'pneumobatch[ray]').",
)
@click.option(
    "--ray-address",
    metavar="auto|ray://HOST:PORT",
    help="With --engine ray: the cluster to join (auto: the one started on this node with 'ray start'). [default: $RAY_ADDRESS, else a Ray started for this run]",
)
@click.option(
    "--ray-actors",
    type=click.IntRange(1),
    help="With --engine ray: model actors. [default: one per GPU of the cluster, else 1 CPU actor]",
)
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress bar and no summary (for cron); errors still go to stderr."
)
@click.option("-v", "--verbose", count=True)
def predict_command(
    inputs: tuple[Path, ...], spool, model_names: tuple[str, ...], quiet: bool, verbose: int, **options
) -> None:
    """Predict every image under INPUTS (folders or files) and write CSV predictions.

    With --spool SPOOL instead of INPUTS: the studies `pneumobatch listen` announced
    complete in SPOOL and not yet predicted; they are marked predicted once OUT is written.

    Every file found gets a row: status ok, skipped (by rule, with a reason such as
    not-image, not-cxr, lateral, no-pixels) or error (corrupt, too-large, ...).

    \b
    Exit codes: 0 all files predicted or skipped by rule; 1 some files errored
    (see the CSV); 2 usage error (also: --device cuda without a GPU; --resume on an
    output of other models or weights); 3 fatal error (e.g. model missing or its card
    invalid, output unwritable, disk full); 130/143 stopped by SIGINT/SIGTERM
    (rows so far kept: run again with --resume).
    """
    from tqdm import tqdm

    from pneumobatch.predict import run_predict, run_predict_spool, summary_line

    if bool(inputs) == bool(spool):
        raise click.UsageError("give INPUTS (folders or files) or --spool SPOOL, one of them")
    setup_logging(verbose, quiet, import_pydicom=False)
    config = PredictConfig(inputs=list(inputs), models=model_names, **options)
    with tqdm(total=0, unit="file", disable=quiet or None, dynamic_ncols=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        if spool:
            spooled = run_predict_spool(config, spool, progress)
            run = spooled.run
        else:
            run = run_predict(config, progress)
    if not quiet:
        if spool:
            click.echo(f"{len(spooled.studies)} complete studies from {spool}, marked predicted")
        click.echo(summary_line(run, config.output))
    if run.exit_code != EXIT_OK:
        sys.exit(run.exit_code)
