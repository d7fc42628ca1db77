"""The key a labels file is joined on: which columns can be keys, how keys compare, which is used.

Paths compare as POSIX paths without a leading ``./``, UIDs without padding; labels
written relative to another folder than predict's root match on trailing folders
(:func:`suffix_matches`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import pandas as pd

from pneumobatch.core.errors import LabelError

#: Columns a labels file can be joined on, in the order they are tried. ``study`` is
#: predict's study key (the StudyInstanceUID for DICOM, the file or folder for PNG/JPEG).
KEY_COLUMNS = ("path", "sop_instance_uid", "study_instance_uid", "study")
STUDY_KEY = "study_instance_uid"
STUDY_KEYS = ("study_instance_uid", "study")


def normalise_keys(values: pd.Series, key: str) -> pd.Series:
    """Keys as compared: paths POSIX without leading ``./``; UIDs without padding."""
    text = values.fillna("").astype(str).str.strip()
    if key == "path":
        text = (
            text.str.replace("\\", "/", regex=False)
            .str.replace(r"^(?:\./)+", "", regex=True)
            .str.replace(r"/{2,}", "/", regex=True)
        )
    else:
        text = text.str.strip("\x00 ")
    return text


def normalise_path(value: object) -> str:
    """One path key, normalised as :func:`normalise_keys` does."""
    return str(normalise_keys(pd.Series([value]), "path").iloc[0])


def has_values(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and bool((frame[column].fillna("").astype(str).str.strip() != "").any())


def detect_key(labels: pd.DataFrame, predictions: pd.DataFrame, key: Optional[str] = None) -> str:
    """The column to join on: ``key`` if given, else the first of :data:`KEY_COLUMNS`
    filled in both tables."""
    source = labels.attrs.get("source", "labels file")
    if key:
        if key not in labels.columns:
            raise LabelError(f"labels file {source} has no key column {key!r} (columns: {column_list(labels)})")
        if key not in predictions.columns:
            raise LabelError(
                f"predictions have no column {key!r} to join on "
                f"(key columns there: {', '.join(c for c in KEY_COLUMNS if c in predictions.columns)})"
            )
        return key
    for candidate in KEY_COLUMNS:
        if has_values(labels, candidate) and has_values(predictions, candidate):
            return candidate
    raise LabelError(
        f"labels file {source} has no key column filled in both files: need one of "
        f"{', '.join(KEY_COLUMNS)} (it has: {column_list(labels)}); name one with --key"
    )


def column_list(frame: pd.DataFrame, limit: int = 12) -> str:
    cols = [str(c) for c in frame.columns]
    more = f", ... ({len(cols) - limit} more)" if len(cols) > limit else ""
    return ", ".join(cols[:limit]) + more


def suffix_matches(label_keys: Iterable[str], pred_keys: Iterable[str]) -> dict[str, str]:
    """Label path -> prediction path where one is the other with leading folders removed.

    Used only when no path matches exactly (labels written relative to another folder
    than the predict root). A label whose shorter path fits several predictions is left
    unmatched.
    """
    pred_set = set(pred_keys)
    by_suffix: dict[str, set[str]] = {}
    for p in pred_set:
        parts = p.split("/")
        for i in range(1, len(parts)):
            by_suffix.setdefault("/".join(parts[i:]), set()).add(p)
    out: dict[str, str] = {}
    for lab in set(label_keys):
        candidates = by_suffix.get(lab)
        if candidates:
            if len(candidates) == 1:
                out[lab] = next(iter(candidates))
            continue
        parts = lab.split("/")
        for i in range(1, len(parts)):
            tail = "/".join(parts[i:])
            if tail in pred_set:
                out[lab] = tail
                break
    return out


def study_column(rows: pd.DataFrame) -> Optional[str]:
    """The column holding each file's study: predict's ``study`` key, else the UID."""
    for col in ("study", STUDY_KEY):
        if has_values(rows, col):
            return col
    return None
