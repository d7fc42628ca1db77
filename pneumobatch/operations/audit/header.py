"""The header shortcut: how well the DICOM header alone predicts a model's positive call.

A model that learned the scanner or the export protocol instead of the lungs calls more
images of one manufacturer, station or pixel spacing positive than its patients explain.
:func:`header_features` reads, for one file, the device and protocol descriptors of
:data:`CATEGORICAL` and :data:`NUMERIC` (never a patient's name, ID or a date);
:func:`header_auc` fits a classifier from those alone to the model's calls, cross-validated
(scikit-learn), and gives its ROC AUC: about 0.5 when the header tells nothing of the call,
near 1 when it tells the call. :func:`value_rates` gives per field and value the share of
positive calls and the share flagged not applicable, with exact 95% intervals.

PNG and JPEG files have no header: their descriptors are :data:`NO_HEADER` and only their
``format`` is a feature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.io.discovery import FileKind, sniff

#: Text descriptors, one-hot encoded; ``format`` is the file's kind (dicom, png, jpeg).
CATEGORICAL = (
    "format",
    "manufacturer",
    "manufacturer_model_name",
    "station_name",
    "view_position",
    "photometric_interpretation",
    "transfer_syntax",
)
#: Numeric descriptors, used as numbers (missing: imputed, with an indicator).
NUMERIC = ("rows", "columns", "pixel_spacing", "bits_stored")
FIELDS = CATEGORICAL + NUMERIC
#: The value of every header field of a file without a DICOM header.
NO_HEADER = "no DICOM header"
#: The value of a field a DICOM header leaves empty.
EMPTY = "(empty)"
#: Values seen fewer times are pooled into one "other" column by the classifier.
MIN_VALUE_COUNT = 3
#: Fewer positive or fewer negative calls than this: no AUC (the verdict says so).
MIN_PER_CLASS = 10
#: Folds of the cross-validation (fewer when a class has fewer calls).
N_FOLDS = 5
#: An AUC at or above this says the output tracks the scanner or protocol.
SHORTCUT_AUC = 0.7
#: Values shown per field in the tables (most frequent first; the rest are counted).
MAX_VALUES = 30
N_BOOTSTRAP = 1000

_TEXT_KEYWORDS = {
    "manufacturer": "Manufacturer",
    "manufacturer_model_name": "ManufacturerModelName",
    "station_name": "StationName",
    "view_position": "ViewPosition",
    "photometric_interpretation": "PhotometricInterpretation",
}
#: Coded values, upper-cased as the reader does; names (manufacturer, station) are kept as written.
_UPPER = {"view_position", "photometric_interpretation"}


def _spacing(ds: Any) -> Optional[float]:
    from pneumobatch.io.readers.dicom_values import as_float, first_value, header_value

    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = as_float(first_value(header_value(ds, keyword)))
        if value is not None and value > 0:
            return round(value, 4)
    return None


def header_features(path: Path) -> dict[str, Any]:
    """The descriptors of one file (:data:`FIELDS`); raises ``FileRejected`` or ``OSError``
    when it cannot be read. Text values are sanitised header text of at most 64 characters."""
    from pneumobatch.io.readers.dicom import read_header
    from pneumobatch.io.readers.dicom_values import as_int, as_text, header_value

    kind = sniff(path)
    if kind is FileKind.EMPTY or kind is FileKind.OTHER:  # predicted once, not an image now
        raise FileRejected(Reason.EMPTY if kind is FileKind.EMPTY else Reason.NOT_IMAGE, "no longer an image")
    if kind is not FileKind.DICOM:
        return {"format": kind.value, **{f: NO_HEADER for f in CATEGORICAL[1:]}, **{f: None for f in NUMERIC}}
    ds = read_header(path)
    out: dict[str, Any] = {"format": kind.value}
    for field, keyword in _TEXT_KEYWORDS.items():
        text = as_text(header_value(ds, keyword), 64)
        out[field] = (text.upper() if field in _UPPER else text) or EMPTY
    try:
        out["transfer_syntax"] = as_text(ds.file_meta.get("TransferSyntaxUID"), 64) or EMPTY
    except Exception:  # a damaged file meta: the value is unknown, not an error
        out["transfer_syntax"] = EMPTY
    out["rows"] = as_int(header_value(ds, "Rows"))
    out["columns"] = as_int(header_value(ds, "Columns"))
    out["pixel_spacing"] = _spacing(ds)
    out["bits_stored"] = as_int(header_value(ds, "BitsStored"))
    return out


def transfer_syntax_name(value: str) -> str:
    """A transfer syntax UID with its name when pydicom knows it (``1.2.840.10008.1.2.1 (Explicit VR Little Endian)``)."""
    from pydicom.uid import UID

    try:
        name = UID(value).name
    except Exception:
        return value
    return f"{value} ({name})" if name and name != value else value


def _text(value: Any) -> str:
    """A field's value as table text: numbers without a trailing ``.0``, missing as :data:`EMPTY`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return EMPTY
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _pipeline(seed: int) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    columns = ColumnTransformer(
        [
            (
                "text",
                OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=MIN_VALUE_COUNT),
                list(CATEGORICAL),
            ),
            (
                "numbers",
                make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler()),
                list(NUMERIC),
            ),
        ]
    )
    return make_pipeline(columns, LogisticRegression(max_iter=2000, random_state=seed))


