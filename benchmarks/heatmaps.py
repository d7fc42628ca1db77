"""Heatmaps: the sanity checks of issue 25 on a test split, and what --heatmaps costs a run.

``sanity`` (Adebayo et al., NeurIPS 2018, and an export check), per shipped model, on every
image of the manifest's test split, with the predicted class explained as ``predict
--heatmaps`` does (:mod:`pneumobatch.model.explain`):

- model randomisation: the Grad-CAM of the shipped network vs a copy whose top blocks (the
  last three MBConv blocks, the head convolution and its norm, the classifier) are
  re-initialised; mean Spearman rank correlation over images (goal < 0.5: a map that does not
  change when the weights it explains are destroyed shows the image, not the model);
- export agreement: the map of the image exported as a plain 8-bit PNG vs as a 512-px JPEG
  q75 (``pneumobatch.training.invariance.EXPORTS``; goal > 0.8);
- border mass: per subgroup (source, age band, view; >= 30 images) the mean share of the map
  in the outer 12.5% band of each side (a uniform map: 0.4375); markers, text and collimation
  sit there, so a model reading them puts its mass there.

Means come with 95% bootstrap intervals (1,000 resamples of images). ``--record`` writes the
figures into each card's ``explain.sanity``.

``cost``: the same folder predicted by fresh processes without and with ``--heatmaps
positive`` (alternated, ``--repeat`` times each), wall time and the ratio (goal <= 2x).

    python benchmarks/heatmaps.py sanity ../shared/datasets/cxr/manifest.csv [--limit N] [--record]
    python benchmarks/heatmaps.py cost ../shared/datasets/cxr/manifest.csv [--images 200] [--repeat 2] [--positives 0.2]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from pneumobatch.io.discovery import sniff
from pneumobatch.io.readers import ReadOptions, read_image
from pneumobatch.model.explain import GradCam, cam_layer_name
from pneumobatch.model.heatmaps import BORDER_BAND, border_share
from pneumobatch.model.preprocess import input_spec, prepare
from pneumobatch.model.registry import LoadedModel, load_model, write_card
from pneumobatch.training.config import TrainConfig
from pneumobatch.training.data import labelled_splits
from pneumobatch.training.invariance import EXPORTS

SUBGROUPS = {"sg_source": "source", "sg_age_band": "age_band", "sg_view": "view"}
MIN_IMAGES = 30
#: Modules re-initialised for the randomisation check (EfficientNet-Lite0: its top).
RANDOMISED = ("_blocks.13", "_blocks.14", "_blocks.15", "_conv_head", "_bn1", "_fc")
EXPORT_PAIR = ("png8", "jpeg512-q75")


def test_split(manifest: Path, card: Any, split: str, limit: int | None):
    config = TrainConfig.for_card(card, manifest)
    frame = labelled_splits(config)[0]
    frame = frame[frame["split"] == split].reset_index(drop=True)
    if limit:
        frame = frame.sample(min(limit, len(frame)), random_state=0).reset_index(drop=True)
    return frame


def randomised(model: LoadedModel, seed: int = 0) -> LoadedModel:
    """A copy of the model with :data:`RANDOMISED` re-initialised (PyTorch's default initialisers)."""
    torch.manual_seed(seed)
    net = copy.deepcopy(model.net)
    for name in RANDOMISED:
        for module in net.get_submodule(name).modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return LoadedModel(net=net.eval(), card=model.card, weights_path=model.weights_path, applicability=None)


def _input(path: Path, spec) -> np.ndarray:
    pixels = read_image(path, sniff(path), ReadOptions(include_lateral=True)).pixels
    return prepare(pixels, spec)[None, None]


def _predicted(model: LoadedModel, x: np.ndarray) -> int:
    """The network output predict --heatmaps explains: the decided class (a two-level model: its fine label)."""
    from pneumobatch.model.preprocess import normalize

    with torch.inference_mode():
        logits = model.net(normalize(torch.from_numpy(x), model.card.mean, model.card.std))
    card = model.card
    outputs = card.output_probs(logits.float().numpy())[0]  # a two-level model's fine classes
    label = card.decide(card.class_probs(outputs)).label
    tree = card.tree
    return card.output_index(label, tree.best_below(outputs, label) if tree is not None else None)


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def _mean_ci(values, seed: int = 0) -> dict[str, Any]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return {"mean": None, "ci95": None, "n": 0}
    rng = np.random.default_rng(seed)
    boots = rng.choice(v, (1000, len(v))).mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean": round(float(v.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)], "n": int(len(v))}


def sanity(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    models = [load_model(name, args.weights_dir) for name in args.model or ["pneumonia", "etiology"]]
    frame = test_split(args.manifest, models[0].card, args.split, args.limit)
    paths = [Path(p) for p in frame["path"]]
    print(f"{len(paths)} {args.split} images of {args.manifest}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        exported = []
        read = ReadOptions(include_lateral=True)
        for i, path in enumerate(paths):
            pixels = read_image(path, sniff(path), read).pixels
            exported.append({e: EXPORTS[e].write(pixels, Path(tmp) / f"{i:05d}-{e}") for e in EXPORT_PAIR})
        for model in models:
            t0 = time.perf_counter()
            spec = input_spec(model.card)
            cam, cam_random = GradCam(model, torch.device("cpu")), GradCam(randomised(model), torch.device("cpu"))
            rows = []
            for i, path in enumerate(paths):
                x = _input(path, spec)
                cls = _predicted(model, x)
                heat = cam(x, [cls])[0]
                a, b = (_input(exported[i][e], spec) for e in EXPORT_PAIR)
                cls_a = _predicted(model, a)
                rows.append(
                    {
                        "randomised": _rho(heat, cam_random(x, [cls])[0]),
                        "exports": _rho(cam(a, [cls_a])[0], cam(b, [cls_a])[0]),
                        "border": border_share(heat),
                        **{v: str(frame.at[i, k]) for k, v in SUBGROUPS.items()},
                    }
                )
                if (i + 1) % 100 == 0:
                    print(f"  {model.card.name}: {i + 1}/{len(paths)} ({time.perf_counter() - t0:.0f} s)")
            results[model.card.name] = summarise(model, rows, len(paths), args)
            report(model.card.name, results[model.card.name])
            if args.record:
                model.card.explain = {
                    "method": "gradcam",
                    "layer": cam_layer_name(model.card),
                    "sanity": results[model.card.name],
                }
                write_card(model.card, model.weights_path.with_suffix(".json"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def summarise(model: LoadedModel, rows: list[dict[str, Any]], n: int, args: argparse.Namespace) -> dict[str, Any]:
    border = {}
    for group in SUBGROUPS.values():
        for value in sorted({r[group] for r in rows}):
            values = [r["border"] for r in rows if r[group] == value]
            if len(values) >= MIN_IMAGES:
                border[f"{group}={value}"] = _mean_ci(values)
    randomised_rho = _mean_ci(r["randomised"] for r in rows)
    exports_rho = _mean_ci(r["exports"] for r in rows)
    return {
        "data": f"{args.manifest} ({args.split} split, {n} images)",
        "command": f"python benchmarks/heatmaps.py sanity {args.manifest} --record",
        "class_explained": "the predicted class (as predict --heatmaps)",
        "randomisation": {
            "modules_reinitialised": list(RANDOMISED),
            "mean_spearman": randomised_rho,
            "goal": "< 0.5",
            "passes": bool(randomised_rho["mean"] is not None and randomised_rho["mean"] < 0.5),
        },
        "export_agreement": {
            "exports": list(EXPORT_PAIR),
            "mean_spearman": exports_rho,
            "goal": "> 0.8",
            "passes": bool(exports_rho["mean"] is not None and exports_rho["mean"] > 0.8),
        },
        "border_share": {
            "band": BORDER_BAND,
            "uniform_map": round(1 - (1 - 2 * BORDER_BAND) ** 2, 4),
            "all": _mean_ci(r["border"] for r in rows),
            "by_subgroup": border,
        },
    }


def report(name: str, s: dict[str, Any]) -> None:
    r, e, b = s["randomisation"], s["export_agreement"], s["border_share"]
    fmt = lambda m: f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] (n={m['n']})"  # noqa: E731
    print(f"\n{name}: {s['data']}")
    print(f"  randomised top vs shipped, mean Spearman: {fmt(r['mean_spearman'])}  goal < 0.5: {r['passes']}")
    print(f"  png8 vs jpeg512-q75, mean Spearman:       {fmt(e['mean_spearman'])}  goal > 0.8: {e['passes']}")
    print(f"  border share (uniform map {b['uniform_map']}): all {fmt(b['all'])}")
    for group, m in b["by_subgroup"].items():
        print(f"    {group:60s} {fmt(m)}")


def cost(args: argparse.Namespace) -> None:
    model = load_model("pneumonia", args.weights_dir)
    frame = test_split(args.manifest, model.card, args.split, None)
    if args.positives is not None:  # a night's mix: this share of pneumonias, the rest normals
        sick = frame[frame["label"] != "No Finding"]
        n_sick = round(args.images * args.positives)
        frame = pd.concat(
            [
                sick.sample(n_sick, random_state=0),
                frame[frame["label"] == "No Finding"].sample(args.images - n_sick, random_state=0),
            ]
        )
    else:
        frame = frame.sample(min(args.images, len(frame)), random_state=0)
    frame = frame.reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "night"
        folder.mkdir()
        for i, p in enumerate(frame["path"]):
            shutil.copy(p, folder / f"{i:05d}{Path(p).suffix}")
        times: dict[str, list[float]] = {"without": [], "with": []}
        positives = None
        for _ in range(args.repeat):
            for kind in ("without", "with"):
                out = Path(tmp) / f"{kind}.csv"
                cmd = [sys.executable, "-m", "pneumobatch", "predict", str(folder), "-o", str(out), "--overwrite"]
                cmd += ["--quiet", *(["--heatmaps", "positive"] if kind == "with" else [])]
                t0 = time.perf_counter()
                run = subprocess.run(cmd, capture_output=True, text=True)
                times[kind].append(time.perf_counter() - t0)
                if run.returncode not in (0, 1):
                    raise SystemExit(run.stderr)
                if kind == "with":
                    info = json.loads(out.with_name("with.run.json").read_text())
                    positives = info["heatmaps"]["written"] + info["heatmaps"]["kept"]
        n = len(frame)
        w, h = statistics.median(times["without"]), statistics.median(times["with"])
        mix = f"{(frame['label'] != 'No Finding').mean():.0%} labelled pneumonia"
        print(f"{n} {args.split} images ({mix}), fresh processes, median of {args.repeat}:")
        print(f"  without heatmaps:       {w:6.1f} s  ({n / w:.1f} images/s)")
        print(
            f"  --heatmaps positive:    {h:6.1f} s  ({n / h:.1f} images/s), {positives} heatmaps ({positives / n:.0%})"
        )
        print(f"  ratio {h / w:.2f}x (goal <= 2x); all runs: {times}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sanity")
    s.add_argument("manifest", type=Path)
    s.add_argument("-m", "--model", action="append", default=None)
    s.add_argument("--weights-dir", type=Path, default=None)
    s.add_argument("--split", default="test")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--json", type=Path, default=None)
    s.add_argument("--record", action="store_true", help="write the figures into each card's explain.sanity")
    c = sub.add_parser("cost")
    c.add_argument("manifest", type=Path)
    c.add_argument("--weights-dir", type=Path, default=None)
    c.add_argument("--split", default="test")
    c.add_argument("--images", type=int, default=200)
    c.add_argument("--repeat", type=int, default=2)
    c.add_argument(
        "--positives", type=float, default=None, help="share of pneumonias (by label) [default: the split's]"
    )
    args = parser.parse_args()
    sanity(args) if args.what == "sanity" else cost(args)


if __name__ == "__main__":
    main()
