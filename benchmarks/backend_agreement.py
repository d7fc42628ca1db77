"""ONNX Runtime vs PyTorch on the test split: the same AUC, the same labels?

Runs the shipped models (default: pneumonia and etiology) over the manifest's test
split once with each CPU backend (fp32, the same decoded 192 px inputs: PyTorch eager and the shipped
ONNX export in ONNX Runtime, which predict runs on the CPU without torch) and prints,
per model: test-split AUC (binary: the positive class; multi-class: macro one-vs-rest)
with each backend and their difference, the largest |dp| of any class probability, and
how many images change label at the card's operating point.

    python benchmarks/backend_agreement.py ../shared/datasets/cxr/manifest.csv [-m pneumonia -m etiology]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pneumobatch.model.inference import Predictor
from pneumobatch.model.preprocess import input_spec
from pneumobatch.model.registry import load_model
from pneumobatch.model.runtime import OnnxPredictor, load_onnx_model
from pneumobatch.training.config import TrainConfig
from pneumobatch.training.data import Dataset, decode_split, labelled_splits


def decoded_split(card, manifest: Path, split: str, workers: int) -> Dataset:
    """``split`` of ``manifest`` as ``train`` sees it (age bands from the card's defaults), at the card's input size."""
    config = TrainConfig.for_card(card, manifest)
    frame, task, _, _, _ = labelled_splits(config)
    return decode_split(frame[frame["split"] == split], task, input_spec(card), workers)[0]


def auc(card, targets: np.ndarray, proba: np.ndarray) -> float:
    if card.binary:
        return float(roc_auc_score(targets == card.positive_index, proba[:, card.positive_index]))
    present = [k for k in range(len(card.classes)) if 0 < (targets == k).sum() < len(targets)]
    return float(np.mean([roc_auc_score(targets == k, proba[:, k]) for k in present]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("-m", "--model", action="append", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    for name in args.model or ["pneumonia", "etiology"]:
        loaded = load_model(name)
        card = loaded.card
        test = decoded_split(card, args.manifest, "test", args.workers)
        targets = test.targets.numpy()
        spec = input_spec(card)
        batches = [test.images[i : i + args.batch_size] for i in range(0, len(test.images), args.batch_size)]
        eager = Predictor([loaded], cpu, None, backend="torch")
        shipped = OnnxPredictor([load_onnx_model(name)])  # what predict runs on the CPU, without torch
        outputs = {  # probabilities of the network's outputs (a two-level model's fine classes)
            "torch": np.concatenate([eager({spec: x})[card.name] for x in batches]),
            "onnxruntime": np.concatenate([shipped({spec: x.numpy()})[card.name] for x in batches]),
        }
        proba = {b: card.class_probs(p) for b, p in outputs.items()}
        bands = test.frame["sg_age_band"].to_numpy()
        labels = {b: card.decide_many(p, bands) for b, p in proba.items()}
        flips = int((labels["torch"] != labels["onnxruntime"]).sum())
        a_torch, a_onnx = auc(card, targets, proba["torch"]), auc(card, targets, proba["onnxruntime"])
        dp = float(
            max(
                np.abs(proba["torch"] - proba["onnxruntime"]).max(),
                np.abs(outputs["torch"] - outputs["onnxruntime"]).max(),
            )
        )
        print(
            f"{card.name:10s} n={len(targets)}  AUC torch {a_torch:.5f}  onnxruntime {a_onnx:.5f}  "
            f"difference {a_onnx - a_torch:+.5f}  max |dp| {dp:.1e}  label changes {flips}",
            flush=True,
        )


if __name__ == "__main__":
    main()