def _frame(features: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(features), columns=list(FIELDS))
    for field in CATEGORICAL:
        frame[field] = frame[field].fillna(EMPTY).astype(str)
    for field in NUMERIC:
        values = pd.to_numeric(frame[field], errors="coerce").astype(float)
        # a column no image has a value for is a constant, not a column the imputer drops
        frame[field] = values if values.notna().any() else 0.0
    return frame


def header_auc(features: Sequence[Mapping[str, Any]], positive: Sequence[bool], seed: int = 0) -> dict[str, Any]:
    """Cross-validated ROC AUC of the header descriptors predicting ``positive`` (the model's calls).

    Logistic regression on the one-hot text values (rare ones pooled) and the standardised
    numbers, :data:`N_FOLDS`-fold stratified cross-validation with ``seed``; the AUC of the
    out-of-fold probabilities with a bootstrap 95% interval. With fewer than
    :data:`MIN_PER_CLASS` positive or negative calls, ``auc`` is None and ``verdict`` says why.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from pneumobatch.evaluation.metrics import BootstrapAUC, bootstrap_draws, percentile_ci

    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    out: dict[str, Any] = {
        "n": int(len(y)),
        "positive_calls": n_pos,
        "negative_calls": n_neg,
        "classifier": "logistic regression on one-hot text values and standardised numbers",
        "fields": list(FIELDS),
        "auc": None,
        "auc_ci": None,
        "folds": None,
        "seed": seed,
        "shortcut_auc": SHORTCUT_AUC,
        "tracks_header": None,
    }
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        out["verdict"] = (
            f"header shortcut: not enough positive and negative calls to judge ({n_pos} positive, {n_neg} negative; "
            f"at least {MIN_PER_CLASS} of each are needed)"
        )
        return out
    frame = _frame(features)
    folds = min(N_FOLDS, n_pos, n_neg)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(_pipeline(seed), frame, y.astype(int), cv=cv, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(y, proba))
    boot = np.concatenate([BootstrapAUC(y, proba)(d) for d in bootstrap_draws(len(y), N_BOOTSTRAP, seed)])
    ci = percentile_ci(boot, 0.95)[0]
    out.update(auc=auc, auc_ci=ci, folds=folds, tracks_header=auc >= SHORTCUT_AUC)
    measured = f"header shortcut: AUC {auc:.2f}" + (f" (95% CI {ci[0]:.2f}-{ci[1]:.2f}, {len(y)} images)" if ci else "")
    if auc >= SHORTCUT_AUC:
        out["verdict"] = (
            f"{measured}: the model's output tracks the scanner or the protocol more than the patients: "
            "validate per group"
        )
    else:
        out["verdict"] = f"{measured}, below {SHORTCUT_AUC}: the header alone tells little of the model's calls"
    return out


def _share(k: int, n: int) -> dict[str, Any]:
    from pneumobatch.evaluation.metrics.intervals import exact_interval

    return {"k": int(k), "n": int(n), "rate": k / n if n else None, "ci": exact_interval(int(k), int(n))}


def value_rates(
    features: Sequence[Mapping[str, Any]], positive: Sequence[bool], applicable: Sequence[Optional[bool]]
) -> dict[str, Any]:
    """Per field of :data:`FIELDS` and value: images, the share called positive and the share
    flagged not applicable (among images the flag scored: ``applicable`` None is unscored), each
    with an exact (Clopper-Pearson) 95% interval. At most :data:`MAX_VALUES` values per field,
    most frequent first; ``omitted_values`` counts the rest."""
    frame = pd.DataFrame(list(features), columns=list(FIELDS))
    y = np.asarray(positive, dtype=bool)
    flags = pd.Series(list(applicable), dtype=object)
    scored = flags.notna().to_numpy()
    not_applicable = (flags == False).to_numpy()  # noqa: E712 - element-wise, None stays unscored
    out: dict[str, Any] = {}
    no_header = (frame["format"] != FileKind.DICOM.value).to_numpy()
    for field in FIELDS:
        blank = no_header & (field != "format")
        values = np.array([NO_HEADER if none else _text(v) for v, none in zip(frame[field], blank)], dtype=object)
        if field == "transfer_syntax":
            values = np.array([transfer_syntax_name(v) if v not in (EMPTY, NO_HEADER) else v for v in values])
        counts = pd.Series(values).value_counts()
        rows = []
        for value in sorted(counts.index, key=lambda v: (-counts[v], v))[:MAX_VALUES]:
            mask = values == value
            rows.append(
                {
                    "value": str(value),
                    "n": int(mask.sum()),
                    "positive": _share(int(y[mask].sum()), int(mask.sum())),
                    "not_applicable": _share(int(not_applicable[mask].sum()), int(scored[mask].sum())),
                }
            )
        out[field] = {"values": rows, "n_values": int(len(counts)), "omitted_values": max(0, len(counts) - MAX_VALUES)}
    return out
