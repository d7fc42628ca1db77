"""Throughput of predict on this machine: decode, forward pass, core splits, end to end.

Generates a mixed folder of chest-X-ray-sized DICOMs (every encoding pneumobatch.testing.synthetic
writes) and prints, all from one run so that ratios hold on a noisy shared machine:

1. decode + resize images/s per transfer syntax, one process: full decode vs the
   reduced-resolution decode ``predict`` uses (``ReadOptions(min_side=input size)``);
2. forward-only images/s per CPU backend option (eager contiguous, eager channels_last,
   ``torch.jit.trace`` + ``freeze``, dynamic int8; ``--compile`` adds ``torch.compile``),
   rounds interleaved so that load changes hit every option alike;
3. end-to-end ``run_predict`` images/s on a larger folder (``--e2e-per-encoding``) for
   several (workers, torch threads) splits, the default split first, and each one's ratio to
   the serial bound 1 / (1/decode + 1/forward) (decode: one process, reduced; forward: the
   default threads) and to that bound times the cores (every core busy, no overhead);
4. with ``--baseline DIR`` (a checkout of an older pneumobatch, e.g. ``git archive``), on
   folders of two sizes (``--baseline-per-encoding``), ``pneumobatch predict`` as a fresh
   process with that code and with this one, alternately, both at their defaults, the
   speed-up per folder and the marginal speed-up (start-up excluded: a long night).

    python benchmarks/throughput.py [--size 2048] [--per-encoding 4] [--baseline DIR [--baseline-only]]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pneumobatch.io.discovery import walk
from pneumobatch.io.readers import ReadOptions
from pneumobatch.model.device import available_cores, default_split, resolve_device, resolve_precision
from pneumobatch.model.inference import Predictor, make_loader
from pneumobatch.model.preprocess import InputSpec
from pneumobatch.model.registry import load_model
from pneumobatch.predict import run_predict
from pneumobatch.predict_config import PredictConfig
from pneumobatch.testing.synthetic import ENCODINGS, write_cxr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from decode import chest_like  # noqa: E402 - the benchmarks' shared test image


def make_studies(folder: Path, size: int, per_encoding: int, encodings: tuple[str, ...]) -> None:
    for encoding in encodings:
        for i in range(per_encoding):
            pixels = np.roll(chest_like(size, seed=i), i * size // 29, axis=1)
            if encoding == "jpeg-baseline":
                write_cxr(folder / f"{encoding}_{i}.dcm", (pixels >> 4).astype(np.uint8), encoding)
            else:
                write_cxr(folder / f"{encoding}_{i}.dcm", pixels, encoding, bits_stored=12, window=(2048.0, 3600.0))


def decode_rate(entries, size, reduced: bool, workers: int = 0) -> float:
    options = ReadOptions(min_side=size if reduced else None)
    loader = make_loader(entries, [InputSpec(size)], options, batch_size=8, workers=workers)
    t0 = time.perf_counter()
    n = sum(len(ok) for _, _, ok in loader)
    return n / (time.perf_counter() - t0)


def forward_backends(net: torch.nn.Module, size: int, batch: int, compile_too: bool) -> dict:
    """Name -> (callable, input) for each CPU backend option of the same weights."""
    x = torch.randn(batch, 3, size, size)
    xc = x.contiguous(memory_format=torch.channels_last)
    contiguous = copy.deepcopy(net).eval().to(memory_format=torch.contiguous_format)
    channels_last = copy.deepcopy(net).eval().to(memory_format=torch.channels_last)
    options = {"eager fp32": (contiguous, x), "eager fp32 channels_last": (channels_last, xc)}
    with torch.inference_mode():
        frozen = torch.jit.freeze(torch.jit.trace(channels_last, xc))
    options["jit trace+freeze channels_last"] = (frozen, xc)
    # dynamic int8 quantises nn.Linear only: in EfficientNet-Lite0 just the classifier
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(channels_last), {torch.nn.Linear}, dtype=torch.qint8)
    options["dynamic int8 (Linear) channels_last"] = (dynamic, xc)
    session = onnx_session(contiguous, x)
    if session is not None:
        options["onnxruntime fp32"] = (lambda t: torch.from_numpy(session.run(None, {"x": t.numpy()})[0]), x)
    if compile_too:
        options["torch.compile channels_last"] = (torch.compile(channels_last), xc)
    return options


def onnx_session(net: torch.nn.Module, x: torch.Tensor):
    """An ONNX Runtime session running ``net`` with this process's torch thread count; None if not installed."""
    try:
        import onnxruntime
    except ImportError:
        print("  (onnxruntime not installed: pip install onnxruntime onnx)")
        return None
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def time_forward(options: dict, batch: int, rounds: int) -> dict[str, float]:
    """images/s per option: median of ``rounds`` interleaved rounds of 2 batches each."""
    reference = None
    times: dict[str, list[float]] = {name: [] for name in options}
    with torch.inference_mode():
        for name, (fn, x) in options.items():
            t0 = time.perf_counter()
            out = fn(x)  # warm-up (and compilation)
            print(f"  {name}: first call {time.perf_counter() - t0:.1f} s", end="")
            reference = out if reference is None else reference
            print(f", max |logit - eager| {float((out - reference).abs().max()):.2e}")
        for _ in range(rounds):
            for name, (fn, x) in options.items():
                t0 = time.perf_counter()
                fn(x)
                fn(x)
                times[name].append(time.perf_counter() - t0)
    return {name: 2 * batch / float(np.median(t)) for name, t in times.items()}


