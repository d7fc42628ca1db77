"""Where ``predict`` decodes and runs the models: this machine, or a Ray cluster.

An engine turns the files still to do into :class:`~pneumobatch.inference.FileResult`
records, one per file, in any order; :func:`pneumobatch.predict.run_predict` writes them
(journal, resume, final CSV in discovery order, study CSV, run.json) the same way
whatever the engine, so the outputs, reason codes and exit codes do not depend on it.

* ``local`` (:class:`LocalEngine`): a DataLoader decodes in worker processes while
  the models run on one device (:func:`~pneumobatch.inference.run_inference`).
* ``ray`` (:class:`pneumobatch.ray_engine.RayEngine`, ``pip install 'pneumobatch[ray]'``):
  Ray Data tasks decode, an actor pool (one per GPU, or CPU actors) runs the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

from pneumobatch.errors import OptionError

if TYPE_CHECKING:  # torch stays out of imports that only need the names
    import torch

    from pneumobatch.discovery import FileEntry
    from pneumobatch.inference import FileResult, Predictor
    from pneumobatch.models import LoadedModel
    from pneumobatch.predict import PredictConfig
    from pneumobatch.readers import ReadOptions

ENGINES = ("local", "ray")


class Engine(Protocol):
    """What :func:`~pneumobatch.predict.run_predict` needs from an engine."""

    #: where the models run, as run.json and the summary line say it (``cpu``, ``cuda``, ...)
    device: str
    #: processes decoding on this machine (``None``: the engine scales them itself)
    workers: int | None
    #: torch threads of this process (``None``: not this process's business)
    threads: int | None
    #: files per forward pass (and per journal flush)
    batch_size: int

    def results(self, entries: Sequence[FileEntry], models: Sequence[LoadedModel], options: ReadOptions) -> Iterator[FileResult]:
        """One result per entry, each exactly once, in any order (``batch_size`` files at a time)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The engine's part of run.json."""
        ...


def create_engine(config: PredictConfig) -> Engine:
    """The engine ``config.engine`` names; fails fast (before models load) on a device or
    cluster this run cannot have."""
    if config.engine not in ENGINES:
        raise OptionError(f"engine {config.engine!r}: use one of {', '.join(ENGINES)}")
    if config.engine == "ray":
        from pneumobatch.ray_engine import RayEngine

        return RayEngine(config)
    if config.ray_address or config.ray_actors:
        raise OptionError("--ray-address and --ray-actors need --engine ray")
    return LocalEngine(config)


def create_predictor(models: Sequence[LoadedModel], device: torch.device, precision: str, backend: str = "auto") -> Predictor:
    """The models on ``device`` at ``precision`` (``auto``, ``fp32``...) run by ``backend``, with their
    applicability statistics."""
    from pneumobatch.inference import Predictor, resolve_precision

    applicability = {m.card.name: m.applicability for m in models if m.applicability is not None}
    return Predictor(models, device, resolve_precision(precision, device), applicability, backend)


class LocalEngine:
    """This machine: ``workers`` DataLoader processes decode, the models run on one device."""

    def __init__(self, config: PredictConfig) -> None:
        from pneumobatch.inference import default_split, resolve_device

        self.torch_device = resolve_device(config.device)
        self.device = str(self.torch_device)
        split = default_split(self.torch_device)  # decode workers vs torch threads, from this machine's cores
        self.workers = config.workers if config.workers is not None else split.workers
        self.threads = config.threads or split.threads
        self.batch_size = config.batch_size or split.batch_size
        self.precision = config.precision
        self.backend = config.backend

    def results(self, entries: Sequence[FileEntry], models: Sequence[LoadedModel], options: ReadOptions) -> Iterator[FileResult]:
        """The results of :func:`~pneumobatch.inference.run_inference`, with this process's torch
        threads set to ``threads`` while they are produced and given back afterwards (a library
        caller's own setting survives the run)."""
        import torch

        from pneumobatch.inference import run_inference

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            predictor = create_predictor(models, self.torch_device, self.precision, self.backend)
            yield from run_inference(entries, predictor, options, batch_size=self.batch_size, workers=self.workers)
        finally:
            torch.set_num_threads(previous)

    def describe(self) -> dict[str, Any]:
        return {"name": "local"}
