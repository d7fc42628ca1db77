"""Where ``predict`` decodes and runs the models: this machine, or a Ray cluster.

An engine turns the files still to do into :class:`~pneumobatch.io.results.FileResult`
records, one per file, in any order; :func:`pneumobatch.predict.run_predict` writes them
(journal, resume, final CSV in discovery order, study CSV, run.json) the same way
whatever the engine, so the outputs, reason codes and exit codes do not depend on it.

* ``local`` (:class:`LocalEngine`): a DataLoader decodes in worker processes while
  the models run on one device (:func:`~pneumobatch.model.inference.run_inference`).
* ``ray`` (:class:`pneumobatch.engines.ray.RayEngine`, ``pip install 'pneumobatch[ray]'``):
  Ray Data tasks decode, an actor pool (one per GPU, or CPU actors) runs the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol, Sequence

from pneumobatch.core.errors import OptionError

if TYPE_CHECKING:  # torch stays out of imports that only need the names
    from pathlib import Path

    from pneumobatch.io.discovery import FileEntry
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.io.results import FileResult
    from pneumobatch.model.registry import LoadedModel
    from pneumobatch.predict_config import PredictConfig

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

    def results(
        self, entries: Sequence[FileEntry], models: Sequence[LoadedModel], options: ReadOptions
    ) -> Iterator[FileResult]:
        """One result per entry, each exactly once, in any order (``batch_size`` files at a time)."""
        ...

    def load_models(self, names: Sequence[str], weights_dir: Optional[Path]) -> list[Any]:
        """The named models, loaded the way this engine runs them (networks, or ONNX exports)."""
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
        from pneumobatch.engines.ray import RayEngine

        return RayEngine(config)
    if config.ray_address or config.ray_actors:
        raise OptionError("--ray-address and --ray-actors need --engine ray")
    from pneumobatch.engines.local import LocalEngine

    return LocalEngine(config)
