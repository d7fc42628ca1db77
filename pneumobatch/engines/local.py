"""The local engine: this machine's DataLoader workers decode, the models run on one device."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:  # torch stays out of imports that only need the names
    from pneumobatch.io.discovery import FileEntry
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.io.results import FileResult
    from pneumobatch.model.registry import LoadedModel
    from pneumobatch.predict_config import PredictConfig


class LocalEngine:
    """This machine: ``workers`` DataLoader processes decode, the models run on one device."""

    def __init__(self, config: PredictConfig) -> None:
        from pneumobatch.model.device import default_split, resolve_device

        self.torch_device = resolve_device(config.device)
        self.device = str(self.torch_device)
        split = default_split(self.torch_device)  # decode workers vs torch threads, from this machine's cores
        self.workers = config.workers if config.workers is not None else split.workers
        self.threads = config.threads or split.threads
        self.batch_size = config.batch_size or split.batch_size
        self.precision = config.precision
        self.backend = config.backend

    def results(
        self, entries: Sequence[FileEntry], models: Sequence[LoadedModel], options: ReadOptions
    ) -> Iterator[FileResult]:
        """The results of :func:`~pneumobatch.model.inference.run_inference`, with this process's torch
        threads set to ``threads`` while they are produced and given back afterwards (a library
        caller's own setting survives the run)."""
        import torch

        from pneumobatch.model.inference import create_predictor, run_inference

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            predictor = create_predictor(models, self.torch_device, self.precision, self.backend)
            yield from run_inference(entries, predictor, options, batch_size=self.batch_size, workers=self.workers)
        finally:
            torch.set_num_threads(previous)

    def describe(self) -> dict[str, Any]:
        return {"name": "local"}
