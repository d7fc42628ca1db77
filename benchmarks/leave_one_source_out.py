"""Leave-one-source-out: how a model does on a source it never saw (the honest estimate of a new hospital).

For each ``SOURCE=WEIGHTS_DIR`` pair, WEIGHTS_DIR holds a model trained with
``pneumobatch train ... --exclude-group 'SOURCE*'`` (the shipped recipe otherwise); every
image of that source (all its splits: the model saw none of them) is predicted through
the product's inference path and scored at the card's operating point (its age band's
where known). Prints per held-out source: n, AUC with a bootstrap 95% interval (sources
with both classes), sensitivity and specificity with exact 95% intervals, and the share
called positive; ``--shipped`` adds the shipped model's figures on the same source's test
split (trained with the source) for comparison. ``--json`` writes the table, ``--record``
puts it into the shipped card (``metrics.leave_one_source_out``). ``--rows-from CARD``
instead of the pairs takes the held-out rows that CARD recorded (models trained earlier;
the recipe and epochs recorded with them) and scores only the shipped column again, for
new shipped weights whose recipe differs from those models' only in the epochs.

    python benchmarks/leave_one_source_out.py ../shared/datasets/cxr/manifest.csv \\
        RSNA=runs/loso-RSNA Hannover=runs/loso-Hannover ieee8023=runs/loso-ieee8023 NIH=runs/loso-NIH \\
        [--model pneumonia] [--shipped weights] [--json out.json] [--record]
    python benchmarks/leave_one_source_out.py ../shared/datasets/cxr/manifest.csv \\
        --rows-from old_card.json --shipped weights --record
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pneumobatch.core.errors import Status
from pneumobatch.evaluation.metrics.intervals import exact_interval
from pneumobatch.io.discovery import FileEntry
from pneumobatch.io.readers import ReadOptions
from pneumobatch.model.inference import create_predictor, run_inference
from pneumobatch.model.registry import load_model, write_card
from pneumobatch.training.config import TrainConfig
from pneumobatch.training.data import labelled_splits


def predict_files(model, paths: list[str]) -> np.ndarray:
    """Probabilities (n, classes) of ``paths`` through the product's path; NaN rows where predict gives none."""
    predictor = create_predictor([model], torch.device("cpu"), "auto", "auto")
    entries = [FileEntry(Path(p), Path(p).name, 0, 0) for p in paths]
    options = ReadOptions(min_side=model.card.input_size)
    out = np.full((len(paths), len(model.card.classes)), np.nan)
    for i, result in enumerate(run_inference(entries, predictor, options, batch_size=16, workers=1)):
        if result.status is Status.OK:
            out[i] = model.card.class_probs(result.probs[model.card.name])
    return out


def score(model, frame, proba: np.ndarray) -> dict[str, Any]:
    """n, AUC (bootstrap CI), sensitivity/specificity (exact CIs) and share called positive at the card's rule."""
    card = model.card
    ok = ~np.isnan(proba).any(axis=1)
    frame, proba = frame[ok], proba[ok]
    pos = card.positive_index
    y = (frame["cls"] == card.positive).to_numpy()
    called = card.decide_many(proba, frame["sg_age_band"].tolist()) == card.positive
    tp, fn = int((called & y).sum()), int((~called & y).sum())
    tn, fp = int((~called & ~y).sum()), int((called & ~y).sum())
    row: dict[str, Any] = {
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
        "not_scored": int((~ok).sum()),
        "called_positive": float(called.mean()) if len(y) else None,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "sensitivity_ci": exact_interval(tp, tp + fn),
        "specificity": tn / (tn + fp) if tn + fp else None,
        "specificity_ci": exact_interval(tn, tn + fp),
        "auc": None,
        "auc_ci": None,
    }
    if y.any() and (~y).any():
        p = proba[:, pos]
        row["auc"] = float(roc_auc_score(y, p))
        rng = np.random.default_rng(0)
        boots = []
        for _ in range(1000):
            idx = rng.integers(0, len(y), len(y))
            if y[idx].any() and (~y[idx]).any():
                boots.append(roc_auc_score(y[idx], p[idx]))
        row["auc_ci"] = [float(v) for v in np.percentile(boots, [2.5, 97.5])]
    return row


def shipped_column(shipped, held) -> dict[str, Any]:
    """The shipped model (trained with the source) scored on the held-out source's test split."""
    test = held[held["split"] == "test"].reset_index(drop=True)
    return score(shipped, test, predict_files(shipped, test["path"].tolist()))


