"""Prediction on ONNX Runtime with numpy only: the path ``predict`` takes on the CPU, which never imports torch.

A card whose weights ship their ONNX export (``NAME.onnx`` beside them, named by the card's
``onnx`` entry with its SHA-256 and the SHA-256 of the weights it was exported from;
:func:`pneumobatch.model.onnx.write_export` writes it) is loaded by :func:`load_onnx_model`.
:class:`OnnxPredictor` normalises batches, runs the graph (logits and the layers the
applicability statistics read) and gives the same probabilities and scores as
:class:`pneumobatch.model.inference.Predictor`; :func:`run_onnx_inference` decodes in a
process pool (:func:`pneumobatch.model.decoding.decode_in_processes`). A card without a
usable export (older cards, statistics refitted since the export) is left to the PyTorch
path, which needs torch installed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import ModelError
from pneumobatch.io.discovery import FileEntry
from pneumobatch.io.readers import ReadOptions
from pneumobatch.io.results import FileResult
from pneumobatch.model.decoding import DECODE_CHUNK, batched_results, decode_in_processes
from pneumobatch.model.preprocess import InputSpec, input_spec
from pneumobatch.model.store import load_applicability, read_card, resolve_model_paths, sha256_file

log = logging.getLogger(__name__)

#: The exports' Grad-CAM output (``pneumobatch.model.onnx.GRADCAM_OUTPUT``; this module must not import torch).
GRADCAM_OUTPUT = "gradcam"


class NoOnnxExport(ModelError):
    """The card names no ONNX export this run can use (the PyTorch path can still run the model)."""


@dataclass
class OnnxModel:
    """A model as the ONNX Runtime path runs it: its card, its verified export and statistics."""

    card: ModelCard
    onnx_path: Path
    weights_path: Path
    applicability: Optional[Any] = None  # ApplicabilityStats, when the card names a verified file


def export_problem(card: ModelCard, stats: Optional[Any]) -> Optional[str]:
    """Why the card's ONNX export cannot stand in for its weights, or ``None`` when it can."""
    info = card.onnx or {}
    if not info.get("file") or not info.get("sha256"):
        return "the card names no ONNX export"
    if str(info.get("weights_sha256", "")).lower() != str(card.weights_sha256).lower():
        return "the ONNX export was made from other weights than the card's"
    outputs = [o for o in info.get("outputs") or [] if o != GRADCAM_OUTPUT]  # the maps are optional
    wanted = ["logits", *(stats.layer_names if stats is not None else outputs[1:])]
    if outputs != wanted:
        return "the ONNX export's outputs are not the applicability statistics' layers (refitted since?)"
    return None


def load_onnx_model(name_or_path: str, weights_dir: Optional[Path] = None, *, verify: bool = True) -> OnnxModel:
    """Card, applicability statistics and ONNX export of a model, each checked against the card.

    :class:`NoOnnxExport` when the card has no usable export; :class:`ModelError` when the
    export it names is missing or not the file the card was written with."""
    card_path, weights_path = resolve_model_paths(name_or_path, weights_dir)
    card = read_card(card_path)
    stats = load_applicability(card, weights_path, verify)
    problem = export_problem(card, stats)
    if problem is not None:
        raise NoOnnxExport(f"model {card.name}: {problem}")
    path = weights_path.with_name(Path(str(card.onnx["file"])).name)  # never outside the weights folder
    if not path.is_file():
        raise ModelError(f"{path}: the ONNX export named by the card is missing")
    if verify and sha256_file(path) != str(card.onnx["sha256"]).lower():
        raise ModelError(f"{path}: SHA-256 does not match the card; the ONNX export was changed or corrupted")
    return OnnxModel(card, path, weights_path, stats)


def normalize(batch: np.ndarray, mean: Sequence[float], std: Sequence[float], channels: int = 3) -> np.ndarray:
    """uint8 (B, 1, H, W) -> float32 (B, channels, H, W) standardised, as
    :func:`pneumobatch.model.preprocess.normalize` does in torch."""
    x = batch.astype(np.float32)
    if batch.dtype == np.uint8:
        x /= np.float32(255.0)
    x = np.broadcast_to(x, (x.shape[0], channels, *x.shape[2:]))
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - mean_a) / std_a, dtype=np.float32)


