"""Classification metrics of labelled predictions, per subgroup, and a summary for unlabelled ones.

Every metric with a scikit-learn implementation comes from scikit-learn. What is
computed by hand is only what scikit-learn lacks: specificity and NPV (read off its
confusion matrices), the reliability binning (:mod:`.calibration`) and the bootstrap
(:mod:`.bootstrap`).

All results are plain dicts of str, int, float, None and lists, ready for
``json.dumps``. Undefined values (the AUC of a class absent from the labels, the
precision of a class never predicted) are ``None`` and come with a note.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    multilabel_confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from pneumobatch.core.card import TARGET_RECALL, decide_indices, is_positive
from pneumobatch.evaluation.metrics.bootstrap import BootstrapAUC, bootstrap_draws, percentile_ci, row_counts
from pneumobatch.evaluation.metrics.calibration import reliability
from pneumobatch.evaluation.metrics.common import as_indices, finite_or_none, jsonable, ratio, thin
from pneumobatch.evaluation.metrics.operating_points import threshold_points

# -------------------------------------------------------------------------- evaluate


def evaluate(
    y_true: Sequence[str],
    proba: np.ndarray,
    classes: Sequence[str],
    *,
    y_pred: Optional[Sequence[str]] = None,
    positive: Optional[str] = None,
    threshold: Optional[float] = None,
    card_thresholds: Optional[Mapping[str, float]] = None,
    target_recall: float = TARGET_RECALL,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
    n_bins: int = 10,
    log_offsets: Optional[Sequence[float]] = None,
) -> dict[str, Any]:
    """All metrics of labelled predictions, as a JSON-ready dict.

    ``y_true`` and ``y_pred`` hold class names; ``proba`` is (n, len(classes)) in the
    order of ``classes``. For a binary task give ``positive`` (and the shipped
    ``threshold``): ROC, PR and calibration are then reported for the positive class,
    and operating points are added (shipped threshold, highest threshold with
    sensitivity >= ``target_recall`` on these data, Youden's J, and any
    ``card_thresholds``; see :mod:`.operating_points`).
    Without ``y_pred`` the prediction is the threshold rule (binary) or the argmax.
    """
    classes = [str(c) for c in classes]
    k = len(classes)
    proba = np.asarray(proba, dtype=np.float64).reshape(-1, k)
    n = proba.shape[0]
    if len(y_true) != n:
        raise ValueError(f"{len(y_true)} labels but {n} probability rows")
    if n == 0:
        raise ValueError("no labelled predictions to evaluate")
    if positive is not None and positive not in classes:
        raise ValueError(f"positive class {positive!r} is not one of {classes}")
    binary = k == 2 and positive is not None
    pos_idx = classes.index(positive) if binary else None
    yt = as_indices(list(y_true), classes, "y_true")
    if y_pred is not None:
        yp = as_indices(list(y_pred), classes, "y_pred")
    else:
        yp = decide_indices(proba, classes, positive if binary else None, threshold, log_offsets)
    labels = list(range(k))
    notes: list[str] = []

    support = np.bincount(yt, minlength=k)
    absent = [classes[i] for i in range(k) if support[i] == 0]
    if absent:
        notes.append(f"no labelled samples of {', '.join(absent)}: their recall and AUC are undefined")

    # ---- per-class and averaged classification metrics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        prec, rec, f1, sup = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=np.nan)
        averages = {}
        for avg in ("macro", "weighted"):
            p, r, f, _ = precision_recall_fscore_support(yt, yp, labels=labels, average=avg, zero_division=np.nan)
            averages[avg] = {"precision": finite_or_none(p), "recall": finite_or_none(r), "f1": finite_or_none(f)}
        balanced = balanced_accuracy_score(yt, yp)
    mcm = multilabel_confusion_matrix(yt, yp, labels=labels)  # [[tn, fp], [fn, tp]]
    spec = [ratio(m[0, 0], m[0, 0] + m[0, 1]) for m in mcm]
    defined_spec = [s for s in spec if s is not None]
    averages["macro"]["specificity"] = finite_or_none(np.mean(defined_spec)) if defined_spec else None
    weights = support / support.sum()
    averages["weighted"]["specificity"] = finite_or_none(sum(w * s for w, s in zip(weights, spec) if s is not None))
    per_class = [
        {
            "class": classes[i],
            "support": int(sup[i]),
            "n_predicted": int((yp == i).sum()),
            "precision": finite_or_none(prec[i]),
            "recall": finite_or_none(rec[i]),
            "sensitivity": finite_or_none(rec[i]),
            "specificity": spec[i],
            "f1": finite_or_none(f1[i]),
        }
        for i in range(k)
    ]
    cm = confusion_matrix(yt, yp, labels=labels)
    row = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cm_norm = np.where(row > 0, cm / np.where(row > 0, row, 1), np.nan)

    # ---- ROC, PR, bootstrap
    curve_classes = [pos_idx] if binary else labels
    roc: dict[str, Any] = {}
    pr: dict[str, Any] = {}
    aucs: dict[int, BootstrapAUC] = {}
    for i in curve_classes:
        name = classes[i]
        y_i = yt == i
        s_i = proba[:, i]
        if y_i.all() or not y_i.any():
            why = "no positive" if not y_i.any() else "no negative"
            roc[name] = {"auc": None, "auc_ci": None, "note": f"{why} samples: AUC undefined"}
            pr[name] = {
                "average_precision": None,
                "prevalence": finite_or_none(y_i.mean()),
                "note": f"{why} samples: precision-recall undefined",
            }
            continue
        fpr, tpr, thr = roc_curve(y_i, s_i)
        fpr_l, tpr_l, thr_l = thin(fpr, tpr, thr)
        roc[name] = {
            "auc": finite_or_none(roc_auc_score(y_i, s_i)),
            "auc_ci": None,
            "fpr": fpr_l,
            "tpr": tpr_l,
            "thresholds": thr_l,
            "note": "",
        }
        precision, recall, _ = precision_recall_curve(y_i, s_i, drop_intermediate=True)
        p_l, r_l = thin(precision, recall)
        pr[name] = {
            "average_precision": finite_or_none(average_precision_score(y_i, s_i)),
            "prevalence": finite_or_none(y_i.mean()),
            "precision": p_l,
            "recall": r_l,
            "note": "",
        }
        aucs[i] = BootstrapAUC(y_i, s_i)
    defined = [roc[classes[i]]["auc"] for i in curve_classes if roc[classes[i]]["auc"] is not None]
    macro_auc = finite_or_none(np.mean(defined)) if defined else None

    # ---- operating points (binary)
    points: list[dict[str, Any]] = []
    if binary:
        y_pos = yt == pos_idx
        shipped = 0.5 if threshold is None else float(threshold)
        if threshold is None:
            notes.append("no shipped threshold recorded: 0.5 used")
        points, op_notes = threshold_points(
            y_pos, proba[:, pos_idx], shipped, dict(card_thresholds or {}), target_recall
        )
        notes.extend(op_notes)

    # ---- bootstrap: AUC per class, macro AUC, sensitivity/specificity at each point
    bootstrap = {"n_resamples": int(n_bootstrap), "seed": int(seed), "level": ci_level}
    if n_bootstrap > 0 and (aucs or points):
        auc_samples: dict[int, list[np.ndarray]] = {i: [] for i in aucs}
        op_samples: list[tuple[list, list]] = [([], []) for _ in points]
        if binary and points:
            # per case and point: whether the point classifies it correctly (the card's rule)
            y_pos = yt == pos_idx
            right = [is_positive(proba[:, pos_idx], p["threshold"]) == y_pos for p in points]
        for draws in bootstrap_draws(n, n_bootstrap, seed):
            for i, fn in aucs.items():
                auc_samples[i].append(fn(draws))
            if binary and points:
                n_pos = row_counts(draws, y_pos.astype(np.int64), 2).astype(np.float64)
                for r, (s_list, sp_list) in zip(right, op_samples):
                    c = row_counts(draws, 2 * r.astype(np.int64) + y_pos, 4)  # (b, [fp, fn, tn, tp])
                    with np.errstate(invalid="ignore", divide="ignore"):
                        s_list.append(c[:, 3] / n_pos[:, 1])
                        sp_list.append(c[:, 2] / n_pos[:, 0])
        per_class_boot = {i: np.concatenate(v) for i, v in auc_samples.items()}
        for i, samples in per_class_boot.items():
            ci, valid = percentile_ci(samples, ci_level)
            roc[classes[i]]["auc_ci"] = ci
            roc[classes[i]]["n_bootstrap_valid"] = valid
        if per_class_boot:
            stacked = np.vstack(list(per_class_boot.values()))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples
                macro_samples = np.nanmean(stacked, axis=0)
            macro_ci, _ = percentile_ci(macro_samples, ci_level)
        else:
            macro_ci = None
        for p, (s_list, sp_list) in zip(points, op_samples):
            p["sensitivity_ci"], _ = percentile_ci(np.concatenate(s_list), ci_level)
            p["specificity_ci"], _ = percentile_ci(np.concatenate(sp_list), ci_level)
    else:
        macro_ci = None
        if n_bootstrap <= 0:
            notes.append("bootstrap disabled: no confidence intervals")

    # ---- calibration
    calibration: dict[str, Any] = {"n_bins": n_bins, "strategy": "uniform", "classes": {}}
    for i in curve_classes:
        calibration["classes"][classes[i]] = reliability(yt == i, proba[:, i], n_bins)
    if not binary:
        conf = proba.max(axis=1)
        top = reliability(proba.argmax(axis=1) == yt, conf, n_bins)
        top.pop("brier")
        calibration["top_label"] = top
    # rows of a CSV with rounded probabilities sum to one only approximately
    sums = proba.sum(axis=1, keepdims=True)
    deviation = float(np.abs(sums - 1.0).max())
    if deviation > 0.01:
        notes.append(
            f"probabilities of a row do not sum to one (up to {deviation:.3f} off): "
            "multiclass Brier score and log loss use rows rescaled to sum to one"
        )
    unit = np.clip(proba, 0.0, None) / np.where(sums > 0, sums, 1.0)
    if not binary:
        calibration["brier_multiclass"] = finite_or_none(brier_score_loss(yt, unit, labels=labels))
    calibration["log_loss"] = finite_or_none(log_loss(yt, np.clip(unit, 1e-15, 1.0), labels=labels))

    return jsonable(
        {
            "n": n,
            "classes": classes,
            "positive": positive if binary else None,
            "threshold": threshold if binary else None,
            "class_counts": {classes[i]: int(support[i]) for i in range(k)},
            "accuracy": accuracy_score(yt, yp),
            "balanced_accuracy": balanced,
            "per_class": per_class,
            "macro_avg": averages["macro"],
            "weighted_avg": averages["weighted"],
            "confusion_matrix": {"labels": classes, "counts": cm, "row_normalised": cm_norm},
            "roc": roc,
            "macro_auc": macro_auc,
            "macro_auc_ci": macro_ci,
            "pr": pr,
            "operating_points": points,
            "calibration": calibration,
            "bootstrap": bootstrap,
            "notes": notes,
        }
    )


# ------------------------------------------------------------------------- subgroups


#: A subgroup's AUC needs at least this many images of two classes; its sensitivity
#: (specificity) this many positives (negatives). Below, the number is left out and a
#: note says why: a figure from 3 images is noise, not a finding.
MIN_PER_CLASS = 5


def blank_unsupported(row: dict[str, Any], positive: Optional[str], minimum: int) -> None:
    """Blank a subgroup row's AUC, sensitivity and specificity where too few images back them."""
    counts = row["class_counts"]
    notes = list(row.get("notes") or [])
    if sum(1 for n in counts.values() if n >= minimum) < 2 and row.get("auc") is not None:
        row["auc"], row["auc_ci"] = None, None
        notes.append(f"too few images for an AUC (fewer than {minimum} of two classes)")
    if positive is not None:
        n_pos = counts.get(positive, 0)
        n_neg = sum(counts.values()) - n_pos
        if n_pos < minimum and row.get("sensitivity") is not None:
            row["sensitivity"] = None
            notes.append(f"too few positives for a sensitivity ({n_pos} < {minimum})")
        if n_neg < minimum and row.get("specificity") is not None:
            row["specificity"] = None
            notes.append(f"too few negatives for a specificity ({n_neg} < {minimum})")
    row["notes"] = notes


