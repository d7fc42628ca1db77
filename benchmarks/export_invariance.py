"""Export invariance of the shipped models on a manifest's test split (issue 24's test).

Every test image is read as ``predict`` reads it, written again in each export of
``pneumobatch.training.invariance.EXPORTS`` (224-px RGB resave, JPEG at 320/512/1024 px
and q60-95, 8-bit PNG, 16-bit DICOM with and without a VOI window, gamma 0.8/1.2, a 5%
crop), and originals and exports are predicted through the product's inference path.
Prints, per model and export, the change in the share called positive (multi-class: the
class whose share moves most) and the mean |dP| overall, and every subgroup (source,
age band, view) with >= 30 images that misses the goal (both <= 0.05); ``--json`` writes
the whole table, ``--record`` writes it into the model cards (``metrics.export_invariance``).

    python benchmarks/export_invariance.py ../shared/datasets/cxr/manifest.csv [-m pneumonia -m etiology]
        [--weights-dir weights] [--split test] [--limit N] [--json out.json] [--record]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pneumobatch.evaluation.invariance import GOAL, format_table
from pneumobatch.model.registry import load_model, write_card
from pneumobatch.training.config import TrainConfig
from pneumobatch.training.data import labelled_splits
from pneumobatch.training.invariance import EXPORTS, measure_invariance

SUBGROUPS = {"sg_source": "source", "sg_age_band": "age_band", "sg_view": "view"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("-m", "--model", action="append", default=None)
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images (a quick look)")
    parser.add_argument("--export", action="append", default=None, choices=list(EXPORTS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--record", action="store_true", help="write each table into its model card")
    args = parser.parse_args()
    models = [load_model(name, args.weights_dir) for name in args.model or ["pneumonia", "etiology"]]
    card = models[0].card
    config = TrainConfig.for_card(card, args.manifest)
    frame, _, _, _, _ = labelled_splits(config)
    frame = frame[frame["split"] == args.split].reset_index(drop=True)
    if args.limit:
        frame = frame.sample(min(args.limit, len(frame)), random_state=0).reset_index(drop=True)
    t0 = time.perf_counter()
    result = measure_invariance(
        models,
        [Path(p) for p in frame["path"]],
        frame[list(SUBGROUPS)].rename(columns=SUBGROUPS),
        age_bands=frame["sg_age_band"].tolist(),
        exports=args.export or tuple(EXPORTS),
        workers=args.workers,
        progress=print,
    )
    print(f"{result['n_images']} {args.split} images of {args.manifest}, {time.perf_counter() - t0:.0f} s")
    for model in models:
        table = result[model.card.name]
        print(f"\n{model.card.name}: goal |delta share| and mean |dP| <= {GOAL} in every subgroup of >= 30 images")
        print("\n".join(format_table(table)))
        over = [r for r in table["rows"] if r["passes"] is False and r["subgroup"] != "all"]
        for r in over:
            print(
                f"  over: {r['export']} {r['subgroup']} n={r['n']} delta {r['delta_share']:+.3f} "
                f"mean|dP| {r['mean_abs_dp']:.3f}"
            )
        print(f"  passes: {table['passes']}")
        if args.record:
            model.card.metrics["export_invariance"] = {
                "data": f"{args.manifest} ({args.split} split, {result['n_images']} images)",
                "command": "python benchmarks/export_invariance.py "
                + " ".join([str(args.manifest)] + [f"-m {m.card.name}" for m in models] + ["--record"]),
                "exports": result["exports"],
                **table,
            }
            write_card(model.card, model.weights_path.with_suffix(".json"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
