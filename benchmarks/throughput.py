"""Throughput of predict on this machine: decode-only, model-forward-only, end to end.

Generates a folder of chest-X-ray-sized DICOMs in several encodings, then prints
images/s for (1) reading + resizing in the DataLoader workers alone, (2) the model
forward pass alone on ready tensors, (3) ``run_predict`` (what ``pneumobatch predict`` calls) end to end (CSV
included), and the ratio of (3) to the slower of (1) and (2). All in one run, so
the ratios hold even on a noisy shared machine.

    python benchmarks/throughput.py [--size 1024] [--per-encoding 6] [--model pneumonia]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pneumobatch.discovery import walk
from pneumobatch.errors import PneumobatchError
from pneumobatch.inference import Predictor, make_loader, resolve_device, resolve_precision
from pneumobatch.models import load_model
from pneumobatch.predict import PredictConfig, run_predict
from pneumobatch.readers import ReadOptions
from pneumobatch.synthetic import write_cxr

ENCODINGS = ("explicit", "rle", "jpegls", "j2k-lossless", "jpeg-baseline", "deflate")


def make_studies(folder: Path, size: int, per_encoding: int, encodings: tuple[str, ...]) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for encoding in encodings:
        for i in range(per_encoding):
            body = 2400 + 1200 * np.sin(3 * xx + i) * np.cos(2 * yy) + rng.normal(0, 60, (size, size))
            pixels = np.clip(body, 0, 4095).astype(np.uint16)
            if encoding == "jpeg-baseline":
                write_cxr(folder / f"{encoding}_{i}", (pixels >> 4).astype(np.uint8), encoding)
            else:
                write_cxr(folder / f"{encoding}_{i}", pixels, encoding, bits_stored=12)


def decode_rate(entries, sizes, workers: int, batch_size: int) -> float:
    loader = make_loader(entries, sizes, ReadOptions(min_side=max(sizes)), batch_size=batch_size, workers=workers)
    t0 = time.perf_counter()
    n = sum(len(ok) for _, _, ok in loader)
    return n / (time.perf_counter() - t0)


def forward_rate(predictor: Predictor, batch_size: int, n_batches: int) -> float:
    inputs = {s: torch.randint(0, 255, (batch_size, 1, s, s), dtype=torch.uint8) for s in predictor.sizes}
    predictor(inputs)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n_batches):
        predictor(inputs)
    return batch_size * n_batches / (time.perf_counter() - t0)


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--per-encoding", type=int, default=6)
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--model", default="pneumonia")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    model = load_model(args.model)
    predictor = Predictor([model], device, resolve_precision(args.precision, device))
    encodings = tuple(args.encodings.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "studies"
        folder.mkdir()
        make_studies(folder, args.size, args.per_encoding, encodings)
        entries = [e for _, e in walk([folder])]
        print(f"{len(entries)} DICOMs of {args.size}x{args.size} ({', '.join(encodings)}); model {model.card.name} "
              f"({model.card.architecture} @ {model.card.input_size}px) on {device}, batch {args.batch_size}, "
              f"{args.workers} workers, torch threads {torch.get_num_threads()}")
        for encoding in encodings:
            subset = [e for e in entries if e.path.name.startswith(encoding + "_")]
            print(f"  decode+resize {encoding:>14}: {decode_rate(subset, predictor.sizes, 0, args.batch_size):7.1f} images/s (one process)")
        decode = decode_rate(entries, predictor.sizes, args.workers, args.batch_size)
        forward = forward_rate(predictor, args.batch_size, max(2, len(entries) // args.batch_size))
        out = Path(tmp) / "p.csv"
        t0 = time.perf_counter()
        config = PredictConfig(inputs=[folder], output=out, models=[args.model], batch_size=args.batch_size,
                               workers=args.workers, device=args.device, precision=args.precision)
        try:
            run = run_predict(config)
        except PneumobatchError as exc:
            raise SystemExit(f"predict failed: {exc}") from exc
        end_to_end = len(entries) / (time.perf_counter() - t0)
        if run.exit_code != 0:
            raise SystemExit(f"predict failed: {run.counts}")
    bound = min(decode, forward)
    print(f"decode-only (all encodings, {args.workers} workers): {decode:7.1f} images/s")
    print(f"model forward only:                       {forward:7.1f} images/s")
    print(f"end-to-end predict (incl. start-up, CSV): {end_to_end:7.1f} images/s")
    print(f"end-to-end / slower of the two:           {end_to_end / bound:7.2f}")
    combined = 1 / (1 / decode + 1 / forward)
    print(f"end-to-end / serial bound 1/(1/d+1/f):    {end_to_end / combined:7.2f}  (both stages share the same cores here)")


if __name__ == "__main__":
    main_()
