"""Device, precision and backend, and how a run splits this machine's cores between decoding and the network."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pneumobatch.core.errors import DeviceError, OptionError

if TYPE_CHECKING:  # torch is imported where a device or dtype is made: the ONNX Runtime path never needs it
    import torch

log = logging.getLogger(__name__)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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


def default_split(device: Any, cores: Optional[int] = None) -> CoreSplit:
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
    if getattr(device, "type", device) == "cuda":
        return CoreSplit(workers=max(1, cores - 1), threads=1, batch_size=64)
    return CoreSplit(workers=cores if cores > 1 else 0, threads=max(1, cores // 4), batch_size=16)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the first GPU when there is one."""
    import torch

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
    Anything not in :data:`PRECISIONS` is an :class:`~pneumobatch.core.errors.OptionError`.
    """
    check_choice("--precision", precision, PRECISIONS)
    if precision == "fp32":
        return None
    import torch

    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 is faster than fp32;
    elsewhere it is emulated and several times slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_training_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for training: ``auto`` is bf16 on CUDA (fp16 without bf16) and on
    CPUs with native bf16 (:func:`cpu_has_native_bf16`), fp32 otherwise; the rest as
    :func:`resolve_precision`."""
    if precision == "auto" and device.type == "cpu":
        import torch

        return torch.bfloat16 if cpu_has_native_bf16() else None
    return resolve_precision(precision, device)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Mixed-precision context for ``dtype`` (from :func:`resolve_precision`); ``None`` runs fp32."""
    import torch

    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


#: ``auto``: ONNX Runtime for fp32 on the CPU when it is installed (the ``onnx`` extra; about
#: 2x the eager forward pass of EfficientNet-Lite0 on an AVX2 CPU, benchmarks/throughput.py),
#: else PyTorch eager with channels_last.
BACKENDS = ("auto", "torch", "onnxruntime")


def resolve_backend(backend: str, device: torch.device, precision: Optional[torch.dtype]) -> str:
    """``torch`` or ``onnxruntime`` for this device and precision; anything not in :data:`BACKENDS`
    is an :class:`~pneumobatch.core.errors.OptionError`."""
    check_choice("--backend", backend, BACKENDS)
    if backend == "onnxruntime" and (device.type != "cpu" or precision is not None):
        raise DeviceError(
            "--backend onnxruntime runs fp32 on the CPU only: use --device cpu and --precision fp32 or auto"
        )
    if backend == "torch" or device.type != "cpu" or precision is not None:
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        if backend == "onnxruntime":
            raise DeviceError("--backend onnxruntime: not installed (pip install 'pneumobatch[onnx]')") from exc
        return "torch"
    return "onnxruntime"


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """An :class:`~pneumobatch.core.errors.OptionError` naming ``option`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        noun = option.lstrip("-")
        raise OptionError(f"{option} {value}: not a {noun} (use {', '.join(choices)})")


def installed(package: str) -> bool:
    """Whether ``package`` can be imported here (found, not imported: torch takes over a second)."""
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a half-removed install
        return False


def torch_installed() -> bool:
    """Whether PyTorch can be imported here."""
    return installed("torch")


def cuda_may_be_present() -> bool:
    """Whether this machine may have a CUDA GPU for this process, told without importing torch:
    an NVIDIA driver's device files, and ``CUDA_VISIBLE_DEVICES`` not hiding every device.
    ``True`` only means asking torch (``device auto`` then imports it); ``False`` is certain."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    return Path("/proc/driver/nvidia/gpus").is_dir() or any(Path("/dev").glob("nvidia[0-9]*"))
