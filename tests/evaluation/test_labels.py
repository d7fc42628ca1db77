"""Tests for pneumobatch.evaluation.labels (reading, keys, cards, join): reading label files, key detection, joining, counting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumobatch.core.errors import LabelError
from pneumobatch.evaluation.labels.cards import describe_model
from pneumobatch.evaluation.labels.join import join_labels, study_level, study_predictions
from pneumobatch.evaluation.labels.keys import detect_key, normalise_path
from pneumobatch.evaluation.labels.reading import read_labels

ETIOLOGY = ("normal", "bacterial", "viral", "covid-19")


def predictions(
    paths: list[str],
    probs: list[float | None],
    *,
    status: list[str] | None = None,
    reason: list[str] | None = None,
    studies: list[str] | None = None,
    model: str = "pneu-v1",
    task: str = "pneumonia",
    threshold: float = 0.5,
) -> pd.DataFrame:
    """File-level rows of one binary model as `predict` writes them (prob = P(pneumonia))."""
    n = len(paths)
    status = status or ["ok"] * n
    p = np.array([np.nan if v is None else v for v in probs], dtype=float)
    ok = np.array([s == "ok" for s in status])
    return pd.DataFrame(
        {
            "path": paths,
            "status": status,
            "reason": reason or [""] * n,
            "study_instance_uid": studies or [f"1.2.3.{i}" for i in range(n)],
            "sop_instance_uid": [f"1.2.9.{i}" for i in range(n)],
            "view_position": ["PA"] * n,
            "task": task,
            "model": model,
            "weights_sha256": "f" * 64,
            "pred_label": np.where(ok, np.where(p >= threshold, "pneumonia", "normal"), ""),
            "prob_normal": np.where(ok, 1 - p, np.nan),
            "prob_pneumonia": np.where(ok, p, np.nan),
            "threshold": np.where(ok, threshold, np.nan),
        }
    )


def labels_frame(rows: dict[str, list], source: str = "labels.csv") -> pd.DataFrame:
    frame = pd.DataFrame(rows).astype(str)
    frame.attrs["source"] = source
    return frame


# ---------------------------------------------------------------- reading files


def test_read_labels_keeps_uids_and_leading_zeros_as_text(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("sop_instance_uid,label,mrn\n1.2.840.10008.1.2.10,normal,00123\n 1.2.3 ,PNEUMONIA ,7\n")
    frame = read_labels(f)
    assert frame["sop_instance_uid"].tolist() == ["1.2.840.10008.1.2.10", "1.2.3"]
    assert frame["mrn"].tolist() == ["00123", "7"]
    assert frame["label"].tolist() == ["normal", "PNEUMONIA"]
    assert frame.attrs["source"] == str(f)


@pytest.mark.parametrize(
    "encoding,text",
    [
        ("utf-8-sig", "path,label,site\na.png,normal,São Paulo\n"),
        ("cp1252", "path,label,site\na.png,normal,São Paulo\n"),
        ("utf-16", "path\tlabel\tsite\na.png\tnormal\tSão Paulo\n"),
        ("utf-8", "path;label;site\na.png;normal;São Paulo\n"),
    ],
)
def test_read_labels_encodings_and_separators(tmp_path, encoding, text):
    f = tmp_path / "labels.csv"
    f.write_bytes(text.encode(encoding))
    frame = read_labels(f)
    assert list(frame.columns) == ["path", "label", "site"]
    assert frame["site"].iloc[0] == "São Paulo"


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "not found"),
        (b"", "is empty"),
        (b"PK\x03\x04rest-of-zip", "Excel"),
        (b"path,label\n", "no rows"),
    ],
)
def test_read_labels_errors_are_one_line(tmp_path, content, match):
    f = tmp_path / "labels.csv"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(LabelError, match=match) as err:
        read_labels(f)
    assert "\n" not in str(err.value)


def test_read_labels_folder(tmp_path):
    with pytest.raises(LabelError, match="folder"):
        read_labels(tmp_path)


# ---------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "raw,expected",
    [(" ./a/b.png ", "a/b.png"), ("a\\b\\c.dcm", "a/b/c.dcm"), ("././x//y.jpg", "x/y.jpg"), ("a.png", "a.png")],
)
def test_normalise_path(raw, expected):
    assert normalise_path(raw) == expected


def test_detect_key_order_and_explicit_key():
    preds = predictions(["a.png"], [0.9])
    assert detect_key(labels_frame({"path": ["a.png"], "sop_instance_uid": ["1"], "label": ["x"]}), preds) == "path"
    assert detect_key(labels_frame({"sop_instance_uid": ["1"], "label": ["x"]}), preds) == "sop_instance_uid"
    assert detect_key(labels_frame({"study_instance_uid": ["1"], "label": ["x"]}), preds) == "study_instance_uid"
    preds["study"] = "p1"
    assert detect_key(labels_frame({"study": ["p1"], "label": ["x"]}), preds) == "study"
    # an empty path column does not count
    assert detect_key(labels_frame({"path": [""], "study_instance_uid": ["1"], "label": ["x"]}), preds) == (
        "study_instance_uid"
    )
    both = labels_frame({"path": ["a.png"], "sop_instance_uid": ["1"], "label": ["x"]})
    assert detect_key(both, preds, key="sop_instance_uid") == "sop_instance_uid"
    with pytest.raises(LabelError, match="no key column 'accession'"):
        detect_key(both, preds, key="accession")
    with pytest.raises(LabelError, match="need one of path, sop_instance_uid, study_instance_uid, study.*--key"):
        detect_key(labels_frame({"file": ["a.png"], "label": ["x"]}), preds)


# --------------------------------------------------------------------- models


def test_describe_model_from_csv_only():
    preds = predictions(["a.png", "b.png"], [0.9, 0.1], threshold=0.35)
    info = describe_model(preds)
    assert info.name == "pneu-v1" and info.task == "pneumonia"
    assert info.classes == ["normal", "pneumonia"] and info.positive == "pneumonia"
    assert info.threshold == 0.35 and info.weights_sha256 == "f" * 64


def test_describe_model_etiology_orders_classes_and_has_no_threshold():
    frame = pd.DataFrame(
        {
            "path": ["a.png"],
            "status": ["ok"],
            "model": ["eti"],
            "task": ["etiology"],
            "prob_covid-19": [0.1],
            "prob_viral": [0.2],
            "prob_normal": [0.3],
            "prob_bacterial": [0.4],
            "prob_pneumonia": [np.nan],
            "threshold": [np.nan],
        }
    )
    info = describe_model(frame)
    assert tuple(info.classes) == ETIOLOGY and info.positive is None and info.threshold is None
    run = {"name": "eti", "task": "etiology", "classes": list(ETIOLOGY), "thresholds": {"youden": 0.4}}
    assert describe_model(frame, run).operating_points() == {"youden": 0.4}


# ----------------------------------------------------------------------- join


def test_hierarchical_findings_map_per_task():
    paths = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    findings = ["Pneumonia/Viral/COVID-19", "No Finding", "PNEUMONIA", "Pneumonia/Bacterial/Klebsiella", "ARDS"]
    labels = labels_frame({"path": paths, "finding": findings})
    preds = predictions(paths, [0.9, 0.2, 0.8, 0.7, 0.6])
    join = join_labels(preds, labels, describe_model(preds), label_column="finding")
    assert join.y_true.tolist() == ["pneumonia", "normal", "pneumonia", "pneumonia"]
    unmapped = join.problems["unmapped_labels"]
    assert unmapped.count == 1 and unmapped.breakdown == {"ARDS": 1} and "e.png" in unmapped.examples[0]

    eti = pd.DataFrame(
        {
            "path": paths,
            "status": "ok",
            "reason": "",
            "model": "eti",
            "task": "etiology",
            **{f"prob_{c}": 0.25 for c in ETIOLOGY},
            "pred_label": "normal",
        }
    )
    join = join_labels(eti, labels, describe_model(eti), label_column="finding")
    # PNEUMONIA has no etiology: unmapped, like ARDS
    assert dict(zip(join.rows["path"], join.y_true)) == {"a.png": "covid-19", "b.png": "normal", "d.png": "bacterial"}
    assert join.problems["unmapped_labels"].breakdown == {"PNEUMONIA": 1, "ARDS": 1}


def test_unmatched_counts_and_examples():
    preds = predictions(
        ["a.png", "b.png", "c.png", "d.png", "lat.dcm", "bad.dcm", "e.png"],
        [0.9, 0.1, 0.8, 0.3, None, None, 0.4],
        status=["ok", "ok", "ok", "ok", "skipped", "error", "ok"],
        reason=["", "", "", "", "lateral", "corrupt", ""],
    )
    labels = labels_frame(
        {
            "path": ["./a.png", "b.png", "c.png", "c.png", "d.png", "d.png", "lat.dcm", "bad.dcm", "gone.png", ""],
            "label": [
                "pneumonia",
                "normal",
                "pneumonia",
                "Pneumonia/Viral",
                "normal",
                "pneumonia",
                "normal",
                "normal",
                "normal",
                "normal",
            ],
            "sex": ["F", "M", "F", "F", "M", "M", "F", "M", "F", "F"],
        }
    )
    join = join_labels(preds, labels, describe_model(preds))
    assert join.key == "path" and join.level == "file"
    assert sorted(join.rows["path"]) == ["a.png", "b.png", "c.png"]  # ./a.png normalised; d conflicts
    p = join.problems
    assert p["duplicate_labels"].count == 1 and p["duplicate_labels"].examples == ["c.png"]
    assert p["conflicting_labels"].count == 1 and p["conflicting_labels"].examples == ["d.png"]
    assert p["labels_without_prediction"].count == 1 and p["labels_without_prediction"].examples == ["gone.png"]
    assert p["unlabelled_predictions"].count == 1 and p["unlabelled_predictions"].examples == ["e.png"]
    assert p["labelled_not_ok"].count == 2
    assert p["labelled_not_ok"].breakdown == {"skipped: lateral": 1, "error: corrupt": 1}
    assert p["empty_keys"].count == 1
    assert join.column("sex").tolist() == ["F", "M", "F"]
    assert join.column("view_position").tolist() == ["PA"] * 3  # falls back to a prediction column
    with pytest.raises(LabelError, match="no column 'ward'"):
        join.column("ward")
    assert set(join.problems_dict()) == set(p)


def test_nothing_matches_names_key_and_examples():
    preds = predictions(["scan1.dcm", "scan2.dcm"], [0.9, 0.1])
    labels = labels_frame({"path": ["other/x.dcm"], "label": ["normal"]})
    with pytest.raises(LabelError) as err:
        join_labels(preds, labels, describe_model(preds))
    message = str(err.value)
    assert "no path in labels.csv matches" in message
    assert "'other/x.dcm'" in message and "'scan1.dcm'" in message and "--key" in message


def test_all_labels_unmapped_is_an_error_showing_values():
    preds = predictions(["a.png", "b.png"], [0.9, 0.1])
    labels = labels_frame({"path": ["a.png", "b.png"], "label": ["1", "0"]})
    with pytest.raises(LabelError, match=r"maps to the classes of task pneumonia.*'1' \(1\)"):
        join_labels(preds, labels, describe_model(preds))


def test_a_column_that_holds_the_models_labels_is_named_when_the_chosen_one_does_not():
    """A labels file with one column per task (the sample studies' `label` and `etiology`):
    evaluating the etiology model on `label` would keep only the normals; the join says
    which column maps more, in the report's notes, or in the error when nothing maps."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=6)
    preds = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(6)],
            "status": "ok",
            "model": "eti",
            "task": "etiology",
            "pred_label": np.array(ETIOLOGY)[p.argmax(axis=1)],
            **{f"prob_{c}": p[:, j] for j, c in enumerate(ETIOLOGY)},
        }
    )
    etiology = ["normal", "normal", "bacterial", "viral", "covid-19", "bacterial"]
    labels = labels_frame(
        {
            "path": [f"{i}.png" for i in range(6)],
            "label": ["normal" if e == "normal" else "pneumonia" for e in etiology],
            "etiology": etiology,
            "site": ["A", "B"] * 3,
        }
    )
    join = join_labels(preds, labels, describe_model(preds))
    assert len(join.rows) == 2 and join.problems["unmapped_labels"].count == 4
    assert any(
        "4 of 6 labels in column 'label'" in n and "column 'etiology' maps 6" in n and "--label-column etiology" in n
        for n in join.notes
    ), join.notes
    assert not any("site" in n for n in join.notes)
    assert join_labels(preds, labels, describe_model(preds), label_column="etiology").notes == []
    with pytest.raises(LabelError, match="try --label-column etiology"):
        join_labels(preds, labels.assign(label="pneumonia"), describe_model(preds))