def subgroup_metrics(
    groups: Sequence[str],
    y_true: Sequence[str],
    proba: np.ndarray,
    classes: Sequence[str],
    *,
    y_pred: Optional[Sequence[str]] = None,
    max_groups: int = 30,
    small_n: int = 30,
    min_per_class: int = MIN_PER_CLASS,
    **options: Any,
) -> dict[str, Any]:
    """n, AUC (with CI) and sensitivity/specificity at the shipped threshold per group.

    ``options`` are :func:`evaluate`'s keywords (``positive``, ``threshold``,
    ``n_bootstrap``, ``seed`` ...), applied to each group. For multiclass tasks the AUC
    is the macro one-vs-rest AUC and the accuracy and balanced accuracy replace
    sensitivity and specificity. Groups are sorted by size; beyond ``max_groups`` they
    are counted, not evaluated.
    """
    positive = options.get("positive")
    groups = np.asarray([str(g) for g in groups], dtype=object)
    y_true = np.asarray(list(y_true), dtype=object)
    y_pred_arr = None if y_pred is None else np.asarray(list(y_pred), dtype=object)
    proba = np.asarray(proba, dtype=np.float64)
    values, counts = np.unique(groups, return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-counts[i], str(values[i])))
    rows = []
    for i in order[:max_groups]:
        mask = groups == values[i]
        res = evaluate(
            list(y_true[mask]),
            proba[mask],
            classes,
            y_pred=None if y_pred_arr is None else list(y_pred_arr[mask]),
            **options,
        )
        row: dict[str, Any] = {
            "value": str(values[i]),
            "n": int(mask.sum()),
            "class_counts": res["class_counts"],
            "accuracy": res["accuracy"],
            "balanced_accuracy": res["balanced_accuracy"],
            "auc": res["macro_auc"],
            "auc_ci": res["macro_auc_ci"],
            "small": bool(mask.sum() < small_n),
            "notes": res["notes"],
        }
        if positive is not None and res["operating_points"]:
            shipped = res["operating_points"][0]
            row.update(
                n_positive=res["class_counts"][positive],
                sensitivity=shipped["sensitivity"],
                specificity=shipped["specificity"],
                ppv=shipped["ppv"],
                npv=shipped["npv"],
            )
        blank_unsupported(row, positive, min_per_class)
        rows.append(row)
    omitted = len(values) - len(rows)
    return jsonable(
        {
            "groups": rows,
            "n_groups": int(len(values)),
            "omitted_groups": int(omitted),
            "omitted_n": int(sum(counts[i] for i in order[max_groups:])),
        }
    )


