"""Command-line interface: parses options, wires library calls, reports, sets exit codes.

Exit codes, the same for every command (defined with the errors in :mod:`pneumobatch.errors`):
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
from pneumobatch.errors import (
    EXIT_FATAL,
    EXIT_FILE_ERRORS,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    Interrupted,
    ModelError,
    OutputError,
    PneumobatchError,
)
from pneumobatch.outputs import STUDY_FROM
from pneumobatch.predict import PredictConfig
from pneumobatch.tasks import TASKS

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
    :class:`~pneumobatch.errors.Interrupted` error raised where the program is: files are
    closed, decoding workers shut down and the lock released on the way out, then one
    line and exit code 130 or 143. A second signal during that shutdown is ignored.
    """

    def invoke(self, ctx: click.Context):
        try:
            with _signals_stop_the_run():
                return super().invoke(ctx)
        except KeyboardInterrupt as exc:  # SIGINT arriving before the handler was set
            raise CommandError(str(Interrupted(signal.SIGINT)), EXIT_SIGINT) from exc
        except PneumobatchError as exc:
            raise CommandError(str(exc), exc.exit_code) from exc


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
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
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


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pneumobatch")
def main() -> None:
    """Batch chest X-ray classification for folders of DICOM, PNG and JPEG studies.

    Research and quality-assurance use only; not a medical device.

    \b
    Typical nightly job:
      pneumobatch predict /exports/tonight -o tonight.csv
      pneumobatch report tonight.csv --labels tonight_labels.csv -o tonight.pdf
    """


@main.command("models", short_help="List installed models with task, classes and test AUC.")
@click.option("--weights-dir", type=click.Path(file_okay=False, path_type=Path), help="Folder of NAME.safetensors + NAME.json (default: the shipped weights/).")
def models_command(weights_dir: Optional[Path]) -> None:
    """List the installed models with their task, classes and test metrics."""
    from pneumobatch.models import DEFAULT_MODEL, default_weights_dir, list_models

    cards = list_models(weights_dir)
    if not cards:
        raise FatalError(f"no models in {weights_dir or default_weights_dir()}")
    for card in cards:
        test = card.metrics.get("test", {})
        auc = f"test AUC {test['auc']:.3f}" if "auc" in test else "no test metrics"
        default = " (default)" if card.name == DEFAULT_MODEL else ""
        click.echo(f"{card.name}{default}: task {card.task}, classes {', '.join(card.classes)}; {card.architecture} @ {card.input_size}px; {auc}")


@main.command("fit-applicability", short_help="Fit a model's applicability (out-of-distribution) statistics.")
@click.argument("model")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--weights-dir", type=click.Path(file_okay=False, path_type=Path), help="Where MODEL is looked up (default: the shipped weights/).")
@click.option("--class", "only_class", help="Fit on images of this class only (e.g. normal: a site's normal radiographs).")
@click.option("--percentile", type=click.FloatRange(50, 100), default=99.0, show_default=True, help="Validation-score percentile used as the flag threshold.")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True)
def fit_applicability_command(model: str, manifest: Path, weights_dir: Optional[Path], only_class: Optional[str], percentile: float, workers: int) -> None:
    """Fit MODEL's applicability statistics on MANIFEST's train split; threshold on its val split.

    Writes NAME.applicability.safetensors beside the weights and records it (SHA-256,
    threshold) in NAME.json; predict then adds ood_score and applicable to every row.
    """
    from pneumobatch.applicability import attach, fit_from_manifest
    from pneumobatch.models import load_model

    loaded = load_model(model, weights_dir)
    stats, info = fit_from_manifest(loaded, manifest, percentile=percentile, workers=workers, only_class=only_class, progress=click.echo)
    path = attach(loaded, stats, info)
    click.echo(f"wrote {path}; threshold {stats.threshold:.3f} ({percentile:g}th percentile of {info['n_val']} validation images)")


