"""Tests for pneumobatch.evaluation.report: PDF, figures and metrics JSON from built predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pypdf import PdfReader

from pneumobatch.core.errors import LabelError, ReportError
from pneumobatch.evaluation.report import write_report
from pneumobatch.evaluation.report.options import RESEARCH_ONLY, ReportOptions, output_paths

ETIOLOGY = ("normal", "bacterial", "viral", "covid-19")
FINDINGS = {
    "normal": "No Finding",
    "bacterial": "Pneumonia/Bacterial/Streptococcus",
    "viral": "Pneumonia/Viral/Influenza",
    "covid-19": "Pneumonia/Viral/COVID-19",
}
SHA = {"pneumonia": "ab" * 32, "etiology": "cd" * 32}


def make_run(
    folder: Path,
    n: int = 400,
    models: tuple[str, ...] = ("pneumonia",),
    seed: int = 0,
    run_json: bool = True,
    studies_csv: bool = True,
) -> dict[str, Path]:
    """Write predictions.csv (+ studies CSV, run.json) and labels.csv like `predict` would.

    Two images per study; ~4% of files skipped or failed; the labels file has a few
    rows that do not map (ARDS), a few without a prediction and extra columns.
    """
    rng = np.random.default_rng(seed)
    truth = rng.choice(ETIOLOGY, size=(n + 1) // 2, p=[0.4, 0.25, 0.2, 0.15]).repeat(2)[:n]
    idx = np.arange(n)
    status = np.where(idx % 50 == 7, "skipped", np.where(idx % 97 == 5, "error", "ok"))
    reason = np.where(status == "skipped", np.where(idx % 100 == 7, "lateral", "not-image"), "")
    reason = np.where(status == "error", "corrupt", reason)
    base = pd.DataFrame(
        {
            "path": [f"site{i % 3}/study{i // 2}/img{i}.dcm" for i in idx],
            "status": status,
            "reason": reason,
            "detail": "",
            "study": [f"1.2.826.0.1.3680043.{i // 2}" for i in idx],
            "study_instance_uid": [f"1.2.826.0.1.3680043.{i // 2}" for i in idx],
            "series_instance_uid": [f"1.2.826.0.2.{i // 2}" for i in idx],
            "sop_instance_uid": [f"1.2.826.0.3.{i}" for i in idx],
            "view_position": np.where(idx % 3 == 0, "AP", "PA"),
            "file_size": 1000,
            "file_mtime_ns": 0,
        }
    )
    frames, study_frames, run_models = [], [], []
    for model in models:
        df = base.copy()
        df["task"] = model
        df["model"] = f"{model}-densenet121"
        df["weights_sha256"] = SHA[model]
        ok = df["status"] == "ok"
        if model == "pneumonia":
            classes = ("normal", "pneumonia")
            y = (truth != "normal").astype(float)
            p = 1 / (1 + np.exp(-(2.4 * (y - 0.5) + rng.normal(0, 1.0, n))))
            proba = np.c_[1 - p, p]
            threshold = 0.5
            pred = np.where(p >= threshold, "pneumonia", "normal")
        else:
            classes = ETIOLOGY
            t = np.array([ETIOLOGY.index(x) for x in truth])
            logits = rng.normal(0, 1, (n, 4))
            logits[idx, t] += 2.0
            proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            threshold = None
            pred = np.asarray(classes)[proba.argmax(1)]
        proba = np.round(proba, 6)
        for j, c in enumerate(classes):
            df[f"prob_{c}"] = np.where(ok, proba[:, j], np.nan)
        df["pred_label"] = np.where(ok, pred, "")
        df["threshold"] = threshold if threshold is not None else np.nan
        df.loc[~ok, "threshold"] = np.nan
        frames.append(df)
        # predictions.studies.csv as predict writes it: the most abnormal image of each study
        prob_cols = [f"prob_{c}" for c in classes]
        scored = df[ok].assign(_score=1 - df.loc[ok, "prob_normal"])
        best = scored.sort_values("_score", ascending=False, kind="stable").drop_duplicates("study")
        st = (
            df.groupby("study", sort=False)
            .agg(
                study_instance_uid=("study_instance_uid", "first"),
                n_files=("path", "size"),
                n_images=("status", lambda s: int((s == "ok").sum())),
            )
            .reset_index()
        )
        st = st.merge(
            best[["study", "path", "pred_label", *prob_cols]].rename(columns={"path": "key_image"}),
            on="study",
            how="left",
        )
        st["model"] = df["model"].iloc[0]
        st["task"] = model
        st["threshold"] = threshold
        study_frames.append(st)
        run_models.append(
            {
                "name": df["model"].iloc[0],
                "task": model,
                "classes": list(classes),
                "positive": "pneumonia" if model == "pneumonia" else None,
                "threshold": threshold,
                "weights_sha256": SHA[model],
                "thresholds": {"shipped": threshold, "recall_95": 0.3, "youden": 0.45} if threshold is not None else {},
            }
        )
    preds = pd.concat(frames, ignore_index=True)
    cols = [c for c in preds.columns if not c.startswith("prob_")] + sorted(
        {c for c in preds.columns if c.startswith("prob_")}, key=list(preds.columns).index
    )
    paths = {"predictions": folder / "predictions.csv"}
    preds[cols].to_csv(paths["predictions"], index=False)
    if studies_csv:
        paths["studies"] = folder / "predictions.studies.csv"
        pd.concat(study_frames, ignore_index=True).to_csv(paths["studies"], index=False)
    if run_json:
        paths["run"] = folder / "predictions.run.json"
        counts = {
            "files": n,
            "ok": int((status == "ok").sum()),
            "skipped": int((status == "skipped").sum()),
            "error": int((status == "error").sum()),
            "by_reason": {r: int((reason == r).sum()) for r in ("lateral", "not-image", "corrupt")},
        }
        paths["run"].write_text(
            json.dumps(
                {
                    "pneumobatch_version": "0.1.0",
                    "started": "2026-11-23T01:00:00+00:00",
                    "finished": "2026-11-23T01:05:00+00:00",
                    "roots": ["/data/nightly/2026-11-23"],
                    "device": "cpu",
                    "models": run_models,
                    "counts": counts,
                    "seconds": 290.0,
                    "images_per_second": 41.5,
                }
            )
        )
    labels = pd.DataFrame(
        {
            "path": ["./" + p if i % 5 == 0 else p for i, p in enumerate(base["path"])],
            "finding": [FINDINGS[t] for t in truth],
            "sex": np.where(idx % 2 == 0, "F", "M"),
            "source": np.where(idx % 4 == 0, "hospital-b", "hospital-a"),
        }
    )
    labels.loc[idx % 61 == 3, "finding"] = "ARDS"
    extra = pd.DataFrame(
        {"path": ["elsewhere/x1.dcm", "elsewhere/x2.dcm"], "finding": "No Finding", "sex": "F", "source": "x"}
    )
    labels = pd.concat([labels, extra], ignore_index=True)
    paths["labels"] = folder / "labels.csv"
    labels.to_csv(paths["labels"], index=False)
    return paths


def pdf_text(path: Path) -> str:
    return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("binary")
    paths = make_run(folder, n=400)
    out = folder / "out" / "report.pdf"
    result = write_report(
        ReportOptions(
            paths["predictions"],
            out,
            paths["labels"],
            label_column="finding",
            by=["sex", "view_position"],
            n_bootstrap=200,
        )
    )
    return paths, result


def test_binary_report_files_and_text(binary_report):
    paths, result = binary_report
    assert result.pdf.is_file() and result.pdf.stat().st_size > 10_000
    json_path, folder = output_paths(result.pdf)
    assert result.metrics_json == json_path and json_path.is_file()
    assert {p.name for p in folder.glob("*.png")} == {p.name for p in result.figures}
    kinds = {p.stem.split("_", 1)[1] for p in result.figures}
    assert kinds == {"confusion", "roc", "pr", "calibration", "study_roc"}
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == "pneumobatch.report/1"  # what readers of the JSON key on: a format name, not a module path
    model = doc["models"][0]
    ev = model["evaluation"]
    auc = ev["roc"]["pneumonia"]["auc"]
    text = pdf_text(result.pdf)
    flat = " ".join(text.split())
    assert "pneumonia-densenet121" in text
    assert f"{auc:.3f}" in text
    assert "normal" in text and "pneumonia" in text
    assert "not a diagnostic device" in flat
    assert SHA["pneumonia"][:12] in text
    assert "0.1.0" in text and "/data/nightly/2026-11-23" in text
    for section in ("Operating points", "Calibration", "Study level", "Subgroups by sex", "Join problems"):
        assert section in text, section
    for rel in model["figures"].values():
        assert (result.pdf.parent / rel).is_file()
    assert all(f in doc["files"] for f in ("report.pdf", "report.json"))


def test_binary_report_numbers(binary_report):
    paths, result = binary_report
    doc = json.loads(result.metrics_json.read_text())
    model = doc["models"][0]
    ev = model["evaluation"]
    assert model["threshold"] == 0.5 and model["positive"] == "pneumonia"
    assert 0.8 < ev["roc"]["pneumonia"]["auc"] <= 1.0
    lo, hi = ev["roc"]["pneumonia"]["auc_ci"]
    assert lo <= ev["roc"]["pneumonia"]["auc"] <= hi
    names = [p["name"] for p in ev["operating_points"]]
    assert names[:3] == ["shipped", "recall_target", "youden"]
    assert {"card_recall_95", "card_youden"} <= set(names)
    assert ev["operating_points"][1]["sensitivity"] >= 0.95
    join = model["join"]
    assert join["key"] == "path" and join["level"] == "file"
    problems = join["problems"]
    assert problems["labels_without_prediction"]["count"] == 2
    assert problems["unmapped_labels"]["count"] == 7  # i % 61 == 3 for i < 400
    assert problems["unmapped_labels"]["breakdown"] == {"ARDS": 7}
    assert problems["labelled_not_ok"]["count"] > 0
    assert model["study"]["evaluation"]["n"] > 0
    assert set(model["subgroups"]) == {"sex", "view_position"}
    assert {g["value"] for g in model["subgroups"]["sex"]["groups"]} == {"F", "M"}
    assert doc["run"]["counts"]["files"] == 400


def test_rerun_replaces_outputs_without_leftovers(tmp_path):
    paths = make_run(tmp_path, n=120)
    out = tmp_path / "r.pdf"
    first = write_report(
        ReportOptions(paths["predictions"], out, paths["labels"], label_column="finding", n_bootstrap=50)
    )
    stray = tmp_path / "r_files" / "mine.png"
    stray.write_bytes(b"user file")
    second = write_report(ReportOptions(paths["predictions"], out, None, n_bootstrap=50))  # no labels: fewer figures
    assert {p.name for p in (tmp_path / "r_files").glob("*.png")} == {p.name for p in second.figures} | {"mine.png"}
    assert len(second.figures) < len(first.figures)
    assert stray.read_bytes() == b"user file"


def test_multiclass_two_models_and_no_run_json(tmp_path):
    paths = make_run(tmp_path, n=300, models=("pneumonia", "etiology"), run_json=False, studies_csv=False)
    result = write_report(
        ReportOptions(
            paths["predictions"], tmp_path / "both.pdf", paths["labels"], label_column="finding", n_bootstrap=100
        )
    )
    assert result.models == ["pneumonia-densenet121", "etiology-densenet121"]
    doc = json.loads(result.metrics_json.read_text())
    eti = doc["models"][1]
    assert eti["classes"] == list(ETIOLOGY) and eti["positive"] is None
    ev = eti["evaluation"]
    assert set(ev["roc"]) == set(ETIOLOGY)
    assert ev["operating_points"] == []
    assert "top_label" in ev["calibration"]
    assert doc["run"]["counts_source"] == "predictions CSV"
    text = pdf_text(result.pdf)
    assert "covid-19" in text and "etiology-densenet121" in text
    assert f"{ev['macro_auc']:.3f}" in text
    assert "the most abnormal image of each study" in " ".join(text.split())


def test_model_option_and_unknown_model(tmp_path):
    paths = make_run(tmp_path, n=100, models=("pneumonia", "etiology"))
    result = write_report(
        ReportOptions(
            paths["predictions"],
            tmp_path / "e.pdf",
            paths["labels"],
            label_column="finding",
            model="etiology-densenet121",
            n_bootstrap=0,
        )
    )
    assert result.models == ["etiology-densenet121"]
    by_task = write_report(ReportOptions(paths["predictions"], tmp_path / "p.pdf", model="pneumonia"))  # unique task
    assert by_task.models == ["pneumonia-densenet121"]
    with pytest.raises(ReportError, match="pneumonia-densenet121"):
        write_report(ReportOptions(paths["predictions"], tmp_path / "x.pdf", model="nope"))


def test_summary_report_without_labels(tmp_path):
    paths = make_run(tmp_path, n=200)
    result = write_report(ReportOptions(paths["predictions"], tmp_path / "summary.pdf", by=["view_position"]))
    assert not result.labelled
    doc = json.loads(result.metrics_json.read_text())
    s = doc["models"][0]["summary"]
    assert sum(s["prediction_counts"].values()) == s["status_counts"]["ok"]
    assert s["reason_counts"]["skipped"] and s["reason_counts"]["error"] == {"corrupt": 3}
    assert s["images_per_second"] == 41.5
    text = " ".join(pdf_text(result.pdf).split())
    assert "not a diagnostic device" in text and "41.5 images/s" in text
    assert "Predictions by view_position" in text and "corrupt" in text


def test_errors(tmp_path):
    paths = make_run(tmp_path, n=60)
    with pytest.raises(ReportError, match="overwrite an input"):
        write_report(
            ReportOptions(paths["predictions"], tmp_path / "predictions.pdf", run_json=tmp_path / "predictions.json")
        )
    with pytest.raises(ReportError, match=r"\.pdf"):
        write_report(ReportOptions(paths["predictions"], tmp_path / "report.txt"))
    with pytest.raises(ReportError, match="not found"):
        write_report(ReportOptions(tmp_path / "missing.csv", tmp_path / "r.pdf"))
    with pytest.raises(LabelError, match="--label-column finding"):
        write_report(ReportOptions(paths["predictions"], tmp_path / "r.pdf", paths["labels"]))
    with pytest.raises(LabelError, match="--by ward"):
        write_report(
            ReportOptions(
                paths["predictions"], tmp_path / "r.pdf", paths["labels"], label_column="finding", by=["ward"]
            )
        )
    assert not (tmp_path / "r.pdf").exists()


def test_awkward_strings_render(tmp_path):
    paths = make_run(tmp_path, n=80)
    labels = pd.read_csv(paths["labels"])
    labels["source"] = np.where(labels.index % 2, "São Paulo <b>&</b>", "北京 hospital")
    labels.to_csv(paths["labels"], index=False)
    result = write_report(
        ReportOptions(
            paths["predictions"],
            tmp_path / "odd.pdf",
            paths["labels"],
            label_column="finding",
            by=["source"],
            n_bootstrap=20,
        )
    )
    assert "São Paulo <b>&</b>" in pdf_text(result.pdf)


def test_ten_thousand_predictions_are_fast(tmp_path):
    paths = make_run(tmp_path, n=10_000)
    result = write_report(
        ReportOptions(paths["predictions"], tmp_path / "big.pdf", paths["labels"], label_column="finding", by=["sex"])
    )
    print(f"\n10,000 predictions, labelled, 1,000 bootstrap resamples: report in {result.seconds:.1f} s")
    doc = json.loads(result.metrics_json.read_text())
    assert doc["models"][0]["evaluation"]["n"] > 9000
    assert result.seconds < 60  # generous: the machine is shared; typically a few seconds


def test_research_only_constant():
    assert "not a diagnostic device" in RESEARCH_ONLY


def test_where_restricts_labels_to_a_subset():
    import pandas as pd
    import pytest

    from pneumobatch.core.errors import LabelError
    from pneumobatch.evaluation.report import select_labels

    labels = pd.DataFrame({"path": ["a", "b", "c"], "split": ["train", "Test", "test"], "label": ["normal"] * 3})
    assert list(select_labels(labels, ["split=test"]).path) == ["b", "c"]
    with pytest.raises(LabelError, match="no column"):
        select_labels(labels, ["site=x"])
    with pytest.raises(LabelError, match="COLUMN=VALUE"):
        select_labels(labels, ["split"])
    with pytest.raises(LabelError, match="no label rows"):
        select_labels(labels, ["split=val"])


def test_target_recall_moves_the_recall_target_point(tmp_path):
    """report --target-recall sets the sensitivity the recall_target point reaches, as in the card."""
    from click.testing import CliRunner

    from pneumobatch.cli import main

    paths = make_run(tmp_path, n=300)
    points = {}
    for target in (0.8, 0.95):
        out = tmp_path / f"r{target}.pdf"
        args = ["report", str(paths["predictions"]), "--labels", str(paths["labels"]), "--label-column", "finding"]
        result = CliRunner().invoke(main, [*args, "--target-recall", str(target), "--bootstrap", "0", "-o", str(out)])
        assert result.exit_code == 0, result.output
        doc = json.loads(out.with_suffix(".json").read_text())
        assert doc["inputs"]["target_recall"] == target
        ev = doc["models"][0]["evaluation"]
        point = next(p for p in ev["operating_points"] if p["name"] == "recall_target")
        assert point["sensitivity"] >= target and f">= {target:g}" in point["note"]
        assert f"reaching sensitivity {target:g}" in pdf_text(out)
        points[target] = point
    assert points[0.8]["threshold"] > points[0.95]["threshold"]
    assert points[0.8]["sensitivity"] < 0.95


def test_report_import_graph_has_no_torch():
    """Every report module (loaded lazily by pneumobatch.evaluation.report) and the metrics stay torch-free."""
    import subprocess
    import sys

    modules = "options, inputs, build, cases, thumbnails, figures, document, pdf, write"
    code = (
        f"import sys; from pneumobatch.evaluation.report import {modules}; import pneumobatch.evaluation.metrics; "
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("keep", ["heading", "intro"])
def test_headings_and_intro_lines_stay_on_the_page_of_what_follows(tmp_path, keep):
    """Wherever the page ends, a heading (or a ``keep`` intro line) is on the page of the
    table after it, as the report's hand-held keep-with-next did; a plain paragraph is not."""
    from pneumobatch.evaluation.report.document import Document

    def pages(n_filler: int, kept: bool) -> list[str]:
        pdf = Document(tmp_path)
        for i in range(n_filler):
            pdf.para(f"filler line {i}")
        if keep == "heading" and kept:
            pdf.heading("HEADINGMARK", "h2")
        else:
            pdf.para("HEADINGMARK", keep=kept)
        pdf.table([], [["TABLEROW " + "word " * 300]], [1])  # one tall row: a table that cannot split
        out = tmp_path / f"k{n_filler}.pdf"
        pdf.write(out, title="t", footer="footer line")
        return [page.extract_text() for page in PdfReader(out).pages]

    split_plain = 0
    for n in range(36, 50, 2):
        kept = pages(n, True)
        assert all("footer line" in p and f"page {i + 1}" in p for i, p in enumerate(kept))
        assert sum("HEADINGMARK" in p for p in kept) == 1
        assert "TABLEROW" in next(p for p in kept if "HEADINGMARK" in p)
        plain = pages(n, False)
        split_plain += "TABLEROW" not in next(p for p in plain if "HEADINGMARK" in p)
    assert split_plain  # some page end falls between them when nothing keeps them together
