"""Reduced-resolution decode vs full decode: do the shipped models still say the same?

Runs the shipped models (default: pneumonia and etiology) twice over each folder, once
decoding every file in full (``ReadOptions(min_side=None)``) and once as ``predict`` does
(reduced-resolution decode for the models' input size), and prints per folder and
encoding: files, how many were decoded reduced, the largest |dp| of any class
probability, and the files whose predicted label differs. The folders are
``sample_studies/`` and a generated set of chest-X-ray-like DICOMs in every encoding
``pneumobatch.testing.synthetic`` writes (MONOCHROME1 and VOI windows included).

    python benchmarks/reduced_decode.py [--size 2048] [--per-encoding 4] [FOLDER ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from pneumobatch.io.discovery import walk
from pneumobatch.io.readers import ReadOptions
from pneumobatch.model.device import resolve_device
from pneumobatch.model.inference import Predictor, run_inference
from pneumobatch.model.registry import load_model
from pneumobatch.testing.synthetic import ENCODINGS, write_cxr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from decode import chest_like  # noqa: E402 - the benchmarks' shared test image


def make_every_encoding(folder: Path, size: int, per_encoding: int) -> None:
    """``per_encoding`` files per encoding; alternately MONOCHROME1 and with a VOI window."""
    for encoding in ENCODINGS:
        for i in range(per_encoding):
            pixels = np.roll(chest_like(size, seed=i), (i * size // 37, -i * size // 23), axis=(0, 1))
            eight_bit = encoding == "jpeg-baseline"
            window = ((128.0, 220.0) if eight_bit else (2048.0, 3600.0)) if i % 2 else None
            write_cxr(
                folder / f"{encoding}_{i}.dcm",
                (pixels >> 4).astype(np.uint8) if eight_bit else pixels,
                encoding,
                bits_stored=None if eight_bit else 12,
                monochrome1=i % 4 == 2,
                window=window,
            )


def predictions(folder: Path, predictor: Predictor, min_side) -> dict[str, tuple]:
    """relpath -> (transfer syntax or format, {model: probs}, {model: label})."""
    entries = [e for _, e in walk([folder])]
    out = {}
    for result in run_inference(entries, predictor, ReadOptions(min_side=min_side), batch_size=16, workers=1):
        if not result.probs:
            continue
        labels = {
            m.card.name: m.card.decide(m.card.class_probs(result.probs[m.card.name]), result.meta.get("age_band")).label
            for m in predictor.models
        }
        kind = result.meta.get("transfer_syntax") or result.meta.get("format", "")
        out[result.entry.relpath] = (str(kind), result.probs, labels)
    return out


def compare(name: str, folder: Path, predictor: Predictor) -> tuple[float, int]:
    full = predictions(folder, predictor, None)
    fast = predictions(folder, predictor, max(s.size for s in predictor.specs))
    rows: dict[str, list] = defaultdict(list)
    for path, (kind, probs, labels) in full.items():
        _, fprobs, flabels = fast[path]
        dp = max(float(np.abs(probs[m] - fprobs[m]).max()) for m in probs)
        flips = [f"{path}:{m} {labels[m]}->{flabels[m]}" for m in labels if labels[m] != flabels[m]]
        rows[kind].append((dp, flips))
    print(f"\n{name}: {len(full)} predicted files, models {', '.join(m.card.name for m in predictor.models)}")
    print(f"  {'encoding':<48} {'files':>5} {'max |dp|':>9}  label flips")
    worst, total_flips = 0.0, 0
    for kind, values in sorted(rows.items()):
        dp = max(v[0] for v in values)
        flips = [f for v in values for f in v[1]]
        worst, total_flips = max(worst, dp), total_flips + len(flips)
        print(f"  {kind[:48]:<48} {len(values):>5} {dp:9.4f}  {len(flips)} {' '.join(flips)}")
    print(f"  all: max |dp| {worst:.4f}, {total_flips} label flips")
    return worst, total_flips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--models", default="pneumonia,etiology")
    parser.add_argument("--size", type=int, default=2048, help="side of the generated images")
    parser.add_argument("--per-encoding", type=int, default=4)
    args = parser.parse_args()
    device = resolve_device("auto")
    predictor = Predictor([load_model(name) for name in args.models.split(",")], device, None)
    compare("sample_studies", ROOT / "sample_studies", predictor)
    for folder in args.folders:
        compare(str(folder), folder, predictor)
    with tempfile.TemporaryDirectory() as tmp:
        make_every_encoding(Path(tmp), args.size, args.per_encoding)
        compare(f"generated {args.size}px, every encoding", Path(tmp), predictor)


if __name__ == "__main__":
    main()