@main.command("train", short_help="Train a model from a manifest CSV or class folders.")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--task", type=click.Choice([*TASKS, "custom"]), default="pneumonia", show_default=True, help="Which classes to learn; findings map to them by rule.")
@click.option("--name", help="Model name (files NAME.safetensors/NAME.json). Default: the task name.")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("weights"), show_default=True)
@click.option("--label-column", default="finding", show_default=True, help="Manifest column holding the label or hierarchical finding.")
@click.option("--split-column", default="split", show_default=True, help="Manifest column with train/val/test; without it a patient-grouped stratified split is made.")
@click.option("--patient-column", default="patient_id", show_default=True, help="Manifest column grouping images of one patient (no patient on two sides of a split).")
@click.option("--group-column", default="source", show_default=True, help="Manifest column to report test metrics by (e.g. source, site).")
@click.option("--arch", "architecture", default="efficientnet_lite0", show_default=True, help="Architecture (see --help for the list in the README).")
@click.option("--init", default="imagenet", show_default=True, help="imagenet, random, or a .safetensors of the same architecture.")
@click.option("--input-size", type=click.IntRange(32, 1024), default=192, show_default=True)
@click.option("--batch-size", type=click.IntRange(2, 4096), default=32, show_default=True)
@click.option("--head-epochs", type=click.IntRange(0), default=1, show_default=True, help="Stage 1: epochs training the classifier head alone (pretrained init only).")
@click.option("--epochs", type=click.IntRange(1), default=6, show_default=True, help="Stage 2: epochs fine-tuning the whole network (at most).")
@click.option("--patience", type=click.IntRange(1), default=3, show_default=True, help="Early stopping: epochs without validation-AUC gain.")
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--balance", type=LibraryChoice("pneumobatch.train", "BALANCE_CHOICES"), default="source", show_default=True, help="Imbalance handling: source = sample classes equally and sources within a class by the square root of their size; weights = class-weighted loss.")
@click.option("--default-age-band", multiple=True, metavar="PATTERN=child|adult", help="Age band for images without an age whose --group-column value matches PATTERN (glob, case-insensitive). Repeatable.")
@click.option("--age-column", default="age", show_default=True, help="Manifest column with the age in years (age bands: child < 18 <= adult).")
@click.option("--view-column", default="view", show_default=True, help="Manifest column with the view (AP/PA), for per-view metrics.")
@click.option("--sex-column", default="sex", show_default=True, help="Manifest column with the sex, for per-sex metrics.")
@click.option("--hflip/--no-hflip", default=False, show_default=True, help="Random horizontal flips (off: the heart's side is anatomy).")
@click.option("--target-recall", type=click.FloatRange(0.5, 1.0), default=0.95, show_default=True, help="Sensitivity the shipped threshold must reach on validation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="Processes decoding images.")
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
    from pneumobatch.train import TrainConfig, train

    _setup_logging(verbose, False)
    name = name or options["task"]
    if (out_dir / f"{name}.safetensors").exists() and not overwrite and not options["resume"]:
        raise click.UsageError(f"{out_dir / name}.safetensors exists; pass --overwrite to replace it or --name for another name")
    _check_train_inputs(out_dir, options["init"], options["device"])
    config = TrainConfig(data=data, out_dir=out_dir, name=name, **options)
    card = train(config, progress=click.echo)
    test = card.metrics.get("test", {})
    click.echo(f"wrote {out_dir / name}.safetensors and {out_dir / name}.json")
    if test:
        parts = [f"test AUC {test.get('auc', float('nan')):.4f}"]
        if "sensitivity" in test:
            parts.append(f"sensitivity {test['sensitivity']:.3f} / specificity {test['specificity']:.3f} at threshold {card.threshold:.3f}")
        click.echo("; ".join(parts))


def _check_train_inputs(out_dir: Path, init: str, device: str) -> None:
    """Fail in seconds, before images are decoded: device, --init weights, output folder."""
    from pneumobatch.inference import resolve_device

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
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=_P.output, show_default=True, help="File-level CSV; OUT.studies.csv and OUT.run.json are written beside it.")
@click.option("-m", "--model", "model_names", multiple=True, help="Model name in the weights folder or path to NAME.json/NAME.safetensors; repeat for several. [default: pneumonia]")
@click.option("--weights-dir", type=click.Path(file_okay=False, path_type=Path), help="Where model names are looked up (default: the shipped weights/).")
@click.option("--device", default=_P.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=LibraryChoice("pneumobatch.inference", "PRECISIONS"), default=_P.precision, show_default=True, help="auto: fp16/bf16 on CUDA, fp32 on CPU.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=_P.batch_size, show_default=True)
@click.option("--workers", type=click.IntRange(0, 64), default=_P.workers, help="Decoding processes. [default: 2, or 8 with a GPU]")
@click.option("--resume", is_flag=True, help="Skip files already in OUT (same path, size and mtime) and add the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option("--study-from", type=click.Choice(STUDY_FROM), default=_P.study_from, show_default=True, help="How PNG/JPEG files group into studies (DICOM uses StudyInstanceUID).")
@click.option("--include-lateral", is_flag=True, help="Predict lateral views too (skipped with reason lateral by default).")
@click.option("--max-pixels", type=click.IntRange(1), default=_P.max_pixels, show_default=True, help="Refuse larger images (reason too-large).")
@click.option("--include-patient-id", is_flag=True, help="Add a patient_id column (patient names are never written).")
@click.option("--chest-term", "chest_terms", multiple=True, metavar="WORD", help="A site's word for the chest in BodyPartExamined or descriptions. Repeatable.")
@click.option("--not-chest-term", "not_chest_terms", multiple=True, metavar="WORD", help="A site's word for another body part: such DICOMs are skipped (not-chest). Repeatable.")
@click.option("--follow-external-links", is_flag=True, help="Follow symbolic links that lead outside the input folders (skipped as external-link by default).")
@click.option("--skip-ood", is_flag=True, help="Turn images flagged not applicable into skipped rows (out-of-distribution) instead of predicting and flagging them.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary (for cron); errors still go to stderr.")
@click.option("-v", "--verbose", count=True)
def predict_command(inputs: tuple[Path, ...], model_names: tuple[str, ...], quiet: bool, verbose: int, **options) -> None:
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


@main.command("report", short_help="Evaluate predictions against labels: PDF + JSON.")
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Labels CSV; without it a summary report (distribution, reasons, throughput).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.pdf"), show_default=True, help="PDF to write; REPORT.json and REPORT_files/*.png are written beside it.")
@click.option("--key", type=click.Choice(["path", "sop_instance_uid", "study_instance_uid", "study"]), help="Column joining labels to predictions. [default: detected]")
@click.option("--label-column", default="label", show_default=True, help="Labels column: class names or hierarchical findings (e.g. Pneumonia/Viral/COVID-19).")
@click.option("-m", "--model", help="Report on this model (name, or task when one model has it). [default: each model in turn]")
@click.option("--by", multiple=True, help="Subgroup table by this labels column (e.g. --by view --by sex); repeatable.")
@click.option("--where", multiple=True, metavar="COLUMN=VALUE", help="Use only label rows where COLUMN equals VALUE (e.g. --where split=test); repeatable.")
@click.option("--default-age-band", multiple=True, metavar="PATTERN=child|adult", help="For --by age_band: the band of rows without an age whose source matches PATTERN. Repeatable.")
@click.option("--bootstrap", type=click.IntRange(0), default=1000, show_default=True, help="Bootstrap resamples for 95% confidence intervals (0: none).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-q", "--quiet", is_flag=True)
def report_command(predictions: Path, labels_csv: Optional[Path], output: Path, key: Optional[str], label_column: str, model: Optional[str], by: tuple[str, ...], where: tuple[str, ...], default_age_band: tuple[str, ...], bootstrap: int, seed: int, quiet: bool) -> None:
    """Evaluate PREDICTIONS (a CSV from predict) against labels; write PDF + JSON.

    \b
    Per class: precision, recall (sensitivity), specificity, F1, support; confusion
    matrix; ROC with AUC and bootstrap 95% CI; precision-recall; operating points
    (shipped threshold, 95% sensitivity, Youden); calibration (reliability, ECE, Brier);
    study-level metrics; optional subgroups. Labels that match no prediction, and
    predictions without a label, are counted and listed, never silently dropped.
    """
    from pneumobatch.report import write_report

    _setup_logging(0, quiet)
    result = write_report(predictions, output, labels_csv, key=key, label_column=label_column, model=model, by=by, where=where, default_age_band=default_age_band, n_bootstrap=bootstrap, seed=seed)
    if not quiet:
        for warning in result.warnings:
            click.echo(f"note: {warning}", err=True)
        click.echo(f"wrote {result.pdf} and {result.metrics_json} ({len(result.figures)} figures) in {result.seconds:.1f}s")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