# ------------------------------------------------------------------- model card


def card_metrics(
    proba: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    positive: Optional[str],
    threshold: Optional[float],
    log_offsets: Optional[Sequence[float]] = None,
) -> dict[str, Any]:
    """The model card's compact metrics, read off :func:`evaluate` (no bootstrap).

    ``targets`` are class indices. Keys: ``n``, ``support``; binary: ``auc`` (both
    classes present), ``sensitivity`` and ``specificity`` at ``threshold`` (where
    defined); multiclass: ``auc_per_class`` and their mean ``auc`` over the classes
    present; then ``accuracy``, ``balanced_accuracy`` (two classes or more present) and
    ``recall_per_class`` (classes present).
    """
    classes = [str(c) for c in classes]
    targets = np.asarray(targets, dtype=np.int64)
    binary = len(classes) == 2
    pos = classes.index(positive) if binary and positive in classes else 1
    res = evaluate(
        [classes[i] for i in targets],
        proba,
        classes,
        positive=classes[pos] if binary else None,
        threshold=threshold,
        n_bootstrap=0,
        log_offsets=log_offsets,
    )
    support = res["class_counts"]
    present = [c for c in classes if support[c]]
    out: dict[str, Any] = {"n": res["n"], "support": support}
    if binary:
        if len(present) == 2:
            out["auc"] = res["roc"][classes[pos]]["auc"]
        shipped = res["operating_points"][0]
        if support[classes[pos]]:
            out["sensitivity"] = shipped["sensitivity"]
        if support[classes[1 - pos]]:
            out["specificity"] = shipped["specificity"]
    else:
        aucs = {c: r["auc"] for c, r in res["roc"].items() if r["auc"] is not None}
        out["auc_per_class"] = aucs
        if aucs:
            out["auc"] = res["macro_auc"]
    out["accuracy"] = res["accuracy"]
    if len(present) > 1:
        out["balanced_accuracy"] = res["balanced_accuracy"]
    out["recall_per_class"] = {r["class"]: r["recall"] for r in res["per_class"] if support[r["class"]]}
    return out


