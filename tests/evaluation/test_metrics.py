"""Tests for pneumobatch.evaluation.metrics: hand-checked small cases, edge cases, bootstrap, speed."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumobatch.core.errors import OptionError
from pneumobatch.evaluation.metrics import (
    BootstrapAUC,
    bootstrap_draws,
    evaluate,
    operating_point,
    subgroup_metrics,
    summarise,
)

BINARY = ["normal", "pneumonia"]
ETIOLOGY = ["normal", "bacterial", "viral", "covid-19"]


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-12)


@pytest.fixture
def six() -> dict:
    """Three positives (0.9, 0.8, 0.4) and three negatives (0.6, 0.2, 0.1); threshold 0.5.

    By hand: TP 2, FN 1 (0.4), FP 1 (0.6), TN 2. AUC: positive-negative pairs ranked
    right = 3 + 3 + 2 of 9 = 8/9. AP: recall steps of 1/3 at precision 1, 1, 3/4 = 11/12.
    Brier: (.01 + .04 + .36 + .36 + .04 + .01) / 6. ECE (one case per bin): mean |y - p| = 0.3.
    """
    y = ["pneumonia"] * 3 + ["normal"] * 3
    p = np.array([0.9, 0.8, 0.4, 0.6, 0.2, 0.1])
    return evaluate(y, np.c_[1 - p, p], BINARY, positive="pneumonia", threshold=0.5, n_bootstrap=200, seed=1)


def test_binary_hand_checked_counts_and_rates(six):
    pneu, normal = six["per_class"][1], six["per_class"][0]
    assert pneu["class"] == "pneumonia" and pneu["support"] == 3 and pneu["n_predicted"] == 3
    for key in ("precision", "recall", "sensitivity", "specificity", "f1"):
        assert pneu[key] == approx(2 / 3), key
        assert normal[key] == approx(2 / 3), key
    assert six["accuracy"] == approx(4 / 6)
    assert six["balanced_accuracy"] == approx(2 / 3)
    assert six["confusion_matrix"]["counts"] == [[2, 1], [1, 2]]
    assert six["confusion_matrix"]["row_normalised"][0] == [approx(2 / 3), approx(1 / 3)]


def test_binary_hand_checked_auc_ap_calibration(six):
    assert list(six["roc"]) == ["pneumonia"]  # binary: the positive class only
    assert six["roc"]["pneumonia"]["auc"] == approx(8 / 9)
    assert six["macro_auc"] == approx(8 / 9)
    assert six["pr"]["pneumonia"]["average_precision"] == approx(11 / 12)
    assert six["pr"]["pneumonia"]["prevalence"] == approx(0.5)
    cal = six["calibration"]["classes"]["pneumonia"]
    assert cal["brier"] == approx(0.82 / 6)
    assert cal["ece"] == approx(0.3)
    assert sum(b["count"] for b in cal["bins"]) == 6


def test_binary_hand_checked_operating_points(six):
    points = {p["name"]: p for p in six["operating_points"]}
    shipped = points["shipped"]
    assert (shipped["tp"], shipped["fp"], shipped["tn"], shipped["fn"]) == (2, 1, 2, 1)
    for key in ("sensitivity", "specificity", "ppv", "npv", "f1"):
        assert shipped[key] == approx(2 / 3)
    r95 = points["recall_target"]  # all three positives needed: threshold = lowest positive score
    assert r95["threshold"] == approx(0.4)
    assert (r95["tp"], r95["fp"], r95["tn"], r95["fn"]) == (3, 1, 2, 0)
    assert r95["sensitivity"] == 1.0 and r95["specificity"] == approx(2 / 3)
    assert r95["ppv"] == approx(3 / 4) and r95["npv"] == 1.0
    youden = points["youden"]  # J = 2/3 first reached at 0.8 (sens 2/3, spec 1)
    assert youden["threshold"] == approx(0.8)
    assert youden["sensitivity"] == approx(2 / 3) and youden["specificity"] == 1.0


def test_multiclass_hand_checked():
    """y_pred by hand: normal TP1 FN1; bacterial TP1 FP1; viral TP1 FP1; covid TP1 FN1."""
    y_true = ["normal", "normal", "bacterial", "viral", "covid-19", "covid-19"]
    y_pred = ["normal", "bacterial", "bacterial", "viral", "viral", "covid-19"]
    proba = np.full((6, 4), 0.1)
    proba[np.arange(6), [ETIOLOGY.index(c) for c in y_pred]] = 0.7
    res = evaluate(y_true, proba, ETIOLOGY, n_bootstrap=0)  # y_pred derived by argmax
    per = {r["class"]: r for r in res["per_class"]}
    assert [per[c]["precision"] for c in ETIOLOGY] == [1.0, 0.5, 0.5, 1.0]
    assert [per[c]["recall"] for c in ETIOLOGY] == [0.5, 1.0, 1.0, 0.5]
    assert [per[c]["specificity"] for c in ETIOLOGY] == [1.0, 0.8, 0.8, 1.0]
    assert res["accuracy"] == approx(4 / 6)
    assert res["balanced_accuracy"] == approx(0.75)
    assert res["macro_avg"]["specificity"] == approx(0.9)
    # normal vs rest: positives 0.7, 0.1; negatives all 0.1 -> (4 wins + 4 ties / 2) / 8
    assert res["roc"]["normal"]["auc"] == approx(0.75)
    assert set(res["roc"]) == set(ETIOLOGY)
    assert res["operating_points"] == []
    assert "top_label" in res["calibration"] and res["calibration"]["brier_multiclass"] is not None
    assert res["roc"]["normal"]["auc_ci"] is None
    assert any("bootstrap disabled" in n for n in res["notes"])


def test_perfect_predictor():
    y = np.array(["normal", "pneumonia"] * 50)
    p = (y == "pneumonia").astype(float)
    res = evaluate(y, np.c_[1 - p, p], BINARY, positive="pneumonia", threshold=0.5, n_bootstrap=100)
    assert res["roc"]["pneumonia"]["auc"] == 1.0
    assert res["roc"]["pneumonia"]["auc_ci"] == [1.0, 1.0]
    assert res["accuracy"] == 1.0 and res["balanced_accuracy"] == 1.0
    assert res["pr"]["pneumonia"]["average_precision"] == 1.0
    cal = res["calibration"]["classes"]["pneumonia"]
    assert cal["ece"] == pytest.approx(0.0, abs=1e-12) and cal["brier"] == 0.0


def test_random_predictor_large_n():
    rng = np.random.default_rng(42)
    n = 20_000
    y = rng.choice(BINARY, n)
    p = rng.random(n)
    res = evaluate(y, np.c_[1 - p, p], BINARY, positive="pneumonia", threshold=0.5, n_bootstrap=200)
    auc = res["roc"]["pneumonia"]["auc"]
    assert abs(auc - 0.5) < 0.02
    lo, hi = res["roc"]["pneumonia"]["auc_ci"]
    assert lo < auc < hi and hi - lo < 0.04
    # labels ignore p, so the observed fraction is 0.5 in every bin: ECE ~ mean |p - 0.5| = 0.25
    assert res["calibration"]["classes"]["pneumonia"]["ece"] == pytest.approx(0.25, abs=0.02)


def test_recall_target_point_is_the_highest_threshold_reaching_095():
    rng = np.random.default_rng(3)
    n = 2_000
    y = rng.integers(0, 2, n).astype(bool)
    score = np.clip(0.35 * y + rng.normal(0.35, 0.2, n), 0, 1).round(3)  # ties on purpose
    labels = np.where(y, "pneumonia", "normal")
    res = evaluate(labels, np.c_[1 - score, score], BINARY, positive="pneumonia", threshold=0.5, n_bootstrap=0)
    point = next(p for p in res["operating_points"] if p["name"] == "recall_target")
    assert point["sensitivity"] >= 0.95
    above = operating_point(y, score, np.nextafter(point["threshold"], 2.0), "above")
    assert above["sensitivity"] < 0.95
    # counts agree with a direct computation
    pred = score >= point["threshold"]
    assert point["tp"] == int((pred & y).sum()) and point["fp"] == int((pred & ~y).sum())


def test_class_absent_from_labels_gives_none_and_note():
    y = ["normal", "bacterial", "viral", "normal", "viral", "bacterial"]  # no covid-19
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(4), size=6)
    res = evaluate(y, proba, ETIOLOGY, n_bootstrap=50)
    assert res["roc"]["covid-19"]["auc"] is None and "AUC undefined" in res["roc"]["covid-19"]["note"]
    assert res["pr"]["covid-19"]["average_precision"] is None
    per = {r["class"]: r for r in res["per_class"]}
    assert per["covid-19"]["recall"] is None and per["covid-19"]["support"] == 0
    assert any("covid-19" in n for n in res["notes"])
    defined = [res["roc"][c]["auc"] for c in ETIOLOGY[:3]]
    assert res["macro_auc"] == approx(float(np.mean(defined)))
    json.dumps(res, allow_nan=False)


def test_single_class_binary_does_not_crash():
    y = ["pneumonia"] * 5
    p = np.array([0.9, 0.7, 0.4, 0.6, 0.8])
    res = evaluate(y, np.c_[1 - p, p], BINARY, positive="pneumonia", threshold=0.5, n_bootstrap=50)
    assert res["roc"]["pneumonia"]["auc"] is None
    assert [pt["name"] for pt in res["operating_points"]] == ["shipped"]
    assert res["operating_points"][0]["sensitivity"] == approx(4 / 5)
    assert res["operating_points"][0]["specificity"] is None
    json.dumps(res, allow_nan=False)


def test_card_thresholds_and_given_predictions():
    y = ["pneumonia", "normal", "pneumonia", "normal"]
    p = np.array([0.7, 0.3, 0.2, 0.1])
    res = evaluate(
        y,
        np.c_[1 - p, p],
        BINARY,
        y_pred=["pneumonia", "pneumonia", "normal", "normal"],
        positive="pneumonia",
        threshold=0.5,
        card_thresholds={"recall_95": 0.15},
        n_bootstrap=0,
    )
    assert res["per_class"][1]["n_predicted"] == 2  # the given pred_label, not the threshold rule
    card = next(pt for pt in res["operating_points"] if pt["name"] == "card_recall_95")
    assert card["threshold"] == 0.15 and card["sensitivity"] == 1.0 and card["specificity"] == 0.5


def test_bootstrap_auc_matches_sklearn_per_resample():
    rng = np.random.default_rng(7)
    for n, decimals in ((300, 2), (300, None), (9, 1)):
        y = rng.integers(0, 2, n)
        s = rng.random(n)
        s = s.round(decimals) if decimals else s
        draws = next(bootstrap_draws(n, 25, seed=0))
        fast = BootstrapAUC(y, s)(draws)
        for row, value in zip(draws, fast):
            if 0 < y[row].sum() < n:
                assert value == pytest.approx(roc_auc_score(y[row], s[row]), abs=1e-12)
            else:
                assert math.isnan(value)


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(1)
    y = rng.choice(BINARY, 500)
    p = rng.random(500)
    a = evaluate(y, np.c_[1 - p, p], BINARY, positive="pneumonia", n_bootstrap=100, seed=5)
    b = evaluate(y, np.c_[1 - p, p], BINARY, positive="pneumonia", n_bootstrap=100, seed=5)
    c = evaluate(y, np.c_[1 - p, p], BINARY, positive="pneumonia", n_bootstrap=100, seed=6)
    assert a["roc"]["pneumonia"]["auc_ci"] == b["roc"]["pneumonia"]["auc_ci"]
    assert a["roc"]["pneumonia"]["auc_ci"] != c["roc"]["pneumonia"]["auc_ci"]
    assert a["operating_points"][0]["sensitivity_ci"] == b["operating_points"][0]["sensitivity_ci"]


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="not one of"):
        evaluate(["flu"], np.array([[0.5, 0.5]]), BINARY)
    with pytest.raises(ValueError, match="no labelled"):
        evaluate([], np.zeros((0, 2)), BINARY)


def test_subgroups():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.choice(BINARY, n)
    p = np.clip((y == "pneumonia") * 0.3 + rng.random(n) * 0.7, 0, 1)
    groups = np.where(np.arange(n) < 280, "PA", "AP")
    res = subgroup_metrics(groups, y, np.c_[1 - p, p], BINARY, positive="pneumonia", threshold=0.5, n_bootstrap=50)
    assert [g["value"] for g in res["groups"]] == ["PA", "AP"]
    pa, ap = res["groups"]
    assert pa["n"] == 280 and not pa["small"] and ap["n"] == 20 and ap["small"]
    mask = groups == "PA"
    assert pa["auc"] == approx(roc_auc_score(y[mask] == "pneumonia", p[mask]))
    assert {"sensitivity", "specificity", "n_positive"} <= set(pa)
    capped = subgroup_metrics(
        np.arange(n) % 40, y, np.c_[1 - p, p], BINARY, positive="pneumonia", n_bootstrap=0, max_groups=5
    )
    assert len(capped["groups"]) == 5 and capped["omitted_groups"] == 35


def test_summarise_without_labels():
    res = summarise(
        ["ok", "ok", "ok", "skipped", "error", "skipped"],
        ["", "", "", "lateral", "corrupt", "not-image"],
        ["normal", "pneumonia", "pneumonia"],
        np.array([[0.8, 0.2], [0.3, 0.7], [0.47, 0.53]]),
        BINARY,
        positive="pneumonia",
        threshold=0.5,
        images_per_second=12.5,
    )
    assert res["status_counts"] == {"ok": 3, "skipped": 2, "error": 1}
    assert res["reason_counts"] == {"skipped": {"lateral": 1, "not-image": 1}, "error": {"corrupt": 1}}
    assert res["prediction_counts"] == {"normal": 1, "pneumonia": 2}
    assert res["prediction_fractions"]["pneumonia"] == approx(2 / 3)
    assert list(res["probability_histogram"]["counts"]) == ["pneumonia"]
    assert sum(res["probability_histogram"]["counts"]["pneumonia"]) == 3
    assert res["near_threshold"] == 1 and res["images_per_second"] == 12.5
    assert res["mean_probability"]["normal"] == approx((0.8 + 0.3 + 0.47) / 3)
    json.dumps(res, allow_nan=False)


def test_ten_thousand_predictions_evaluate_in_seconds():
    rng = np.random.default_rng(0)
    n = 10_000
    y = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += 1.5
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    start = time.perf_counter()
    res = evaluate([ETIOLOGY[i] for i in y], proba.round(4), ETIOLOGY, n_bootstrap=1000)
    seconds = time.perf_counter() - start
    print(f"\n10,000 x 4 classes, 1,000 bootstrap resamples: {seconds:.2f} s")
    assert all(res["roc"][c]["auc_ci"] is not None for c in ETIOLOGY)
    assert len(json.dumps(res)) < 2_000_000  # curves are thinned
    assert seconds < 30  # generous: shared machine


@pytest.mark.parametrize("target", [0.8, 0.95, 1.0])
def test_card_and_report_choose_thresholds_by_one_rule(target):
    """The thresholds training writes into the card are the report's recall_target and youden points."""
    from pneumobatch.evaluation.metrics import select_threshold

    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 500).astype(bool)
    score = np.clip(0.3 * y + rng.normal(0.35, 0.2, 500), 0, 1).round(2)  # ties on purpose
    labels = np.where(y, "pneumonia", "normal")
    res = evaluate(
        labels,
        np.c_[1 - score, score],
        BINARY,
        positive="pneumonia",
        threshold=0.5,
        target_recall=target,
        n_bootstrap=0,
    )
    points = {p["name"]: p for p in res["operating_points"]}
    card = select_threshold(y, score, target)
    for name in ("recall_target", "youden"):
        assert card[name] == points[name]["threshold"]
        assert card[f"{name}_sensitivity"] == approx(points[name]["sensitivity"])
        assert card[f"{name}_specificity"] == approx(points[name]["specificity"])
    assert points["recall_target"]["sensitivity"] >= target
    # highest such threshold: the next distinct score above it misses the target
    above = score[score > card["recall_target"]]
    if above.size:
        assert operating_point(y, score, above.min(), "above")["sensitivity"] < target


