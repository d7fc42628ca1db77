"""Nightly monitoring: the run.json block from real DICOM headers, and drift across nights.

The drift tests build four nights from a real predict run of the shipped pneumonia model:
its committed reference output on ``sample_studies/`` (``tests/data/
sample_studies_expected.csv``, which ``test_sample_studies`` checks the weights still
reproduce). Each night draws, with replacement, 40 predicted images per scanner from
the labelled ones, plus the export's skipped and failed files, and gets its run.json
from :func:`pneumobatch.operations.monitor.record.monitoring_block` (what predict calls). On night 3
scanner C sends only normal radiographs (a different prevalence, as when a screening
clinic's images arrive through a ward's station).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import binomtest

from pneumobatch.cli import main
from pneumobatch.core.card import ModelCard
from pneumobatch.io.predictions import file_counts
from pneumobatch.operations.monitor.analysis import analyse, load_nights
from pneumobatch.operations.monitor.drift import rate_change
from pneumobatch.operations.monitor.prometheus import prometheus_text
from pneumobatch.operations.monitor.record import NO_HEADER, monitoring_block
from pneumobatch.operations.monitor.schema import night_problem
from pneumobatch.testing.synthetic import write_cxr
from tests.helpers import ROOT, one_line_error

SAMPLES = ROOT / "sample_studies"
EXPECTED = ROOT / "tests" / "data" / "sample_studies_expected.csv"
SCANNERS = {
    "A": ("ACME", "Rad 1000", "ER_ROOM_1"),
    "B": ("Globex", "DR-9", "WARD_7"),
    "C": ("Initech", "Portable X", "ICU_2"),
}
PER_SCANNER = 40
BAD_NIGHT, BAD_SCANNER = 3, "C"
BAD_GROUP = "Initech / Portable X / ICU_2"


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> list[Path]:
    """Four nights of predictions CSV + run.json; on night 3 scanner C sends only normals."""
    root = tmp_path_factory.mktemp("nights")
    card = ModelCard.from_dict(json.loads((ROOT / "weights" / "pneumonia.json").read_text()))
    reference = pd.read_csv(EXPECTED, dtype=str, keep_default_na=False)
    reference = reference[reference["model"] == card.name]
    labels = pd.read_csv(SAMPLES / "labels.csv", dtype=str, keep_default_na=False).set_index("path")["label"]
    ok = reference[reference["path"].isin(labels.index)].reset_index(drop=True)
    other = reference[reference["status"] != "ok"]
    rng = np.random.default_rng(0)
    runs = []
    for night in range(4):
        parts = []
        for s, (scanner, (maker, model, station)) in enumerate(SCANNERS.items()):
            pool = ok
            if night == BAD_NIGHT and scanner == BAD_SCANNER:
                pool = ok[ok["path"].map(labels) == "normal"]
            rows = pool.iloc[rng.integers(0, len(pool), PER_SCANNER)].copy()
            rows["label"] = rows["path"].map(labels)
            rows["path"] = [f"{scanner}/{i:03d}/{p}" for i, p in enumerate(rows["path"])]
            rows["sop_instance_uid"] = [f"1.2.826.0.1.9.{night}.{s}.{i}" for i in range(len(rows))]
            rows["manufacturer"], rows["manufacturer_model_name"], rows["station_name"] = maker, model, station
            parts.append(rows)
        frame = pd.concat([*parts, other.assign(label="")], ignore_index=True).fillna("")
        frame.drop(columns="label").to_csv(root / f"night{night}.csv", index=False)
        frame[frame["label"] != ""][["sop_instance_uid", "label"]].to_csv(
            root / f"night{night}.labels.csv", index=False
        )
        run = {
            "schema_version": 4,
            "started": f"2026-01-0{night + 1}T02:00:00+00:00",
            "finished": f"2026-01-0{night + 1}T02:10:00+00:00",
            "counts": file_counts(frame),
            "images_per_second": 20.0,
            "models": [{"name": card.name, "card": card.to_dict()}],
            "monitoring": monitoring_block(frame, [card], 20.0),
        }
        path = root / f"night{night}.run.json"
        path.write_text(json.dumps(run))
        runs.append(path)
    return runs


def test_run_json_records_monitoring_by_scanner_from_dicom_headers(weights_dir, tmp_path):
    """predict itself: Manufacturer / model / station from the DICOM headers, PNG without a header."""
    from pneumobatch.predict import run_predict
    from pneumobatch.predict_config import PredictConfig

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i, scanner in enumerate("AABBB"):
        maker, model, station = SCANNERS[scanner]
        pixels = rng.integers(0, 4096, (64, 64)).astype(np.uint16)
        write_cxr(
            tmp_path / "in" / f"{scanner}{i}.dcm",
            pixels,
            bits_stored=12,
            view_position="AP" if i else "PA",
            extra={"Manufacturer": maker, "ManufacturerModelName": model, "StationName": station},
        )
    write_cxr(tmp_path / "in" / "noinfo.dcm", rng.integers(0, 255, (64, 64)).astype(np.uint8))
    (tmp_path / "in" / "export.png").write_bytes((SAMPLES / "exports" / "SAMPLE005.png").read_bytes())
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    run = run_predict(
        PredictConfig(
            inputs=[tmp_path / "in"], output=tmp_path / "p.csv", models=["tiny"], weights_dir=weights_dir, workers=0
        )
    )
    info = json.loads(run.run_json.read_text())
    assert info["schema_version"] == 4
    block = info["monitoring"]["models"]["tiny"]
    scanners = block["by"]["scanner"]
    assert {g: s["files"] for g, s in scanners.items()} == {
        "ACME / Rad 1000 / ER_ROOM_1": 2,
        "Globex / DR-9 / WARD_7": 3,
        "? / ? / ?": 1,
        NO_HEADER: 2,
    }
    assert scanners[NO_HEADER]["by_reason"] == {"not-image": 1}
    assert block["by"]["view"]["AP"]["ok"] == 4 and block["by"]["view"]["PA"]["ok"] == 2
    overall = block["overall"]
    assert overall["ok"] == 7 and overall["skipped"] == 1 and sum(overall["histogram"]) == overall["n_scored"] == 7
    assert len(overall["quantiles"]) == 101 and overall["quantiles"] == sorted(overall["quantiles"])
    assert overall["n_positive"] == round(overall["positive_rate"] * 7)
    assert block["operating_point"] == {"source": "shipped", "threshold": 0.5, "thresholds": {}}
    assert night_problem(info) is None  # what predict writes is what monitor accepts
    csv = pd.read_csv(run.output, dtype=str, keep_default_na=False)
    assert set(csv["station_name"]) == {"ER_ROOM_1", "WARD_7", ""}
    assert "Anonymous" not in run.run_json.read_text() + csv.to_csv()  # the patient name never leaves the header


def test_monitor_flags_the_changed_scanner_on_its_night_only(nights):
    loaded, notes = load_nights(nights)
    assert notes == []
    doc = analyse(loaded, baseline=2)
    alerts = doc["alerts"]
    assert alerts, "the night with a changed scanner raised no alert"
    assert {a["run_json"] for a in alerts} == {str(nights[BAD_NIGHT])}
    by_scanner = {a["group"] for a in alerts if a["dimension"] == "scanner"}
    assert by_scanner == {BAD_GROUP}
    clean = doc["drift"]["pneumonia"][0]["groups"]["scanner"]
    bad = doc["drift"]["pneumonia"][1]["groups"]["scanner"]
    assert bad[BAD_GROUP]["psi"] > max(clean[g]["psi"] for g in clean if "psi" in clean[g])
    assert all(bad[g]["psi"] < bad[g]["psi_noise"] for g in bad if g != BAD_GROUP and "psi" in bad[g])
    assert bad[BAD_GROUP]["positive_rate"]["ci"][1] < bad[BAD_GROUP]["positive_rate"]["baseline_rate"]
    prom = prometheus_text(loaded, doc)
    assert f"pneumobatch_alerts {len(alerts)}" in prom
    assert f'pneumobatch_files{{status="ok"}} {3 * PER_SCANNER}.0' in prom


def test_monitor_command_writes_pdf_json_and_prometheus_and_takes_limits(nights, tmp_path):
    out = tmp_path / "monitor.pdf"
    args = ["monitor", *map(str, nights), "--baseline", "2", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "ALERT" in result.output and BAD_GROUP in result.output
    assert out.read_bytes().startswith(b"%PDF")
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["baseline"]["run_json"] == [str(p) for p in nights[:2]]
    prom = out.with_suffix(".prom").read_text()
    assert "# TYPE pneumobatch_last_success_timestamp_seconds gauge" in prom
    finished = datetime.fromisoformat(json.loads(nights[-1].read_text())["finished"]).timestamp()
    # full precision (a timestamp must not be rounded to 6 digits), in prometheus_client's Go-style float form
    (stamp,) = [s for f in text_string_to_metric_families(prom) for s in f.samples if s.name.endswith("_seconds")]
    assert stamp.value == finished and f"pneumobatch_last_success_timestamp_seconds {stamp.value:.7e}\n" in prom
    assert 'pneumobatch_positive_rate{model="pneumonia"}' in prom and "pneumobatch_drift_score" in prom
    # limits no night can cross: no alerts
    quiet = CliRunner().invoke(
        main,
        args
        + [
            "--limit",
            "psi=100",
            "--limit",
            "ks_d=2",
            "--limit",
            "positive_rate_change=2",
            "--limit",
            "flag_rate_change=2",
            "--limit",
            "error_rate=2",
        ],
    )
    assert quiet.exit_code == 0 and "0 alerts" in quiet.output, quiet.output
    bad = CliRunner().invoke(main, args + ["--limit", "nonsense=1"])
    assert bad.exit_code == 2 and "psi" in bad.output


def test_monitor_adds_rolling_labelled_metrics(nights, tmp_path):
    labels = tmp_path / "past.csv"  # labels arrive for the two oldest nights only
    pd.concat(
        [pd.read_csv(p.with_name(p.name.replace(".run.json", ".labels.csv")), dtype=str) for p in nights[:2]]
    ).to_csv(labels, index=False)
    out = tmp_path / "m.pdf"
    result = CliRunner().invoke(
        main,
        [
            "monitor",
            *map(str, nights),
            "--baseline",
            "2",
            "--labels",
            str(labels),
            "--key",
            "sop_instance_uid",
            "-o",
            str(out),
            "--window",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    wrong = CliRunner().invoke(
        main,
        [
            "monitor",
            *map(str, nights),
            "--labels",
            str(labels),
            "--label-column",
            "finding",
            "-o",
            str(tmp_path / "w.pdf"),
        ],
    )
    assert wrong.exit_code == 3 and "no label column 'finding'" in wrong.output
    perf = json.loads(out.with_suffix(".json").read_text())["labelled"]["models"]["pneumonia"]
    assert [r["labelled"] > 0 for r in perf] == [True, True, False, False]

    def counts(night: Path) -> tuple[int, int, int, int]:
        pred = pd.read_csv(night.with_name(night.name.replace(".run.json", ".csv")), dtype=str, keep_default_na=False)
        truth = pd.read_csv(night.with_name(night.name.replace(".run.json", ".labels.csv")), dtype=str)
        both = truth.merge(pred, on="sop_instance_uid")
        t, p = both["label"] == "pneumonia", both["pred_label"] == "pneumonia"
        return int((t & p).sum()), int((~t & p).sum()), int((~t & ~p).sum()), int((t & ~p).sum())

    tp, fp, tn, fn = counts(nights[0])
    first = perf[0]
    assert first["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert first["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert first["ppv"]["value"] == pytest.approx(tp / (tp + fp))
    lo, hi = first["sensitivity"]["ci"]
    assert lo < first["sensitivity"]["value"] <= hi <= 1.0
    for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp), ("ppv", tp, tp + fp)):
        assert first[name]["ci"] == _exact(k, n)  # the same numbers as the exact interval monitor wrote before
    tp1, fp1, tn1, fn1 = counts(nights[1])  # window 2: night 1 pools nights 0 and 1
    assert perf[1]["sensitivity"]["n"] == tp + fn + tp1 + fn1 and perf[1]["ppv"]["k"] == tp + tp1


def test_monitor_needs_two_runs_with_monitoring(nights, tmp_path):
    old = tmp_path / "old.run.json"
    old.write_text(json.dumps({"schema_version": 3, "models": []}))
    result = CliRunner().invoke(main, ["monitor", str(old), str(nights[0]), "-o", str(tmp_path / "m.pdf")])
    assert result.exit_code == 3
    assert "at least two runs" in result.output and "no monitoring block" in result.output


def test_a_changed_operating_point_is_an_alert(nights):
    import copy

    loaded, _ = load_nights(nights[:3])
    changed = copy.deepcopy(loaded[2].run)
    changed["monitoring"]["models"]["pneumonia"]["operating_point"] = {"source": "site", "file": "site.json"}
    loaded[2] = type(loaded[2])(loaded[2].path, changed)
    kinds = {(a["run_json"], a["kind"]) for a in analyse(loaded, baseline=2)["alerts"]}
    assert kinds == {(str(nights[2]), "operating-point-changed")}


def _exact(k: int, n: int) -> list[float]:
    """The exact interval as monitor computed it before it used the shared helper."""
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)]


@pytest.mark.parametrize("k, n, k0, n0", [(0, 40, 10, 80), (40, 40, 10, 80), (17, 40, 30, 80), (3, 120, 1, 240)])
def test_rate_change_interval_is_the_exact_one(k, n, k0, n0):
    """rate_change's interval comes from the shared Clopper-Pearson helper, with the numbers of the
    binomial test against the baseline rate that it used to read it from."""
    before = binomtest(k, n, k0 / n0).proportion_ci(confidence_level=0.95, method="exact")
    change = rate_change(k, n, k0, n0)
    assert change["ci"] == [float(before.low), float(before.high)] == _exact(k, n)
    assert change["p_value"] == binomtest(k, n, k0 / n0).pvalue


#: Samples of the hand-written Prometheus text (pneumobatch before prometheus_client) for these
#: nights: (baseline, [(name, labels, value), ...]). The names and labels are those of the old
#: writer; the values of the positive rate, drift score and alert count follow the shipped
#: pneumonia model's reference output (updated with each shipped pneumonia weights, last on 2026-12-08).
OLD_PROMETHEUS_SAMPLES = {
    2: [
        ("pneumobatch_last_success_timestamp_seconds", {}, 1767492600.0),
        ("pneumobatch_files", {"status": "ok"}, 120.0),
        ("pneumobatch_files", {"status": "skipped"}, 9.0),
        ("pneumobatch_files", {"status": "error"}, 2.0),
        ("pneumobatch_errors", {}, 2.0),
        ("pneumobatch_images_per_second", {}, 20.0),
        ("pneumobatch_positive_rate", {"model": "pneumonia"}, 0.65),
        ("pneumobatch_drift_score", {"model": "pneumonia"}, 2.770994809866428),
        ("pneumobatch_alerts", {}, 6.0),
    ],
    1: [
        ("pneumobatch_last_success_timestamp_seconds", {}, 1767492600.0),
        ("pneumobatch_files", {"status": "ok"}, 120.0),
        ("pneumobatch_files", {"status": "skipped"}, 9.0),
        ("pneumobatch_files", {"status": "error"}, 2.0),
        ("pneumobatch_errors", {}, 2.0),
        ("pneumobatch_images_per_second", {}, 20.0),
        ("pneumobatch_positive_rate", {"model": "pneumonia"}, 0.65),
        ("pneumobatch_drift_score", {"model": "pneumonia"}, 2.6892840090908647),
        ("pneumobatch_alerts", {}, 7.0),
    ],
}


@pytest.mark.parametrize("baseline", sorted(OLD_PROMETHEUS_SAMPLES))
def test_prometheus_samples_are_those_of_the_hand_written_text(nights, baseline):
    loaded, _ = load_nights(nights)
    prom = prometheus_text(loaded, analyse(loaded, baseline=baseline))
    families = list(text_string_to_metric_families(prom))
    samples = [(s.name, s.labels, s.value) for f in families for s in f.samples]
    expected = OLD_PROMETHEUS_SAMPLES[baseline]
    assert [(name, labels) for name, labels, _ in samples] == [(name, labels) for name, labels, _ in expected]
    for (name, labels, value), (_, _, old) in zip(samples, expected):
        assert value == pytest.approx(old, rel=1e-12, abs=0), (name, labels)
    assert all(f.type == "gauge" and f.documentation for f in families)


def test_prometheus_leaves_out_unknown_values_and_escapes_labels(nights):
    """No finish time, no throughput: those samples are left out; a model name is escaped as Prometheus reads it."""
    import copy

    loaded, _ = load_nights(nights)
    doc = analyse(loaded, baseline=2)
    run = copy.deepcopy(loaded[-1].run)
    del run["finished"], run["images_per_second"]
    run["monitoring"]["models"] = {'odd "name"\\x': run["monitoring"]["models"]["pneumonia"]}
    loaded[-1] = type(loaded[-1])(loaded[-1].path, run)
    prom = prometheus_text(loaded, doc)
    assert "# TYPE pneumobatch_last_success_timestamp_seconds gauge" in prom
    assert (
        "\npneumobatch_last_success_timestamp_seconds " not in prom and "\npneumobatch_images_per_second " not in prom
    )
    assert 'pneumobatch_positive_rate{model="odd \\"name\\"\\\\x"} 0.65' in prom
    rates = [
        s for f in text_string_to_metric_families(prom) for s in f.samples if s.name == "pneumobatch_positive_rate"
    ]
    assert [s.labels for s in rates] == [{"model": 'odd "name"\\x'}]


# ------------------------------------------------ tampered nights, changed models, outputs over inputs


def _copy_nights(nights: list[Path], dst: Path) -> list[Path]:
    """The nights' run.json, predictions CSV and labels CSV copied into ``dst`` (the fixture's stay untouched)."""
    import shutil

    dst.mkdir(exist_ok=True)
    for run in nights:
        stem = run.name[: -len(".run.json")]
        for name in (run.name, f"{stem}.csv", f"{stem}.labels.csv"):
            shutil.copy(run.with_name(name), dst / name)
    return [dst / p.name for p in nights]


def _edit(path: Path, change) -> None:
    run = json.loads(path.read_text())
    change(run)
    path.write_text(json.dumps(run))


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader

    return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)


def _stats(run: dict) -> dict:
    return run["monitoring"]["models"]["pneumonia"]["overall"]


#: Tamperings of a run.json and the part of the "left out" note that names what is wrong.
TAMPERINGS = {
    "models-as-list": (lambda r: r["monitoring"].update(models=[1, 2]), "monitoring/models"),
    "no-overall": (lambda r: r["monitoring"]["models"]["pneumonia"].pop("overall"), "overall"),
    "short-quantiles": (lambda r: _stats(r).update(quantiles=[0.1, 0.5]), "quantiles"),
    "string-quantiles": (lambda r: _stats(r).update(quantiles=["x"] * 101), "quantiles"),
    "nan-quantile": (lambda r: _stats(r)["quantiles"].__setitem__(50, float("nan")), "quantiles"),
    "bad-finished": (lambda r: r.update(finished="yesterday"), "finished"),
    "number-finished": (lambda r: r.update(finished=12), "finished"),
    "counts-as-list": (lambda r: r.update(counts=[1, 2]), "counts"),
    "string-count": (lambda r: r["counts"].update(ok="many"), "counts/ok"),
    "by-as-list": (lambda r: r["monitoring"]["models"]["pneumonia"].update(by=[]), "by"),
    "group-as-list": (lambda r: r["monitoring"]["models"]["pneumonia"]["by"].update(scanner=[1]), "by/scanner"),
    "more-positives-than-images": (lambda r: _stats(r).update(n_positive=10**6), "n_positive"),
    "string-positive-rate": (lambda r: _stats(r).update(positive_rate="high"), "positive_rate"),
    "run-models-as-dict": (lambda r: r.update(models={"a": 1}), "models"),
    "monitoring-as-list": (lambda r: r.update(monitoring=[]), "monitoring"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_a_tampered_night_is_left_out_with_a_note(nights, tmp_path, tampering):
    """A run.json edited by hand is left out with a note naming the file and what is wrong; the others are analysed."""
    change, where = TAMPERINGS[tampering]
    runs = _copy_nights(nights, tmp_path / "runs")
    _edit(runs[-1], change)  # the latest night: the one the Prometheus file describes
    out = tmp_path / "m.pdf"
    result = CliRunner().invoke(main, ["monitor", *map(str, runs), "--baseline", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    (note,) = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert str(runs[-1]) in note and "left out" in note and where in note, note
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["series"]["run_json"] == [str(p) for p in runs[:-1]] and note[len("note: ") :] in doc["notes"]
    assert out.read_bytes().startswith(b"%PDF") and "pneumobatch_alerts" in out.with_suffix(".prom").read_text()
    # with only one usable night left: the one-line error, naming the left-out file
    alone = CliRunner().invoke(main, ["monitor", str(runs[0]), str(runs[-1]), "-o", str(tmp_path / "n.pdf")])
    one_line_error(alone, 3, "at least two runs", str(runs[-1]))


def test_the_library_leaves_out_a_tampered_night(nights, tmp_path):
    runs = _copy_nights(nights, tmp_path / "runs")
    _edit(runs[1], TAMPERINGS["no-overall"][0])
    loaded, notes = load_nights(runs)
    assert [n.path for n in loaded] == [runs[0], *runs[2:]]
    assert len(notes) == 1 and notes[0].startswith(f"{runs[1]}: ") and notes[0].endswith("left out")


def _add_model(run: dict, name: str, weights: str = "1" * 64) -> None:
    """A second model in a night: the pneumonia model's numbers under another name and weights."""
    import copy

    run["monitoring"]["models"][name] = copy.deepcopy(run["monitoring"]["models"]["pneumonia"])
    run["models"].append({"name": name, "weights_sha256": weights})