def end_to_end(folder: Path, model: str, workers: int, threads: int, out: Path) -> float:
    n = sum(1 for _ in walk([folder]))
    t0 = time.perf_counter()
    run = run_predict(
        PredictConfig(inputs=[folder], output=out, models=[model], workers=workers, threads=threads, overwrite=True)
    )
    if run.exit_code != 0:
        raise SystemExit(f"predict failed: {run.counts}")
    return n / (time.perf_counter() - t0)


def cli_seconds(code: Path, folder: Path, model: str, out: Path) -> float:
    """Seconds of ``python -m pneumobatch predict`` with the code under ``code`` (start-up included)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pneumobatch",
            "predict",
            str(folder),
            "-m",
            model,
            "-o",
            str(out),
            "--overwrite",
            "--quiet",
        ],
        env=env,
        check=True,
        cwd=code,
    )
    return time.perf_counter() - t0


def compare_with_baseline(
    baseline: Path, size: int, per_encoding: list[int], encodings: tuple[str, ...], model: str
) -> None:
    """``pneumobatch predict`` with the baseline's code and this tree's, alternately, twice each,
    on folders of each size; the marginal rate (time of the larger folder minus the smaller's)
    is what a night of thousands of files sees, start-up excluded."""
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for per in sorted(set(per_encoding)):
            folder = Path(tmp) / f"studies{per}"
            folder.mkdir()
            make_studies(folder, size, per, encodings)
            folders.append((sum(1 for _ in walk([folder])), folder))
        print(
            f"\n4. pneumobatch predict as a fresh process, defaults, start-up included: {size}x{size} DICOMs, "
            f"folders of {', '.join(str(n) for n, _ in folders)}"
        )
        for round_ in (1, 2):
            seconds: dict[str, list[float]] = {"baseline": [], "this tree": []}
            for n, folder in folders:
                for name, code in (("baseline", baseline.resolve()), ("this tree", ROOT)):
                    seconds[name].append(cli_seconds(code, folder, model, Path(tmp) / f"{name[:4]}.csv"))
                old, new = n / seconds["baseline"][-1], n / seconds["this tree"][-1]
                print(
                    f"  round {round_}, {n:4d} files: baseline {old:6.2f} images/s; this tree {new:6.2f} images/s; {new / old:.2f}x"
                )
            if len(folders) > 1:
                extra = folders[-1][0] - folders[0][0]
                old, new = (extra / (t[-1] - t[0]) for t in (seconds["baseline"], seconds["this tree"]))
                print(
                    f"  round {round_}, marginal ({folders[-1][0]} - {folders[0][0]} files, start-up excluded): "
                    f"baseline {old:6.2f} images/s; this tree {new:6.2f} images/s; {new / old:.2f}x"
                )


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--per-encoding", type=int, default=4)
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--model", default="pneumonia")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the forward timings")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    parser.add_argument("--baseline", type=Path, help="a checkout of older pneumobatch code to compare with")
    parser.add_argument(
        "--baseline-per-encoding",
        default="8,32",
        help="files per encoding of the folders of the baseline comparison (comma-separated)",
    )
    parser.add_argument("--e2e-per-encoding", type=int, default=16, help="files per encoding of the end-to-end splits")
    parser.add_argument("--e2e-rounds", type=int, default=3, help="interleaved rounds of the end-to-end splits")
    parser.add_argument("--baseline-only", action="store_true", help="only the comparison with --baseline")
    args = parser.parse_args()
    encodings = tuple(args.encodings.split(","))
    if args.baseline_only:
        if not args.baseline:
            raise SystemExit("--baseline-only needs --baseline DIR")
        compare_with_baseline(args.baseline, args.size, _ints(args.baseline_per_encoding), encodings, args.model)
        return

    device = resolve_device("auto")
    split = default_split(device)
    model = load_model(args.model)
    size = model.card.input_size
    print(
        f"{available_cores()} cores, CUDA: {torch.cuda.is_available()}; default split: "
        f"{split.workers} workers, {split.threads} torch threads, batch {split.batch_size}; model {model.card.name} "
        f"({model.card.architecture} @ {size}px) on {device}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "studies"
        folder.mkdir()
        make_studies(folder, args.size, args.per_encoding, encodings)
        entries = [e for _, e in walk([folder])]
        print(f"{len(entries)} DICOMs of {args.size}x{args.size} ({', '.join(encodings)})")

        print("\n1. decode + resize, one process, images/s")
        print(f"  {'encoding':<14} {'full':>8} {'reduced':>8} {'ratio':>7}")
        for encoding in encodings:
            subset = [e for e in entries if e.path.name.startswith(encoding + "_")]
            full, fast = decode_rate(subset, size, False), decode_rate(subset, size, True)
            print(f"  {encoding:<14} {full:8.1f} {fast:8.1f} {fast / full:6.1f}x")
        full_all, decode = decode_rate(entries, size, False), decode_rate(entries, size, True)
        print(f"  {'all (mixed)':<14} {full_all:8.1f} {decode:8.1f} {decode / full_all:6.1f}x")
        cores = available_cores()
        parallel = decode_rate(entries, size, True, workers=cores)
        print(
            f"  all (mixed), reduced, {cores} worker processes: {parallel:.1f} images/s ({parallel / decode:.2f}x one process)"
        )

        print(f"\n2. forward only, batch {split.batch_size}, {split.threads} torch threads, images/s")
        torch.set_num_threads(split.threads)
        precision = resolve_precision("auto", device)
        predictor = Predictor([model], device, precision)
        rates = time_forward(
            forward_backends(model.net, size, split.batch_size, args.compile), split.batch_size, args.rounds
        )
        for name, rate in rates.items():
            print(f"  {name:<36} {rate:7.1f}")
        forward = rates["onnxruntime fp32" if predictor.backend == "onnxruntime" else "eager fp32 channels_last"]
        print(f"  predict runs: {predictor.backend}")

        bound = 1 / (1 / decode + 1 / forward)
        folder = Path(tmp) / "e2e"
        folder.mkdir()
        make_studies(folder, args.size, args.e2e_per_encoding, encodings)
        print(
            f"\n3. end-to-end run_predict on {args.e2e_per_encoding * len(encodings)} DICOMs (model load, export, workers "
            f"and CSV included); serial bound {bound:.1f} images/s, all {cores} cores busy {cores * bound:.1f}"
        )
        splits = [(split.workers, split.threads)] + [
            (w, t)
            for w in sorted({0, 1, 2, cores})
            for t in sorted({1, 2, cores})
            if (w, t) != (split.workers, split.threads)
        ]
        rates: dict[tuple[int, int], list[float]] = {split_: [] for split_ in splits}
        end_to_end(folder, args.model, split.workers, split.threads, Path(tmp) / "p.csv")  # warm-up: caches, export
        for _ in range(args.e2e_rounds):  # interleaved, so that a change of load hits every split alike
            for workers, threads in splits:
                rates[(workers, threads)].append(end_to_end(folder, args.model, workers, threads, Path(tmp) / "p.csv"))
        for (workers, threads), values in rates.items():
            rate = float(np.median(values))
            tag = "  (default)" if (workers, threads) == (split.workers, split.threads) else ""
            print(
                f"  workers {workers}, threads {threads}: median {rate:6.1f} images/s ({', '.join(f'{v:.1f}' for v in values)}), "
                f"{rate / bound:5.2f} of the serial bound, {rate / bound / cores:5.2f} of all cores busy{tag}"
            )
    if args.baseline:
        compare_with_baseline(args.baseline, args.size, _ints(args.baseline_per_encoding), encodings, args.model)


if __name__ == "__main__":
    main_()
