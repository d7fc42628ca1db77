"""The tables of docs/models.md, printed from the model cards (so the manual quotes the cards, not memory).

    python benchmarks/model_tables.py [--weights-dir weights] [--baseline OLD_invariance.json]

Prints, as Markdown: the pneumonia and etiology test metrics per subgroup with their
intervals; each card's export-invariance rows (``all`` subgroup, plus the worst judged
subgroup per export) next to the baseline's (a ``benchmarks/export_invariance.py --json``
file of other weights, e.g. version 0.2's); and the pneumonia card's leave-one-source-out
table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional


def f3(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def ci(values: Optional[list]) -> str:
    return "" if not values else f" ({values[0]:.3f}–{values[1]:.3f})"


def rate(value: Optional[float], n: int) -> str:
    """A rate of ``n`` cases with its exact 95% interval."""
    from pneumobatch.evaluation.metrics.intervals import exact_interval

    if value is None or not n:
        return "–"
    return f3(value) + ci(exact_interval(round(value * n), n))


def subgroup_table(card: dict[str, Any]) -> list[str]:
    lines = [
        "| subgroup (test) | n (pos / neg) | AUC (95% CI) | sensitivity (95% CI) | specificity (95% CI) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in ("age_band", "source", "view"):
        for row in card["metrics"]["test_subgroups"][key]["groups"]:
            pos = int(row.get("n_positive") or 0)
            neg = row["n"] - pos
            counts = f"{row['n']} ({pos} / {neg})" if "n_positive" in row else str(row["n"])
            lines.append(
                f"| {key} = {row['value']} | {counts} | {f3(row.get('auc'))}{ci(row.get('auc_ci'))} | "
                f"{rate(row.get('sensitivity'), pos)} | {rate(row.get('specificity'), neg)} |"
            )
    return lines


def invariance_table(card: dict[str, Any], baseline: Optional[dict[str, Any]]) -> list[str]:
    table = card["metrics"].get("export_invariance")
    if not table:
        return ["(no export-invariance table in the card)"]
    old = {(r["export"], r["subgroup"]): r for r in (baseline or {}).get("rows", [])}
    lines = [
        "| export | all: change in share called (v0.2 → now) | all: mean abs dP (v0.2 → now) | worst judged subgroup now |",
        "| --- | --- | --- | --- |",
    ]
    for export in table["exports"]:
        rows = [r for r in table["rows"] if r["export"] == export]
        every = next(r for r in rows if r["subgroup"] == "all")
        judged = [r for r in rows if r["judged"] and r["subgroup"] != "all"]
        worst = max(judged, key=lambda r: max(abs(r["delta_share"]), r["mean_abs_dp"]), default=None)
        before = old.get((export, "all"))
        shift = f"{before['delta_share']:+.3f} → " if before else ""
        dp = f"{before['mean_abs_dp']:.3f} → " if before else ""
        mark = "" if every["passes"] else " (over)"
        worst_text = (
            f"{worst['subgroup']} (n={worst['n']}): {worst['delta_share']:+.3f} / {worst['mean_abs_dp']:.3f}"
            + ("" if worst["passes"] else " **over**")
            if worst
            else "–"
        )
        lines.append(
            f"| {export} | {shift}{every['delta_share']:+.3f} | {dp}{every['mean_abs_dp']:.3f}{mark} | {worst_text} |"
        )
    return lines


def loso_table(card: dict[str, Any]) -> list[str]:
    table = card["metrics"].get("leave_one_source_out")
    if not table:
        return ["(no leave-one-source-out table in the card)"]
    lines = [
        "| held-out source | images (pneumonia / normal) | AUC (95% CI) | sensitivity (95% CI) | specificity (95% CI) | trained with it, its test split: AUC / sens / spec |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in table["rows"]:
        seen = r.get("shipped_on_test_split") or {}
        lines.append(
            f"| {r['source']} | {r['n_positive']} / {r['n_negative']} | {f3(r['auc'])}{ci(r['auc_ci'])} | "
            f"{f3(r['sensitivity'])}{ci(r['sensitivity_ci'])} | {f3(r['specificity'])}{ci(r['specificity_ci'])} | "
            + " / ".join(f3(seen.get(k)) for k in ("auc", "sensitivity", "specificity"))
            + " |"
        )
    return lines


def class_table(card: dict[str, Any]) -> list[str]:
    """A multi-class card's test split per class (its decision rule), with the argmax beside it, and
    the fine level's top-1 / top-3 accuracy and per fine class recall."""
    table = card["metrics"].get("test_per_class")
    if not table:
        return ["(no per-class table in the card)"]
    argmax = {r["class"]: r["recall"] for r in card["metrics"].get("test_per_class_argmax", {}).get("per_class", [])}
    lines = [
        "| class (test) | n | recall (95% CI) | precision (95% CI) | F1 (95% CI) | AUC (95% CI) | recall by the argmax |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table["per_class"]:
        lines.append(
            f"| {r['class']} | {r['support']} | {f3(r['recall'])}{ci(r['recall_ci'])} | "
            f"{f3(r['precision'])}{ci(r['precision_ci'])} | {f3(r['f1'])}{ci(r['f1_ci'])} | "
            f"{f3(r['auc'])}{ci(r['auc_ci'])} | {f3(argmax.get(r['class']))} |"
        )
    lines.append(
        f"\nbalanced accuracy {f3(table['balanced_accuracy'])}{ci(table['balanced_accuracy_ci'])}, "
        f"macro AUC {f3(table['macro_auc'])}{ci(table['macro_auc_ci'])}, n={table['n']}"
    )
    fine = card["metrics"].get("test_fine")
    if fine:
        lines += [
            f"\nfine level: top-1 accuracy {f3(fine['top1_accuracy'])}, top-3 {f3(fine['top3_accuracy'])} (n={fine['n']})\n",
            "| fine class | parent | n (test) | recall | precision |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, r in fine["per_class"].items():
            lines.append(f"| {name} | {r['parent']} | {r['n']} | {f3(r['recall'])} | {f3(r['precision'])} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-dir", type=Path, default=Path("weights"))
    parser.add_argument("--baseline", type=Path, default=None)
    args = parser.parse_args()
    baseline = json.loads(args.baseline.read_text()) if args.baseline else {}
    for name in ("pneumonia", "etiology"):
        card = json.loads((args.weights_dir / f"{name}.json").read_text())
        print(f"## {name}\n")
        print("\n".join(subgroup_table(card)) + "\n")
        print("\n".join(invariance_table(card, baseline.get(name))) + "\n")
        if name == "pneumonia":
            print("\n".join(loso_table(card)) + "\n")
        else:
            print("\n".join(class_table(card)) + "\n")


if __name__ == "__main__":
    main()
