"""Throughput of ``pneumobatch predict`` against this machine's limit, all figures from one run.

Two folders, generated: a night of full-size DICOM radiographs (``--night-per-format``
files each of raw 16-bit, JPEG 2000, JPEG-LS, RLE and JPEG baseline at 2048x2500: 200 by
default) and a folder of 1024-px exports (``--folder-images``, half 8-bit PNG, half JPEG
q90). It prints:

1. decode + resize images/s per format in one process (what ``predict``'s workers do:
   reduced-resolution decode where the format allows, equalisation, resize);
2. forward images/s per backend at ``predict``'s batch size: the shipped ONNX export in ONNX
   Runtime (what ``predict`` runs on the CPU) with the default thread count and with one
   thread per core, and PyTorch eager (``--backend torch``) when torch is installed;
3. per folder, the bound: every core busy decoding and running the network with no
   overhead, ``cores / (mean decode core-seconds per image + forward core-seconds per
   image)``, from the rates of 1 and 2;
4. ``pneumobatch predict`` on each folder as a fresh process (start-up included) and its
   ratio to the bound; with ``--baseline DIR`` (a checkout of older pneumobatch, e.g.
   ``git archive 5fa9cf3 | tar -x -C /tmp/v010``: version 0.1.0 before the throughput work)
   the same command with that code, alternately, and the speed-up;
5. start-up: one file, a fresh process, seconds and peak RSS (this tree's default, and
   ``--backend torch``);
6. with torchxrayvision installed (``pip install torchxrayvision``; not a dependency), its
   documented per-image loop on the export folder (skimage read, ``xrv.datasets.normalize``,
   centre crop, resize to 224, one forward per image of its DenseNet-121, ``weights=None``:
   the same computation as its shipped weights, nothing downloaded) and the ratio.

    python benchmarks/throughput.py [--night-per-format 40] [--folder-images 200] [--rounds 2] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pneumobatch.io.discovery import walk
from pneumobatch.io.readers import ReadOptions
from pneumobatch.model.decoding import read_entry
from pneumobatch.model.device import available_cores, default_split, torch_installed
from pneumobatch.model.preprocess import input_spec
from pneumobatch.model.runtime import OnnxPredictor, load_onnx_model
from pneumobatch.testing.synthetic import write_cxr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from decode import chest_like  # noqa: E402 - the benchmarks' shared test image

#: The night's formats, as the throughput issue measured them (synthetic.ENCODINGS names).
NIGHT_FORMATS = ("explicit", "j2k", "jpegls", "rle", "jpeg-baseline")
NIGHT_SHAPE = (2500, 2048)  # rows x columns


def radiograph(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A 12-bit chest-like image of ``shape`` (rows, columns), shifted per seed so files differ."""
    side = max(shape)
    image = np.roll(chest_like(side, seed=seed), seed * side // 29, axis=1)
    return np.ascontiguousarray(image[: shape[0], : shape[1]])


def make_night(folder: Path, per_format: int) -> None:
    for encoding in NIGHT_FORMATS:
        for i in range(per_format):
            pixels = radiograph(NIGHT_SHAPE, i)
            path = folder / f"{encoding}_{i:03d}.dcm"
            if encoding == "jpeg-baseline":
                write_cxr(path, (pixels >> 4).astype(np.uint8), encoding)
            else:
                write_cxr(path, pixels, encoding, bits_stored=12, window=(2048.0, 3600.0))


def make_exports(folder: Path, n: int) -> None:
    """1024-px 8-bit exports, half PNG and half JPEG q90 (a teaching file or a research export)."""
    for i in range(n):
        pixels = (radiograph((1024, 1024), i) >> 4).astype(np.uint8)
        if i % 2:
            Image.fromarray(pixels).save(folder / f"export_{i:03d}.jpg", quality=90)
        else:
            Image.fromarray(pixels).save(folder / f"export_{i:03d}.png")


def kind_of(path: Path) -> str:
    return path.name.rsplit("_", 1)[0] if path.suffix == ".dcm" else path.suffix.lstrip(".")


def decode_rates(folder: Path, spec, options: ReadOptions) -> dict[str, float]:
    """images/s per format, one process, as predict's workers read and prepare them."""
    entries = [e for _, e in walk([folder])]
    seconds: dict[str, list[float]] = {}
    for entry in entries:
        t0 = time.perf_counter()
        item = read_entry(entry, [spec], options)
        if item["inputs"] is None:
            raise SystemExit(f"{entry.relpath}: {item['reason']} {item['detail']}")
        seconds.setdefault(kind_of(entry.path), []).append(time.perf_counter() - t0)
    return {kind: len(s) / sum(s) for kind, s in seconds.items()}


def forward_rates(name: str, batch: int, threads: int, cores: int, rounds: int = 5) -> dict[str, float]:
    """images/s of each backend's forward pass (normalisation and softmax included), median of rounds."""
    model = load_onnx_model(name)
    spec = input_spec(model.card)
    images = np.random.default_rng(0).integers(0, 256, (batch, 1, spec.size, spec.size), dtype=np.uint8)
    options = {
        f"onnxruntime, {t} thread{'s' if t > 1 else ''}": OnnxPredictor([model], t) for t in sorted({threads, cores})
    }
    runs = {label: (lambda p=p: p({spec: images}, {})) for label, p in options.items()}
    if torch_installed():
        import torch

        from pneumobatch.model.inference import Predictor
        from pneumobatch.model.registry import load_model

        torch.set_num_threads(threads)
        loaded = load_model(name)
        eager = Predictor([loaded], torch.device("cpu"), None, {name: loaded.applicability}, backend="torch")
        x = torch.from_numpy(images)
        runs[f"PyTorch eager, {threads} thread{'s' if threads > 1 else ''}"] = lambda: eager({spec: x}, {})
    times: dict[str, list[float]] = {label: [] for label in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(rounds):  # interleaved: a change of load hits every backend alike
        for label, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return {label: batch / float(np.median(t)) for label, t in times.items()}


def run_cli(code: Path, args: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB of the largest process) of ``pneumobatch ARGS`` as a fresh process with
    the code under ``code``. The RSS comes from GNU time (``/usr/bin/time``), which forks from a small
    process: a child forked from this one starts with this process's high-water mark."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    timer = ["/usr/bin/time", "-f", "%M", "-o", str(cwd / "rss.txt")] if Path("/usr/bin/time").exists() else []
    t0 = time.perf_counter()
    done = subprocess.run([*timer, sys.executable, "-m", "pneumobatch", *args], env=env, cwd=cwd)
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        raise SystemExit(f"pneumobatch {' '.join(args)} (code {code}) exited {done.returncode}")
    rss = float((cwd / "rss.txt").read_text().split()[-1]) / 1024 if timer else float("nan")
    return seconds, rss


def bound(rates: dict[str, float], counts: dict[str, int], forward: float, cores: int) -> float:
    """Every core busy, no overhead: cores / (mean decode core-seconds + forward core-seconds) per image."""
    n = sum(counts.values())
    decode_seconds = sum(counts[k] / rates[k] for k in counts) / n
    return cores / (decode_seconds + 1 / forward)


def torchxrayvision_rate(folder: Path) -> float:
    """images/s of torchxrayvision's documented per-image use on ``folder`` (PNG/JPEG)."""
    import skimage.io
    import torch
    import torchvision
    import torchxrayvision as xrv

    torch.set_num_threads(available_cores())
    model = xrv.models.DenseNet(weights=None).eval()  # the architecture of its res224 weights; nothing downloaded
    transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    t0 = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            img = xrv.datasets.normalize(skimage.io.imread(path), 255)
            img = img.mean(2)[None, ...] if img.ndim == 3 else img[None, ...]
            model(torch.from_numpy(transform(img))[None, ...])
    return len(paths) / (time.perf_counter() - t0)


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--night-per-format", type=int, default=40, help="DICOMs per format of the night")
    parser.add_argument("--folder-images", type=int, default=200, help="1024-px PNG/JPEG exports")
    parser.add_argument("--model", default="pneumonia")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the end-to-end runs")
    parser.add_argument("--baseline", type=Path, help="a checkout of older pneumobatch code to compare with")
    args = parser.parse_args()

    cores = available_cores()
    split = default_split("cpu")
    model = load_onnx_model(args.model)
    spec = input_spec(model.card)
    flags = Path("/proc/cpuinfo").read_text(errors="replace").split() if Path("/proc/cpuinfo").exists() else []
    print(
        f"{cores} cores ({'AVX512-BF16' if 'avx512_bf16' in flags else 'AVX512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'}); "
        f"default split {split.workers} decoding workers + {split.threads} forward thread(s), batch {split.batch_size}; "
        f"model {model.card.name} ({model.card.architecture} @ {spec.size} px, equalised: {spec.equalize}); "
        f"torch installed: {torch_installed()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {"night": tmp / "night", "exports": tmp / "exports"}
        for folder in folders.values():
            folder.mkdir()
        make_night(folders["night"], args.night_per_format)
        make_exports(folders["exports"], args.folder_images)
        counts = {
            name: {
                k: sum(1 for _, e in walk([f]) if kind_of(e.path) == k) for k in {kind_of(e.path) for _, e in walk([f])}
            }
            for name, f in folders.items()
        }
        options = ReadOptions(min_side=spec.size, defer_pixels=True)  # as predict reads

        print("\n1. decode + resize, one process, images/s (per core)")
        rates = {name: decode_rates(folder, spec, options) for name, folder in folders.items()}
        for name, by_kind in rates.items():
            for kind, rate in sorted(by_kind.items()):
                print(f"  {name:<8} {kind:<14} {rate:7.1f}   ({counts[name][kind]} files)")

        print(f"\n2. forward pass, batch {split.batch_size}, images/s")
        forwards = forward_rates(args.model, split.batch_size, split.threads, cores)
        for label, rate in forwards.items():
            print(f"  {label:<28} {rate:7.1f}")
        forward_1 = next(r for label, r in forwards.items() if label.startswith(f"onnxruntime, {split.threads} "))

        print("\n3. the bound (every core busy, no overhead), images/s")
        bounds = {name: bound(rates[name], counts[name], forward_1, cores) for name in folders}
        for name, value in bounds.items():
            print(f"  {name:<8} {sum(counts[name].values())} files: {value:6.1f}")

        print("\n4. pneumobatch predict as a fresh process, defaults, start-up included, images/s")
        codes = {"this tree": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
        results: dict[tuple[str, str], list[float]] = {}
        for round_ in range(1, args.rounds + 1):
            for name, folder in folders.items():
                n = sum(counts[name].values())
                for label, code in codes.items():
                    cmd = [
                        "predict",
                        str(folder),
                        "-m",
                        args.model,
                        "-o",
                        str(tmp / f"{label[:4]}.csv"),
                        "--overwrite",
                        "-q",
                    ]
                    seconds, _ = run_cli(code, cmd, tmp)
                    results.setdefault((name, label), []).append(n / seconds)
                line = ", ".join(f"{label} {results[(name, label)][-1]:6.1f}" for label in codes)
                print(f"  round {round_}, {name:<8}: {line}")
        for name in folders:
            best = {label: max(results[(name, label)]) for label in codes}
            text = f"  {name:<8} best of {args.rounds}: this tree {best['this tree']:6.1f} = {best['this tree'] / bounds[name]:.2f} of the bound"
            if "baseline" in best:
                text += f"; baseline {best['baseline']:6.1f}; speed-up {best['this tree'] / best['baseline']:.2f}x"
            print(text)

        print("\n5. start-up: one file (a 2048x2500 JPEG-LS DICOM), fresh process: seconds, peak RSS")
        one = folders["night"] / "jpegls_000.dcm"
        variants = {
            "default (ONNX Runtime, no torch)": [],
            **({"--backend torch": ["--backend", "torch"]} if torch_installed() else {}),
        }
        if args.baseline:
            variants["baseline"] = []
        for label, extra in variants.items():
            code = args.baseline.resolve() if label == "baseline" else ROOT
            runs = [
                run_cli(
                    code,
                    ["predict", str(one), "-m", args.model, "-o", str(tmp / "one.csv"), "--overwrite", "-q", *extra],
                    tmp,
                )
                for _ in range(3)
            ]
            seconds = sorted(s for s, _ in runs)
            print(
                f"  {label:<34} {seconds[1]:.2f} s (median of 3; {seconds[0]:.2f}-{seconds[-1]:.2f}), {max(m for _, m in runs):.0f} MB"
            )

        try:
            import torchxrayvision  # noqa: F401
        except ImportError:
            print(
                "\n6. torchxrayvision is not installed (pip install torchxrayvision): its per-image loop is not measured"
            )
            return
        xrv = torchxrayvision_rate(folders["exports"])
        ours = max(results[("exports", "this tree")])
        print(
            f"\n6. torchxrayvision's documented per-image loop on the exports folder: {xrv:.1f} images/s; "
            f"pneumobatch {ours:.1f}: {ours / xrv:.1f}x"
        )


if __name__ == "__main__":
    main_()