# ------------------------------------------------------------------- summary only


def summarise(
    statuses: Sequence[str],
    reasons: Sequence[str],
    pred_labels: Sequence[str],
    proba: Optional[np.ndarray],
    classes: Sequence[str],
    *,
    positive: Optional[str] = None,
    threshold: Optional[float] = None,
    images_per_second: Optional[float] = None,
    elapsed_s: Optional[float] = None,
    n_bins: int = 20,
) -> dict[str, Any]:
    """What can be said without labels: outcomes, predicted classes, probabilities.

    ``statuses``/``reasons`` cover every file row; ``pred_labels`` and ``proba`` only
    the predicted (``ok``) ones. For a binary task the histogram is of the positive
    class probability, otherwise one histogram per class.
    """
    classes = [str(c) for c in classes]
    statuses = [str(s) for s in statuses]
    reasons = [str(r) if r is not None else "" for r in reasons]
    status_counts: dict[str, int] = {}
    reason_counts: dict[str, dict[str, int]] = {}
    for status, reason in zip(statuses, reasons):
        status_counts[status] = status_counts.get(status, 0) + 1
        if status != "ok":
            bucket = reason_counts.setdefault(status, {})
            key = reason or "(none given)"
            bucket[key] = bucket.get(key, 0) + 1
    pred_counts = {c: 0 for c in classes}
    for label in pred_labels:
        label = str(label) if label is not None else ""
        pred_counts[label or "(empty)"] = pred_counts.get(label or "(empty)", 0) + 1
    n_pred = sum(pred_counts.values())
    out: dict[str, Any] = {
        "n_rows": len(statuses),
        "status_counts": status_counts,
        "reason_counts": {s: dict(sorted(r.items(), key=lambda kv: -kv[1])) for s, r in reason_counts.items()},
        "prediction_counts": pred_counts,
        "prediction_fractions": {c: ratio(v, n_pred) for c, v in pred_counts.items()},
        "threshold": threshold,
        "positive": positive,
        "images_per_second": images_per_second,
        "elapsed_s": elapsed_s,
    }
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    hist: dict[str, Any] = {"edges": edges, "counts": {}}
    means: dict[str, Any] = {}
    if proba is not None and len(classes):
        proba = np.asarray(proba, dtype=np.float64).reshape(-1, len(classes))
        shown = [classes.index(positive)] if positive in classes else range(len(classes))
        for i in shown:
            col = proba[:, i]
            col = col[np.isfinite(col)]
            hist["counts"][classes[i]] = np.histogram(np.clip(col, 0, 1), bins=edges)[0]
        for i, cls in enumerate(classes):
            col = proba[:, i][np.isfinite(proba[:, i])]
            means[cls] = float(col.mean()) if col.size else None
        if positive in classes and threshold is not None:
            col = proba[:, classes.index(positive)]
            out["near_threshold"] = int((np.abs(col - threshold) < 0.05).sum())
    out["probability_histogram"] = hist
    out["mean_probability"] = means
    return jsonable(out)
