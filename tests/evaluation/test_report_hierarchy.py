"""The report of a two-level (etiology) model: the coarse level by the card's decision, the fine level by
the fallback rule, both confusion matrices, untrusted fine cells; and older 4-class CSVs unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from pypdf import PdfReader
from scipy.stats import binomtest

from pneumobatch.cli import main
from pneumobatch.core.card import ModelCard

COARSE = ["normal", "bacterial", "viral", "fungal", "covid-19"]
#: the fine classes (network output order) and their parents; no "other fungal": every fungal
#: training image named Pneumocystis, so an Aspergillus image falls in a fine class the model lacks
FINE = ["normal", "Streptococcus", "other bacterial", "Influenza", "other viral", "Pneumocystis", "covid-19"]
PARENT = ["normal", "bacterial", "bacterial", "viral", "viral", "fungal", "covid-19"]
#: fungal gets +1 on the log scale: row 10 (P(viral) 0.4 > P(fungal) 0.3) is decided fungal
OFFSETS = [0.0, 0.0, 0.0, 1.0, 0.0]
MODEL = "etiology-v1"

#: finding, pred_label, fine_label, fine_top3 names; the true fine class and top-1/top-3 hits in the comments
ROWS = [
    ("No Finding", "normal", "normal", ["normal", "Streptococcus", "Influenza"]),  # normal: hit, hit
    ("No Finding", "bacterial", "Streptococcus", ["Streptococcus", "normal", "other bacterial"]),  # miss, hit
    ("Pneumonia/Bacterial/Streptococcus", "bacterial", "Streptococcus", ["Streptococcus", "normal", "Influenza"]),
    ("Pneumonia/Bacterial/Streptococcus", "bacterial", "other bacterial", ["other bacterial", "Influenza", "normal"]),
    ("Pneumonia/Bacterial/Klebsiella", "bacterial", "other bacterial", ["other bacterial", "Streptococcus", "normal"]),
    ("Pneumonia/Bacterial", "viral", "other viral", ["other viral", "other bacterial", "Influenza"]),  # miss, hit
    ("Pneumonia/Viral/Influenza", "viral", "Influenza", ["Influenza", "other viral", "covid-19"]),  # hit, hit
    ("Pneumonia/Viral/RSV", "viral", "Influenza", ["Influenza", "other viral", "normal"]),  # other viral: miss, hit
    ("Pneumonia/Viral/COVID-19", "covid-19", "covid-19", ["covid-19", "Influenza", "other viral"]),  # hit, hit
    ("Pneumonia/Fungal/Pneumocystis", "fungal", "Pneumocystis", ["Pneumocystis", "other viral", "Influenza"]),
    ("Pneumonia/Fungal/Aspergillus", "fungal", "Pneumocystis", ["Pneumocystis", "normal", "covid-19"]),  # miss, miss
    ("Pneumonia/Viral/COVID-19", "viral", "other viral", ["other viral", "covid-19", "Influenza"]),  # miss, hit
]
TOP1_HITS, TOP3_HITS = 6, 10
#: fine class: (support, n predicted, hits), worked out by hand from ROWS
BY_HAND = {
    "normal": (2, 1, 1),
    "Streptococcus": (2, 2, 1),
    "other bacterial": (2, 2, 1),
    "Influenza": (1, 2, 1),
    "other viral": (1, 2, 0),
    "Pneumocystis": (1, 2, 1),
    "covid-19": (2, 1, 1),
    "other fungal": (1, 0, 0),
}
#: truth x pred_label in COARSE order (row 10 is fungal by the offsets, viral by the argmax)
COARSE_CONFUSION = [[1, 1, 0, 0, 0], [0, 3, 1, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 2, 0], [0, 0, 1, 0, 1]]


def _probs(pred: str, row: int) -> dict[str, float]:
    if row == 9:  # the argmax says viral; log(0.3) + 1 > log(0.4): the card's rule says fungal
        return {"normal": 0.1, "bacterial": 0.1, "viral": 0.4, "fungal": 0.3, "covid-19": 0.1}
    return {c: 0.6 if c == pred else 0.1 for c in COARSE}


def _top_cell(names: list[str]) -> str:
    return "; ".join(f"{name} {p:.6f}" for name, p in zip(names, (0.5, 0.2, 0.1)))


def write_hierarchical_run(folder: Path, rows=ROWS, run_json: bool = True) -> dict[str, Path]:
    """predictions.csv, predictions.run.json (with the two-level card) and labels.csv, as predict writes them."""
    records, labels = [], []
    for i, (finding, pred, fine_label, top) in enumerate(rows):
        path = f"study{i}/img{i}.png"
        probs = _probs(pred, i)
        records.append(
            {
                "path": path,
                "status": "ok",
                "reason": "",
                "task": "etiology",
                "model": MODEL,
                "pred_label": pred,
                **{f"prob_{c}": f"{probs[c]:.6f}" for c in COARSE},
                "fine_label": fine_label,
                "fine_top3": top if isinstance(top, str) else _top_cell(top),
                "threshold": "",
            }
        )
        labels.append({"path": path, "finding": finding})
    paths = {"predictions": folder / "predictions.csv", "labels": folder / "labels.csv"}
    pd.DataFrame(records).to_csv(paths["predictions"], index=False)
    pd.DataFrame(labels).to_csv(paths["labels"], index=False)
    if run_json:
        card = ModelCard(
            name=MODEL,
            task="etiology",
            classes=COARSE,
            architecture="densenet121",
            input_size=224,
            mean=[0.5],
            std=[0.25],
            hierarchy={"fine": FINE, "parent": PARENT, "rule": "the test's rule"},
            decision={"rule": "log-offsets", "log_offsets": OFFSETS},
        )
        paths["run"] = folder / "predictions.run.json"
        paths["run"].write_text(json.dumps({"models": [{"name": MODEL, "task": "etiology", "card": card.to_dict()}]}))
    return paths


def run_report(paths: dict[str, Path], out: Path, *extra: str) -> dict:
    args = ["report", str(paths["predictions"]), "--labels", str(paths["labels"]), "--model", "etiology"]
    result = CliRunner().invoke(main, [*args, "--label-column", "finding", "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.with_suffix(".json").read_text())


def pdf_text(path: Path) -> str:
    return " ".join(" ".join(page.extract_text() or "" for page in PdfReader(str(path)).pages).split())


def exact(k: int, n: int) -> list[float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [ci.low, ci.high]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hierarchy")
    paths = write_hierarchical_run(folder)
    out = folder / "report.pdf"
    return run_report(paths, out, "--bootstrap", "50"), out


def test_fine_per_class_numbers_match_the_hand_count(report):
    doc, _ = report
    fine = doc["models"][0]["fine"]
    assert fine["classes"] == [*FINE, "other fungal"] and fine["model_classes"] == FINE
    assert fine["parents"] == [*PARENT, "fungal"]
    assert fine["n"] == len(ROWS)
    table = {row["class"]: row for row in fine["per_class"]}
    assert set(table) == set(BY_HAND)
    for name, (support, called, hits) in BY_HAND.items():
        row = table[name]
        assert (row["support"], row["n_predicted"]) == (support, called), name
        assert row["recall"] == pytest.approx(hits / support), name
        assert row["recall_ci"] == pytest.approx(exact(hits, support)), name
        if called:
            assert row["precision"] == pytest.approx(hits / called), name
            assert row["precision_ci"] == pytest.approx(exact(hits, called)), name
        else:
            assert row["precision"] is None and row["precision_ci"] is None
    assert table["other fungal"]["parent"] == "fungal" and table["Streptococcus"]["parent"] == "bacterial"
    assert any("other fungal 1" in note for note in fine["notes"])


def test_top1_and_top3_accuracy_with_exact_intervals(report):
    doc, _ = report
    fine = doc["models"][0]["fine"]
    assert fine["top1"]["hits"] == TOP1_HITS and fine["top1"]["n"] == len(ROWS)
    assert fine["top1"]["accuracy"] == pytest.approx(TOP1_HITS / len(ROWS))
    assert fine["top1"]["ci"] == pytest.approx(exact(TOP1_HITS, len(ROWS)))
    assert fine["top3"]["hits"] == TOP3_HITS and fine["top3"]["n"] == len(ROWS)
    assert fine["top3"]["accuracy"] == pytest.approx(TOP3_HITS / len(ROWS))
    assert fine["top3"]["ci"] == pytest.approx(exact(TOP3_HITS, len(ROWS)))
    assert fine["problems"]["unusable_fine_label"]["count"] == 0
    assert fine["problems"]["malformed_fine_top3"]["count"] == 0


def test_both_confusion_matrices_and_the_coarse_one_follows_the_decision(report):
    doc, _ = report
    model = doc["models"][0]
    coarse = model["evaluation"]["confusion_matrix"]
    assert coarse["labels"] == COARSE
    assert coarse["counts"] == COARSE_CONFUSION  # pred_label (the card's offsets), not the argmax
    fine = model["fine"]["confusion_matrix"]
    assert fine["labels"] == [*FINE, "other fungal"]
    counts = np.array(fine["counts"])
    assert counts.sum() == len(ROWS)
    assert list(np.diag(counts)) == [BY_HAND[c][2] for c in fine["labels"]]
    assert list(counts.sum(axis=1)) == [BY_HAND[c][0] for c in fine["labels"]]
    assert list(counts.sum(axis=0)) == [BY_HAND[c][1] for c in fine["labels"]]
    i = fine["labels"].index
    assert counts[i("other fungal"), i("Pneumocystis")] == 1 and counts[i("covid-19"), i("other viral")] == 1


def test_blank_pred_labels_are_decided_by_the_cards_offsets(tmp_path):
    rows = [(f, "", fine, top) if i == 9 else (f, p, fine, top) for i, (f, p, fine, top) in enumerate(ROWS)]
    paths = write_hierarchical_run(tmp_path, rows)
    doc = run_report(paths, tmp_path / "r.pdf", "--bootstrap", "0")
    model = doc["models"][0]
    assert model["evaluation"]["confusion_matrix"]["counts"] == COARSE_CONFUSION  # fungal, as the offsets say
    assert any("derived from the probabilities" in n for n in model["join"]["notes"])
    assert model["fine"]["top1"]["hits"] == TOP1_HITS  # the fine label still sits below the decision


def test_the_pdf_has_the_fine_level(report):
    doc, out = report
    model = doc["models"][0]
    assert (out.parent / model["figures"]["fine_confusion"]).is_file()
    assert (out.parent / model["figures"]["confusion"]).is_file()
    text = pdf_text(out)
    assert "Evaluation (fine level: organism)" in text
    assert f"Top-1 accuracy {TOP1_HITS / len(ROWS):.3f}" in text
    assert f"top-3 accuracy {TOP3_HITS / len(ROWS):.3f}" in text
    assert "Pneumocystis" in text and "other fungal *" in text


HOSTILE = "=HYPERLINK(<b>x</b>)"


def test_hostile_fine_cells_are_counted_not_crashed_on(tmp_path):
    rows = list(ROWS)
    rows[0] = ("No Finding", "normal", HOSTILE, ["normal", "Streptococcus", "Influenza"])  # not a fine class
    rows[2] = (rows[2][0], "bacterial", "Influenza", rows[2][3])  # a fine class, but not below pred_label
    rows[6] = (rows[6][0], "viral", "", rows[6][3])  # empty
    rows[1] = (rows[1][0], rows[1][1], rows[1][2], f"{HOSTILE} 0.5; normal x; ;;")  # malformed
    rows[4] = (rows[4][0], rows[4][1], rows[4][2], "normal 0.5; normal 0.3; Streptococcus 0.2")  # a name twice
    rows[7] = (rows[7][0], rows[7][1], rows[7][2], "Influenza 7.0; other viral 0.2; normal 0.1")  # p > 1
    rows[8] = (rows[8][0], rows[8][1], rows[8][2], "covid-19 0.9")  # too few
    paths = write_hierarchical_run(tmp_path, rows)
    out = tmp_path / "hostile.pdf"
    doc = run_report(paths, out, "--bootstrap", "20")
    fine = doc["models"][0]["fine"]
    bad_label = fine["problems"]["unusable_fine_label"]
    assert bad_label["count"] == 3
    assert bad_label["breakdown"] == {"not a fine class of the model": 1, "not below pred_label": 1, "empty": 1}
    assert fine["problems"]["malformed_fine_top3"]["count"] == 4
    assert fine["n"] == len(ROWS) - 3 and fine["top3"]["n"] == len(ROWS) - 4
    # rows 0, 2, 6 (all top-1 hits before) are out of the fine level; 1, 4, 7, 8 (top-3 hits) out of top-3
    assert fine["top1"]["hits"] == TOP1_HITS - 3
    assert fine["top3"]["hits"] == TOP3_HITS - 4
    notes = " ".join(fine["notes"])
    assert "3 of 12 rows have an unusable fine_label" in notes and "4 of 12 rows have a malformed" in notes
    assert HOSTILE not in out.with_suffix(".json").read_text() and HOSTILE not in pdf_text(out)
    assert "study0/img0.png" in bad_label["examples"]  # the row's key, never the cell
    assert "unusable fine_label" in pdf_text(out)


def test_an_older_four_class_csv_reports_as_before(tmp_path):
    """No prob_fungal, no fine columns, no card in run.json: the 4-class report, without a fine section."""
    old = ["normal", "bacterial", "viral", "covid-19"]
    rows = [(finding, pred) for finding, pred, _, _ in ROWS if pred != "fungal"]  # 10 rows
    records, labels = [], []
    for i, (finding, pred) in enumerate(rows):
        probs = {c: 0.7 if c == pred else 0.1 for c in old}
        records.append(
            {
                "path": f"s{i}/i{i}.png",
                "status": "ok",
                "reason": "",
                "task": "etiology",
                "model": "etiology-v03",
                "pred_label": pred,
                **{f"prob_{c}": probs[c] for c in ("covid-19", "viral", "normal", "bacterial")},  # any column order
                "threshold": "",
            }
        )
        labels.append({"path": f"s{i}/i{i}.png", "finding": finding})
    paths = {"predictions": tmp_path / "predictions.csv", "labels": tmp_path / "labels.csv"}
    pd.DataFrame(records).to_csv(paths["predictions"], index=False)
    pd.DataFrame(labels).to_csv(paths["labels"], index=False)
    out = tmp_path / "old.pdf"
    doc = run_report(paths, out, "--bootstrap", "0")
    model = doc["models"][0]
    assert "fine" not in model and "fine_confusion" not in model["figures"]
    ev = model["evaluation"]
    assert model["classes"] == old and ev["confusion_matrix"]["labels"] == old
    # truth x pred_label, by hand: rows 0-8 and 11 of ROWS
    assert ev["confusion_matrix"]["counts"] == [[1, 1, 0, 0], [0, 3, 1, 0], [0, 0, 2, 0], [0, 0, 1, 1]]
    assert ev["accuracy"] == pytest.approx(7 / 10)
    assert "fine level" not in pdf_text(out)
