"""``predict`` with a two-level (etiology) model: coarse probabilities that are the sums of the fine
ones, the fine label below the decision, the same numbers in PyTorch and ONNX Runtime, and an
older one-level model beside it unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pneumobatch.cli import main
from pneumobatch.core.hierarchy import Hierarchy, parse_top_text
from tests.helpers import save_tiny_model

COARSE = ("normal", "bacterial", "viral", "fungal", "covid-19")
FINE = ("normal", "Streptococcus", "other bacterial", "SARS", "other viral", "Pneumocystis", "covid-19")
PARENT = ("normal", "bacterial", "bacterial", "viral", "viral", "fungal", "covid-19")
SAMPLES = Path(__file__).parents[2] / "sample_studies"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hier")
    save_tiny_model(
        folder,
        name="etio2",
        task="etiology",
        classes=COARSE,
        hierarchy={"fine": list(FINE), "parent": list(PARENT)},
        decision={"rule": "log-offsets", "log_offsets": [0.0, 0.2, -0.1, 0.0, 0.3]},
        seed=3,
    )
    save_tiny_model(folder, name="etio1", task="etiology", classes=("normal", "bacterial", "viral", "covid-19"))
    return folder


def _predict(models: Path, out: Path, *extra: str) -> pd.DataFrame:
    args = ["predict", str(SAMPLES), "-m", "etio2", "-m", "etio1", "--weights-dir", str(models), "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--quiet", *extra])
    assert result.exit_code in (0, 1), result.output
    return pd.read_csv(out, dtype=str, keep_default_na=False)


def test_two_level_rows_add_up_and_carry_the_fine_label(models: Path, tmp_path: Path):
    frame = _predict(models, tmp_path / "p.csv", "--backend", "torch")
    tree = Hierarchy(COARSE, FINE, PARENT)
    two = frame[(frame.model == "etio2") & (frame.status == "ok")]
    assert len(two) > 10
    for _, row in two.iterrows():
        coarse = np.array([float(row[f"prob_{c}"]) for c in COARSE])
        assert abs(coarse.sum() - 1) < 1e-5
        assert row.operating_point == "log-offsets"
        # the decision follows the card's offsets, not the argmax
        offsets = np.array([0.0, 0.2, -0.1, 0.0, 0.3])
        assert row.pred_label == COARSE[int(np.argmax(np.log(coarse) + offsets))]
        assert tree.parent[tree.fine.index(row.fine_label)] == row.pred_label
        top = parse_top_text(row.fine_top3)
        assert len(top) == 3 and [p for _, p in top] == sorted((p for _, p in top), reverse=True)
        for name, p in top:  # no fine class is more probable than its coarse class
            assert p <= float(row[f"prob_{tree.parent[tree.fine.index(name)]}"]) + 1e-6
        # fine_prob is fine_label's probability: at most its class's, at least its siblings' in fine_top3
        fine_p = float(row.fine_prob)
        assert 0 < fine_p <= float(row[f"prob_{row.pred_label}"]) + 1e-6
        assert all(abs(p - fine_p) <= 1e-6 for name, p in top if name == row.fine_label)
        siblings = [
            p for name, p in top if name != row.fine_label and tree.parent[tree.fine.index(name)] == row.pred_label
        ]
        assert all(p <= fine_p + 1e-6 for p in siblings)
    one = frame[(frame.model == "etio1") & (frame.status == "ok")]
    assert (one.prob_fungal == "").all() and (one.fine_label == "").all() and (one.fine_top3 == "").all()
    assert (one.fine_prob == "").all()
    assert set(one.operating_point) == {"argmax"}
    # rows that were not read carry no fine cells either
    assert (frame[frame.status != "ok"].fine_label == "").all() and (frame[frame.status != "ok"].fine_prob == "").all()


def test_onnx_runtime_gives_the_same_two_level_rows_as_pytorch(models: Path, tmp_path: Path):
    from pneumobatch.model.onnx import write_export
    from pneumobatch.model.registry import load_model

    folder = tmp_path / "m"
    folder.mkdir()
    for f in models.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    write_export(load_model("etio2", folder))
    torch_rows = _predict(folder, tmp_path / "t.csv", "--backend", "torch")
    onnx_rows = _predict(folder, tmp_path / "o.csv", "--backend", "onnxruntime")
    a = torch_rows[torch_rows.model == "etio2"].reset_index(drop=True)
    b = onnx_rows[onnx_rows.model == "etio2"].reset_index(drop=True)
    ok = a.status == "ok"
    for c in COARSE:
        np.testing.assert_allclose(
            a.loc[ok, f"prob_{c}"].astype(float), b.loc[ok, f"prob_{c}"].astype(float), atol=2e-5
        )
    assert (a.loc[ok, "fine_label"] == b.loc[ok, "fine_label"]).mean() > 0.95
