"""Command-line interface: parses options, wires library calls, reports, sets exit codes.

Exit codes, the same for every command (defined with the errors in :mod:`pneumobatch.core.errors`):
0 success; 1 the run completed but some files could not be read (they are listed in the
CSV); 2 usage error (bad option or argument; an existing output without --resume or
--overwrite; a --device this machine does not have, e.g. cuda without a GPU); 3 fatal
error (model missing or corrupt, output not writable, unusable data); 130/143 interrupted
by SIGINT/SIGTERM (rows written so far are kept for --resume). The package's
errors are turned into a one-line message and their exit code in one place,
:class:`Group.invoke`. An empty input folder is not an error: a night without studies
writes a CSV with only the header.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import click

from pneumobatch import __version__
from pneumobatch.core.errors import (
    EXIT_FATAL,
    EXIT_FILE_ERRORS,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    Interrupted,
    ModelError,
    OutputError,
    PneumobatchError,
)
from pneumobatch.core.tasks import TASKS
from pneumobatch.engines import ENGINES
from pneumobatch.evaluation.labels import KEY_COLUMNS
from pneumobatch.evaluation.report.options import ReportOptions
from pneumobatch.io.predictions import STUDY_FROM
from pneumobatch.predict_config import PredictConfig
from pneumobatch.training.config import BALANCE_CHOICES, DEFAULT_OUT_DIR, TrainConfig

__all__ = ["main", "EXIT_OK", "EXIT_FILE_ERRORS", "EXIT_USAGE", "EXIT_FATAL", "EXIT_SIGINT", "EXIT_SIGTERM"]


class CommandError(click.ClickException):
    """A one-line error (``Error: ...`` on stderr) with the exit code of the error it wraps."""

    def __init__(self, message: str, exit_code: int = EXIT_FATAL) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class FatalError(CommandError):
    """A one-line error that stops the run with exit code 3."""


class Group(click.Group):
    """Click group that translates the package's errors once for every command.

    SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's timeout) stop a command by an
    :class:`~pneumobatch.core.errors.Interrupted` error raised where the program is: files are
    closed, decoding workers shut down and the lock released on the way out, then one
    line and exit code 130 or 143. A second signal during that shutdown is ignored. An
    error the package did not anticipate (a bug) is one line and exit code 4.
    """

    def invoke(self, ctx: click.Context):
        try:
            with _signals_stop_the_run():
                return super().invoke(ctx)
        except Interrupted as exc:
            raise CommandError(str(exc), exc.exit_code) from exc
        except KeyboardInterrupt as exc:  # SIGINT arriving before the handler was set
            raise CommandError(str(Interrupted(signal.SIGINT)), EXIT_SIGINT) from exc
        except PneumobatchError as exc:
            raise CommandError(str(exc), exc.exit_code) from exc
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # a bug: one line and its own code, not exit 1 ("some files errored")
            if os.environ.get("PNEUMOBATCH_TRACEBACK"):
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise CommandError(
                f"internal error ({type(exc).__name__}{': ' + first if first else ''}); this is a bug in pneumobatch, "
                "please report it with the traceback (run again with PNEUMOBATCH_TRACEBACK=1)",
                EXIT_INTERNAL,
            ) from exc


#: Target recalls an operating point may be asked for (train on validation data, report on the evaluated data).
RECALL_RANGE = click.FloatRange(0.5, 1.0)


@contextlib.contextmanager
def _signals_stop_the_run():
    """SIGINT and SIGTERM raise :class:`Interrupted` (once) while the command runs."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)

    owner = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked decoding worker: as without this handler
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the DataLoader's workers end quietly on it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for s in signals:  # the shutdown that follows is not to be interrupted again
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class LibraryChoice(click.Choice):
    """A choice list read from a library constant when first needed (so importing the
    CLI, or running ``report``, does not import torch for ``inference.PRECISIONS``)."""

    def __init__(self, module: str, name: str) -> None:
        self._where = (module, name)
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        module, name = self._where
        return tuple(getattr(importlib.import_module(module), name))

    @choices.setter
    def choices(self, value: object) -> None:  # set by click.Choice.__init__; read from the library instead
        pass


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = (
        logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Warnings raised while reading one file (numpy overflow on a hostile rescale slope, a
    # malformed DICOM value) are about that file, whose row says what happened: they go to
    # logging and are shown only with -v, never with -q. Decoding workers inherit this.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose and not quiet else logging.CRITICAL)
    # pydicom logs every failed decoder attempt at ERROR with a traceback; the reader turns
    # those failures into reason codes in the CSV, so its log is noise unless asked for.
    import pydicom.config  # noqa: F401 - pydicom sets its logger's level on import; import it first

    logging.getLogger("pydicom").setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)
    # pynetdicom logs a failed connection at ERROR; pull/push report it once, as a one-line error
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pneumobatch")
def main() -> None:
    """Batch chest X-ray classification for folders of DICOM, PNG and JPEG studies.

    Research and quality-assurance use only; not a medical device.

    \b
    Typical nightly job:
      pneumobatch predict /exports/tonight -o tonight.csv
      pneumobatch report tonight.csv --labels tonight_labels.csv -o tonight.pdf

    \b
    With a PACS (see the README, "Nightly job with a PACS"):
      pneumobatch pull tonight --url https://pacs/dicom-web --since yesterday
      pneumobatch predict tonight -o tonight.csv
      pneumobatch push tonight.csv --source tonight --url https://pacs/dicom-web
    """


@main.command("models", short_help="List installed models with task, classes and test AUC.")
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of NAME.safetensors + NAME.json (default: the shipped weights/).",
)
def models_command(weights_dir: Optional[Path]) -> None:
    """List the installed models with their task, classes and test metrics."""
    from pneumobatch.model.registry import DEFAULT_MODEL, default_weights_dir, list_models

    cards = list_models(weights_dir)
    if not cards:
        raise FatalError(f"no models in {weights_dir or default_weights_dir()}")
    for card in cards:
        test = card.metrics.get("test", {})
        auc = f"test AUC {test['auc']:.3f}" if "auc" in test else "no test metrics"
        default = " (default)" if card.name == DEFAULT_MODEL else ""
        click.echo(
            f"{card.name}{default}: task {card.task}, classes {', '.join(card.classes)}; {card.architecture} @ {card.input_size}px; {auc}"
        )