def test_missing_label_column_suggests_alternative():
    preds = predictions(["a.png"], [0.9])
    labels = labels_frame({"path": ["a.png"], "finding": ["No Finding"]})
    with pytest.raises(LabelError, match="no label column 'label'.*--label-column finding"):
        join_labels(preds, labels, describe_model(preds))


def test_paths_relative_to_another_folder_match_on_trailing_folders():
    preds = predictions(["p1/a.png", "p1/b.png", "p2/a.png"], [0.9, 0.1, 0.3])
    labels = labels_frame({"path": ["data/images/p1/a.png", "images/p1/b.png", "a.png"], "label": ["normal"] * 3})
    join = join_labels(preds, labels, describe_model(preds))
    assert sorted(join.rows["path"]) == ["p1/a.png", "p1/b.png"]  # bare a.png is ambiguous
    assert any("dropping leading folders" in n for n in join.notes)
    assert join.problems["labels_without_prediction"].count == 1


def test_sop_key_and_missing_pred_label_derived():
    preds = predictions(["a.dcm", "b.dcm"], [0.9, 0.2])
    preds["pred_label"] = ""
    labels = labels_frame({"sop_instance_uid": ["1.2.9.0", "1.2.9.1"], "label": ["pneumonia", "normal"]})
    join = join_labels(preds, labels, describe_model(preds))
    assert join.key == "sop_instance_uid"
    assert join.y_pred.tolist() == ["pneumonia", "normal"]
    assert any("derived from the probabilities" in n for n in join.notes)


