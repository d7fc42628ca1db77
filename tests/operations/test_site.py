"""Site calibration: calibrate fits temperature and operating points; predict --site applies them."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.stats import binomtest

from pneumobatch.cli import main
from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import EXIT_USAGE, SiteError
from pneumobatch.core.site import apply_site, load_site
from pneumobatch.evaluation.metrics import min_positives_for, rescale_probabilities
from pneumobatch.operations.calibrate import fit_site
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT, one_line_error

SHA = "ab" * 32


def _card(**changes) -> ModelCard:
    card = ModelCard(
        name="pn",
        task="pneumonia",
        classes=["normal", "pneumonia"],
        architecture="resnet18",
        input_size=64,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        positive="pneumonia",
        threshold=0.6,
        temperature=1.5,
        weights_sha256=SHA,
        thresholds={
            "recall_target": 0.6,
            "youden": 0.7,
            "by_age_band": {
                "child": {"recall_target": 0.65, "youden": 0.8},
                "adult": {"recall_target": 0.55, "youden": 0.75},
            },
        },
    )
    for k, v in changes.items():
        setattr(card, k, v)
    return card


def _sample(n_child: tuple[int, int], n_adult: tuple[int, int], seed: int = 0, overconfident: float = 4.0):
    """Predictions (overconfident by a factor) and labels: (negatives, positives) per band."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for band, (neg, pos) in (("child", n_child), ("adult", n_adult)):
        for i, y in enumerate([0] * neg + [1] * pos):
            margin = rng.normal(1.2 if y else -1.2, 1.0) * overconfident
            p = 1 / (1 + np.exp(-margin))
            path = f"{band}/{i:04d}.dcm"
            rows.append(
                {
                    "path": path,
                    "status": "ok",
                    "reason": "",
                    "model": "pn",
                    "pred_label": "",
                    "prob_normal": round(1 - p, 6),
                    "prob_pneumonia": round(p, 6),
                    "age_band": band,
                    "file_mtime_ns": str(1_700_000_000_000_000_000 + i),
                }
            )
            labels.append({"path": path, "label": "pneumonia" if y else "normal"})
    labels = pd.DataFrame(labels)
    labels.attrs["source"] = "labels.csv"
    return pd.DataFrame(rows), labels


def test_min_positives_is_where_an_all_detected_sample_can_show_the_target():
    assert min_positives_for(0.95) == 72 and min_positives_for(0.90) == 36
    for target in (0.9, 0.95, 0.99):
        n = min_positives_for(target)
        exact = lambda k: binomtest(k, k).proportion_ci(0.95, method="exact").low  # noqa: E731
        assert exact(n - 1) < target <= exact(n)


