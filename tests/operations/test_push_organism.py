"""``pneumobatch push`` of a two-level (hierarchical) etiology model: the SR adds the organism
(``fine_label`` and its probability in ``fine_top3``) to the decided finding, leaves it out with
a warning when the cells cannot be trusted, and a one-level 4-class CSV pushes what it did before.

Issue 26. The night's images are predicted once by the tiny binary model (``test_push.night``);
its CSV and run.json are then rewritten as those of a hierarchical model (a card with
``hierarchy`` and log-offset decisions, rows built with the card's own rules, as predict
writes them) or of the older 4-class model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

from pneumobatch.core.card import ModelCard
from pneumobatch.core.hierarchy import top_text
from pneumobatch.operations.pacs.sr import ORGANISM, ORGANISM_PROBABILITY, ImageResult, StudyResult, organism_of
from tests.operations import test_pacs, test_push
from tests.operations.test_pacs import _content_items
from tests.operations.test_push import Night, _push, _srs_by_study, _upload

# the Orthanc of test_pacs.py and the predicted night of test_push.py (pytest finds fixtures by name)
orthanc_server, orthanc, night = test_pacs.orthanc_server, test_pacs.orthanc, test_push.night

COARSE = ["normal", "bacterial", "viral", "fungal", "covid-19"]
FINE = ["normal", "Streptococcus", "other bacterial", "SARS", "other viral", "Pneumocystis", "covid-19"]
PARENT = ["normal", "bacterial", "bacterial", "viral", "viral", "fungal", "covid-19"]


def _card(hierarchical: bool = True) -> ModelCard:
    return ModelCard(
        name="tiny-etiology-5" if hierarchical else "tiny-etiology",
        task="etiology",
        classes=COARSE if hierarchical else ["normal", "bacterial", "viral", "covid-19"],
        architecture="mobilenet_v3_small",
        input_size=40,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        weights_sha256=("5e" if hierarchical else "4d") * 32,
        hierarchy={"fine": FINE, "parent": PARENT} if hierarchical else {},
        decision={"rule": "log-offsets", "log_offsets": [0.0, 0.1, 0.2, 0.6, 0.0]} if hierarchical else {},
    )


#: Per image: the fine class whose output is raised (so it decides), and an edit of its fine cells.
PLAN = {
    "a": ("SARS", None),
    "b": ("normal", None),  # the fine class is the coarse class: no organism item
    "c1": ("Streptococcus", None),
    "c2": ("Streptococcus", {"fine_label": "Aspergillus-XYZ"}),  # not one of the card's fine classes
    "c3": ("Streptococcus", {"fine_label": "Pneumocystis"}),  # below fungal, not below bacterial
    "c4": ("Streptococcus", {"fine_top3": "Streptococcus 0.7; garbage-QQQ"}),  # malformed
}


def _hierarchical_rows(frame: pd.DataFrame, night: Night, card: ModelCard) -> pd.DataFrame:
    """The night's rows as predict writes them for ``card``: coarse probabilities, the
    card's decision, the fine label below it and the top three fine classes."""
    tree = card.tree
    rng = np.random.default_rng(26)
    out = frame.drop(columns=[c for c in frame.columns if c.startswith("prob_")]).copy()
    out["model"], out["task"], out["weights_sha256"], out["threshold"] = card.name, card.task, card.weights_sha256, ""
    for cls in card.classes:
        out[f"prob_{cls}"] = ""
    out["fine_label"], out["fine_top3"] = "", ""
    for name, (raised, edit) in PLAN.items():
        logits = rng.normal(0, 0.3, (1, len(FINE)))
        logits[0, FINE.index(raised)] += 3.0
        coarse, fine = tree.probabilities(logits)
        decision = card.decide(coarse[0])
        row = out.index[out["path"] == night.paths[name]][0]
        out.loc[row, [f"prob_{c}" for c in card.classes]] = [f"{p:.6f}" for p in coarse[0]]
        out.loc[row, ["pred_label", "operating_point"]] = [decision.label, decision.operating_point]
        out.loc[row, "fine_label"] = tree.best_below(fine[0], decision.label)
        out.loc[row, "fine_top3"] = top_text(tree.ranked(fine[0]))
        for column, value in (edit or {}).items():
            out.loc[row, column] = value
    return out


def _write(night: Night, folder: Path, card: ModelCard, frame: pd.DataFrame) -> Path:
    csv = folder / "p.csv"
    frame.to_csv(csv, index=False)
    run = json.loads(night.run_json.read_text(encoding="utf-8"))
    run["models"] = [{"name": card.name, "weights_sha256": card.weights_sha256, "card": card.to_dict()}]
    (folder / "p.run.json").write_text(json.dumps(run), encoding="utf-8")
    return csv