def test_study_key_joins_studies_and_aggregates_without_them():
    preds = predictions(
        ["s1/1.dcm", "s1/2.dcm", "s2/1.dcm", "s3/1.dcm"],
        [0.9, 0.5, 0.2, None],
        status=["ok", "ok", "ok", "skipped"],
        reason=["", "", "", "lateral"],
        studies=["S1", "S1", "S2", "S3"],
    )
    info = describe_model(preds)
    labels = labels_frame({"study_instance_uid": ["S1", "S2", "S3"], "label": ["pneumonia", "normal", "normal"]})
    join = join_labels(preds, labels, info)  # no studies CSV: the most abnormal image, as predict does
    assert join.level == "study"
    rows = join.rows.set_index("study_instance_uid")
    assert rows.loc["S1", "prob_pneumonia"] == pytest.approx(0.9)
    assert rows.loc["S1", "key_image"] == "s1/1.dcm"
    assert rows.loc["S1", "n_images"] == 2
    assert join.problems["labelled_not_ok"].count == 1  # S3: its only image was skipped
    assert join.problems["labels_without_prediction"].count == 0
    studies = study_predictions(preds, info)
    studies.loc[studies["study_instance_uid"] == "S1", "prob_pneumonia"] = 0.95
    join = join_labels(preds, labels, info, studies=studies)
    assert join.rows.set_index("study_instance_uid").loc["S1", "prob_pneumonia"] == 0.95