def cpu_session(model: str | bytes, threads: int) -> Any:
    """An ONNX Runtime session on the CPU for a model file or its bytes: ``threads`` intra-op threads,
    one inter-op, only errors logged."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxPredictor:
    """Models' ONNX exports run by ONNX Runtime on ``threads`` threads of this process.

    Called with uint8 (B, 1, S, S) inputs by :class:`InputSpec`, it returns probabilities per
    model and fills ``scores`` with applicability scores, like the PyTorch ``Predictor``."""

    backend = "onnxruntime"

    def __init__(self, models: Sequence[OnnxModel], threads: int = 1) -> None:
        self.models = list(models)
        self.threads = max(1, int(threads))
        self.applicability = {m.card.name: m.applicability for m in self.models if m.applicability is not None}
        self._sessions: dict[str, Any] = {}

    def prepare(self) -> None:
        """Load each export into an ONNX Runtime session (the first call; later calls return at once)."""
        if self._sessions:
            return
        for model in self.models:
            try:
                session = cpu_session(str(model.onnx_path), self.threads)
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors: a damaged or foreign file
                raise ModelError(f"{model.onnx_path}: ONNX Runtime cannot load it ({str(exc)[:200]})") from exc
            names = [o.name for o in session.get_outputs()]
            if names != list(model.card.onnx["outputs"]) or [i.name for i in session.get_inputs()] != ["x"]:
                raise ModelError(f"{model.onnx_path}: its inputs and outputs are not the ones the card names")
            self._sessions[model.card.name] = session

    @property
    def specs(self) -> list[InputSpec]:
        """The inputs the models need (models with the same :class:`InputSpec` share one)."""
        return sorted({input_spec(m.card) for m in self.models})

    def applicable(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per model, whether each image is applicable (:meth:`ApplicabilityStats.flag`)."""
        return {name: self.applicability[name].flag(s) for name, s in scores.items()}

    def __call__(
        self,
        inputs: dict[InputSpec, np.ndarray],
        scores: Optional[dict[str, np.ndarray]] = None,
        cams: Optional[dict[str, np.ndarray]] = None,
    ) -> dict[str, np.ndarray]:
        """Probabilities per model; fills ``scores`` with applicability scores and ``cams`` with the
        Grad-CAM maps of exports that compute them (output ``gradcam``)."""
        self.prepare()
        out = {}
        for model in self.models:
            card = model.card
            x = normalize(inputs[input_spec(card)], card.mean, card.std)
            logits, *rest = self._sessions[card.name].run(None, {"x": x})
            names = card.onnx["outputs"][1:]
            outputs = dict(zip(names, rest))
            out[card.name] = card.output_probs(logits)
            if GRADCAM_OUTPUT in outputs and cams is not None:
                cams[card.name] = outputs.pop(GRADCAM_OUTPUT)
            stats = self.applicability.get(card.name)
            if stats is not None and scores is not None:
                scores[card.name] = stats.score({k: v for k, v in outputs.items() if k != GRADCAM_OUTPUT})
        return out


def run_onnx_inference(
    entries: Sequence[FileEntry],
    predictor: OnnxPredictor,
    options: ReadOptions,
    *,
    batch_size: int = 16,
    workers: int = 2,
    ready: Callable[[], None] = lambda: None,
) -> Iterator[FileResult]:
    """Yield a :class:`FileResult` for every entry, in order (as
    :func:`pneumobatch.model.inference.run_inference`, without torch): workers decode
    :data:`DECODE_CHUNK` files per task about two batches ahead while the sessions load.
    ``ready`` is called once the workers run and the sessions are loaded, before the first
    decoded files are waited for."""
    chunk = max(1, min(DECODE_CHUNK, batch_size))
    # the workers start (fork) before ONNX Runtime starts its threads, and decode while the sessions load
    chunks = decode_in_processes(
        entries,
        predictor.specs,
        options,
        workers=workers,
        chunk=chunk,
        in_flight=2 * batch_size,
        started=lambda: (predictor.prepare(), ready()),
    )
    try:
        yield from batched_results(chunks, entries, predictor, predictor.applicable, batch_size)
    finally:
        chunks.close()
