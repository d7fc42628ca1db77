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


def _check_heatmaps(mode: str) -> None:
    from pneumobatch.io.predictions import HEATMAP_MODES

    if mode not in HEATMAP_MODES:
        raise OptionError(f"--heatmaps must be one of {', '.join(HEATMAP_MODES)}, not {mode!r}")


def _can_backprop() -> bool:
    """Whether heatmaps the forward pass did not give can be made (Captum, on PyTorch)."""
    from pneumobatch.model.device import installed, torch_installed

    return torch_installed() and installed("captum")


class _Heatmaps:
    """``--heatmaps``: overlays drawn as rows are made, from maps the forward pass computed
    (:mod:`pneumobatch.model.heatmaps`), and by Captum for the rest once every row is in
    (:meth:`finish`, which the writer calls on the merged rows before writing them)."""

    def __init__(self, config: PredictConfig, engine: Any, models: Sequence[Any], paths: Any) -> None:
        from pneumobatch.model.heatmaps import HeatmapCounts, computes_maps

        self.config, self.engine, self.models = config, engine, list(models)
        self.cards = {m.card.name: m.card for m in self.models}
        self.folder = paths.heatmaps
        self.inline = engine.describe().get("name") == "local" and all(computes_maps(m) for m in self.models)
        self.counts = HeatmapCounts()
        self.layers: dict[str, str] = {}
        if not self.inline and not _can_backprop():
            from pneumobatch.core.errors import DeviceError

            raise DeviceError(
                "--heatmaps with these models or this engine needs PyTorch and Captum, not installed: "
                "pip install 'pneumobatch[torch]'"
            )

    def rows(self, result: Any, rows: list[dict]) -> None:
        """Draw the overlays of a file's rows that want one, when its result carries the maps."""
        from pneumobatch.model.heatmaps import open_folder, wanted, write_overlay

        if not self.inline:
            return
        for row in rows:
            card = self.cards[row["model"]]
            if row["status"] == Status.OK.value and wanted(card, row["pred_label"], self.config.heatmaps):
                if not self.counts.written:
                    open_folder(self.folder)
                if write_overlay(row, card, result.cams.get(card.name), result.display, self.folder):
                    self.counts.written += 1
        result.display = None

    def finish(self, frame: Any, entries: Sequence[Any], options: Any) -> None:
        """The rows still without a heatmap (resumed, Ray, a GPU, no closed form): Grad-CAM by Captum."""
        from pneumobatch.model.heatmaps import plan

        todo, counts = plan(frame, self.cards, self.folder, self.config.heatmaps)
        self.counts.kept = counts.kept - self.counts.written
        if not todo:
            return
        if not _can_backprop():  # a resumed run's rows, on an install without torch
            from pneumobatch.model.heatmaps import mark_failed

            log.warning(
                "%d heatmaps not made: they need PyTorch and Captum (pip install 'pneumobatch[torch]')", len(todo)
            )
            for jobs in todo.values():
                mark_failed(frame, jobs, self.counts)
            return
        from pneumobatch.model.device import default_split, resolve_device
        from pneumobatch.model.explain import cam_layer_name, write_heatmaps
        from pneumobatch.model.registry import LoadedModel, load_model
        from pneumobatch.model.store import DEFAULT_MODEL

        requested = list(self.config.models or (DEFAULT_MODEL,))
        nets = [
            m if isinstance(m, LoadedModel) else load_model(spec, self.config.weights_dir)
            for spec, m in zip(requested, self.models)
        ]
        for net, model in zip(nets, self.models):
            net.card = model.card  # a site's card decides; the network is the same
            self.layers[net.card.name] = cam_layer_name(net.card)
        device = resolve_device("cpu" if self.engine.device == "cpu" else self.config.device)
        split = default_split(device)
        write_heatmaps(
            frame,
            todo,
            nets,
            entries,
            self.folder,
            options,
            self.counts,
            device=device,
            workers=self.config.workers if self.config.workers is not None else split.workers,
            threads=self.config.threads or max(1, split.workers),
        )

    def info(self) -> dict[str, Any]:
        """run.json's ``heatmaps``."""
        from pneumobatch.model.heatmaps import METHOD, layer_name

        return {
            "mode": self.config.heatmaps,
            "method": METHOD,
            "layers": {name: self.layers.get(name) or layer_name(card) for name, card in self.cards.items()},
            "folder": self.folder.name,
            "from_forward_pass": self.inline,
            "written": self.counts.written,
            "kept": self.counts.kept,
            "failed": self.counts.failed,
        }


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
    if config.heatmaps:
        _check_heatmaps(config.heatmaps)
    from pneumobatch.engines import create_engine
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.io.readers.bodyparts import BodyPartVocabulary
    from pneumobatch.model.heatmaps import DISPLAY_SIDE
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
    columns = columns_for(cards, config.include_patient_id, heatmaps=bool(config.heatmaps))
    heatmaps = _Heatmaps(config, engine, models, paths) if config.heatmaps else None
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
            display_side=DISPLAY_SIDE if heatmaps is not None and heatmaps.inline else 0,
            defer_pixels=True,  # equalising models need no image, only the stored values' histogram
        )
        t0 = time.perf_counter()
        batch: list[dict] = []
        n_ok_now = 0
        if progress:
            progress(0, len(todo))
        # closing: on an error or a signal the decoding workers are shut down before the lock is released
        with contextlib.closing(engine.results(todo, models, options)) as results:
            for done, result in enumerate(results, 1):
                rows = result_rows(result, cards, config.study_from, config.include_patient_id, config.skip_ood)
                if heatmaps is not None:
                    heatmaps.rows(result, rows)
                batch += rows
                n_ok_now += result.status is Status.OK
                if progress:
                    progress(done, len(todo))
                if len(batch) >= batch_size * len(cards):  # flush policy: every batch_size files
                    writer.append(batch)
                    batch = []
        writer.append(batch)
        finish = (lambda frame: heatmaps.finish(frame, entries, options)) if heatmaps is not None else None
        frame = writer.finalize(entries, names, amend=finish)
        seconds = time.perf_counter() - t0
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
    if heatmaps is not None:
        info["heatmaps"] = heatmaps.info()
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
