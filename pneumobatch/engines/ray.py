"""The Ray engine: ``pneumobatch predict --engine ray`` on a Ray cluster (``pip install 'pneumobatch[ray]'``).

The driver (the machine running ``predict``) discovers the files, skips what ``--resume``
finds done and writes every output, exactly as with the local engine
(:func:`pneumobatch.predict.run_predict`). Ray Data does the rest, streaming:

1. the file list becomes a dataset of ``(index, path)`` rows, one block per batch;
2. CPU tasks read and resize each batch with the local engine's own code
   (:class:`pneumobatch.model.inference.StudyFiles`: readers, checks, reason codes, resize),
   so only the uint8 model inputs (192x192: 37 KB an image) cross the object store,
   never a decoded 2,000x2,000 image;
3. an actor pool runs the models (:class:`~pneumobatch.model.inference.Predictor`): one
   actor per GPU (``num_gpus=1``), or CPU actors on a cluster without GPUs;
4. results stream back to the driver as :class:`~pneumobatch.io.results.FileResult`
   records, in completion order; the writer puts them in discovery order at the end.

Inputs must be at the same path on every node (a shared filesystem); the output is a
file on the driver. Failures: Ray re-runs a read task whose worker died and restarts a
model actor that died, re-running its batch (at most :data:`MAX_RETRIES` times each); a
result that comes back twice is written once. When Ray gives up, :class:`EngineError`
stops the run (exit code 3) with the rows so far in the journal; ``--resume`` finishes.

Ray is imported only here, and only when ``--engine ray`` is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from pneumobatch.core.errors import DeviceError, EngineError, EngineUnavailable, OptionError, Reason, Status
from pneumobatch.io.discovery import FileEntry
from pneumobatch.model.preprocess import InputSpec, input_spec

if TYPE_CHECKING:
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.io.results import FileResult
    from pneumobatch.model.registry import LoadedModel
    from pneumobatch.predict_config import PredictConfig

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pneumobatch[ray]'"
#: How often Ray re-runs a read task or a model batch whose process died (a file that
#: crashes its decoder every time must stop the run, not loop forever).
MAX_RETRIES = 3
#: Columns a batch carries from the read tasks, through the actors, back to the driver.
_RECORD = ("index", "status", "reason", "detail", "meta", "decoded")


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-line error naming what to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs Ray Data, not only Ray Core
    except ImportError as exc:
        raise EngineUnavailable(f"--engine ray needs Ray Data, which is not installed: {INSTALL_HINT}") from exc
    return ray


def _input_column(spec: InputSpec) -> str:
    return f"input_{spec.key}"


def read_batch(batch: dict[str, np.ndarray], specs: Sequence[InputSpec], options: ReadOptions) -> dict[str, np.ndarray]:
    """Ray Data task: read and resize a batch of files (the local engine's ``StudyFiles``).

    Returns the record columns plus ``input_<spec key>`` (n, 1, size, size) uint8 per model
    input size; rows that were not decoded (skipped, errors) hold zeros there and
    ``decoded`` False. ``meta`` travels pickled: its keys differ from file to file.
    """
    from pneumobatch.model.inference import StudyFiles

    entries = [
        FileEntry(Path(os.fsdecode(path)), "", 0, 0, (Reason(reason), detail) if reason else None)
        for path, reason, detail in zip(batch["path"], batch["problem"], batch["problem_detail"])
    ]
    files = StudyFiles(entries, specs, options)
    items = [files[i] for i in range(len(files))]
    out: dict[str, np.ndarray] = {
        "index": batch["index"],
        "status": np.array([Status(item["status"]).value for item in items], dtype=object),
        "reason": np.array([item["reason"] for item in items], dtype=object),
        "detail": np.array([item["detail"] for item in items], dtype=object),
        "meta": np.array([pickle.dumps(item["meta"]) for item in items], dtype=object),
        "decoded": np.array([item["inputs"] is not None for item in items], dtype=bool),
    }
    for spec in sorted(set(specs)):
        pixels = np.zeros((len(items), 1, spec.size, spec.size), dtype=np.uint8)
        for row, item in enumerate(items):
            if item["inputs"] is not None:
                pixels[row] = item["inputs"][spec]
        out[_input_column(spec)] = pixels
    return out


class ModelActor:
    """Ray Data actor: the models on this actor's GPU (or CPU), probabilities per batch.

    Adds ``probs_<i>`` (n, classes) and, for models with applicability statistics,
    ``ood_<i>`` (n,) and ``applicable_<i>`` (n,) for model ``i``; NaN (False) on rows
    that were not decoded.
    """

    def __init__(self, models_ref: list[Any], use_gpu: bool, precision: str, backend: str = "auto") -> None:
        import ray
        import torch

        from pneumobatch.model.inference import create_predictor

        # the models travel once through the object store (the driver keeps the reference),
        # so a restarted actor finds them without weights files on every node
        models: list[LoadedModel] = ray.get(models_ref[0])
        self.predictor = create_predictor(models, torch.device("cuda" if use_gpu else "cpu"), precision, backend)
        self.predictor.prepare()  # the ONNX export once per actor, before its first batch
        self.models = [(i, m.card.name, len(m.card.classes), m.applicability is not None) for i, m in enumerate(models)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = np.flatnonzero(batch["decoded"])
        n = len(batch["index"])
        scores: dict[str, np.ndarray] = {}
        probs: dict[str, np.ndarray] = {}
        if len(ok):
            inputs = {s: torch.from_numpy(batch[_input_column(s)][ok]) for s in self.predictor.specs}
            probs = self.predictor(inputs, scores)
        applicable = self.predictor.applicable(scores)
        out = {key: batch[key] for key in _RECORD}
        for i, name, n_classes, scored in self.models:
            column = np.full((n, n_classes), np.nan, dtype=np.float32)
            column[ok] = probs.get(name, np.nan)
            out[f"probs_{i}"] = column
            if scored:
                score = np.full(n, np.nan, dtype=np.float64)
                score[ok] = scores.get(name, np.nan)
                out[f"ood_{i}"] = score
                flag = np.zeros(n, dtype=bool)
                flag[ok] = applicable.get(name, False)
                out[f"applicable_{i}"] = flag
        return out


def file_results(
    batch: dict[str, np.ndarray], entries: Sequence[FileEntry], names: Sequence[str]
) -> Iterator[tuple[int, FileResult]]:
    """The driver's side: ``(index, result)`` for each row of a batch from the actors."""
    from pneumobatch.io.results import FileResult

    for row, index in enumerate(batch["index"]):
        result = FileResult(
            entries[int(index)],
            Status(batch["status"][row]),
            str(batch["reason"][row]),
            str(batch["detail"][row]),
            pickle.loads(batch["meta"][row]),
        )
        if batch["decoded"][row]:
            result.probs = {name: batch[f"probs_{i}"][row] for i, name in enumerate(names)}
            result.ood_scores = {
                name: float(batch[f"ood_{i}"][row]) for i, name in enumerate(names) if f"ood_{i}" in batch
            }
            result.applicable = {
                name: bool(batch[f"applicable_{i}"][row]) for i, name in enumerate(names) if f"ood_{i}" in batch
            }
        yield int(index), result


class RayEngine:
    """Reads on Ray Data CPU tasks, models on an actor pool; see the module docstring."""

    def __init__(self, config: PredictConfig) -> None:
        ray = import_ray()
        if config.device not in ("auto", "cpu", "cuda"):
            raise DeviceError(
                f"--device {config.device}: with --engine ray use auto, cpu or cuda (Ray gives each actor one GPU)"
            )
        self.precision = config.precision
        self.backend = config.backend
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:  # else: a caller (a notebook, a test) has connected already
            address = config.ray_address or os.environ.get("RAY_ADDRESS")
            if not log.isEnabledFor(logging.INFO):  # how to opt out of the token the local instance gets: -v only
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            try:
                with _keeping_signal_handlers():
                    ray.init(
                        address=address,
                        include_dashboard=False,
                        log_to_driver=log.isEnabledFor(logging.DEBUG),
                        logging_level=logging.WARNING,
                    )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"--ray-address {address}" if address else "a local Ray instance"
                raise EngineUnavailable(f"cannot start {where}: {_first_line(exc)}") from exc
        resources = ray.cluster_resources()
        self.cluster = {
            "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "cpus": resources.get("CPU", 0),
            "gpus": resources.get("GPU", 0),
        }
        gpus = int(self.cluster["gpus"])
        if config.device == "cuda" and not gpus:
            self.close()
            raise DeviceError("--device cuda: the Ray cluster has no GPU")
        self.use_gpu = gpus > 0 and config.device != "cpu"
        self.actors = config.ray_actors or (gpus if self.use_gpu else 1)
        # more actors than the cluster can place would wait for resources forever
        room = gpus if self.use_gpu else int(self.cluster["cpus"]) - 1  # a CPU left for the read tasks
        if self.actors > room:
            self.close()
            what = f"{gpus} GPU(s)" if self.use_gpu else f"{int(self.cluster['cpus'])} CPU(s), one of them for reading"
            raise OptionError(f"--ray-actors {self.actors}: the Ray cluster has {what}")
        self.device = f"ray: {self.actors} {'cuda' if self.use_gpu else 'cpu'} actor{'s' if self.actors > 1 else ''}"
        self.workers = None  # Ray Data scales the read tasks to the cluster's CPUs
        self.threads = None  # the actors' business, not the driver's
        self.batch_size = config.batch_size or (64 if self.use_gpu else 16)

    def load_models(self, names: Sequence[str], weights_dir: Optional[Path]) -> list[LoadedModel]:
        """The networks (Ray's actors run them in PyTorch or the cached ONNX export)."""
        from pneumobatch.model.registry import load_model

        return [load_model(name, weights_dir) for name in names]

    def describe(self) -> dict[str, Any]:
        return {
            "name": "ray",
            "actors": self.actors,
            "gpus_per_actor": 1 if self.use_gpu else 0,
            "cluster": self.cluster,
        }

    def close(self) -> None:
        """Shut down the Ray instance this engine started (never one a caller started)."""
        if self._owns_ray:
            import_ray().shutdown()
            self._owns_ray = False

    def results(
        self, entries: Sequence[FileEntry], models: Sequence[LoadedModel], options: ReadOptions
    ) -> Iterator[FileResult]:
        """Stream one result per entry, each once, in completion order."""
        ray = import_ray()
        try:
            if not entries:
                return
            dataset = self._dataset(ray, entries, models, options, self.batch_size)
            names = [m.card.name for m in models]
            seen: set[int] = set()
            batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
            try:
                for batch in batches:
                    for index, result in file_results(batch, entries, names):
                        if index in seen:  # a batch Ray ran twice: its file has its row already
                            log.debug("result for %s came back twice; written once", result.entry.relpath)
                            continue
                        seen.add(index)
                        yield result
            finally:
                close = getattr(batches, "close", None)
                if close:
                    close()
            if len(seen) != len(entries):
                raise EngineError(
                    f"Ray returned {len(seen)} of {len(entries)} files; the rows so far are kept, run again with --resume"
                )
        except ray.exceptions.RayError as exc:
            raise EngineError(
                f"the Ray cluster stopped the run: {_first_line(exc)}; the rows so far are kept, run again with --resume"
            ) from exc
        finally:
            self._models_ref = None
            self.close()

    def _dataset(
        self,
        ray: Any,
        entries: Sequence[FileEntry],
        models: Sequence[LoadedModel],
        options: ReadOptions,
        batch_size: int,
    ) -> Any:
        import warnings

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # predict shows its own
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(log.getEffectiveLevel())  # its INFO lines with --verbose only
        logging.getLogger("ray.data._internal.progress").setLevel(
            logging.ERROR
        )  # "progress bars disabled": we did that
        rows = [
            {
                "index": i,
                "path": os.fsencode(e.path),
                "problem": e.problem[0].value if e.problem else "",
                "problem_detail": e.problem[1] if e.problem else "",
            }
            for i, e in enumerate(entries)
        ]
        specs = sorted({input_spec(m.card) for m in models})
        dataset = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch_size))
        self._models_ref = ray.put(list(models))  # alive until the run ends: actors restart from it
        with warnings.catch_warnings():
            # bounded retries have no other spelling than the "ray_remote_args" Ray 2.5x deprecates
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
            dataset = dataset.map_batches(
                read_batch,
                batch_size=batch_size,
                batch_format="numpy",
                fn_kwargs={"specs": specs, "options": options},
                num_cpus=1,
                max_retries=MAX_RETRIES,
            )
            return dataset.map_batches(
                ModelActor,
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self.actors),
                fn_constructor_kwargs={
                    "models_ref": [self._models_ref],
                    "use_gpu": self.use_gpu,
                    "precision": self.precision,
                    "backend": self.backend,
                },
                num_gpus=1 if self.use_gpu else 0,
                num_cpus=None if self.use_gpu else 1,
                max_task_retries=MAX_RETRIES,
            )


@contextlib.contextmanager
def _keeping_signal_handlers():
    """Give SIGTERM and SIGINT back to the handlers they had before ``ray.init``: it sets its
    own (SIGTERM: ``sys.exit(15)``, and its C++ core a crash reporter that prints a stack),
    which would end a run without the journal's one line, exit code 143 and --resume hint."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
