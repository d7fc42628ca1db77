"""``predict`` as a library call: folders in, CSV predictions, study CSV and run.json out.

    from pneumobatch.predict import PredictConfig, run_predict
    run = run_predict(PredictConfig(inputs=[Path("/exports/tonight")], output=Path("tonight.csv")))

:func:`run_predict` does what ``pneumobatch predict`` does (the CLI only parses options,
shows progress and sets the exit code): it walks the inputs (names prefixed by their root
when there are several), leaves out this run's own output files, hands the files still to
do to an engine (:mod:`pneumobatch.engines`: this machine, or a Ray cluster) and writes the
results it yields, whatever their order, through
:class:`~pneumobatch.io.predictions.PredictionWriter` (journal flushed every ``batch_size`` files,
resume, atomic final write), then ``OUT.studies.csv`` and ``OUT.run.json``. Errors are
the package's own (:mod:`pneumobatch.core.errors`); per-file failures are rows, not errors.
No Click here.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pneumobatch import __version__
from pneumobatch.core.errors import EXIT_FILE_ERRORS, EXIT_OK, OptionError, Status
from pneumobatch.predict_config import PredictConfig

log = logging.getLogger(__name__)

#: Schema of OUT.run.json (2: each model's full card under ``models[i]["card"]``;
#: 3: the CSV gained operating_point, age_band, ood_score, applicable, warnings;
#: 4: ``monitoring`` (:func:`pneumobatch.operations.monitor.record.monitoring_block`), the CSV gained manufacturer,
#: manufacturer_model_name, station_name).
RUN_SCHEMA_VERSION = 4
#: ``progress(done, total)``: called once before the first file and after every file.
Progress = Callable[[int, int], None]


@dataclass
class PredictRun:
    """What a run wrote and counted; ``info`` is the content of run.json."""

    output: Path
    studies: Path
    run_json: Path
    counts: dict[str, Any]
    files_processed: int  # files read this run (the others were resumed)
    seconds: float
    images_per_second: float
    device: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """1 when some files could not be read (they are rows with status error), else 0."""
        return EXIT_FILE_ERRORS if self.counts["error"] else EXIT_OK


def _entries(roots: Sequence[Path], follow_external_links: bool = False, relative_to: Optional[Path] = None) -> list:
    import dataclasses

    from pneumobatch.io.discovery import escape_path, root_prefixes, walk

    unique = list(dict.fromkeys(Path(r).resolve() for r in roots))  # the same folder given twice: once
    prefixes = root_prefixes(unique)
    prefix_of = {root: prefixes[root] if root.is_dir() else "" for root in unique}  # a file root keeps its name
    if relative_to is not None:  # paths as seen from one folder above the inputs (the spool)
        base = Path(relative_to).resolve()
        prefix_of = {root: escape_path(root.relative_to(base).as_posix()) for root in unique}
    entries = []
    for root, entry in walk(unique, follow_external_links=follow_external_links):
        if prefix_of[root]:  # keep paths unique across several roots
            entry = dataclasses.replace(entry, relpath=f"{prefix_of[root]}/{entry.relpath}")
        entries.append(entry)
    return entries


def _apply_site(models: Sequence[Any], path: Path) -> None:
    """Give the site file's model its site card (:func:`pneumobatch.core.site.site_card`)."""
    from pneumobatch.core.errors import SiteError
    from pneumobatch.core.site import apply_site, load_site

    site = load_site(path)
    wanted = (site.get("model") or {}).get("name")
    model = next((m for m in models if m.card.name == wanted), None)
    if model is None:
        raise SiteError(f"{path} was fitted for model {wanted}, which this run does not predict (add -m {wanted})")
    model.card = apply_site(model.card, site)


def _is_input_image(path: Path, roots: Sequence[Path]) -> bool:
    """Whether an output path names an image inside an input folder (never to be replaced)."""
    from pneumobatch.core.errors import FileRejected
    from pneumobatch.io.discovery import FileKind, sniff

    if not path.is_file() or not any(path.resolve().is_relative_to(Path(r).resolve()) for r in roots):
        return False
    try:
        return sniff(path) in (FileKind.DICOM, FileKind.PNG, FileKind.JPEG)
    except (OSError, FileRejected):  # gone, unreadable, or swapped for a FIFO since is_file(): not an image
        return False


