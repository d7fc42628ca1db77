"""Batched inference: a DataLoader decodes in worker processes while the models run.

Files are read and resized in workers (one torch thread each) and travel as uint8;
normalisation, the forward pass and softmax run in the main process on the chosen
device. Results come back in discovery order, one :class:`FileResult` per file,
identical whatever the batch size or worker count.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pneumobatch.discovery import FileEntry, sniff
from pneumobatch.errors import DeviceError, FileRejected, Reason, Status
from pneumobatch.models import LoadedModel
from pneumobatch.preprocess import normalize, resize, to_uint8
from pneumobatch.readers import ReadOptions, read_image

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class FileResult:
    """What happened to one file; ``probs`` maps model name -> class probabilities."""

    entry: FileEntry
    status: Status
    reason: str = ""
    detail: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    #: model name -> applicability score (models with applicability statistics only)
    ood_scores: dict[str, float] = field(default_factory=dict)


class StudyFiles(Dataset):
    """Reads and resizes one file per item; never raises for bad input."""

    def __init__(self, entries: Sequence[FileEntry], sizes: Sequence[int], options: ReadOptions) -> None:
        self.entries = list(entries)
        self.sizes = sorted(set(sizes))
        self.options = options

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        item: dict[str, Any] = {"index": index, "status": Status.OK, "reason": "", "detail": "", "meta": {}, "inputs": None}
        if entry.problem is not None:
            reason, detail = entry.problem
            item.update(status=reason.status, reason=reason.value, detail=detail)
            return item
        try:
            image = read_image(entry.path, sniff(entry.path), self.options)
            item["meta"] = image.meta
            item["inputs"] = {s: torch.from_numpy(to_uint8(resize(image.pixels, s)))[None] for s in self.sizes}
        except FileRejected as exc:
            item.update(status=exc.status, reason=exc.reason.value, detail=exc.detail, meta=exc.meta)
        except PermissionError:
            item.update(status=Status.ERROR, reason=Reason.UNREADABLE.value, detail="permission denied")
        except OSError as exc:
            item.update(status=Status.ERROR, reason=Reason.UNREADABLE.value, detail=(exc.strerror or type(exc).__name__)[:200])
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop a night's batch
            log.debug("unexpected error reading %s", entry.path, exc_info=True)
            item.update(status=Status.ERROR, reason=Reason.READ_FAILED.value, detail=f"{type(exc).__name__}: {exc}"[:200])
        return item


def _collate(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[int, torch.Tensor], list[int]]:
    ok = [i for i, item in enumerate(items) if item["inputs"] is not None]
    stacked = {}
    if ok:
        for size in items[ok[0]]["inputs"]:
            stacked[size] = torch.stack([items[i]["inputs"][size] for i in ok])
    for item in items:
        item["inputs"] = None
    return items, stacked, ok


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process owns the cores for the CNN


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CoreSplit:
    """How a run uses the machine: decoding processes, torch threads of the main process, batch."""

    workers: int
    threads: int
    batch_size: int


def default_split(device: torch.device, cores: Optional[int] = None) -> CoreSplit:
    """The split of cores between decoding and the network that ``predict`` uses by default.

    On the CPU, half the cores (at least one) decode in worker processes and the others
    run the network as torch threads of the main process, so that the two stages run side
    by side on their own cores instead of time-slicing the same ones: with the
    reduced-resolution decode, decoding a mixed folder costs about what the forward pass
    does. On 2 cores that is 1 worker + 1 thread; benchmarks/throughput.py compares it with
    the other splits. On CUDA the GPU runs the network, so every core but one decodes, the
    main process needs one thread to feed the GPU, and batches are larger (64) to keep it busy.
    """
    cores = cores or available_cores()
    if device.type == "cuda":
        return CoreSplit(workers=max(1, cores - 1), threads=1, batch_size=64)
    workers = max(1, cores // 2)
    return CoreSplit(workers=workers, threads=max(1, cores - workers), batch_size=16)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the first GPU when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA GPU is available")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or ``None`` for fp32.

    ``auto``: fp16/bf16 on CUDA; fp32 on the CPU, because bf16 is only faster on CPUs
    with native bf16 instructions (AVX512-BF16, AMX) and changes probabilities slightly.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Mixed-precision context for ``dtype`` (from :func:`resolve_precision`); ``None`` runs fp32."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


#: ``auto``: ONNX Runtime for fp32 on the CPU when it is installed (the ``onnx`` extra; about
#: 2x the eager forward pass of EfficientNet-Lite0 on an AVX2 CPU, benchmarks/throughput.py),
#: else PyTorch eager with channels_last.
BACKENDS = ("auto", "torch", "onnxruntime")


def resolve_backend(backend: str, device: torch.device, precision: Optional[torch.dtype]) -> str:
    """``torch`` or ``onnxruntime`` for this device and precision."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "onnxruntime" and (device.type != "cpu" or precision is not None):
        raise DeviceError("--backend onnxruntime runs fp32 on the CPU only: use --device cpu and --precision fp32 or auto")
    if backend == "torch" or device.type != "cpu" or precision is not None:
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        if backend == "onnxruntime":
            raise DeviceError("--backend onnxruntime: not installed (pip install 'pneumobatch[onnx]')") from exc
        return "torch"
    return "onnxruntime"