def test_fit_site_meets_the_target_per_band_recalibrates_and_keeps_thin_bands_shipped():
    frame, labels = _sample(n_child=(60, 90), n_adult=(40, 5))
    card = _card()
    site, warnings = fit_site(frame, labels, card, target_recall=0.95, n_bootstrap=200)
    assert site["model"] == {
        "name": "pn",
        "task": "pneumonia",
        "classes": ["normal", "pneumonia"],
        "positive": "pneumonia",
        "weights_sha256": SHA,
    }
    assert site["fitted_on"]["counts"] == {"normal": 100, "pneumonia": 95}
    assert site["fitted_on"]["date_range"]["first"] == "2023-11-14"
    # margins x ~ N(+-1.2, 1) have true log-odds 2.4 x; the sample's are 4 x: 4 / 2.4 times too confident
    assert site["temperature"]["scale"] == pytest.approx(4 / 2.4, rel=0.15)
    assert site["temperature"]["site"] == pytest.approx(card.temperature * site["temperature"]["scale"])
    assert site["temperature"]["log_loss_after"] < site["temperature"]["log_loss_before"]

    site_card = apply_site(card, {**site, "_path": "site.json"})
    scale = site["temperature"]["scale"]
    proba = frame[["prob_normal", "prob_pneumonia"]].to_numpy()
    bands = frame["age_band"].to_numpy()
    decided = site_card.decide_many(rescale_probabilities(proba, scale), bands)
    truth = labels["label"].to_numpy()
    child = bands == "child"
    sens_child = ((decided == "pneumonia") & (truth == "pneumonia") & child).sum() / (
        (truth == "pneumonia") & child
    ).sum()
    sens_all = site["operating_points"]["pooled"]["target"]["sensitivity"]
    assert sens_child >= 0.95 and sens_all >= 0.95
    point = site["operating_points"]["by_age_band"]["child"]["target"]
    assert point["sensitivity"] == pytest.approx(sens_child)
    assert point["sensitivity_ci"][0] <= point["sensitivity"] <= point["sensitivity_ci"][1]
    assert point["specificity_ci"][0] <= point["specificity"] <= point["specificity_ci"][1]
    assert site_card.threshold_for("child") == (pytest.approx(point["threshold"]), "site-child")
    # adults: 5 positives, under the 10-per-class rule: the shipped threshold, same decisions as before
    adult = site["operating_points"]["by_age_band"]["adult"]
    assert adult["source"] == "shipped"
    assert site_card.threshold_for("adult")[1] == "adult"
    shipped_decisions = card.decide_many(proba[~child], bands[~child])
    assert (decided[~child] == shipped_decisions).all()
    assert any("age band adult" in w and "shipped threshold kept" in w for w in warnings)
    assert site_card.threshold_for("unknown")[1] == "site-pooled"
    # 90 child positives >= 72, pooled 95: no small-sample warning for those
    assert not any("too few to show" in w for w in warnings)


def test_small_sample_gets_a_warning_naming_the_rule():
    frame, labels = _sample(n_child=(30, 30), n_adult=(0, 0))
    _, warnings = fit_site(frame, labels, _card(thresholds={}), n_bootstrap=50)
    assert any("30 positives are too few to show 95% sensitivity: with fewer than 72" in w for w in warnings)


def test_youden_can_be_the_applied_point():
    frame, labels = _sample(n_child=(60, 90), n_adult=(0, 0))
    site, _ = fit_site(frame, labels, _card(thresholds={}), apply="youden", n_bootstrap=50)
    site_card = apply_site(_card(), {**site, "_path": "s.json"})
    assert site_card.threshold == pytest.approx(site["operating_points"]["pooled"]["youden"]["threshold"])
    assert site_card.site["apply"] == "youden"


def test_site_file_is_refused_for_other_weights_or_model():
    frame, labels = _sample(n_child=(20, 20), n_adult=(0, 0))
    site, _ = fit_site(frame, labels, _card(), n_bootstrap=0)
    with pytest.raises(SiteError, match="fitted for model pn .weights abababababab., not pn .weights cdcdcdcdcdcd"):
        apply_site(_card(weights_sha256="cd" * 32), site)
    with pytest.raises(SiteError, match="not other"):
        apply_site(_card(name="other"), site)
    assert SiteError.exit_code == EXIT_USAGE


def test_load_site_refuses_what_is_not_a_site_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(SiteError, match="not readable JSON"):
        load_site(bad)
    bad.write_text(json.dumps({"format": "something"}))
    with pytest.raises(SiteError, match="not a pneumobatch site file"):
        load_site(bad)
    with pytest.raises(SiteError, match="not found"):
        load_site(tmp_path / "missing.json")


