"""Batched inference: a DataLoader decodes in worker processes while the models run.

Files are read and resized in workers (one torch thread each) and travel as uint8 numpy
arrays pickled through the worker's pipe, not as shared-memory tensors: those a worker
hands over as file descriptors on a side connection, and a signal that ends the main
process mid-handshake made the worker print a traceback. Normalisation, the forward pass
and softmax run in the main process on the chosen device (on CUDA each decoded chunk is
pinned and copied without blocking). Results come back in discovery order, one
:class:`FileResult` per file, identical whatever the batch size or worker count.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pneumobatch.io.discovery import FileEntry
from pneumobatch.io.readers import ReadOptions
from pneumobatch.io.results import FileResult
from pneumobatch.model.decoding import (  # noqa: F401 - end_with_parent and DECODE_CHUNK: re-exported
    DECODE_CHUNK,
    batched_results,
    collate,
    end_with_parent,
    read_entry,
    worker_parent,
)
from pneumobatch.model.device import autocast, resolve_backend, resolve_precision
from pneumobatch.model.onnx import OnnxRunner
from pneumobatch.model.preprocess import InputSpec, input_spec, normalize
from pneumobatch.model.registry import LoadedModel

log = logging.getLogger(__name__)


class StudyFiles(Dataset):
    """Reads and resizes one file per item (:func:`~pneumobatch.model.decoding.read_entry`); never raises for bad input."""

    def __init__(self, entries: Sequence[FileEntry], specs: Sequence[InputSpec], options: ReadOptions) -> None:
        self.entries = list(entries)
        self.specs = sorted(set(specs))
        self.options = options

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return read_entry(self.entries[index], self.specs, self.options, index)


def _worker_init(parent: int, death_signal: bool, _: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process owns the cores for the CNN
    end_with_parent(parent, death_signal)


class Predictor:
    """One or more loaded models on a device, ready for batches of (B, 1, S, S) uint8.

    The forward pass runs in PyTorch (channels_last, autocast for ``precision``) or, for
    fp32 on the CPU with ``backend`` auto and onnxruntime installed, in ONNX Runtime; both
    give the same probabilities to ~1e-6 and the same features (every layer a model's
    applicability statistics use) for applicability scores.
    """

    def __init__(
        self,
        models: Sequence[LoadedModel],
        device: torch.device,
        precision: Optional[torch.dtype],
        applicability: Optional[dict[str, Any]] = None,
        backend: str = "auto",
    ) -> None:
        self.models = list(models)
        self.device = device
        self.precision = precision
        #: model name -> ApplicabilityStats; those models also yield applicability scores
        self.applicability = dict(applicability or {})
        self.backend = resolve_backend(backend, device, precision)
        self._hooks = {}
        self._onnx: dict[str, OnnxRunner] = {}
        self._prepared = False
        for model in self.models:
            model.net.to(device).eval()

    def prepare(self) -> None:
        """Export the models for ONNX Runtime (about half a second each) or set up the
        PyTorch path; the first call does it, later calls return at once. ``run_inference``
        calls it after the decoding workers have started, so that it overlaps their work."""
        from pneumobatch.model.applicability.features import tap
        from pneumobatch.model.registry import ARCHITECTURES

        if self._prepared:
            return
        self._prepared = True
        for model in self.models:
            if self.backend == "onnxruntime":
                try:
                    stats = self.applicability.get(model.card.name)
                    layers = stats.layer_names if stats is not None else []  # no statistics: logits only
                    head = ARCHITECTURES[model.card.architecture].head(model.net)
                    self._onnx[model.card.name] = OnnxRunner(model.net, head, model.card.input_size, layers)
                    continue
                except Exception as exc:  # noqa: BLE001 - an architecture the exporter cannot handle: run it in torch
                    log.warning("model %s runs in PyTorch: ONNX export failed (%s)", model.card.name, str(exc)[:200])
            model.net.to(memory_format=torch.channels_last)
            if model.card.name in self.applicability:
                self._hooks[model.card.name] = tap(model, self.applicability[model.card.name].layer_names)

    def applicable(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per model, whether each image is applicable: its statistics' own rule
        (:meth:`ApplicabilityStats.flag`) on the scores ``__call__`` filled in."""
        return {name: self.applicability[name].flag(s) for name, s in scores.items()}

    @property
    def specs(self) -> list[InputSpec]:
        """The inputs the models need (models with the same :class:`InputSpec` share one)."""
        return sorted({input_spec(m.card) for m in self.models})

    @torch.inference_mode()
    def __call__(
        self,
        inputs: dict[InputSpec, torch.Tensor],
        scores: Optional[dict[str, np.ndarray]] = None,
        cams: Optional[dict[str, np.ndarray]] = None,
    ) -> dict[str, np.ndarray]:
        """Probabilities per model; with ``scores``, also fills it with applicability scores (``cams``:
        not computed on this path; ``predict --heatmaps`` makes them after the rows, :mod:`.explain`)."""
        self.prepare()
        out = {}
        for model in self.models:
            card = model.card
            x = normalize(inputs[input_spec(card)].to(self.device, non_blocking=True), card.mean, card.std)
            features = None
            if card.name in self._onnx:
                logits, features = self._onnx[card.name](x)
            else:
                with autocast(self.device, self.precision):
                    logits = model.net(x.contiguous(memory_format=torch.channels_last))
                if (hook := self._hooks.get(card.name)) is not None:
                    features = hook.numpy()
            out[card.name] = card.output_probs(logits.float().cpu().numpy())
            if features is not None and scores is not None and card.name in self.applicability:
                scores[card.name] = self.applicability[card.name].score(features)
        return out


