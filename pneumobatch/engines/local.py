"""The local engine: this machine's worker processes decode, the models run on one device.

On the CPU at fp32 (``--backend auto`` or ``onnxruntime``), models whose weights ship their
ONNX export run in ONNX Runtime with numpy only (:mod:`pneumobatch.model.runtime`): torch is
never imported, so a run starts in well under a second and ``pip install pneumobatch``
without the ``torch`` extra can predict. Otherwise (a GPU, ``--backend torch``, bf16/fp16, a
model without an export) the PyTorch path runs (:mod:`pneumobatch.model.inference`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from pneumobatch.core.errors import DeviceError, ModelError

if TYPE_CHECKING:  # torch stays out of imports that only need the names
    from pathlib import Path

    from pneumobatch.io.discovery import FileEntry
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.io.results import FileResult
    from pneumobatch.model.registry import LoadedModel
    from pneumobatch.predict_config import PredictConfig

log = logging.getLogger(__name__)

_NEEDS_TORCH = "pip install 'pneumobatch[torch]'"


def _import_in_background(module: str):
    """A callable that starts importing ``module`` in a daemon thread and returns at once.

    Called once the decoding workers are forked (a fork must never happen while another thread
    imports) and the ONNX Runtime sessions are loaded, so that the import of pandas (about 0.3 s,
    which the writer needs for the journal and the CSV) runs while this process waits for the
    workers' first files instead of after them: a one-file run started in 0.95-1.22 s before, 0.83-0.98 s
    after. An import the main thread then reaches waits for this one to finish (the import lock)."""

    def load() -> None:
        import importlib

        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the main thread's own import meets the same error, and reports it
            log.debug("importing %s in the background failed", module, exc_info=True)

    def start() -> None:
        import threading

        threading.Thread(target=load, name=f"import-{module}", daemon=True).start()

    return start


def _what_needs_torch(config: PredictConfig) -> str:
    """The option of a run that keeps it off the ONNX Runtime path, for the error without torch."""
    if config.backend == "torch":
        return "--backend torch"
    if config.precision not in ("auto", "fp32"):
        return f"--precision {config.precision}"
    if config.device not in ("auto", "cpu"):
        return f"--device {config.device}"
    return "predict without onnxruntime (pip install onnxruntime)"


class LocalEngine:
    """This machine: ``workers`` processes decode, the models run on one device."""

    def __init__(self, config: PredictConfig) -> None:
        from pneumobatch.model.device import (
            BACKENDS,
            PRECISIONS,
            check_choice,
            cuda_may_be_present,
            default_split,
            installed,
            torch_installed,
        )

        check_choice("--backend", config.backend, BACKENDS)
        check_choice("--precision", config.precision, PRECISIONS)
        self.precision = config.precision
        self.backend = config.backend
        self._has_torch = torch_installed()
        #: whether ONNX Runtime without torch may serve this run (decided per model when they load)
        self._numpy = (
            config.backend in ("auto", "onnxruntime")
            and config.precision in ("auto", "fp32")
            and (
                config.device == "cpu" or (config.device == "auto" and not (self._has_torch and cuda_may_be_present()))
            )
            and installed("onnxruntime")
        )
        if self._numpy:
            self.torch_device = None
            self.device = "cpu"
        else:
            if not self._has_torch:
                raise DeviceError(f"{_what_needs_torch(config)} needs PyTorch, which is not installed: {_NEEDS_TORCH}")
            from pneumobatch.model.device import resolve_device

            self.torch_device = resolve_device(config.device)
            self.device = str(self.torch_device)
        split = default_split(self.device)  # decode workers vs forward threads, from this machine's cores
        self.workers = config.workers if config.workers is not None else split.workers
        self.threads = config.threads or split.threads
        self.batch_size = config.batch_size or split.batch_size

    def load_models(self, names: Sequence[str], weights_dir: Optional[Path]) -> list[Any]:
        """The models this engine runs: ONNX exports (:class:`~pneumobatch.model.runtime.OnnxModel`)
        when every model ships a usable one and this run may use ONNX Runtime, else networks."""
        if self._numpy:
            from pneumobatch.model.runtime import NoOnnxExport, load_onnx_model

            try:
                return [load_onnx_model(name, weights_dir) for name in names]
            except NoOnnxExport as exc:
                if not self._has_torch:
                    raise ModelError(f"{exc}; running it needs PyTorch: {_NEEDS_TORCH}") from exc
                log.info("%s: the models run in PyTorch", exc)
            self._numpy = False
            from pneumobatch.model.device import resolve_device

            self.torch_device = resolve_device("cpu")
        from pneumobatch.model.registry import load_model

        return [load_model(name, weights_dir) for name in names]

    def results(
        self, entries: Sequence[FileEntry], models: Sequence[LoadedModel], options: ReadOptions
    ) -> Iterator[FileResult]:
        """The results of :func:`~pneumobatch.model.runtime.run_onnx_inference` (ONNX exports) or
        :func:`~pneumobatch.model.inference.run_inference`; on the PyTorch path this process's torch
        threads are ``threads`` while they are produced and given back afterwards (a library
        caller's own setting survives the run)."""
        from pneumobatch.model.runtime import OnnxModel

        if models and all(isinstance(m, OnnxModel) for m in models):
            from pneumobatch.model.runtime import OnnxPredictor, run_onnx_inference

            predictor = OnnxPredictor(models, self.threads)
            ready = _import_in_background("pandas") if self.workers else (lambda: None)
            yield from run_onnx_inference(
                entries, predictor, options, batch_size=self.batch_size, workers=self.workers, ready=ready
            )
            return
        import torch

        from pneumobatch.model.inference import create_predictor, run_inference

        if self.torch_device is None:
            from pneumobatch.model.device import resolve_device

            self.torch_device = resolve_device("cpu")
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            predictor = create_predictor(models, self.torch_device, self.precision, self.backend)
            yield from run_inference(entries, predictor, options, batch_size=self.batch_size, workers=self.workers)
        finally:
            torch.set_num_threads(previous)

    def describe(self) -> dict[str, Any]:
        return {"name": "local"}
