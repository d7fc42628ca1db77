"""The imbalance methods side by side: one etiology model per ``train --balance`` method, same splits.

Each ``METHOD=DIR`` names a folder holding an etiology model trained with ``--balance METHOD``
and otherwise the same command (see docs/models.md). Its card already holds everything:
validation metrics under the card's decision rule, and on the test split per class recall and
precision (exact 95% intervals), F1 and AUC (bootstrap 95% intervals), balanced accuracy and
macro AUC (bootstrap 95% intervals), the same under the plain argmax, and the fine level's
top-1/top-3 accuracy. This prints the table per method and names the method validation
chooses (highest validation macro AUC; ties: validation balanced accuracy). The test split
chooses nothing. ``--record CARD`` writes the table into a card (``metrics.imbalance_methods``).

    python benchmarks/imbalance_methods.py source=runs/imb-source weights=runs/imb-weights \\
        oversample=runs/imb-oversample undersample=runs/imb-undersample none=runs/imb-none \\
        [--name etiology] [--record weights/etiology.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from pneumobatch.core.card import ModelCard
from pneumobatch.model.store import write_card

#: Per-class recall the seed projects' coarse model reached (bacterial / viral / fungal).
SEED_RECALL = {"bacterial": 0.2, "viral": 1.0, "fungal": 0.5}


def _ci(values: Optional[list[float]]) -> str:
    return f"{values[0]:.2f}-{values[1]:.2f}" if values else "-"


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def summary(method: str, card: dict[str, Any]) -> dict[str, Any]:
    metrics = card["metrics"]
    table = metrics["test_per_class"]
    argmax = metrics.get("test_per_class_argmax") or {}
    return {
        "method": method,
        "balance": card["training"]["balance"],
        "best_epoch": card["training"]["best_epoch"],
        "seconds": card["training"]["seconds"],
        "val_macro_auc": metrics["val"].get("auc"),
        "val_balanced_accuracy": metrics["val"].get("balanced_accuracy"),
        "decision": {k: card.get("decision", {}).get(k) for k in ("rule", "log_offsets")},
        "test": table,
        "test_balanced_accuracy_argmax": argmax.get("balanced_accuracy"),
        "test_recall_argmax": {r["class"]: r["recall"] for r in argmax.get("per_class", [])},
        "test_fine": {k: metrics.get("test_fine", {}).get(k) for k in ("top1_accuracy", "top3_accuracy")},
    }


def chosen(rows: list[dict[str, Any]]) -> str:
    """The method validation chooses: highest macro AUC, then balanced accuracy."""
    return max(rows, key=lambda r: (r["val_macro_auc"] or 0.0, r["val_balanced_accuracy"] or 0.0))["method"]


def markdown(rows: list[dict[str, Any]], pick: str) -> str:
    lines = [
        "| method | val macro AUC | val balanced acc. | test balanced acc. (95% CI) | test macro AUC (95% CI) "
        "| argmax balanced acc. | fine top-1 / top-3 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = r["test"]
        lines.append(
            f"| {r['method']}{' (chosen)' if r['method'] == pick else ''} | {_num(r['val_macro_auc'])} "
            f"| {_num(r['val_balanced_accuracy'])} | {_num(t['balanced_accuracy'])} ({_ci(t['balanced_accuracy_ci'])}) "
            f"| {_num(t['macro_auc'])} ({_ci(t['macro_auc_ci'])}) | {_num(r['test_balanced_accuracy_argmax'])} "
            f"| {_num(r['test_fine']['top1_accuracy'])} / {_num(r['test_fine']['top3_accuracy'])} |"
        )
    lines += [
        "",
        "| method | class | n | recall (95% CI) | precision (95% CI) | F1 (95% CI) | AUC (95% CI) | recall, argmax |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for c in r["test"]["per_class"]:
            lines.append(
                f"| {r['method']} | {c['class']} | {c['support']} | {_num(c['recall'])} ({_ci(c['recall_ci'])}) "
                f"| {_num(c['precision'])} ({_ci(c['precision_ci'])}) | {_num(c['f1'])} ({_ci(c['f1_ci'])}) "
                f"| {_num(c['auc'])} ({_ci(c['auc_ci'])}) | {_num(r['test_recall_argmax'].get(c['class']))} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="METHOD=DIR")
    parser.add_argument("--name", default="etiology", help="the model's name in each DIR")
    parser.add_argument("--record", type=Path, help="write the table into this card (metrics.imbalance_methods)")
    args = parser.parse_args()
    rows = []
    for item in args.runs:
        method, _, folder = item.partition("=")
        card = json.loads((Path(folder) / f"{args.name}.json").read_text())
        rows.append(summary(method, card))
    pick = chosen(rows)
    print(markdown(rows, pick))
    print(f"\nchosen on validation: {pick}")
    if args.record:
        card = ModelCard.from_dict(json.loads(args.record.read_text()))
        card.metrics["imbalance_methods"] = {
            "rule": "highest validation macro AUC (ties: validation balanced accuracy); test chooses nothing",
            "chosen": pick,
            "seed_projects_recall": SEED_RECALL,
            "methods": rows,
        }
        write_card(card, args.record)
        print(f"recorded in {args.record}")


if __name__ == "__main__":
    main()
