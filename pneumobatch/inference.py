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

import contextlib
import hashlib
import logging
import os
import re
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
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
            item["inputs"] = {s: to_uint8(resize(image.pixels, s))[None] for s in self.sizes}
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


def _collate(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[int, np.ndarray], list[int]]:
    ok = [i for i, item in enumerate(items) if item["inputs"] is not None]
    stacked = {}
    if ok:
        for size in items[ok[0]]["inputs"]:
            stacked[size] = np.stack([items[i]["inputs"][size] for i in ok])
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

    On the CPU every core decodes (one worker process each) and the network runs in the
    main process on a quarter of the cores (at least one thread). Decoding is the larger
    cost: on a mixed folder of 2048 px DICOMs it takes 2-3x the forward pass's CPU time
    per image (35 ms of a core in one process, 49 ms in two, vs 14 ms for EfficientNet-Lite0
    at 256 px in ONNX Runtime), and the main process waits for decoded files part of the
    time, so the network's threads are added on top of the workers rather than taken from
    them. On 2 cores that is 2 workers + 1 thread, which benchmarks/throughput.py measured
    fastest of the splits it tries (README, Throughput). On a single core a worker process
    only adds the hand-over: the main process decodes itself (measured 10% faster than one
    worker). On CUDA the GPU runs the network, so every core but one decodes, the main
    process needs one thread to feed the GPU, and batches are larger (64) to keep it busy.
    """
    cores = cores or available_cores()
    if device.type == "cuda":
        return CoreSplit(workers=max(1, cores - 1), threads=1, batch_size=64)
    return CoreSplit(workers=cores if cores > 1 else 0, threads=max(1, cores // 4), batch_size=16)


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


#: bump when the export below changes what it writes, so that older cached files are not used
_ONNX_EXPORT_VERSION = 1


def cache_dir() -> Optional[Path]:
    """Where exported ONNX models are kept between runs: ``$PNEUMOBATCH_CACHE``, else
    ``$XDG_CACHE_HOME/pneumobatch``, else ``~/.cache/pneumobatch``; ``None`` when
    ``PNEUMOBATCH_CACHE`` is ``off``. Deleting it is always safe (the next run exports again)."""
    env = os.environ.get("PNEUMOBATCH_CACHE")
    if env:
        return None if env.strip().lower() == "off" else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pneumobatch"


def _onnx_cache_path(net: torch.nn.Module, size: int, layers: Sequence[str]) -> Optional[Path]:
    """The cache file of this exact network (every parameter and buffer, hashed), input size,
    feature layers and torch version; ``None`` without a cache folder."""
    folder = cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(repr((_ONNX_EXPORT_VERSION, torch.__version__, type(net).__module__, type(net).__qualname__,
                                  size, list(layers))).encode())
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return folder / "onnx" / f"{digest.hexdigest()}.onnx"


#: cached exports kept (the most recently used): one per set of weights, about 13 MB each for
#: EfficientNet-Lite0; older ones are deleted when a new export is written
ONNX_CACHE_KEEP = 8
_CACHE_NAME = re.compile(r"[0-9a-f]{64}\.onnx")


def _prune_onnx_cache(folder: Path, keep: int = ONNX_CACHE_KEEP) -> None:
    """Delete all but the ``keep`` most recently used exports in ``folder`` (only files named
    as this cache names them: whatever else someone put there is left alone)."""
    files = []
    for path in folder.iterdir():
        if _CACHE_NAME.fullmatch(path.name):
            try:
                files.append((path.stat().st_mtime, path))
            except OSError:
                continue
    for _, path in sorted(files, reverse=True)[keep:]:
        try:
            path.unlink()
        except OSError as exc:  # another run deleted it, or a read-only folder
            log.debug("cannot prune %s: %s", path, exc)


def _export_onnx(net: torch.nn.Module, head: torch.nn.Module, size: int, layers: Sequence[str]) -> bytes:
    import io

    buffer = io.BytesIO()
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():  # the exporter's tracer and deprecation notices: not the user's business
        warnings.simplefilter("ignore")
        torch.onnx.export(_WithFeatures(net, head, layers).eval(), (example,), buffer, input_names=["x"],
                          output_names=["logits", *layers], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return buffer.getvalue()


class _OnnxRunner:
    """One model exported to ONNX and run by ONNX Runtime with this process's torch threads.

    The export (0.5-0.7 s per model for EfficientNet-Lite0 on this 2-core CPU) is kept in
    :func:`cache_dir`, keyed by a hash of the network's weights, so later runs load it after
    checking that it computes what the network does on one image; a cache file that cannot be
    loaded or disagrees is exported again and replaced, and a cache folder that cannot be
    written only means exporting every run. The :data:`ONNX_CACHE_KEEP` most recently used
    exports are kept.
    """

    def __init__(self, net: torch.nn.Module, head: torch.nn.Module, size: int, layers: Sequence[str]) -> None:
        import onnxruntime

        from pneumobatch.atomicfile import atomic_write

        self.layers = list(layers)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3

        def session(model: str | bytes):
            return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

        cached = _onnx_cache_path(net, size, self.layers)
        if cached is not None and cached.is_file():
            try:
                self.session = session(str(cached))
                if self._agrees_with(net, head, size):
                    with contextlib.suppress(OSError):
                        os.utime(cached)  # recently used: kept by the pruning below
                    return
                log.warning("exporting %s again: the cached export does not compute what the weights do", cached.name)
            except Exception as exc:  # noqa: BLE001 - a damaged cache file: export again
                log.info("exporting %s again: the cached export cannot be loaded (%s)", cached.name, str(exc)[:200])
        exported = _export_onnx(net, head, size, self.layers)
        self.session = session(exported)
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cached, exported)
                _prune_onnx_cache(cached.parent)
            except Exception as exc:  # noqa: BLE001 - a read-only home: export every run
                log.debug("cannot cache the ONNX export in %s: %s", cached.parent, exc)

    def _agrees_with(self, net: torch.nn.Module, head: torch.nn.Module, size: int) -> bool:
        """Whether the loaded session gives the network's logits and features on one random
        image (a cache file is a file anyone with access to the folder could have replaced;
        this costs one forward pass)."""
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = _WithFeatures(net, head, self.layers).eval()(x)
        got = self.session.run(None, {"x": x.numpy()})
        return len(got) == len(expected) and all(
            g.shape == tuple(e.shape) and np.allclose(g, e.numpy(), rtol=1e-3, atol=1e-4) for g, e in zip(got, expected)
        )

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
        self.models = list(models)
        self.device = device
        self.precision = precision
        #: model name -> ApplicabilityStats; those models also yield applicability scores
        self.applicability = dict(applicability or {})
        self.backend = resolve_backend(backend, device, precision)
        self._hooks = {}
        self._onnx: dict[str, _OnnxRunner] = {}
        self._prepared = False
        for model in self.models:
            model.net.to(device).eval()

    def prepare(self) -> None:
        """Export the models for ONNX Runtime (about half a second each) or set up the
        PyTorch path; the first call does it, later calls return at once. ``run_inference``
        calls it after the decoding workers have started, so that it overlaps their work."""
        from pneumobatch.applicability import tap
        from pneumobatch.models import ARCHITECTURES

        if self._prepared:
            return
        self._prepared = True
        for model in self.models:
            if self.backend == "onnxruntime":
                try:
                    stats = self.applicability.get(model.card.name)
                    layers = stats.layer_names if stats is not None else []  # no statistics: logits only
                    head = ARCHITECTURES[model.card.architecture].head(model.net)
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
        self.prepare()
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


#: Files one decoding task reads. Small, so that the workers share a folder's slow files
#: evenly (a study's files usually share one encoding, and a whole batch of JPEG-LS or
#: deflated files takes a worker several times as long as one of JPEG) and the first forward
#: pass waits for a few files, not a whole batch; the main process gathers the decoded
#: files into batches of ``batch_size`` for the network.
DECODE_CHUNK = 4


def make_loader(
    entries: Sequence[FileEntry],
    sizes: Sequence[int],
    options: ReadOptions,
    *,
    batch_size: int = 16,
    workers: int = 2,
    in_flight: Optional[int] = None,
) -> DataLoader:
    """The DataLoader that reads and resizes files in ``workers`` processes: batches of
    ``(items, uint8 numpy inputs by size, indices of decoded items)``; with workers, about
    ``in_flight`` files (default: two batches per worker) are decoded ahead of the consumer."""
    prefetch = {}
    if workers:
        prefetch["prefetch_factor"] = max(2, -(-(in_flight or 2 * batch_size * workers) // (batch_size * workers)))
    return DataLoader(
        StudyFiles(entries, sizes, options),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
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
    loader = make_loader(entries, predictor.sizes, options, batch_size=chunk, workers=workers,
                         in_flight=2 * batch_size)
    dataset = loader.dataset
    chunks = iter(loader)  # starts the workers: the export below overlaps their first files
    predictor.prepare()
    pending: deque[tuple[dict[str, Any], bool]] = deque()  # (item, decoded), in order, not yet yielded
    gathered: dict[int, list[torch.Tensor]] = {}  # size -> decoded inputs of the pending items, in order
    rows = 0

    def forward(n: int) -> Iterator[FileResult]:
        """Run the first ``n`` gathered rows; yield the pending items up to the last of them."""
        nonlocal gathered, rows
        inputs = {size: torch.cat(parts) for size, parts in gathered.items()}
        scores: dict[str, np.ndarray] = {}
        probs = predictor({size: x[:n] for size, x in inputs.items()}, scores) if n else {}
        gathered = {size: [x[n:]] for size, x in inputs.items()} if rows > n else {}
        rows -= n
        row = 0
        while pending and (not pending[0][1] or row < n):
            item, decoded = pending.popleft()
            result = FileResult(dataset.entries[item["index"]], item["status"], item["reason"], item["detail"], item["meta"])
            if decoded:
                result.probs = {name: p[row] for name, p in probs.items()}
                result.ood_scores = {name: float(s[row]) for name, s in scores.items()}
                row += 1
            yield result

    for items, inputs, ok in chunks:
        decoded = set(ok)
        pending.extend((item, i in decoded) for i, item in enumerate(items))
        for size, x in inputs.items():  # on CUDA each chunk is pinned and copied as it arrives
            t = torch.from_numpy(x)
            gathered.setdefault(size, []).append(t.pin_memory().to(predictor.device, non_blocking=True) if cuda else t)
        rows += len(ok)
        while rows >= batch_size:
            yield from forward(batch_size)
    yield from forward(rows)