@main.command("fit-applicability", short_help="Fit a model's applicability (out-of-distribution) statistics.")
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
    default=99.0,
    show_default=True,
    help="Validation-score percentile used as the flag threshold.",
)
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True)
def fit_applicability_command(
    model: str, manifest: Path, weights_dir: Optional[Path], only_class: Optional[str], percentile: float, workers: int
) -> None:
    """Fit MODEL's applicability statistics on MANIFEST's train split; threshold on its val split.

    Writes NAME.applicability.safetensors beside the weights and records it (SHA-256,
    threshold) in NAME.json; predict then adds ood_score and applicable to every row.
    """
    from pneumobatch.model.applicability.features import attach
    from pneumobatch.model.registry import load_model
    from pneumobatch.training.applicability import fit_from_manifest

    loaded = load_model(model, weights_dir, statistics=False)  # the statistics are being replaced
    stats, info = fit_from_manifest(
        loaded, manifest, percentile=percentile, workers=workers, only_class=only_class, progress=click.echo
    )
    path = attach(loaded, stats, info)
    click.echo(
        f"wrote {path}; threshold {stats.threshold:.3f} ({percentile:g}th percentile of {info['n_val']} validation images)"
    )


_T = TrainConfig  # option defaults are the library's, defined once


@main.command("train", short_help="Train a model from a manifest CSV or class folders.")
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
@click.option(
    "--label-column",
    default=_T.label_column,
    show_default=True,
    help="Manifest column holding the label or hierarchical finding.",
)
@click.option(
    "--split-column",
    default=_T.split_column,
    show_default=True,
    help="Manifest column with train/val/test; without it a patient-grouped stratified split is made.",
)
@click.option(
    "--patient-column",
    default=_T.patient_column,
    show_default=True,
    help="Manifest column grouping images of one patient (no patient on two sides of a split).",
)
@click.option(
    "--group-column",
    default=_T.group_column,
    show_default=True,
    help="Manifest column to report test metrics by (e.g. source, site).",
)
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
@click.option(
    "--band-target-recall",
    multiple=True,
    metavar="BAND=RECALL",
    help="That age band's operating point aims at RECALL on validation instead (e.g. adult=0.90). Repeatable.",
)
@click.option("--seed", type=int, default=_T.seed, show_default=True)
@click.option("--device", default=_T.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--workers", type=click.IntRange(1), default=_T.workers, show_default=True, help="Processes decoding images."
)
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
    from pneumobatch.training.train import train

    _setup_logging(verbose, False)
    name = name or options["task"]
    if (out_dir / f"{name}.safetensors").exists() and not overwrite and not options["resume"]:
        raise click.UsageError(
            f"{out_dir / name}.safetensors exists; pass --overwrite to replace it or --name for another name"
        )
    _check_train_inputs(out_dir, options["init"], options["device"])
    config = TrainConfig(data=data, out_dir=out_dir, name=name, **options)
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