def run_predict(config: PredictConfig, progress: Optional[Progress] = None) -> PredictRun:
    """Predict every file under ``config.inputs``; see the module docstring."""
    from pneumobatch.io.predictions import (
        OutputPaths,
        PredictionWriter,
        check_not_busy,
        columns_for,
        file_counts,
        result_rows,
        write_run_json,
        write_studies,
    )

    check_not_busy(OutputPaths(Path(config.output)))  # before torch, the models or a Ray instance start
    from pneumobatch.engines import create_engine
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.io.readers.bodyparts import BodyPartVocabulary
    from pneumobatch.model.store import DEFAULT_MODEL
    from pneumobatch.operations.monitor.record import monitoring_block

    engine = create_engine(config)  # fails fast on a device or cluster this run cannot have
    models = engine.load_models(config.models or (DEFAULT_MODEL,), config.weights_dir)
    names = [m.card.name for m in models]
    if len(set(names)) != len(names):
        raise OptionError("the same model was given twice")
    if config.site is not None:
        _apply_site(models, config.site)
    cards = [m.card for m in models]
    batch_size = engine.batch_size

    started = datetime.now(timezone.utc)
    paths = OutputPaths(Path(config.output))
    roots = [Path(p) for p in config.inputs]
    entries = [
        e for e in _entries(roots, config.follow_external_links, config.relative_to) if not paths.owns(e.path)
    ]  # an output inside the input tree
    columns = columns_for(cards, config.include_patient_id)
    inputs = roots + [p for p in paths.replaced if _is_input_image(p, roots)]
    with PredictionWriter(
        paths, columns, resume=config.resume, overwrite=config.overwrite, cards=cards, inputs=inputs
    ) as writer:
        todo = [e for e in entries if not all(writer.done(e, n) for n in names)]
        vocabulary = BodyPartVocabulary.with_site_terms(config.chest_terms, config.not_chest_terms)
        options = ReadOptions(
            max_pixels=config.max_pixels,
            include_lateral=config.include_lateral,
            min_side=max(c.input_size for c in cards),
            body_parts=vocabulary,
        )
        t0 = time.perf_counter()
        batch: list[dict] = []
        n_ok_now = 0
        if progress:
            progress(0, len(todo))
        # closing: on an error or a signal the decoding workers are shut down before the lock is released
        with contextlib.closing(engine.results(todo, models, options)) as results:
            for done, result in enumerate(results, 1):
                batch += result_rows(result, cards, config.study_from, config.include_patient_id, config.skip_ood)
                n_ok_now += result.status is Status.OK
                if progress:
                    progress(done, len(todo))
                if len(batch) >= batch_size * len(cards):  # flush policy: every batch_size files
                    writer.append(batch)
                    batch = []
        writer.append(batch)
        seconds = time.perf_counter() - t0
        frame = writer.finalize(entries, names)
    write_studies(frame, cards, paths.studies)

    counts = file_counts(frame)
    rate = n_ok_now / seconds if seconds > 0 else 0.0
    info = {
        "schema_version": RUN_SCHEMA_VERSION,
        "pneumobatch_version": __version__,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "roots": [str(p.resolve()) for p in roots],
        "device": engine.device,
        "precision": config.precision,
        "backend": config.backend,
        "batch_size": batch_size,
        "workers": engine.workers,
        "threads": engine.threads,
        "engine": engine.describe(),
        "resumed": config.resume,
        "models": [
            {
                "name": c.name,
                "task": c.task,
                "classes": c.classes,
                "positive": c.positive,
                "threshold": c.threshold,
                "thresholds": c.operating_points(),
                "weights_sha256": c.weights_sha256,
                "architecture": c.architecture,
                "input_size": c.input_size,
                "card": c.to_dict(),
            }
            for c in cards
        ],
        "counts": counts,
        "files_processed_this_run": len(todo),
        "seconds": round(seconds, 2),
        "images_per_second": round(rate, 2),
    }
    info["monitoring"] = monitoring_block(frame, cards, round(rate, 2))
    write_run_json(paths.run, info)
    return PredictRun(
        paths.predictions, paths.studies, paths.run, counts, len(todo), seconds, rate, engine.device, info
    )


def summary_line(run: PredictRun, output: Path) -> str:
    """The line ``pneumobatch predict`` prints after a run: files by status and reason, speed, what it wrote."""
    counts = run.counts
    reasons = {r: n for by_status in counts["by_reason"].values() for r, n in by_status.items()}
    reason_text = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    return (
        f"{counts['files']} files: {counts['ok']} ok, {counts['skipped']} skipped, "
        f"{counts['error']} errors{f' ({reason_text})' if reason_text else ''}; "
        f"{run.files_processed} read this run at {run.images_per_second:.1f} images/s on {run.device}; "
        f"wrote {output} and {run.studies.name}"
    )


@dataclass
class SpoolRun:
    """``predict --spool``: the run, and the complete studies it predicted (marked in the journal)."""

    run: PredictRun
    studies: list[Any]


def run_predict_spool(config: PredictConfig, spool: Path, progress: Optional[Progress] = None) -> SpoolRun:
    """Predict the complete studies of a ``pneumobatch listen`` spool not yet predicted.

    The studies' folders are the run's inputs (paths in the CSV relative to the spool, so
    ``push --source SPOOL`` finds them); they are marked predicted in the spool's journal
    only once the CSV, the study CSV and run.json are written. One ``predict --spool`` per
    spool at a time (a lock file); a run killed before the end marks nothing, and the
    next run (``--resume`` on the same output) predicts the same studies.
    """
    import dataclasses

    from pneumobatch.core.errors import OutputError
    from pneumobatch.io.lockfile import LockBusy, ProcessLock
    from pneumobatch.operations.pacs.spool import JOURNAL_NAME, SpoolJournal

    spool = Path(spool)
    if not (spool / JOURNAL_NAME).is_file():
        raise OptionError(f"{spool} is not a pneumobatch listen spool (no {JOURNAL_NAME} in it)")
    try:
        lock = ProcessLock(spool / ".predict.lock").acquire()
    except LockBusy as exc:
        raise OutputError(f"another predict --spool (PID {exc.pid or '?'}) is reading {spool}") from exc
    try:
        with SpoolJournal(spool) as journal:
            studies = [s for s in journal.to_predict() if s.folder.is_dir()]
            config = dataclasses.replace(config, inputs=[s.folder for s in studies], relative_to=spool)
            run = run_predict(config, progress)
            journal.mark_predicted(studies, run.output)
    finally:
        lock.release()
    return SpoolRun(run, studies)