class _WithFeatures(torch.nn.Module):
    """A network returning (logits, the features of ``layers``) for export (see FeatureTap)."""

    def __init__(self, net: torch.nn.Module, head: torch.nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.net, self.head, self.layers = net, head, list(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from pneumobatch.applicability import FeatureTap

        tap = FeatureTap(self.net, self.head, self.layers)
        try:
            logits = self.net(x)
        finally:
            tap.close()
        return (logits, *(tap.features[name] for name in self.layers))


class _OnnxRunner:
    """One model exported to ONNX (in memory) and run by ONNX Runtime with this process's torch threads."""

    def __init__(self, net: torch.nn.Module, head: torch.nn.Module, size: int, layers: Sequence[str]) -> None:
        import io

        import onnxruntime

        self.layers = list(layers)
        buffer = io.BytesIO()
        example = torch.zeros(2, 3, size, size)
        with warnings.catch_warnings():  # the exporter's tracer and deprecation notices: not the user's business
            warnings.simplefilter("ignore")
            torch.onnx.export(_WithFeatures(net, head, self.layers).eval(), (example,), buffer, input_names=["x"],
                              output_names=["logits", *self.layers], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        logits, *features = self.session.run(None, {"x": x.contiguous().numpy()})
        return torch.from_numpy(logits), dict(zip(self.layers, features))


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
        from pneumobatch.applicability import tap
        from pneumobatch.models import ARCHITECTURES

        self.models = list(models)
        self.device = device
        self.precision = precision
        #: model name -> ApplicabilityStats; those models also yield applicability scores
        self.applicability = dict(applicability or {})
        self.backend = resolve_backend(backend, device, precision)
        self._hooks = {}
        self._onnx: dict[str, _OnnxRunner] = {}
        for model in self.models:
            head = ARCHITECTURES[model.card.architecture].head(model.net)
            model.net.to(device).eval()
            if self.backend == "onnxruntime":
                try:
                    stats = self.applicability.get(model.card.name)
                    layers = stats.layer_names if stats is not None else []  # no statistics: logits only
                    self._onnx[model.card.name] = _OnnxRunner(model.net, head, model.card.input_size, layers)
                    continue
                except Exception as exc:  # noqa: BLE001 - an architecture the exporter cannot handle: run it in torch
                    log.warning("model %s runs in PyTorch: ONNX export failed (%s)", model.card.name, str(exc)[:200])
            model.net.to(memory_format=torch.channels_last)
            if model.card.name in self.applicability:
                self._hooks[model.card.name] = tap(model, self.applicability[model.card.name].layer_names)

    @property
    def sizes(self) -> list[int]:
        return sorted({m.card.input_size for m in self.models})

    @torch.inference_mode()
    def __call__(self, inputs: dict[int, torch.Tensor], scores: Optional[dict[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
        """Probabilities per model; with ``scores``, also fills it with applicability scores."""
        out = {}
        for model in self.models:
            card = model.card
            x = normalize(inputs[card.input_size].to(self.device, non_blocking=True), card.mean, card.std)
            features = None
            if card.name in self._onnx:
                logits, features = self._onnx[card.name](x)
            else:
                with autocast(self.device, self.precision):
                    logits = model.net(x.contiguous(memory_format=torch.channels_last))
                if (hook := self._hooks.get(card.name)) is not None:
                    features = hook.numpy()
            out[card.name] = torch.softmax(logits.float() / card.temperature, dim=1).cpu().numpy()
            if features is not None and scores is not None and card.name in self.applicability:
                scores[card.name] = self.applicability[card.name].score(features)
        return out


def make_loader(
    entries: Sequence[FileEntry],
    sizes: Sequence[int],
    options: ReadOptions,
    *,
    batch_size: int = 16,
    workers: int = 2,
    pin_memory: bool = False,
) -> DataLoader:
    """The DataLoader that reads and resizes files in ``workers`` processes: batches of
    ``(items, inputs by size, indices of decoded items)``."""
    return DataLoader(
        StudyFiles(entries, sizes, options),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def run_inference(
    entries: Sequence[FileEntry],
    predictor: Predictor,
    options: ReadOptions,
    *,
    batch_size: int = 16,
    workers: int = 2,
) -> Iterator[FileResult]:
    """Yield a :class:`FileResult` for every entry, in order."""
    loader = make_loader(entries, predictor.sizes, options, batch_size=batch_size, workers=workers, pin_memory=predictor.device.type == "cuda")
    dataset = loader.dataset
    for items, inputs, ok in loader:
        scores: dict[str, np.ndarray] = {}
        probs = predictor(inputs, scores) if ok else {}
        position = {item_index: row for row, item_index in enumerate(ok)}
        for i, item in enumerate(items):
            result = FileResult(dataset.entries[item["index"]], item["status"], item["reason"], item["detail"], item["meta"])
            if i in position:
                result.probs = {name: p[position[i]] for name, p in probs.items()}
                result.ood_scores = {name: float(s[position[i]]) for name, s in scores.items()}
            yield result
