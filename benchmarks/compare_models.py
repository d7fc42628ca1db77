"""Two binary models on the same validation images: paired bootstrap of their AUC difference.

    python benchmarks/compare_models.py MANIFEST MODEL_A MODEL_B [--split val]

MODEL_A and MODEL_B are model names or paths to NAME.json (they may differ in input
size: each sees the split decoded at its own). Prints, pooled, per age band and for the
NIH source, both AUCs, B - A, and the percentile 95% interval of B - A over 2,000
paired resamples of the images. Model choices are made on the validation split; the
test split is for reporting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pneumobatch.model.inference import Predictor
from pneumobatch.model.registry import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend_agreement import decoded_split  # noqa: E402 - the benchmarks' shared split loader


def split_scores(model: str, manifest: Path, split: str, workers: int):
    loaded = load_model(model)
    card = loaded.card
    data = decoded_split(card, manifest, split, workers)
    predictor = Predictor([loaded], torch.device("cpu"), None, backend="torch")
    proba = np.concatenate(
        [predictor({card.input_size: data.images[i : i + 32]})[card.name] for i in range(0, len(data.images), 32)]
    )
    return proba[:, card.positive_index], data.targets.numpy() == card.positive_index, data.frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("model_a")
    parser.add_argument("model_b")
    parser.add_argument("--split", default="val")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    pa, y, frame = split_scores(args.model_a, args.manifest, args.split, args.workers)
    pb, y_b, frame_b = split_scores(args.model_b, args.manifest, args.split, args.workers)
    assert (frame["path"].to_numpy() == frame_b["path"].to_numpy()).all() and (y == y_b).all(), "not the same images"
    bands = frame["sg_age_band"].to_numpy()
    source = frame["source"].astype(str).to_numpy()
    groups = {
        "pooled": np.ones(len(y), bool),
        "adult": bands == "adult",
        "child": bands == "child",
        "NIH": np.array([s.startswith("NIH") for s in source]),
    }
    rng = np.random.default_rng(0)
    print(f"{args.split} split: A = {args.model_a}, B = {args.model_b}")
    for name, m in groups.items():
        ya, sa, sb = y[m], pa[m], pb[m]
        if ya.all() or not ya.any():
            continue
        diffs = []
        for _ in range(args.resamples):
            s = rng.integers(0, len(ya), len(ya))
            if ya[s].all() or not ya[s].any():
                continue
            diffs.append(roc_auc_score(ya[s], sb[s]) - roc_auc_score(ya[s], sa[s]))
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        a, b = roc_auc_score(ya, sa), roc_auc_score(ya, sb)
        print(
            f"{name:7s} n={m.sum():4d}  AUC A {a:.4f}  B {b:.4f}  B - A {b - a:+.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]",
            flush=True,
        )


if __name__ == "__main__":
    main()