def make_loader(
    entries: Sequence[FileEntry],
    specs: Sequence[InputSpec],
    options: ReadOptions,
    *,
    batch_size: int = 16,
    workers: int = 2,
    in_flight: Optional[int] = None,
) -> DataLoader:
    """The DataLoader that reads and resizes files in ``workers`` processes: batches of
    ``(items, uint8 numpy inputs by InputSpec, indices of decoded items)``; with workers, about
    ``in_flight`` files (default: two batches per worker) are decoded ahead of the consumer."""
    prefetch = {}
    if workers:
        prefetch["prefetch_factor"] = max(2, -(-(in_flight or 2 * batch_size * workers) // (batch_size * workers)))
    return DataLoader(
        StudyFiles(entries, specs, options),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        # workers end with the process that started them (PR_SET_PDEATHSIG): that one's PID,
        # the forkserver's under the forkserver start method
        worker_init_fn=functools.partial(
            _worker_init, worker_parent(), threading.current_thread() is threading.main_thread()
        )
        if workers
        else None,
        persistent_workers=False,
        **prefetch,
    )


def run_inference(
    entries: Sequence[FileEntry],
    predictor: Predictor,
    options: ReadOptions,
    *,
    batch_size: int = 16,
    workers: int = 2,
) -> Iterator[FileResult]:
    """Yield a :class:`FileResult` for every entry, in order.

    Workers decode :data:`DECODE_CHUNK` files per task, about two forward batches ahead;
    the models see batches of exactly ``batch_size`` decoded files (the last one fewer).
    """
    cuda = predictor.device.type == "cuda"
    chunk = max(1, min(DECODE_CHUNK, batch_size))
    loader = make_loader(entries, predictor.specs, options, batch_size=chunk, workers=workers, in_flight=2 * batch_size)
    chunks = iter(loader)  # starts the workers: the export below overlaps their first files
    predictor.prepare()

    def to_array(x: np.ndarray) -> torch.Tensor:  # on CUDA each chunk is pinned and copied as it arrives
        t = torch.from_numpy(x)
        return t.pin_memory().to(predictor.device, non_blocking=True) if cuda else t

    yield from batched_results(
        chunks, loader.dataset.entries, predictor, predictor.applicable, batch_size, to_array=to_array, concat=torch.cat
    )


def create_predictor(
    models: Sequence[LoadedModel], device: torch.device, precision: str, backend: str = "auto"
) -> Predictor:
    """The models on ``device`` at ``precision`` (``auto``, ``fp32``...) run by ``backend``, with their
    applicability statistics."""
    applicability = {m.card.name: m.applicability for m in models if m.applicability is not None}
    return Predictor(models, device, resolve_precision(precision, device), applicability, backend)