@main.command("retune", short_help="Choose a trained model's temperature and operating points again (no training).")
@click.argument("model")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where MODEL is looked up (default: the shipped weights/).",
)
@click.option(
    "--label-column",
    default=_T.label_column,
    show_default=True,
    help="Manifest column holding the label or hierarchical finding.",
)
@click.option("--split-column", default=_T.split_column, show_default=True)
@click.option("--patient-column", default=_T.patient_column, show_default=True)
@click.option("--group-column", default=_T.group_column, show_default=True)
@click.option("--default-age-band", multiple=True, metavar="PATTERN=child|adult", help="As for train. Repeatable.")
@click.option(
    "--target-recall",
    type=RECALL_RANGE,
    default=_T.target_recall,
    show_default=True,
    help="Sensitivity the pooled threshold must reach on validation.",
)
@click.option(
    "--band-target-recall",
    multiple=True,
    metavar="BAND=RECALL",
    help="That age band's operating point aims at RECALL on validation instead (e.g. adult=0.90). Repeatable.",
)
@click.option("--device", default=_T.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--workers", type=click.IntRange(1), default=_T.workers, show_default=True, help="Processes decoding images."
)
def retune_command(model: str, data: Path, weights_dir: Optional[Path], **options) -> None:
    """Choose MODEL's temperature and operating points again on DATA's validation split.

    DATA is the manifest the model was trained on (same splits, same leakage rules); the
    test split is evaluated at the new points. The weights and applicability statistics
    stay as they are; the model card is rewritten (metrics, thresholds, and a
    training.retuned entry saying when and with which targets).
    """
    from pneumobatch.training.train import retune

    _setup_logging(0, False)
    config = TrainConfig(data=data, out_dir=weights_dir or Path("."), name=model, **options)
    card = retune(model, config, weights_dir, progress=click.echo)
    points = card.thresholds.get("by_age_band") or {}
    bands = "; ".join(f"{b} {p['recall_target']:.4f} (target {p['target_recall']:g})" for b, p in points.items())
    click.echo(
        f"rewrote the card of {card.name}: pooled threshold {card.threshold:.4f}" + (f"; {bands}" if bands else "")
    )


def _check_train_inputs(out_dir: Path, init: str, device: str) -> None:
    """Fail in seconds, before images are decoded: device, --init weights, output folder."""
    from pneumobatch.model.device import resolve_device

    resolve_device(device)
    if init not in ("imagenet", "random") and not Path(init).is_file():
        raise ModelError(f"--init {init}: no such weights file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {out_dir}: permission denied")


