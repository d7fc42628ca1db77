"""The ONNX Runtime forward pass: each network exported once with its feature layers, cached by a hash of its weights."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pneumobatch.model.runtime import GRADCAM_OUTPUT  # the last output where Grad-CAM has a closed form

log = logging.getLogger(__name__)


class WithFeatures(torch.nn.Module):
    """A network returning (logits, the features of ``layers``[, Grad-CAM maps]) for export (see
    FeatureTap; ``gradcam``: ``(net, cam layer, closed form)``, :attr:`Architecture.gradcam`)."""

    def __init__(
        self, net: torch.nn.Module, head: torch.nn.Module, layers: Sequence[str], gradcam: Optional[tuple] = None
    ) -> None:
        super().__init__()
        self.net, self.head, self.layers = net, head, list(layers)
        self.gradcam = gradcam

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from pneumobatch.model.applicability.features import FeatureTap

        tap = FeatureTap(self.net, self.head, self.layers)
        seen: list[torch.Tensor] = []
        hook = self.gradcam[1].register_forward_hook(lambda m, i, o: seen.append(o)) if self.gradcam else None
        try:
            logits = self.net(x)
        finally:
            tap.close()
            if hook is not None:
                hook.remove()
        maps = (self.gradcam[2](self.net, seen[-1]),) if self.gradcam else ()
        return (logits, *(tap.features[name] for name in self.layers), *maps)


#: bump when the export below changes what it writes, so that older cached files are not used
_ONNX_EXPORT_VERSION = 2


def _conv_batchnorm_pairs(net: torch.nn.Module, size: int) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(convolution, batch norm) pairs where the batch norm reads exactly the convolution's output,
    found by one forward pass (any architecture: no module names are assumed)."""
    outputs: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}  # the tensors are kept, so no id is reused
    pairs: list[tuple[torch.nn.Module, torch.nn.Module]] = []

    def conv_hook(module, inputs, output):
        outputs[id(output)] = (module, output)

    def bn_hook(module, inputs, output):
        seen = outputs.get(id(inputs[0]))
        if seen is not None and seen[1] is inputs[0] and module not in (b for _, b in pairs):
            pairs.append((seen[0], module))

    hooks = [
        m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else bn_hook)
        for m in net.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))
    ]
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def batchnorm_folded(net: torch.nn.Module, size: int, observed: Sequence[str] = ()) -> torch.nn.Module:
    """A copy of ``net`` (eval mode) with every batch norm that follows a convolution folded into it in
    float64, the result rounded once to the network's dtype; the batch norm is left as an exact
    identity (mean 0, variance 1, eps 0, scale 1, shift 0), so module names and taps are unchanged.
    A convolution named in ``observed`` (a layer whose output the export returns: Grad-CAM's) keeps
    its batch norm, since folding would change that output.

    The exporter folds batch norms in float32, which rounds the folded weights a second time: ONNX
    Runtime's probabilities were 1.2e-5 from float64 PyTorch on the pneumonia test split with its
    fold, 8.6e-6 with this one (issue 27's 1e-5)."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_weights

    folded = copy.deepcopy(net).eval()
    modules = dict(folded.named_modules())
    kept = {id(modules[name]) for name in observed if name and name in modules}  # "head": the head's input
    for conv, bn in _conv_batchnorm_pairs(folded, size):
        if bn.running_mean is None or bn.running_var is None or id(conv) in kept:
            continue  # batch statistics at inference, or an output the export returns
        dtype = conv.weight.dtype
        double = [None if t is None else t.detach().double() for t in (conv.weight, conv.bias, bn.weight, bn.bias)]
        weight, bias = fuse_conv_bn_weights(
            double[0], double[1], bn.running_mean.double(), bn.running_var.double(), bn.eps, double[2], double[3]
        )
        with torch.no_grad():
            conv.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
            conv.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.eps = 0.0
            if bn.affine:
                bn.weight.fill_(1.0)
                bn.bias.zero_()
    # a convolution's output that something besides its batch norm also reads (no such layer in the
    # registered architectures) would now get the folded values: then export the network unfolded
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        agrees = all(
            torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(_as_tuple(net.eval()(x)), _as_tuple(folded(x)))
        )
    if not agrees:
        log.warning("the batch norms could not be folded without changing the network's outputs; exported as is")
        return copy.deepcopy(net).eval()
    return folded


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


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
    digest = hashlib.sha256(
        repr(
            (_ONNX_EXPORT_VERSION, torch.__version__, type(net).__module__, type(net).__qualname__, size, list(layers))
        ).encode()
    )
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return folder / "onnx" / f"{digest.hexdigest()}.onnx"


#: cached exports kept (the most recently used): one per set of weights, about 13 MB each for
#: EfficientNet-Lite0; older ones are deleted when a new export is written
ONNX_CACHE_KEEP = 8


_CACHE_NAME = re.compile(r"[0-9a-f]{64}\.onnx")
#: A temporary file of an export (``atomic_write``'s ``.HASH.onnx.tmp-XXXXXXXX``) older than this
#: was left by a writer killed mid-write (a write takes well under a second): it is deleted.
STALE_TEMP_SECONDS = 600


def _stale_temps(folder: Path) -> list[Path]:
    """Temporary export files in ``folder`` older than :data:`STALE_TEMP_SECONDS`."""
    from pneumobatch.io.atomicfile import temp_target

    stale, now = [], time.time()
    for path in folder.iterdir():
        target = temp_target(path.name)
        if target is not None and _CACHE_NAME.fullmatch(target):
            try:
                if now - path.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                    stale.append(path)
            except OSError:
                continue
    return stale


def _remove_stale_temps(folder: Path) -> None:
    for path in _stale_temps(folder):
        with contextlib.suppress(OSError):  # another run removed it first
            path.unlink()


def _prune_onnx_cache(folder: Path, keep: int = ONNX_CACHE_KEEP) -> None:
    """Delete all but the ``keep`` most recently used exports in ``folder``, and the temporary
    files writers killed mid-write left (only files named as this cache names them: whatever
    else someone put there is left alone). A killed writer never leaves a cache file half
    written (the rename is atomic), so the next run finds a whole export or none."""
    files = []
    for path in folder.iterdir():
        if _CACHE_NAME.fullmatch(path.name):
            try:
                files.append((path.stat().st_mtime, path))
            except OSError:
                continue
    for path in _stale_temps(folder) + [path for _, path in sorted(files, reverse=True)[keep:]]:
        try:
            path.unlink()
        except OSError as exc:  # another run deleted it, or a read-only folder
            log.debug("cannot prune %s: %s", path, exc)


def _export_onnx(
    net: torch.nn.Module, head: torch.nn.Module, size: int, layers: Sequence[str], gradcam: Optional[tuple] = None
) -> bytes:
    import io

    names = {id(module): name for name, module in net.named_modules()}
    observed = [*layers, *([names[id(gradcam[1])]] if gradcam is not None else [])]
    folded = batchnorm_folded(net, size, observed)
    head = folded.get_submodule(names[id(head)])
    if gradcam is not None:
        gradcam = (folded, folded.get_submodule(names[id(gradcam[1])]), gradcam[2])
    net = folded
    buffer = io.BytesIO()
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():  # the exporter's tracer and deprecation notices: not the user's business
        warnings.simplefilter("ignore")
        torch.onnx.export(
            WithFeatures(net, head, layers, gradcam).eval(),
            (example,),
            buffer,
            input_names=["x"],
            output_names=["logits", *layers, *([GRADCAM_OUTPUT] if gradcam else [])],
            dynamic_axes={"x": {0: "batch"}},
            dynamo=False,
        )
    return buffer.getvalue()


class OnnxRunner:
    """One model exported to ONNX and run by ONNX Runtime with this process's torch threads.

    The export (0.5-0.7 s per model for EfficientNet-Lite0 on this 2-core CPU) is kept in
    :func:`cache_dir`, keyed by a hash of the network's weights, so later runs load it after
    checking that it computes what the network does on one image; a cache file that cannot be
    loaded or disagrees is exported again and replaced, and a cache folder that cannot be
    written only means exporting every run. The :data:`ONNX_CACHE_KEEP` most recently used
    exports are kept.
    """

    def __init__(self, net: torch.nn.Module, head: torch.nn.Module, size: int, layers: Sequence[str]) -> None:
        from pneumobatch.io.atomicfile import atomic_write
        from pneumobatch.model.runtime import cpu_session

        self.layers = list(layers)
        threads = torch.get_num_threads()

        def session(model: str | bytes):
            return cpu_session(model, threads)

        cached = _onnx_cache_path(net, size, self.layers)
        if cached is not None and cached.is_file():
            try:
                self.session = session(str(cached))
                if self._agrees_with(net, head, size):
                    with contextlib.suppress(OSError):
                        os.utime(cached)  # recently used: kept by the pruning below
                        _remove_stale_temps(cached.parent)
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
            expected = WithFeatures(net, head, self.layers).eval()(x)
        got = self.session.run(None, {"x": x.numpy()})
        return len(got) == len(expected) and all(
            g.shape == tuple(e.shape) and np.allclose(g, e.numpy(), rtol=1e-3, atol=1e-4) for g, e in zip(got, expected)
        )

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        logits, *features = self.session.run(None, {"x": x.contiguous().numpy()})
        return torch.from_numpy(logits), dict(zip(self.layers, features))


def _closed_form_gradcam(net: torch.nn.Module, card) -> Optional[tuple]:
    """``(net, layer, gradcam)`` for the export when the architecture has Grad-CAM in closed form at the
    layer the card uses for heatmaps (its default one), else ``None``."""
    from pneumobatch.model.explain import cam_layer_name
    from pneumobatch.model.registry import ARCHITECTURES

    arch = ARCHITECTURES[card.architecture]
    if arch.gradcam is None or cam_layer_name(card) != arch.cam_layer:
        return None
    return (net, net.get_submodule(arch.cam_layer), arch.gradcam)


def write_export(loaded) -> dict:
    """Export a loaded model (with its applicability statistics' layers) to ``NAME.onnx`` beside
    its weights and record it in the card's ``onnx`` entry: the file, its SHA-256, the SHA-256 of
    the weights it was exported from and its outputs. ``predict`` then runs the model in ONNX
    Runtime without importing torch (:mod:`pneumobatch.model.runtime`); the card is rewritten."""
    from pneumobatch.io.atomicfile import atomic_write
    from pneumobatch.model.registry import ARCHITECTURES, sha256_file, write_card

    card = loaded.card
    stats = loaded.applicability
    layers = list(stats.layer_names) if stats is not None else []
    net = loaded.net.cpu().eval()
    arch = ARCHITECTURES[card.architecture]
    head = arch.head(net)
    gradcam = _closed_form_gradcam(net, card)
    exported = _export_onnx(net, head, card.input_size, layers, gradcam)
    path = loaded.weights_path.with_suffix(".onnx")
    atomic_write(path, exported)
    card.onnx = {
        "file": path.name,
        "sha256": sha256_file(path),
        "weights_sha256": card.weights_sha256,
        "outputs": ["logits", *layers, *([GRADCAM_OUTPUT] if gradcam else [])],
        **({"gradcam_layer": ARCHITECTURES[card.architecture].cam_layer} if gradcam else {}),
        "exporter": f"torch {torch.__version__}",
    }
    write_card(card, loaded.weights_path.with_suffix(".json"))
    return card.onnx


def export_for_onnx_runtime(loaded) -> bool:
    """:func:`write_export` after applicability statistics were attached (train, fit-applicability), so
    that ``predict`` runs the model without torch; an export that fails leaves the model to the
    PyTorch path (the card's ``onnx`` entry emptied) and returns False."""
    from pneumobatch.model.registry import write_card

    try:
        write_export(loaded)
        return True
    except Exception as exc:  # noqa: BLE001 - an architecture the exporter cannot handle
        log.warning("model %s: no ONNX export (%s); predict runs it in PyTorch", loaded.card.name, str(exc)[:200])
        loaded.card.onnx = {}
        write_card(loaded.card, loaded.weights_path.with_suffix(".json"))
        return False