def test_load_site_checks_the_site_schema_field_by_field(tmp_path):
    """Each problem gets one line naming the file and what is wrong; a file calibrate wrote loads."""
    frame, labels = _sample(n_child=(40, 40), n_adult=(10, 5))
    site, _ = fit_site(frame, labels, _card(), n_bootstrap=0)
    path = tmp_path / "site.json"

    def problem(document) -> str:
        path.write_text(json.dumps(document))
        with pytest.raises(SiteError) as raised:
            load_site(path)
        message = str(raised.value)
        assert "\n" not in message and str(path) in message
        return message

    path.write_text(json.dumps(site))
    assert load_site(path)["operating_points"]["by_age_band"]["adult"]["source"] == "shipped"
    assert "not a pneumobatch site file" in problem([site])
    assert "not a pneumobatch site file" in problem({k: v for k, v in site.items() if k != "format"})
    assert problem({**site, "schema_version": 2}).endswith("has schema version 2; this pneumobatch reads 1")
    assert "has schema version None" in problem({k: v for k, v in site.items() if k != "schema_version"})
    lacks = "lacks model, temperature or operating points"
    assert lacks in problem({k: v for k, v in site.items() if k != "temperature"})
    assert lacks in problem({**site, "model": "pn"})
    assert lacks in problem({**site, "operating_points": {"by_age_band": {}}})
    assert lacks in problem({**site, "model": {"weights_sha256": SHA}})
    assert problem({**site, "apply": "best"}).endswith("apply: 'best' is not one of ['target', 'youden']")
    no_sha = problem({**site, "model": {"name": "pn"}})
    assert no_sha.endswith("model: 'weights_sha256' is a required property")
    pooled = {**site["operating_points"]["pooled"], "youden": {"threshold": "high"}}
    message = problem({**site, "operating_points": {**site["operating_points"], "pooled": pooled}})
    assert message.endswith("operating_points/pooled/youden/threshold: 'high' is not of type 'number'")
    band = {**site["operating_points"]["by_age_band"]["child"], "source": "guess"}
    points = {**site["operating_points"], "by_age_band": {"child": band}}
    assert "operating_points/by_age_band/child/source: 'guess' is not one of" in problem(
        {**site, "operating_points": points}
    )
    assert "temperature/site: 0 is less than or equal to the minimum of 0" in problem(
        {**site, "temperature": {**site["temperature"], "site": 0}}
    )


# ------------------------------------------------------------------ the commands


@pytest.fixture()
def reference(tmp_path) -> Path:
    """The shipped pneumonia model's real predictions on sample_studies with the run.json card predict writes."""
    csv = tmp_path / "p.csv"
    shutil.copy(ROOT / "tests" / "data" / "sample_studies_expected.csv", csv)
    card = json.loads((ROOT / "weights" / "pneumonia.json").read_text())
    (tmp_path / "p.run.json").write_text(json.dumps({"models": [{"name": "pneumonia", "card": card}]}))
    return csv