def _organisms(sr: pydicom.Dataset) -> list[tuple[str, float]]:
    """(organism, its probability) of every measurement group of the SR that names one."""
    found = []
    for group in _content_items(sr):
        items = getattr(group, "ContentSequence", [])
        names = [i.ConceptCodeSequence[0].CodeMeaning for i in items if _code(i) == ORGANISM.value]
        probs = [
            float(i.MeasuredValueSequence[0].NumericValue) for i in items if _code(i) == ORGANISM_PROBABILITY.value
        ]
        if names:
            assert len(names) == 1 and len(probs) == 1, "one organism and one probability per group"
            found.append((names[0], probs[0]))
    return found


def _code(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""


def _dciodvfy_errors(ds: pydicom.Dataset, path: Path) -> list[str]:
    ds.save_as(path)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.slow
def test_a_hierarchical_sr_names_the_organism_and_its_probability(orthanc, night, tmp_path):
    if not shutil.which("dciodvfy"):
        pytest.fail("dciodvfy is not installed: run `sh scripts/install_orthanc.sh` as root (dicom3tools)")
    card = _card()
    frame = _hierarchical_rows(pd.read_csv(night.csv, dtype=str, keep_default_na=False), night, card)
    csv = _write(night, tmp_path, card, frame)
    _upload(orthanc, night, *night.images)
    pushed = _push(csv, "--url", orthanc.dicomweb, "--source", str(night.source))
    assert pushed.code == 0, pushed.stderr
    warned = [line for line in pushed.stderr.splitlines() if "sent without its organism item" in line]
    assert len(warned) == 3, pushed.stderr  # c2, c3, c4: one line each, their cells never quoted
    for name, reason in (("c2", "fine classes"), ("c3", "below pred_label"), ("c4", "malformed")):
        assert any(repr(night.paths[name]) in line and reason in line for line in warned), (name, warned)
    assert "XYZ" not in pushed.stderr and "QQQ" not in pushed.stderr
    assert "3 rows sent without their organism item" in pushed.stdout

    srs = _srs_by_study(orthanc)
    assert {uid: len(v) for uid, v in srs.items()} == {night.images[n].StudyInstanceUID: 1 for n in ("a", "b", "c1")}
    by_path = frame.set_index("path")
    for name in ("a", "c1"):
        row = by_path.loc[night.paths[name]]
        p = dict((n, float(v)) for n, v in (part.rsplit(" ", 1) for part in row["fine_top3"].split("; ")))
        assert row["fine_label"] == PLAN[name][0]
        sr = srs[night.images[name].StudyInstanceUID][0]
        assert _organisms(sr) == [(row["fine_label"], pytest.approx(p[row["fine_label"]], abs=1e-6))], name
        assert not _dciodvfy_errors(sr, tmp_path / f"{name}.dcm"), name
    assert _organisms(srs[night.images["b"].StudyInstanceUID][0]) == []  # normal: nothing below it to name


def _old_fingerprint(result: StudyResult) -> str:
    """The fingerprint before issue 26 (what the SR UID of a one-level model was made from)."""
    return json.dumps(
        {
            "model": result.card.name,
            "images": sorted(
                [
                    i.sop_instance_uid,
                    i.pred_label,
                    [[c, round(p, 6)] for c, p in i.probs],
                    i.threshold,
                    i.operating_point,
                ]
                for i in result.images
            ),
        },
        sort_keys=True,
    )


@pytest.mark.slow
def test_an_old_four_class_csv_pushes_the_same_sr_as_before(orthanc, night, tmp_path):
    card = _card(hierarchical=False)
    frame = pd.read_csv(night.csv, dtype=str, keep_default_na=False).drop(columns=["prob_normal", "prob_pneumonia"])
    frame["model"], frame["task"], frame["weights_sha256"], frame["threshold"] = card.name, "etiology", "4d" * 32, ""
    for cls, p in zip(card.classes, ["0.100000", "0.600000", "0.200000", "0.100000"]):
        frame[f"prob_{cls}"] = p
    frame["pred_label"], frame["operating_point"] = "bacterial", "argmax"
    csv = _write(night, tmp_path, card, frame)
    _upload(orthanc, night, "a")
    pushed = _push(csv, "--url", orthanc.dicomweb, "--source", str(night.source))
    assert pushed.code == 0 and "organism" not in pushed.stderr + pushed.stdout, pushed.stderr
    (sr,) = _srs_by_study(orthanc)[night.images["a"].StudyInstanceUID]
    image = ImageResult(
        night.images["a"].SOPInstanceUID,
        night.images["a"].SeriesInstanceUID,
        tuple(zip(card.classes, [0.1, 0.6, 0.2, 0.1])),
        "bacterial",
        None,
        "argmax",
    )
    old = StudyResult(night.images["a"].StudyInstanceUID, card, (image,))
    assert old.fingerprint() == _old_fingerprint(old)
    assert sr.SOPInstanceUID == generate_uid(
        entropy_srcs=["pneumobatch-sr", old.study_instance_uid, card.weights_sha256, _old_fingerprint(old)]
    )
    findings = [i for i in _content_items(sr) if _code(i) in ("53084003", "75570004", "17621005", "840539006")]
    assert len(findings) >= 4 and _organisms(sr) == []


# ------------------------------------------------------------------ the checks, no archive


def _image(
    fine_label: str, fine_top: str, pred_label: str = "viral", sop: str = "1.2.3.4", fine_prob: str = ""
) -> ImageResult:
    probs = tuple(zip(COARSE, [0.1, 0.2, 0.5, 0.1, 0.1]))
    return ImageResult(
        sop,
        "1.2.3",
        probs,
        pred_label,
        None,
        "log-offsets",
        fine_label=fine_label,
        fine_top=fine_top,
        fine_prob=fine_prob,
    )


def test_the_organism_is_checked_against_the_cards_hierarchy():
    card = _card()
    good = "SARS 0.300000; other viral 0.200000; other bacterial 0.150000"
    found, problem = organism_of(card, _image("SARS", good))
    assert problem is None and found.name == "SARS" and found.probability == pytest.approx(0.3)
    for label, top, reason in [
        ("", good, "empty"),
        ("Aspergillus", good, "fine classes"),
        ("Pneumocystis", good, "below pred_label"),
        ("SARS", "SARS 0.3; nonsense", "malformed"),
        ("SARS", "SARS 0.3; Unknown-organism 0.2", "malformed"),
        ("SARS", "other viral 0.200000; normal 0.1", "probability"),
        ("SARS", "SARS 0.900000", "exceeds"),
        ("SARS", "other viral 0.400000; SARS 0.100000", "most probable"),
    ]:
        found, problem = organism_of(card, _image(label, top))
        assert found is None and reason in problem, (label, top, problem)
        assert label not in problem or not label  # cells are never quoted
    assert organism_of(card, _image("normal", "normal 0.9", "normal")) == (None, None)  # nothing below normal
    # Pneumocystis alone below fungal: its probability is fungal's, listed in fine_top3 or not
    found, problem = organism_of(card, _image("Pneumocystis", "other viral 0.300000; SARS 0.200000", "fungal"))
    assert problem is None and found.name == "Pneumocystis" and found.probability == pytest.approx(0.1)
    assert organism_of(_card(hierarchical=False), _image("SARS", good)) == (None, None)


def test_fine_prob_gives_the_organisms_probability_when_fine_top3_does_not_list_it():
    """fine_prob (0.2.x) is fine_label's probability: used when fine_top3's three leave it out, checked
    against fine_top3 where that lists it and against its class; a CSV without it still works."""
    card = _card()
    others = "other bacterial 0.150000; normal 0.100000; covid-19 0.100000"  # viral's fine classes not listed
    assert organism_of(card, _image("SARS", others))[1] == "fine_top3 does not give fine_label's probability"
    found, problem = organism_of(card, _image("SARS", others, fine_prob="0.260000"))
    assert problem is None and found.name == "SARS" and found.probability == pytest.approx(0.26)
    good = "SARS 0.300000; other viral 0.200000; other bacterial 0.150000"
    assert organism_of(card, _image("SARS", good, fine_prob="0.300000"))[0].probability == pytest.approx(0.3)
    for cell, reason in [
        ("0.35", "disagrees"),
        ("high", "not a number"),
        ("nan", "not a probability"),
        ("-0.1", "not a probability"),
        ("0.9", "exceeds"),
    ]:
        found, problem = organism_of(card, _image("SARS", good if reason == "disagrees" else others, fine_prob=cell))
        assert found is None and reason in problem, (cell, problem)
        assert cell not in problem  # cells are never quoted
    # a sibling listed as more probable than the stated fine_prob
    assert "most probable" in organism_of(card, _image("SARS", "other viral 0.300000", fine_prob="0.100000"))[1]


def test_the_sr_uid_follows_the_organism():
    card = _card()
    same = StudyResult("1.2.3.9", card, (_image("SARS", "SARS 0.300000; other viral 0.200000"),))
    other = StudyResult("1.2.3.9", card, (_image("other viral", "other viral 0.300000; SARS 0.200000"),))
    unstated = StudyResult("1.2.3.9", card, (_image("Aspergillus", "SARS 0.300000"),))
    assert len({same.sop_instance_uid, other.sop_instance_uid, unstated.sop_instance_uid}) == 3
    assert "organisms" not in unstated.fingerprint()
    again = StudyResult("1.2.3.9", card, (_image("SARS", "SARS 0.3; other viral 0.2"),))  # other rounding
    assert again.sop_instance_uid == same.sop_instance_uid
