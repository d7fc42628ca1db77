"""The report's document model: every number, table and note of the report as one JSON-ready dict.

No files are written here: :func:`build_report` reads the inputs, joins the labels and
computes the metrics (:mod:`pneumobatch.evaluation.metrics`); :mod:`.figures` and :mod:`.pdf`
render the result, and :func:`~pneumobatch.evaluation.report.write_report` writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import EXIT_FATAL, LabelError, ReportError
from pneumobatch.core.hierarchy import Hierarchy
from pneumobatch.core.site import load_site
from pneumobatch.core.subgroups import REPORT_COLUMNS, add_subgroup_columns, parse_band_defaults
from pneumobatch.evaluation.labels.cards import card_from_run, describe_model, threshold_notes
from pneumobatch.evaluation.labels.fine import fine_join
from pneumobatch.evaluation.labels.join import JoinResult, check_label_column, join_labels, study_level
from pneumobatch.evaluation.labels.keys import detect_key
from pneumobatch.evaluation.labels.reading import read_labels
from pneumobatch.evaluation.metrics import evaluate, fine_level, jsonable, subgroup_metrics, summarise
from pneumobatch.evaluation.report.cases import cases_section
from pneumobatch.evaluation.report.inputs import elapsed_seconds, load_run, load_studies, report_version, select_labels
from pneumobatch.evaluation.report.options import RESEARCH_ONLY, SCHEMA, ReportOptions
from pneumobatch.evaluation.site_comparison import compare_operating_points
from pneumobatch.io.predictions import FINE_LABEL, file_counts, load_predictions


def _group_values(values: pd.Series) -> list[str]:
    text = values.fillna("").astype(str).str.strip()
    return text.where(text != "", "(missing)").tolist()


def _unlabelled_groups(ok: pd.DataFrame, column: str, classes: Sequence[str]) -> dict[str, Any]:
    values = pd.Series(_group_values(ok[column]), index=ok.index)
    groups = []
    for value, idx in values.groupby(values).groups.items():
        preds = ok.loc[idx, "pred_label"].astype(str) if "pred_label" in ok else pd.Series([], dtype=str)
        counts = preds.value_counts()
        groups.append(
            {
                "value": str(value),
                "n": int(len(idx)),
                "prediction_counts": {c: int(counts.get(c, 0)) for c in classes},
            }
        )
    groups.sort(key=lambda g: (-g["n"], g["value"]))
    return {"groups": groups[:30], "n_groups": len(groups), "omitted_groups": max(0, len(groups) - 30)}


def _pick_model(model: str, names: list[str], preds: pd.DataFrame, source: Path) -> str:
    """A model by name, or by task when exactly one model in the CSV has that task."""
    if model in names:
        return model
    if "task" in preds.columns:
        by_task = sorted(set(preds.loc[preds["task"] == model, "model"]))
        if len(by_task) == 1:
            return by_task[0]
    raise ReportError(f"model {model!r} is not in {source.name} (models: {', '.join(names) or 'none'})")


#: ``--by`` columns derived from age, view and sex columns when absent (see :mod:`pneumobatch.core.subgroups`).
DERIVED_SUBGROUPS = {REPORT_COLUMNS.age_band, REPORT_COLUMNS.view, REPORT_COLUMNS.sex}


def applicability_counts(ok: pd.DataFrame) -> Optional[dict[str, int]]:
    """Predicted images the applicability flag scored, and how many it marks not applicable.

    ``None`` when the CSV has no flag (a model without applicability statistics, or a CSV
    from before the flag existed).
    """
    if "applicable" not in ok.columns:
        return None
    flags = ok["applicable"].astype(str).str.lower()
    scored = flags.isin(["true", "false"])
    if not scored.any():
        return None
    return {"scored": int(scored.sum()), "not_applicable": int((flags == "false").sum())}


def build_report(options: ReportOptions) -> dict[str, Any]:
    """Every number of the report as one JSON-ready dict (no files written)."""
    o = options
    predictions_csv, labels_csv, by, key = o.predictions, o.labels, o.by, o.key
    warnings: list[str] = []
    preds = load_predictions(predictions_csv)
    run_path, studies_path = o.run_path, o.studies_path
    run = load_run(run_path, warnings)
    studies_all = load_studies(studies_path, warnings)
    labels = read_labels(labels_csv) if labels_csv is not None else None
    if labels is not None and o.where:
        labels = select_labels(labels, o.where)
        warnings.append(f"labels restricted to {' and '.join(o.where)}: {len(labels)} rows")
    if set(by) & DERIVED_SUBGROUPS:
        # age_band / view_group / sex_group: from age, view and sex columns (and the
        # age-band defaults per source), on whichever side has them
        defaults = parse_band_defaults(o.default_age_band, exit_code=EXIT_FATAL)  # exit 3, as it always was
        if labels is not None:
            labels = add_subgroup_columns(labels, defaults)
        if labels is None or not set(by) & DERIVED_SUBGROUPS <= set(labels.columns):
            preds = add_subgroup_columns(preds, defaults)
    for col in by:
        in_labels = labels is not None and col in labels.columns
        if not in_labels and col not in preds.columns:
            side = "labels file or predictions" if labels is not None else "predictions (no labels given)"
            raise LabelError(f"--by {col}: no such column in the {side}")

    run_models = {str(m.get("name")): m for m in (run or {}).get("models", []) if isinstance(m, dict)}
    names = [n for n in dict.fromkeys(preds["model"].tolist())]
    if names == [""]:
        only = list(run_models)[:1]
        preds["model"] = only[0] if only else "model"
        names = [preds["model"].iloc[0]]
    if not names:
        names = list(run_models)
    if o.model is not None:
        names = [_pick_model(o.model, names, preds, predictions_csv)]
    site = load_site(o.site) if o.site is not None else None
    if site is not None and site["model"]["name"] not in names:
        raise LabelError(
            f"--site {o.site}: the site file is for model {site['model']['name']}, which is not among the reported "
            f"models ({', '.join(names) or 'none'})"
        )

    run = run or {}
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
        "report_pneumobatch_version": report_version(),
        "research_use_only": RESEARCH_ONLY,
        "inputs": {
            "predictions": str(predictions_csv),
            "labels": str(labels_csv) if labels_csv is not None else None,
            "run_json": str(run_path) if run else None,
            "studies_csv": str(studies_path) if studies_all is not None else None,
            "key": key,
            "label_column": o.label_column,
            "by": by,
            "n_bootstrap": o.n_bootstrap,
            "seed": o.seed,
            "target_recall": o.target_recall,
            "site": str(o.site) if o.site is not None else None,
            "cases": o.cases,
            "images": str(o.images) if o.images is not None else None,
        },
        "run": {
            "pneumobatch_version": run.get("pneumobatch_version"),
            "started": run.get("started"),
            "finished": run.get("finished"),
            "elapsed_s": elapsed_seconds(run),
            "roots": run.get("roots"),
            "device": run.get("device"),
            "images_per_second": run.get("images_per_second"),
            "counts": run.get("counts") or file_counts(preds),
            "counts_source": "run.json" if run.get("counts") else "predictions CSV",
        },
        "labelled": labels is not None,
        "models": [],
        "warnings": warnings,
    }
    if not run:
        warnings.append(f"{run_path.name} not found: run details derived from the CSV")

    if labels is not None:  # column problems are the same for every model: fail once, early
        key = detect_key(labels, preds, key)
        check_label_column(labels, o.label_column)
    failures: list[LabelError] = []
    for name in names:
        rows = preds[preds["model"] == name]
        info = card_from_run(run_models.get(name)) or describe_model(rows, run_models.get(name))
        prob_columns = info.prob_columns()
        ok = rows[rows["status"] == "ok"]
        if prob_columns and all(c in ok.columns for c in prob_columns):
            ok = ok[ok[prob_columns].notna().all(axis=1)]
            proba = ok[prob_columns].to_numpy(dtype=np.float64)
        else:
            proba = None
        section: dict[str, Any] = {
            "name": info.name,
            "task": info.task,
            "classes": list(info.classes),
            "positive": info.positive,
            "threshold": info.threshold,
            "weights_sha256": info.weights_sha256,
            "card_thresholds": info.operating_points(),
            "notes": threshold_notes(rows),
            "counts": file_counts(rows),
            "applicability": applicability_counts(ok),
            "summary": summarise(
                rows["status"].tolist(),
                rows["reason"].tolist(),
                ok["pred_label"].tolist() if "pred_label" in ok else [],
                proba,
                info.classes,
                positive=info.positive,
                threshold=info.threshold,
                images_per_second=run.get("images_per_second"),
                elapsed_s=elapsed_seconds(run),
            ),
            "join": None,
            "evaluation": None,
            "site_comparison": None,
            "study": None,
            "subgroups": {},
            "label_error": None,
            "cases": None,
            "figures": {},
        }
        tree = info.tree
        if tree is not None:
            section["fine"] = None  # two-level models only: filled in when labels join per image
        elif FINE_LABEL in ok.columns and (ok[FINE_LABEL].astype(str).str.strip() != "").any():
            section["notes"].append(
                f"the CSV has {FINE_LABEL} values but the model's card (run.json) has no hierarchy: "
                "fine level not evaluated"
            )
        doc["models"].append(section)
        studies = None
        if studies_all is not None:
            studies = studies_all
            if "model" in studies.columns and (studies["model"] != "").any():
                studies = studies[studies["model"] == name]
        if labels is None:
            for col in by:
                section["subgroups"][col] = _unlabelled_groups(ok, col, info.classes)
            if o.cases and proba is not None:
                section["cases"] = cases_section(ok, info, o.cases, predictions_csv.parent)
            continue
        try:
            join = join_labels(
                rows,
                labels,
                info,
                key=key,
                label_column=o.label_column,
                studies=studies,
                max_examples=o.max_examples,
            )
        except LabelError as e:  # nothing joined for this model; others may still join
            failures.append(e)
            section["label_error"] = str(e)
            continue
        section["join"] = join.summary()
        section["evaluation"] = _evaluate(join, info, o)
        if tree is not None and join.level == "file":
            section["fine"] = _fine(join, tree, o)
        elif tree is not None:
            section["notes"].append(f"fine level evaluated per image only: labels joined by {join.key}")
        if o.cases and join.level == "file":
            section["cases"] = cases_section(join.rows, info, o.cases, predictions_csv.parent)
        elif o.cases:
            section["cases"] = {"cases": [], "note": f"no cases to look at: labels joined by {join.key}, not per image"}
        own_site = site if site is not None and site["model"]["name"] == name else None
        if own_site is not None or info.site:
            bands = join.rows["age_band"] if "age_band" in join.rows.columns else pd.Series("", index=join.rows.index)
            section["site_comparison"] = compare_operating_points(
                join.y_true, join.proba, bands.fillna("").astype(str).to_numpy(), info, own_site
            )
        if join.level == "file":
            study_join = study_level(join, studies, rows, max_examples=o.max_examples)
            if study_join is not None:
                section["study"] = {
                    "source": "image labels",
                    "join": study_join.summary(),
                    "evaluation": _evaluate(study_join, info, o),
                }
        for col in by:
            section["subgroups"][col] = subgroup_metrics(
                _group_values(join.column(col)),
                join.y_true,
                join.proba,
                info.classes,
                y_pred=join.y_pred,
                **_settings(info, o),
            )
    if labels is not None and names and len(failures) == len(names):
        raise failures[0]
    return jsonable(doc)


def _settings(info: ModelCard, options: ReportOptions) -> dict[str, Any]:
    """:func:`~pneumobatch.evaluation.metrics.evaluate`'s keywords for this model and these options."""
    return {
        "positive": info.positive,
        "threshold": info.threshold,
        "target_recall": options.target_recall,
        "n_bootstrap": options.n_bootstrap,
        "seed": options.seed,
    }


def _evaluate(join: JoinResult, info: ModelCard, options: ReportOptions) -> dict[str, Any]:
    return evaluate(
        join.y_true,
        join.proba,
        info.classes,
        y_pred=join.y_pred,
        card_thresholds=info.operating_points(),
        **_settings(info, options),
    )


def _fine(join: JoinResult, tree: Hierarchy, options: ReportOptions) -> dict[str, Any]:
    """The fine level of a two-level model's image-level join: the report's ``fine`` section."""
    fine = fine_join(join, tree, options.max_examples)
    metrics = fine_level(
        fine.truth, fine.pred, fine.top, fine.classes, n_bootstrap=options.n_bootstrap, seed=options.seed
    )
    parent = dict(zip(fine.classes, fine.parents))
    for row in metrics["per_class"]:
        row["parent"] = parent[row["class"]]
    return {
        "classes": fine.classes,
        "parents": fine.parents,
        "model_classes": list(tree.fine),
        "rule": tree.rule,
        **metrics,
        "problems": {name: p.to_dict() for name, p in fine.problems.items()},
        "notes": fine.notes,
    }