def fmt(value, ci=None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument(
        "held_out", nargs="*", help="SOURCE=WEIGHTS_DIR (SOURCE: the --exclude-group pattern, '*' added)"
    )
    parser.add_argument(
        "--rows-from",
        type=Path,
        default=None,
        help="a card whose recorded held-out rows are kept; only the --shipped column is scored again",
    )
    parser.add_argument("--model", default="pneumonia")
    parser.add_argument(
        "--shipped", type=Path, default=None, help="weights folder of the model trained on every source"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--record", action="store_true", help="write the table into the --shipped card")
    args = parser.parse_args()
    if bool(args.held_out) == bool(args.rows_from):
        parser.error("give SOURCE=WEIGHTS_DIR pairs or --rows-from CARD, one of the two")
    if args.rows_from and not args.shipped:
        parser.error("--rows-from scores the --shipped column: give --shipped")
    t0 = time.perf_counter()
    table: list[dict[str, Any]] = []
    shipped = load_model(args.model, args.shipped) if args.shipped else None
    recorded = None
    if args.rows_from:
        recorded = json.loads(args.rows_from.read_text())["metrics"]["leave_one_source_out"]
        config = TrainConfig.for_card(shipped.card, args.manifest, args.shipped)
        frame, _, _, _, _ = labelled_splits(config)
        for old in recorded["rows"]:
            row = {k: v for k, v in old.items() if k != "shipped_on_test_split"}
            held = frame[frame["source"].astype(str).isin(row["sources"])]
            row["shipped_on_test_split"] = shipped_column(shipped, held)
            table.append(row)
            print(f"held out {row['source']} (recorded): shipped column scored again", flush=True)
    for pair in args.held_out:
        pattern, folder = pair.split("=", 1)
        model = load_model(args.model, Path(folder))
        card = model.card
        config = TrainConfig.for_card(card, args.manifest, Path(folder))
        frame, _, _, _, _ = labelled_splits(config)
        match = np.array([fnmatch.fnmatch(s.lower(), pattern.lower() + "*") for s in frame["source"].astype(str)])
        held = frame[match].reset_index(drop=True)
        excluded = card.training.get("excluded_groups") or {}
        if not excluded or set(excluded) != set(held["source"].astype(str).unique()):
            raise SystemExit(f"{folder}: its card excluded {sorted(excluded)}, not the {pattern!r} images")
        row = {
            "source": pattern,
            "sources": sorted(held["source"].astype(str).unique()),
            "weights": folder,
            "stages": ", ".join(f"{st['stage']} {st['epochs']}" for st in card.training.get("stages", [])),
            **score(model, held, predict_files(model, held["path"].tolist())),
        }
        if shipped is not None:
            row["shipped_on_test_split"] = shipped_column(shipped, held)
        table.append(row)
        print(f"held out {pattern}: {row['n']} images", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s\n")
    print(
        "| held-out source | images (pos/neg) | AUC [95% CI] | sensitivity [95% CI] | specificity [95% CI] |"
        " trained with it (its test split): AUC / sens / spec |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table:
        s = r.get("shipped_on_test_split") or {}
        seen = " / ".join(fmt(s.get(k)) for k in ("auc", "sensitivity", "specificity")) if s else "-"
        print(
            f"| {r['source']} | {r['n']} ({r['n_positive']}/{r['n_negative']}) | {fmt(r['auc'], r['auc_ci'])} | "
            f"{fmt(r['sensitivity'], r['sensitivity_ci'])} | {fmt(r['specificity'], r['specificity_ci'])} | {seen} |"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    if args.record and shipped is not None:
        if recorded is not None:
            entry = {
                **recorded,
                "shipped_column": "scored again by python benchmarks/leave_one_source_out.py "
                f"{args.manifest} --rows-from {args.rows_from} --shipped {args.shipped}",
                "rows": table,
            }
        else:
            entry = {
                "command": "python benchmarks/leave_one_source_out.py "
                + " ".join(map(str, [args.manifest, *args.held_out])),
                "recipe": "the shipped recipe with --exclude-group SOURCE*; epochs per held-out source: "
                + "; ".join(f"{r['source']} {r['stages']}" for r in table),
                "rows": table,
            }
        shipped.card.metrics["leave_one_source_out"] = entry
        write_card(shipped.card, shipped.weights_path.with_suffix(".json"))


if __name__ == "__main__":
    main()