def test_study_key_for_png_folders():
    """PNG/JPEG have no StudyInstanceUID: predict's ``study`` column holds the folder."""
    preds = predictions(["p1/a.png", "p1/b.png", "p2/a.png"], [0.2, 0.7, 0.1])
    preds["study_instance_uid"] = ""
    preds["study"] = ["p1", "p1", "p2"]
    labels = labels_frame({"study": ["p1", "p2"], "label": ["pneumonia", "normal"]})
    join = join_labels(preds, labels, describe_model(preds))
    assert join.key == "study" and join.level == "study"
    assert dict(zip(join.rows["study"], join.rows["prob_pneumonia"])) == {"p1": 0.7, "p2": 0.1}
    # image labels: the study section groups by the same column
    image_labels = labels_frame({"path": ["p1/a.png", "p1/b.png", "p2/a.png"], "label": ["pneumonia"] * 2 + ["normal"]})
    join = join_labels(preds, image_labels, describe_model(preds))
    study = study_level(join, None, preds)
    assert study is not None and study.key == "study" and study.n_matched == 2


def test_study_level_from_image_labels():
    preds = predictions(
        ["s1/1.dcm", "s1/2.dcm", "s2/1.dcm", "s2/2.dcm", "s3/1.dcm"],
        [0.9, 0.6, 0.2, 0.7, 0.1],
        studies=["S1", "S1", "S2", "S2", "S3"],
    )
    info = describe_model(preds)
    labels = labels_frame(
        {
            "path": ["s1/1.dcm", "s1/2.dcm", "s2/1.dcm", "s2/2.dcm", "s3/1.dcm"],
            "label": ["pneumonia", "pneumonia", "normal", "pneumonia", "normal"],
        }
    )
    join = join_labels(preds, labels, info)
    study = study_level(join, None, preds)
    assert study is not None and study.level == "study"
    assert dict(zip(study.rows["_key"], study.y_true)) == {"S1": "pneumonia", "S3": "normal"}
    assert study.problems["conflicting_study_labels"].count == 1  # S2's images disagree
    # one image per study: no study section
    single = predictions(["a.dcm", "b.dcm"], [0.9, 0.1])
    join = join_labels(
        single, labels_frame({"path": ["a.dcm", "b.dcm"], "label": ["pneumonia", "normal"]}), describe_model(single)
    )
    assert study_level(join, None, single) is None


def test_labels_file_to_join_end_to_end(tmp_path: Path):
    f = tmp_path / "labels.csv"
    f.write_bytes("path;label;sex\r\n./a.png;Pneumonia/Viral/COVID-19;F\r\nb.png;normal;M\r\n".encode("cp1252"))
    preds = predictions(["a.png", "b.png"], [0.8, 0.3])
    join = join_labels(preds, read_labels(f), describe_model(preds))
    assert join.n_matched == 2 and join.y_true.tolist() == ["pneumonia", "normal"]
    assert join.proba.shape == (2, 2)
    summary = join.summary()
    assert summary["n_matched"] == 2 and summary["key"] == "path"