def test_calibrate_command_writes_a_site_file_and_never_overwrites(reference, tmp_path):
    out = tmp_path / "site.json"
    args = [
        "calibrate",
        str(reference),
        "--labels",
        str(ROOT / "sample_studies" / "labels.csv"),
        "--model",
        "pneumonia",
        "-o",
        str(out),
        "--bootstrap",
        "100",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    site = json.loads(out.read_text())
    shipped = json.loads((ROOT / "weights" / "pneumonia.json").read_text())
    assert site["model"]["weights_sha256"] == shipped["weights_sha256"]
    assert site["fitted_on"]["counts"] == {"normal": 10, "pneumonia": 23}
    assert site["fitted_on"]["label_source"]["file"] == "labels.csv"
    assert "23 positives are too few" in result.output  # the sample studies are small, and it says so
    target = site["operating_points"]["pooled"]["target"]
    assert target["sensitivity"] >= 0.95
    # what the warning means: the exact interval cannot rule out a sensitivity under 95% with 23 positives
    assert target["sensitivity_ci_exact"][0] < 0.95 <= target["sensitivity_ci_exact"][1]
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "exists" in again.output
    several = CliRunner().invoke(main, args[:4] + ["-o", str(tmp_path / "s2.json")])
    assert several.exit_code == 2 and "--model" in several.output
    (tmp_path / "p.run.json").unlink()
    missing = CliRunner().invoke(main, args + ["--overwrite"])
    assert missing.exit_code == 3 and "run.json" in missing.output


def test_predict_with_site_applies_its_threshold_and_says_where_it_came_from(weights_dir, tmp_path):
    card = ModelCard.from_dict(json.loads((weights_dir / "tiny.json").read_text()))
    frame, labels = _sample(n_child=(40, 40), n_adult=(0, 0))
    site, _ = fit_site(frame.assign(model="tiny"), labels, card, n_bootstrap=0)
    site_path = tmp_path / "site.json"
    site_path.write_text(json.dumps(site))
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(3):
        write_cxr(tmp_path / "in" / f"{i}.dcm", rng.integers(0, 4096, (64, 64)).astype(np.uint16), bits_stored=12)
    base = ["predict", str(tmp_path / "in"), "-m", "tiny", "--weights-dir", str(weights_dir), "--quiet"]
    assert CliRunner().invoke(main, base + ["-o", str(tmp_path / "a.csv")]).exit_code == 0
    result = CliRunner().invoke(main, base + ["--site", str(site_path), "-o", str(tmp_path / "b.csv")])
    assert result.exit_code == 0, result.output
    shipped = pd.read_csv(tmp_path / "a.csv", dtype=str, keep_default_na=False)
    local = pd.read_csv(tmp_path / "b.csv", dtype=str, keep_default_na=False)
    threshold = site["operating_points"]["pooled"]["target"]["threshold"]
    assert set(shipped["threshold"]) == {"0.500000"} and set(shipped["operating_point"]) == {"pooled"}
    assert set(local["threshold"]) == {f"{threshold:.6f}"} and set(local["operating_point"]) == {"site-pooled"}
    # the site temperature changes the probabilities predict writes
    t = site["temperature"]["site"]
    p = shipped["prob_pneumonia"].astype(float).to_numpy()
    expected = 1 / (1 + ((1 - p) / p) ** (1 / t))
    np.testing.assert_allclose(local["prob_pneumonia"].astype(float), expected, atol=2e-5)
    run = json.loads((tmp_path / "b.run.json").read_text())
    assert run["models"][0]["card"]["site"]["file"] == str(site_path)
    assert run["models"][0]["card"]["site"]["shipped"]["threshold"] == 0.5
    assert run["monitoring"]["models"]["tiny"]["operating_point"]["source"] == "site"
    # another model's site file: one line, exit code 2
    other = dict(site, model={**site["model"], "weights_sha256": "cd" * 32})
    site_path.write_text(json.dumps(other))
    refused = CliRunner().invoke(main, base + ["--site", str(site_path), "-o", str(tmp_path / "c.csv")])
    assert refused.exit_code == 2
    assert refused.output.count("\n") == 1 and "fitted for model tiny (weights cdcdcdcdcdcd" in refused.output
    assert not (tmp_path / "c.csv").exists()
    wrong_model = CliRunner().invoke(
        main,
        base[:3]
        + ["tiny-etiology"]
        + base[4:]
        + ["--site", str(tmp_path / "site.json"), "-o", str(tmp_path / "d.csv")],
    )
    assert wrong_model.exit_code == 2 and "which this run does not predict" in wrong_model.output


def _exact(k: int, n: int) -> list[float]:
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return [ci.low, ci.high]


def test_report_shows_shipped_and_site_operating_points_side_by_side(tmp_path):
    card = _card()
    fit_frame, fit_labels = _sample(n_child=(40, 80), n_adult=(40, 80), seed=0)
    site, _ = fit_site(fit_frame, fit_labels, card, n_bootstrap=0)
    site_path = tmp_path / "site.json"
    site_path.write_text(json.dumps(site))
    # a later labelled sample the site file was not fitted on, predicted with the shipped card
    frame, labels = _sample(n_child=(30, 50), n_adult=(60, 20), seed=1)
    frame.to_csv(tmp_path / "p.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    (tmp_path / "p.run.json").write_text(json.dumps({"models": [{"name": "pn", "card": card.to_dict()}]}))
    args = ["report", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "labels.csv"), "--bootstrap", "0"]
    result = CliRunner().invoke(main, args + ["--site", str(site_path), "-o", str(tmp_path / "r.pdf")])
    assert result.exit_code == 0, result.output
    compared = json.loads((tmp_path / "r.json").read_text())["models"][0]["site_comparison"]
    shipped, local = compared["rules"]
    assert [r["where"] for r in shipped["rows"]] == ["all", "adult", "child"] == [r["where"] for r in local["rows"]]

    # what each rule decides, computed here from the file's probabilities and the two threshold sets
    p = frame["prob_pneumonia"].to_numpy()
    bands = frame["age_band"].to_numpy()
    truth = labels["label"].to_numpy() == "pneumonia"
    shipped_call = p >= np.where(bands == "child", 0.65, 0.55)
    t_site = {b: site["operating_points"]["by_age_band"][b]["target"]["threshold"] for b in ("child", "adult")}
    p_site = rescale_probabilities(frame[["prob_normal", "prob_pneumonia"]].to_numpy(), site["temperature"]["scale"])[
        :, 1
    ]
    site_call = p_site >= np.where(bands == "child", t_site["child"], t_site["adult"])
    assert (shipped_call != site_call).any()  # the two rules differ on these images, so the table can tell them apart
    for rule, call in ((shipped, shipped_call), (local, site_call)):
        for row in rule["rows"]:
            m = np.ones(len(bands), bool) if row["where"] == "all" else bands == row["where"]
            tp, fn = int((call & truth & m).sum()), int((~call & truth & m).sum())
            tn, fp = int((~call & ~truth & m).sum()), int((call & ~truth & m).sum())
            assert (row["tp"], row["fn"], row["tn"], row["fp"]) == (tp, fn, tn, fp)
            assert row["sensitivity_ci_exact"] == pytest.approx(_exact(tp, tp + fn))
            assert row["specificity_ci_exact"] == pytest.approx(_exact(tn, tn + fp))
    assert shipped["rows"][2]["thresholds"] == [{"threshold": 0.65, "operating_point": "child"}]
    assert local["rows"][2]["thresholds"] == [
        {"threshold": pytest.approx(t_site["child"]), "operating_point": "site-child"}
    ]
    assert len(local["rows"][0]["thresholds"]) == 2  # all images: each band's own threshold
    assert not any("in-sample" in n for n in compared["notes"])

    # the same comparison from predictions made with predict --site (site probabilities, site card in run.json)
    with_site = frame.assign(prob_pneumonia=np.round(p_site, 6), prob_normal=np.round(1 - p_site, 6))
    with_site.to_csv(tmp_path / "q.csv", index=False)
    site_run_card = apply_site(card, {**site, "_path": str(site_path)})
    (tmp_path / "q.run.json").write_text(json.dumps({"models": [{"name": "pn", "card": site_run_card.to_dict()}]}))
    args_q = [
        "report",
        str(tmp_path / "q.csv"),
        "--labels",
        str(tmp_path / "labels.csv"),
        "--bootstrap",
        "0",
        "-o",
        str(tmp_path / "q.pdf"),
    ]
    assert CliRunner().invoke(main, args_q).exit_code == 0
    again = json.loads((tmp_path / "q.json").read_text())["models"][0]["site_comparison"]
    for a, b in zip(compared["rules"], again["rules"]):
        assert [(r["tp"], r["fn"], r["tn"], r["fp"]) for r in a["rows"]] == [
            (r["tp"], r["fn"], r["tn"], r["fp"]) for r in b["rows"]
        ]

    # on the very sample it was fitted on, the report says the site figures are in-sample
    fit_frame.to_csv(tmp_path / "f.csv", index=False)
    fit_labels.to_csv(tmp_path / "fl.csv", index=False)
    (tmp_path / "f.run.json").write_text((tmp_path / "p.run.json").read_text())
    args_f = [
        "report",
        str(tmp_path / "f.csv"),
        "--labels",
        str(tmp_path / "fl.csv"),
        "--bootstrap",
        "0",
        "--site",
        str(site_path),
        "-o",
        str(tmp_path / "f.pdf"),
    ]
    assert CliRunner().invoke(main, args_f).exit_code == 0
    assert any(
        "in-sample" in n for n in json.loads((tmp_path / "f.json").read_text())["models"][0]["site_comparison"]["notes"]
    )

    # a site file of other weights: one line, exit code 2, no report
    site_path.write_text(json.dumps({**site, "model": {**site["model"], "weights_sha256": "cd" * 32}}))
    refused = CliRunner().invoke(main, args + ["--site", str(site_path), "-o", str(tmp_path / "x.pdf")])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1 and "fitted for model pn" in refused.output
    assert not (tmp_path / "x.pdf").exists()


def test_site_thresholds_keep_their_decisions_when_predict_rounds_the_probabilities(reference, tmp_path):
    """predict --site recomputes the probabilities and writes 6 decimals: the site's counts must survive that."""
    out = tmp_path / "site.json"
    args = [
        "calibrate",
        str(reference),
        "--labels",
        str(ROOT / "sample_studies" / "labels.csv"),
        "--model",
        "pneumonia",
        "-o",
        str(out),
        "--bootstrap",
        "0",
    ]
    assert CliRunner().invoke(main, args).exit_code == 0
    site = json.loads(out.read_text())
    frame = pd.read_csv(reference)
    frame = frame[(frame.model == "pneumonia") & (frame.status == "ok")]
    labels = pd.read_csv(ROOT / "sample_studies" / "labels.csv")
    joined = frame.merge(labels, on="path")
    p = rescale_probabilities(joined[["prob_normal", "prob_pneumonia"]].to_numpy(), site["temperature"]["scale"])[:, 1]
    truth = (joined["label"] == "pneumonia").to_numpy()
    for key in ("target", "youden"):
        point = site["operating_points"]["pooled"][key]
        assert np.abs(p - point["threshold"]).min() > 1e-4  # not on any image's probability
        for shown in (p, np.round(p, 6)):  # as calibrate saw them, and as predict --site writes them
            called = shown >= point["threshold"]
            assert (int((called & truth).sum()), int((~called & truth).sum())) == (point["tp"], point["fn"])
            assert (int((~called & ~truth).sum()), int((called & ~truth).sum())) == (point["tn"], point["fp"])


# -------------------------------------------------- bad site files, tampered cards, special files


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict:
    """A site file calibrate wrote on the sample studies' predictions (the shipped model), with its inputs."""
    folder = tmp_path_factory.mktemp("calibrated")
    csv = folder / "p.csv"
    shutil.copy(ROOT / "tests" / "data" / "sample_studies_expected.csv", csv)
    card = json.loads((ROOT / "weights" / "pneumonia.json").read_text())
    (folder / "p.run.json").write_text(json.dumps({"models": [{"name": "pneumonia", "card": card}]}))
    labels = ROOT / "sample_studies" / "labels.csv"
    args = ["calibrate", str(csv), "--labels", str(labels), "-o", str(folder / "site.json"), "--bootstrap", "0"]
    result = CliRunner().invoke(main, args + ["--model", "pneumonia"])
    assert result.exit_code == 0, result.output
    return {"csv": csv, "labels": labels, "card": card, "site": json.loads((folder / "site.json").read_text())}


def _report(calibrated: dict, site: Path, tmp_path: Path):
    args = [
        "report",
        str(calibrated["csv"]),
        "--labels",
        str(calibrated["labels"]),
        "--bootstrap",
        "0",
        "-m",
        "pneumonia",
    ]
    return CliRunner().invoke(main, [*args, "--site", str(site), "-o", str(tmp_path / "r.pdf")])


def _set(*where: str, value) -> Callable[[dict], None]:
    def change(site: dict) -> None:
        for key in where[:-1]:
            site = site[key]
        site[where[-1]] = value

    return change


_POOLED = ("operating_points", "pooled", "target", "threshold")
_CHILD = ("operating_points", "by_age_band", "child", "target", "threshold")
BAD_SITES = {
    # S1: thresholds outside [0, 1] or not finite (Python's json reads NaN and Infinity)
    "pooled-nan": (_set(*_POOLED, value=float("nan")), "operating_points/pooled/target/threshold: nan is not a finite"),
    "pooled-2": (_set(*_POOLED, value=2.0), "operating_points/pooled/target/threshold: 2.0 is greater than"),
    "pooled-minus-1": (_set(*_POOLED, value=-1), "operating_points/pooled/target/threshold: -1 is less than"),
    "band-nan": (_set(*_CHILD, value=float("nan")), "by_age_band/child/target/threshold: nan is not a finite"),
    "band-2": (_set(*_CHILD, value=2.0), "by_age_band/child/target/threshold: 2.0 is greater than"),
    "band-minus-1": (_set(*_CHILD, value=-1), "by_age_band/child/target/threshold: -1 is less than"),
    # S2: a temperature that is not a positive finite number
    "temperature-0": (_set("temperature", "site", value=0), "temperature/site: 0 is less than or equal"),
    "temperature-nan": (_set("temperature", "site", value=float("nan")), "temperature/site: nan is not a finite"),
    "temperature-minus": (_set("temperature", "site", value=-1.1), "temperature/site: -1.1 is less than or equal"),
    "temperature-inf": (_set("temperature", "site", value=float("inf")), "temperature/site: inf is not a finite"),
    # S3: wrong types, unknown choices, missing parts
    "pooled-string": (_set(*_POOLED, value="0.5"), "pooled/target/threshold: '0.5' is not of type 'number'"),
    "pooled-null": (_set(*_POOLED, value=None), "pooled/target/threshold: None is not of type 'number'"),
    "band-null": (_set(*_CHILD, value=None), "by_age_band/child/target/threshold: null, but the file applies target"),
    "apply-banana": (_set("apply", value="banana"), "apply: 'banana' is not one of ['target', 'youden']"),
    "bands-list": (_set("operating_points", "by_age_band", value=[1]), "by_age_band: [1] is not of type"),
    "pooled-list": (_set("operating_points", "pooled", value=[1]), "operating_points/pooled: [1] is not of type"),
    "point-list": (_set("operating_points", "pooled", "youden", value=[]), "pooled/youden: [] is not of type"),
    "no-youden": (lambda s: s["operating_points"]["pooled"].pop("youden"), "'youden' is a required property"),
    "target-nan": (_set("target_sensitivity", value=float("nan")), "target_sensitivity: nan is not a finite"),
}


@pytest.mark.parametrize("change, needle", BAD_SITES.values(), ids=BAD_SITES.keys())
def test_a_site_file_with_a_bad_value_is_refused_with_one_line(calibrated, tmp_path, change, needle):
    """S1-S3: exit 2 and one line naming the file and the field, before any report is written."""
    site = copy.deepcopy(calibrated["site"])
    change(site)
    path = tmp_path / "site.json"
    path.write_text(json.dumps(site))  # NaN and inf as JSON's NaN / Infinity literals
    one_line_error(_report(calibrated, path, tmp_path), 2, f"site file {path}: ", needle)
    assert not (tmp_path / "r.pdf").exists()


def test_a_number_too_large_for_a_float_is_refused(calibrated, tmp_path):
    path = tmp_path / "site.json"
    text = json.dumps(calibrated["site"])
    path.write_text(text.replace(f'"site": {calibrated["site"]["temperature"]["site"]!r}', '"site": 1e999'))
    one_line_error(_report(calibrated, path, tmp_path), 2, "temperature/site: inf is not a finite number")


def test_a_site_file_calibrate_wrote_is_applied_and_a_band_may_lack_the_point_not_applied(calibrated, tmp_path):
    path = tmp_path / "site.json"
    path.write_text(json.dumps(calibrated["site"]))
    assert load_site(path)["operating_points"]["by_age_band"]["child"]["source"] == "shipped"
    site = copy.deepcopy(calibrated["site"])
    site["operating_points"]["by_age_band"]["child"]["youden"]["threshold"] = None  # apply is target
    path.write_text(json.dumps(site))
    result = _report(calibrated, path, tmp_path)
    assert result.exit_code == 0, result.output


def test_predict_refuses_a_site_file_whose_applied_band_threshold_is_null(weights_dir, tmp_path):
    """S4: not an exit 4 on the first image of that band, mid-run: exit 2 before any row."""
    card = ModelCard.from_dict(json.loads((weights_dir / "tiny.json").read_text()))
    card.thresholds = {"recall_target": 0.5, "youden": 0.5, "by_age_band": {"adult": {"recall_target": 0.5}}}
    frame, labels = _sample(n_child=(0, 0), n_adult=(40, 40))
    site, _ = fit_site(frame.assign(model="tiny"), labels, card, n_bootstrap=0)
    site["operating_points"]["by_age_band"]["adult"]["target"]["threshold"] = None
    (tmp_path / "site.json").write_text(json.dumps(site))
    (tmp_path / "in").mkdir()
    write_cxr(tmp_path / "in" / "0.dcm", np.zeros((64, 64), np.uint16) + 7, bits_stored=12)
    args = ["predict", str(tmp_path / "in"), "-m", "tiny", "--weights-dir", str(weights_dir), "--quiet"]
    result = CliRunner().invoke(main, args + ["--site", str(tmp_path / "site.json"), "-o", str(tmp_path / "p.csv")])
    one_line_error(result, 2, "by_age_band/adult/target/threshold: null, but the file applies target")
    assert not (tmp_path / "p.csv").exists()


def _tamper(card: dict, *where: str, value) -> list:
    card = copy.deepcopy(card)
    _set(*where, value=value)(card)
    return [{"name": "pneumonia", "card": card}]


TAMPERED = {
    "negative-temperature": (lambda c: _tamper(c, "temperature", value=-0.9), "temperature: -0.9 is less than"),
    "nan-threshold": (lambda c: _tamper(c, "threshold", value=float("nan")), "threshold: must be a finite"),
    "band-null": (
        lambda c: _tamper(c, "thresholds", "by_age_band", "child", "recall_target", value=None),
        "thresholds/by_age_band/child/recall_target: None is not of type 'number'",
    ),
    "band-without-threshold": (
        lambda c: _tamper(c, "thresholds", "by_age_band", "child", value={"youden": 0.4}),
        "has no recall_target threshold for age band child",
    ),
    "models-dict": (lambda c: {"pneumonia": {"name": "pneumonia", "card": c}}, "no list of models"),
    "models-int": (lambda c: 3, "no list of models"),
    "model-entry-int": (lambda c: [3], "holds no model card for pneumonia"),
    "card-list": (lambda c: [{"name": "pneumonia", "card": [c]}], "card: not a JSON object"),
}


@pytest.mark.parametrize("models, needle", TAMPERED.values(), ids=TAMPERED.keys())
def test_calibrate_refuses_a_tampered_run_json_card(calibrated, tmp_path, models, needle):
    """S4: the card in run.json is checked as a card on disk is; nothing is fitted on it or written."""
    csv = tmp_path / "p.csv"
    shutil.copy(calibrated["csv"], csv)
    (tmp_path / "p.run.json").write_text(json.dumps({"models": models(calibrated["card"])}))
    args = ["calibrate", str(csv), "--labels", str(calibrated["labels"]), "-o", str(tmp_path / "site.json")]
    one_line_error(CliRunner().invoke(main, args + ["--bootstrap", "0", "-m", "pneumonia"]), 3, "p.run.json", needle)
    assert not (tmp_path / "site.json").exists()