_P = PredictConfig  # option defaults are the library's, defined once


@main.command("predict", short_help="Predict every file under folders; write CSV predictions.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
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
    inputs: tuple[Path, ...], model_names: tuple[str, ...], quiet: bool, verbose: int, **options
) -> None:
    """Predict every image under INPUTS (folders or files) and write CSV predictions.

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

    from pneumobatch.predict import run_predict

    _setup_logging(verbose, quiet)
    config = PredictConfig(inputs=list(inputs), models=model_names, **options)
    with tqdm(total=0, unit="file", disable=quiet or None, dynamic_ncols=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        run = run_predict(config, progress)
    if not quiet:
        counts = run.counts
        reasons = {r: n for by_status in counts["by_reason"].values() for r, n in by_status.items()}
        reason_text = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        click.echo(
            f"{counts['files']} files: {counts['ok']} ok, {counts['skipped']} skipped, "
            f"{counts['error']} errors{f' ({reason_text})' if reason_text else ''}; "
            f"{run.files_processed} read this run at {run.images_per_second:.1f} images/s on {run.device}; "
            f"wrote {config.output} and {run.studies.name}"
        )
    if run.exit_code != EXIT_OK:
        sys.exit(run.exit_code)


def _archive_options(command):
    """The options naming an archive, shared by pull and push (credentials are never options)."""
    options = [
        click.option("--url", help="DICOMweb base URL, e.g. https://pacs.example.org/dicom-web."),
        click.option(
            "--dimse", metavar="HOST:PORT", help="DIMSE archive address (C-FIND, C-GET, C-STORE) instead of --url."
        ),
        click.option("--calling-ae", help="Our AE title for DIMSE. [default: PNEUMOBATCH]"),
        click.option("--called-ae", help="The archive's AE title for DIMSE. [default: ANY-SCP]"),
        click.option(
            "--config",
            type=click.Path(dir_okay=False, path_type=Path),
            help="PACS config file (mode 0600) with url/dimse, AE titles and credentials. [default: $PNEUMOBATCH_PACS_CONFIG]",
        ),
        click.option(
            "--ca-bundle",
            type=click.Path(exists=True, dir_okay=False),
            help="CA certificates to verify the archive's TLS certificate with (verification is on unless the config file says tls_verify = false).",
        ),
        click.option(
            "--ledger",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Ledger of what was fetched and delivered (SQLite). Share one between pull and push in a nightly job.",
        ),
        click.option(
            "--retries",
            type=click.IntRange(0, 10),
            default=2,
            show_default=True,
            help="Retries of a study that failed, with a growing wait.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No summary (for cron); failures still go to stderr."),
        click.option("-v", "--verbose", count=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _connection(url, dimse, calling_ae, called_ae, config, ca_bundle):
    from pneumobatch.operations.pacs.connection import connect_options

    return connect_options(
        url=url, dimse=dimse, calling_ae=calling_ae, called_ae=called_ae, config=config, ca_bundle=ca_bundle
    )


def _finish(result, quiet: bool) -> None:
    """A pull or push result: failures on stderr (always), its summary unless --quiet, its exit code."""
    for failure in result.failures:
        click.echo(f"failed: {failure}", err=True)
    if not quiet:
        click.echo(result.summary())
    if result.exit_code != EXIT_OK:
        sys.exit(result.exit_code)


@main.command("pull", short_help="Fetch new chest radiograph studies from a PACS into a folder.")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--date", "on", metavar="YYYYMMDD", help="Studies of this one day (also: today, yesterday, Nd).")
@click.option(
    "--since",
    metavar="YYYYMMDD",
    help="Studies from this day on (also: today, yesterday, Nd for N days ago). [default: yesterday]",
)
@click.option("--until", metavar="YYYYMMDD", help="Studies up to this day. [default: today]")
@click.option(
    "--modality", "modalities", multiple=True, help="ModalitiesInStudy to search for; repeatable. [default: CR, DX, DR]"
)
@click.option(
    "--body-part",
    "body_parts",
    multiple=True,
    help="Fetch only series whose BodyPartExamined is this (or empty); repeatable.",
)
@_archive_options
def pull_command(
    output: Path,
    on,
    since,
    until,
    modalities,
    body_parts,
    url,
    dimse,
    calling_ae,
    called_ae,
    config,
    ca_bundle,
    ledger,
    retries,
    quiet,
    verbose,
) -> None:
    """Fetch the studies of a date window from a PACS into OUTPUT, for predict.

    \b
    Files land in OUTPUT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm.
    A ledger (default OUTPUT.ledger.sqlite, beside the folder) records every instance
    fetched: the next run fetches only what is new, and a killed run resumes without
    fetching anything twice. Credentials come from PNEUMOBATCH_PACS_USERNAME /
    PNEUMOBATCH_PACS_PASSWORD or PNEUMOBATCH_PACS_TOKEN, or a 0600 --config file.

    \b
    Exit codes: 0 everything fetched; 1 some studies failed after retries (listed on
    stderr); 2 usage error; 3 the archive cannot be searched (unreachable, refused).
    """
    from pneumobatch.operations.pacs.pull import MODALITIES, PullConfig, date_window, run_pull

    _setup_logging(verbose, quiet)
    conn = _connection(url, dimse, calling_ae, called_ae, config, ca_bundle)
    pull_config = PullConfig(
        connection=conn,
        output=output,
        study_date=date_window(on, since, until),
        modalities=tuple(m.upper() for m in modalities) or MODALITIES,
        body_parts=body_parts,
        ledger=ledger,
        retries=retries,
    )
    result = run_pull(pull_config)
    _finish(result, quiet)


@main.command("push", short_help="Send one DICOM SR per study and model back to a PACS.")
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The folder predict read (headers are copied from its files; otherwise fetched from the archive).",
)
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    help="Push only this model's results; repeatable. [default: every model in the CSV]",
)
@_archive_options
def push_command(
    predictions: Path,
    source,
    models,
    url,
    dimse,
    calling_ae,
    called_ae,
    config,
    ca_bundle,
    ledger,
    retries,
    quiet,
    verbose,
) -> None:
    """Send PREDICTIONS back to a PACS: one DICOM SR per study and model.

    \b
    TID 1500 Comprehensive SR in the source study (new series): per image and finding,
    Present/Absent at the operating point used, the probability and threshold, the
    model, its version and weights SHA-256, the image's SOP Instance UID; marked NOT
    FOR DIAGNOSTIC USE. UIDs are deterministic: pushing again never duplicates an SR.
    Each SR is searched for after sending and only then recorded in the ledger
    (default PREDICTIONS.ledger.sqlite).

    \b
    Exit codes: 0 every SR delivered; 1 some failed after retries (listed on stderr);
    2 usage error; 3 predictions unreadable or archive unusable.
    """
    from pneumobatch.operations.pacs.push import PushConfig, run_push

    _setup_logging(verbose, quiet)
    conn = _connection(url, dimse, calling_ae, called_ae, config, ca_bundle)
    push_config = PushConfig(
        predictions=predictions, connection=conn, source=source, ledger=ledger, models=models, retries=retries
    )
    result = run_push(push_config)
    _finish(result, quiet)


_R = ReportOptions  # option defaults are the library's, defined once


@main.command("report", short_help="Evaluate predictions against labels: PDF + JSON.")
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

    _setup_logging(0, quiet)
    result = write_report(ReportOptions(predictions=predictions, **options))
    if not quiet:
        for warning in result.warnings:
            click.echo(f"note: {warning}", err=True)
        click.echo(
            f"wrote {result.pdf} and {result.metrics_json} ({len(result.figures)} figures) in {result.seconds:.1f}s"
        )


@main.command("calibrate", short_help="Fit temperature and operating points to a site's labelled sample.")
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--labels",
    "labels_csv",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The site's labels CSV (same format as for report).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("site.json"),
    show_default=True,
    help="Site file to write.",
)
@click.option("-m", "--model", help="Model to calibrate. [default: the only one in the CSV]")
@click.option(
    "--key",
    type=click.Choice(["path", "sop_instance_uid", "study_instance_uid", "study"]),
    help="Column joining labels to predictions. [default: detected]",
)
@click.option("--label-column", default="label", show_default=True)
@click.option(
    "--target-sensitivity",
    type=click.FloatRange(0.5, 1.0, max_open=True),
    default=0.95,
    show_default=True,
    help="Sensitivity the site threshold must reach on the sample.",
)
@click.option(
    "--apply",
    "apply",
    type=click.Choice(["target", "youden"]),
    default="target",
    show_default=True,
    help="Operating point predict --site applies: the target-sensitivity threshold or Youden's J.",
)
@click.option(
    "--bootstrap",
    type=click.IntRange(0),
    default=1000,
    show_default=True,
    help="Bootstrap resamples for the 95% intervals.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing site file.")
@click.option("-q", "--quiet", is_flag=True)
def calibrate_command(
    predictions: Path,
    labels_csv: Path,
    output: Path,
    model: Optional[str],
    key: Optional[str],
    label_column: str,
    target_sensitivity: float,
    apply: str,
    bootstrap: int,
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

    _setup_logging(0, quiet)
    result = calibrate(
        CalibrateConfig(
            predictions=predictions,
            labels=labels_csv,
            output=output,
            model=model,
            key=key,
            label_column=label_column,
            target_sensitivity=target_sensitivity,
            apply=apply,
            n_bootstrap=bootstrap,
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


@main.command("monitor", short_help="Drift and alerts across nightly runs: PDF, JSON, Prometheus textfile.")
@click.argument("run_jsons", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("monitor.pdf"),
    show_default=True,
    help="PDF to write; OUT.json and OUT.prom are written beside it.",
)
@click.option(
    "--baseline",
    type=click.IntRange(1),
    default=7,
    show_default=True,
    help="The first N runs form the baseline every later run is compared with.",
)
@click.option(
    "--limit",
    "limits",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override an alert limit (psi, ks_d, positive_rate_change, flag_rate_change, error_rate, alpha, min_images). Repeatable.",
)
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Labels of past nights (keyed by sop_instance_uid or study_instance_uid): adds rolling sensitivity, specificity and PPV.",
)
@click.option(
    "--key",
    type=click.Choice(["path", "sop_instance_uid", "study_instance_uid", "study"]),
    help="Column joining labels to predictions. [default: detected]",
)
@click.option("--label-column", default="label", show_default=True)
@click.option(
    "--window",
    type=click.IntRange(1),
    default=7,
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
    run_jsons: tuple[Path, ...], limits: tuple[str, ...], labels_csv: Optional[Path], quiet: bool, **options
) -> None:
    """Compare nightly RUN_JSONS (OUT.run.json files of predict) with a baseline; alert on drift.

    \b
    Per model and group (scanner, view, age band): PSI and KS of the scores, positive
    rate and applicability flag rate with binomial tests, new or vanished scanners;
    error rate per run. Alerts are printed, listed in the PDF and JSON, and counted in
    the Prometheus file.
    """
    from pneumobatch.operations.monitor.analysis import MonitorConfig, parse_limits, run_monitor

    _setup_logging(0, quiet)
    result = run_monitor(
        MonitorConfig(run_jsons=list(run_jsons), limits=parse_limits(limits), labels=labels_csv, **options)
    )
    for note in result.document["notes"]:
        click.echo(f"note: {note}", err=True)
    if not quiet:
        for alert in result.alerts:
            click.echo(f"ALERT {alert['message']}")
        click.echo(f"{len(result.alerts)} alerts; wrote {result.pdf}, {result.json} and {result.prometheus}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