def _drop_model(run: dict, name: str) -> None:
    del run["monitoring"]["models"][name]
    run["models"] = [m for m in run["models"] if m["name"] != name]


#: How the models of the nights change: (edit of night i, expected (night, model, kind) alerts).
MODEL_CHANGES = {
    "added": (lambda i, r: i == 3 and _add_model(r, "extra"), {(3, "extra", "model-added")}),
    "dropped": (
        lambda i, r: _add_model(r, "extra") if i < 3 else None,
        {(3, "extra", "model-removed")},
    ),
    "switched": (
        lambda i, r: (_add_model(r, "pneumonia-v2"), _drop_model(r, "pneumonia")) if i >= 2 else None,
        {(n, m, k) for n in (2, 3) for m, k in (("pneumonia", "model-removed"), ("pneumonia-v2", "model-added"))},
    ),
    "weights-changed": (
        lambda i, r: i == 3 and r["models"][0].update(weights_sha256="2" * 64),
        {(3, "pneumonia", "weights-changed")},
    ),
}


@pytest.mark.parametrize("change", sorted(MODEL_CHANGES))
def test_a_model_change_is_an_alert_and_every_output_is_written(nights, tmp_path, change):
    edit, expected = MODEL_CHANGES[change]
    runs = _copy_nights(nights, tmp_path / "runs")
    for i, run in enumerate(runs):
        _edit(run, lambda r, i=i: edit(i, r))
    out = tmp_path / "m.pdf"
    result = CliRunner().invoke(main, ["monitor", *map(str, runs), "--baseline", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.with_suffix(".json").read_text())
    kinds = {"model-added", "model-removed", "weights-changed"}
    got = {(runs.index(Path(a["run_json"])), a["model"], a["kind"]) for a in doc["alerts"] if a["kind"] in kinds}
    assert got == expected
    for _, model, kind in expected:
        assert any(kind in line and model in line for line in result.output.splitlines() if line.startswith("ALERT"))
    text = _pdf_text(out)
    assert all(kind in text for _, _, kind in expected)
    tonight = [a for a in doc["alerts"] if a["run_json"] == str(runs[-1])]
    assert f"pneumobatch_alerts {float(len(tonight))}" in out.with_suffix(".prom").read_text()
    loaded, _ = load_nights(runs)  # the library gives the same alerts
    assert {(a["run_json"], a["kind"]) for a in analyse(loaded, baseline=2)["alerts"]} == {
        (a["run_json"], a["kind"]) for a in doc["alerts"]
    }


#: Outputs that name an input: (extra arguments, the input they would replace), relative to the runs folder.
OVERWRITES = {
    "pdf-beside-run-json": (["-o", "night0.run.pdf"], "night0.run.json"),
    "pdf-over-predictions": (["-o", "night1.csv"], "night1.csv"),
    "pdf-over-run-json": (["-o", "night2.run.json"], "night2.run.json"),
    "prometheus-over-run-json": (["-o", "m.pdf", "--prometheus", "night3.run.json"], "night3.run.json"),
    "prometheus-over-labels": (["-o", "m.pdf", "--prometheus", "night0.labels.csv"], "night0.labels.csv"),
    "json-over-labels": (["-o", "night0.labels.pdf"], "night0.labels.json"),
}


@pytest.mark.parametrize("case", sorted(OVERWRITES))
def test_monitor_never_overwrites_an_input(nights, tmp_path, case):
    """An output naming an input (a run.json, a predictions CSV, the labels): one line, exit 2, nothing written."""
    extra, victim = OVERWRITES[case]
    runs = _copy_nights(nights, tmp_path / "runs")
    folder = runs[0].parent
    labels = folder / "night0.labels.json"  # a labels file monitor reads (CSV content, another name)
    labels.write_bytes((folder / "night0.labels.csv").read_bytes())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = [a if a.startswith("-") else str(folder / a) for a in extra]
    if "labels" in victim:
        args += ["--labels", str(folder / victim), "--key", "sop_instance_uid"]
    result = CliRunner().invoke(main, ["monitor", *map(str, runs), "--baseline", "2", *args])
    one_line_error(result, 2, "would overwrite an input", str(folder / victim))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the input unchanged, nothing written


def test_monitor_outputs_must_differ(nights, tmp_path):
    runs = _copy_nights(nights, tmp_path / "runs")
    out = tmp_path / "m.pdf"
    result = CliRunner().invoke(main, ["monitor", *map(str, runs), "-o", str(out), "--prometheus", str(out)])
    one_line_error(result, 2, str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_monitor_refuses_a_link_at_an_output(nights, tmp_path):
    """A symbolic link planted at OUT.json (to a run.json) is refused, as predict refuses one: exit 3."""
    runs = _copy_nights(nights, tmp_path / "runs")
    before = runs[0].read_bytes()
    (tmp_path / "m.json").symlink_to(runs[0])
    result = CliRunner().invoke(main, ["monitor", *map(str, runs), "-o", str(tmp_path / "m.pdf")])
    one_line_error(result, 3, "symbolic link", str(tmp_path / "m.json"))
    assert runs[0].read_bytes() == before and not (tmp_path / "m.pdf").exists()


def test_the_library_refuses_an_output_over_an_input(nights, tmp_path):
    from pneumobatch.core.errors import OptionError
    from pneumobatch.operations.monitor.run import MonitorConfig, run_monitor

    runs = _copy_nights(nights, tmp_path / "runs")
    with pytest.raises(OptionError, match="would overwrite an input"):
        run_monitor(MonitorConfig(run_jsons=runs, output=runs[1].with_suffix(".pdf")))


def test_a_tampered_model_card_is_left_out_of_the_labelled_metrics(nights, tmp_path):
    runs = _copy_nights(nights, tmp_path / "runs")
    _edit(runs[1], lambda r: r["models"][0]["card"].update(classes=5))
    labels = tmp_path / "labels.csv"  # labels of the two oldest nights
    pd.concat(
        [pd.read_csv(p.with_name(p.name.replace(".run.json", ".labels.csv")), dtype=str) for p in runs[:2]]
    ).to_csv(labels, index=False)
    out = tmp_path / "m.pdf"
    args = ["monitor", *map(str, runs), "--labels", str(labels), "--key", "sop_instance_uid", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--baseline", "2"])
    assert result.exit_code == 0, result.output
    assert f"note: {runs[1]}: a model card in it is not valid; left out of the labelled metrics" in result.stderr
    perf = json.loads(out.with_suffix(".json").read_text())["labelled"]["models"]["pneumonia"]
    assert [r["labelled"] > 0 for r in perf] == [True, False, False, False]
