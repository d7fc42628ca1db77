"""Study rows of a two-level model carry the fine label of the image that decided the study (issue 26)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.uid import generate_uid

from pneumobatch.core.card import ModelCard
from pneumobatch.core.studies import aggregate_studies

COARSE = ["normal", "bacterial", "viral", "fungal", "covid-19"]
FINE = ["normal", "Streptococcus", "other bacterial", "SARS", "other viral", "Pneumocystis", "covid-19"]
PARENT = ["normal", "bacterial", "bacterial", "viral", "viral", "fungal", "covid-19"]


def _card(hierarchical: bool = True) -> ModelCard:
    return ModelCard(
        name="two" if hierarchical else "one",
        task="etiology",
        classes=COARSE if hierarchical else ["normal", "bacterial", "viral", "covid-19"],
        architecture="x",
        input_size=8,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        hierarchy={"fine": FINE, "parent": PARENT} if hierarchical else {},
    )


def test_a_study_takes_the_fine_label_of_its_key_image():
    rows = [  # study, path, P(normal), P(viral), P(fungal), fine_label, fine_top3
        ("A", "a1", 0.70, 0.20, 0.10, "other viral", "normal 0.700000; other viral 0.150000; Pneumocystis 0.100000"),
        ("A", "a2", 0.10, 0.30, 0.60, "Pneumocystis", "Pneumocystis 0.600000; SARS 0.200000; normal 0.100000"),
        ("B", "b1", 0.90, 0.05, 0.05, "normal", "normal 0.900000; SARS 0.030000; Pneumocystis 0.050000"),
    ]
    frame = pd.DataFrame(
        [
            {
                "path": path,
                "study": study,
                "model": "two",
                "status": "ok",
                "prob_normal": f"{pn:.6f}",
                "prob_bacterial": "0.000000",
                "prob_viral": f"{pv:.6f}",
                "prob_fungal": f"{pf:.6f}",
                "prob_covid-19": "0.000000",
                "pred_label": "",
                "fine_label": fine,
                "fine_top3": top,
            }
            for study, path, pn, pv, pf, fine, top in rows
        ]
    )
    studies = aggregate_studies(frame, [_card()]).set_index("study")
    a, b = studies.loc["A"], studies.loc["B"]
    assert (a.key_image, a.pred_label, a.fine_label) == ("a2", "fungal", "Pneumocystis")
    assert a.fine_top3 == rows[1][6]
    assert (b.key_image, b.pred_label, b.fine_label) == ("b1", "normal", "normal")
    assert list(studies.columns).index("fine_label") > list(studies.columns).index("prob_normal")


def test_a_one_level_model_beside_it_has_empty_fine_cells_and_an_old_csv_none():
    card = _card(hierarchical=False)
    frame = pd.DataFrame(
        [
            {
                "path": "x",
                "study": "A",
                "model": "one",
                "status": "ok",
                **{f"prob_{c}": "0.250000" for c in card.classes},
            }
        ]
    )
    assert "fine_label" not in aggregate_studies(frame, [card]).columns  # an older CSV: no fine columns
    frame["fine_label"], frame["fine_top3"] = "", ""
    studies = aggregate_studies(frame, [card])
    assert (studies.loc[0, "fine_label"], studies.loc[0, "fine_top3"]) == ("", "")  # its fine cells stay empty


def test_predict_writes_the_fine_label_into_the_studies_csv(tmp_path: Path):
    from pneumobatch.predict import run_predict
    from pneumobatch.predict_config import PredictConfig
    from pneumobatch.testing.synthetic import write_cxr
    from tests.helpers import save_tiny_model

    models = save_tiny_model(
        tmp_path / "models",
        name="etio2",
        task="etiology",
        classes=COARSE,
        hierarchy={"fine": FINE, "parent": PARENT},
        decision={"rule": "log-offsets", "log_offsets": [0.0, 0.2, -0.1, 0.0, 0.3]},
        seed=3,
    )
    study = generate_uid()
    rng = np.random.default_rng(26)
    (tmp_path / "in").mkdir()
    for i in range(3):
        write_cxr(
            tmp_path / "in" / f"{i}.dcm", rng.integers(0, 255, (64, 64)).astype(np.uint8), study_instance_uid=study
        )
    out = tmp_path / "p.csv"
    run_predict(PredictConfig(inputs=[tmp_path / "in"], output=out, models=("etio2",), weights_dir=models, workers=0))
    files = pd.read_csv(out, dtype=str, keep_default_na=False)
    studies = pd.read_csv(out.with_name("p.studies.csv"), dtype=str, keep_default_na=False)
    assert len(studies) == 1
    (row,) = studies.itertuples()
    key = files[files.path == row.key_image].iloc[0]
    assert (row.pred_label, row.fine_label, row.fine_top3) == (key.pred_label, key.fine_label, key.fine_top3)
    assert row.fine_label in FINE and PARENT[FINE.index(row.fine_label)] == row.pred_label