def test_fit_temperature_recovers_the_scale_of_overconfident_logits():
    """Labels drawn from softmax(z): logits 3z are fitted with T about 3, numpy in, no torch."""
    from pneumobatch.evaluation.metrics import fit_temperature, temperature_nll

    rng = np.random.default_rng(5)
    z = rng.normal(0, 2, size=(4000, 3))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    t = fit_temperature(3 * z, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert temperature_nll(3 * z, y, t) <= min(temperature_nll(3 * z, y, t * f) for f in (0.98, 1.02))


def test_each_age_band_can_aim_at_its_own_sensitivity():
    from pneumobatch.core.subgroups import parse_band_targets
    from pneumobatch.evaluation.metrics import band_thresholds

    rng = np.random.default_rng(0)
    y = np.tile([True, False], 200)
    scores = np.clip(np.where(y, 0.65, 0.35) + rng.normal(0, 0.15, len(y)), 0, 1)
    bands = np.repeat(["child", "adult"], 200)
    points = band_thresholds(y, scores, bands, 0.95, band_targets=parse_band_targets(["adult=0.90"]))
    assert points["child"]["target_recall"] == 0.95 and points["adult"]["target_recall"] == 0.90
    for band, target in (("child", 0.95), ("adult", 0.90)):
        m = bands == band
        sensitivity = (scores[m & y] >= points[band]["recall_target"]).mean()
        assert target <= sensitivity < target + 0.03  # the highest threshold that reaches the band's own target
    assert points["adult"]["recall_target"] > band_thresholds(y, scores, bands, 0.95)["adult"]["recall_target"]
    with pytest.raises(OptionError, match="child=R or adult=R"):
        parse_band_targets(["elderly=0.9"])
    with pytest.raises(OptionError, match="between 0.5 and 1"):
        parse_band_targets(["adult=1.5"])


def test_metrics_decide_by_the_card_rule_on_ties_and_age_bands():
    """The metrics' predicted labels are ModelCard.decide's: p == threshold is positive, and
    each age band's operating point (or the pooled one) gives the same labels in both."""
    from sklearn.metrics import confusion_matrix

    from pneumobatch.core.card import ModelCard

    card = ModelCard(
        name="pneu",
        task="pneumonia",
        classes=BINARY,
        architecture="a",
        input_size=32,
        mean=[0.5],
        std=[0.5],
        positive="pneumonia",
        threshold=0.5,
        thresholds={
            "recall_target": 0.5,
            "by_age_band": {"child": {"recall_target": 0.3}, "adult": {"recall_target": 0.7}},
        },
    )
    # every threshold exactly, just below and just above, twice (once per label)
    edges = [t + d for t in (0.3, 0.5, 0.7) for d in (0.0, -1e-9, 1e-9)] + [0.05, 0.95]
    p = np.array(edges * 2)
    y = ["pneumonia"] * len(edges) + ["normal"] * len(edges)
    proba = np.c_[1 - p, p]
    for band in (None, "child", "adult", "elderly"):  # elderly: no point of its own, the pooled one
        threshold, _ = card.threshold_for(band)
        decided = [card.decide(row, age_band=band).label for row in proba]
        assert decided == card.decide_many(proba, None if band is None else [band] * len(p)).tolist()
        res = evaluate(y, proba, BINARY, positive="pneumonia", threshold=threshold, n_bootstrap=0)
        assert res["confusion_matrix"]["counts"] == confusion_matrix(y, decided, labels=BINARY).tolist()
        shipped = res["operating_points"][0]
        y_pos = np.array(y) == "pneumonia"
        is_pos = np.array(decided) == "pneumonia"
        assert (shipped["tp"], shipped["fp"], shipped["tn"], shipped["fn"]) == (
            int((is_pos & y_pos).sum()),
            int((is_pos & ~y_pos).sum()),
            int((~is_pos & ~y_pos).sum()),
            int((~is_pos & y_pos).sum()),
        )
        assert operating_point(y_pos, p, threshold, "x")["tp"] == shipped["tp"]
    # ties in the bootstrap: positives exactly at the threshold are detected in every resample
    t = card.threshold_for("child")[0]
    p = np.array([t] * 6 + [t - 0.1] * 6)
    res = evaluate(
        ["pneumonia"] * 6 + ["normal"] * 6, np.c_[1 - p, p], BINARY, positive="pneumonia", threshold=t, n_bootstrap=50
    )
    shipped = res["operating_points"][0]
    assert shipped["sensitivity"] == 1.0 and shipped["sensitivity_ci"] == [1.0, 1.0]
    assert shipped["specificity_ci"] == [1.0, 1.0]


def test_lazy_names_are_the_defining_modules_and_light_imports_stay_light():
    """lazy_loader gives the package the names of the former hand-written table (TARGET_SENSITIVITY
    is gone); importing metrics.common, the metrics and report packages or the report options
    loads none of scikit-learn, matplotlib, reportlab or torch."""
    import importlib
    import subprocess
    import sys

    import pneumobatch.evaluation.metrics as metrics
    import pneumobatch.evaluation.report as report

    former = {  # the PEP 562 table this package had before lazy_loader
        "bootstrap": "BOOTSTRAP_CELLS BootstrapAUC bootstrap_draws percentile_ci row_counts",
        "calibration": "MIN_PROBABILITY TEMPERATURE_RANGE fit_temperature probability_logits reliability "
        "rescale_probabilities rescale_threshold temperature_nll",
        "classification": "MIN_PER_CLASS blank_unsupported card_metrics evaluate subgroup_metrics summarise",
        "common": "MAX_CURVE_POINTS jsonable",
        "multiclass": "MIN_VAL_PER_CLASS balanced_offsets class_table decided",  # added since: offsets, class table
        "hierarchy": "fine_level",  # added since: the fine level of two-level models
        "operating_points": "CI_LEVEL MIN_PER_CLASS_PER_BAND RECALL_TARGET TARGET_RECALL YOUDEN band_thresholds "
        "confusion_rates min_positives_for operating_point select_threshold threshold_points",
    }
    names = {n: sub for sub, ns in former.items() for n in ns.split()}
    assert sorted(metrics.__all__) == sorted(names)
    for name, sub in names.items():
        assert getattr(metrics, name) is getattr(importlib.import_module(f"{metrics.__name__}.{sub}"), name)
    with pytest.raises(AttributeError):
        metrics.TARGET_SENSITIVITY  # noqa: B018
    for name, module in {
        "build_report": "build",
        "DERIVED_SUBGROUPS": "build",
        "select_labels": "inputs",
        "render_figures": "figures",
        "write_report": "write",
    }.items():
        assert name in report.__all__  # (load_predictions, listed before, was moved to io.predictions)
        assert getattr(report, name) is getattr(importlib.import_module(f"{report.__name__}.{module}"), name)
    assert {"ReportOptions", "ReportError", "RESEARCH_ONLY"} <= set(report.__all__)

    code = (
        "import sys, pneumobatch.evaluation.metrics.common, pneumobatch.evaluation.metrics, "
        "pneumobatch.evaluation.report, pneumobatch.evaluation.report.options; "
        "print(sorted(m for m in ('sklearn', 'matplotlib', 'reportlab', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_operating_point_with_a_margin_reaches_the_target_with_confidence_not_on_average():
    from scipy.stats import beta

    from pneumobatch.evaluation.metrics.operating_points import select_threshold, sensitivity_lower_bound

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(135, bool), np.zeros(117, bool)]
    score = np.r_[rng.normal(2, 1, 135), rng.normal(-1, 1, 117)]
    plain = select_threshold(y, score, 0.95)
    margin = select_threshold(y, score, 0.95, margin_level=0.8)
    assert margin["recall_target"] <= plain["recall_target"]
    assert margin["recall_target_sensitivity"] > plain["recall_target_sensitivity"]
    assert margin["recall_target_lower_bound"] >= 0.95
    detected = round(margin["recall_target_sensitivity"] * 135)
    assert margin["recall_target_lower_bound"] == pytest.approx(beta.ppf(0.2, detected, 135 - detected + 1))
    # one step higher would no longer show the target with that confidence
    assert sensitivity_lower_bound(np.array([detected - 1]), 135, 0.8)[0] < 0.95
    # ten positives cannot show 95% at 80% confidence: the plain rule, and the card says so
    few = select_threshold(y[125:], score[125:], 0.95, margin_level=0.8)
    assert (
        few["recall_target_margin"].startswith("none")
        and few["recall_target"] == select_threshold(y[125:], score[125:], 0.95)["recall_target"]
    )
