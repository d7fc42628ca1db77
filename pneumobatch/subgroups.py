"""Subgroups that model quality is reported by: age band, view, sex, source.

Torch-free: used by training (per-subgroup metrics and operating points), by
``predict`` (the age band of a DICOM's PatientAge picks the operating point) and by
``report --by``.

Age bands: ``child`` below :data:`ADULT_AGE` years, ``adult`` from it, ``unknown``
when no age is known. A manifest's ``age`` column (years) is used where filled;
where it is empty, ``--default-age-band PATTERN=BAND`` can name the band of a whole
source whose population is documented (for instance a pediatric data set whose
per-image ages were not published). DICOM ages come from PatientAge (``045Y``,
``006M``, ``010W``, ``003D``).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Optional

ADULT_AGE = 18.0
CHILD, ADULT, UNKNOWN = "child", "adult", "unknown"
AGE_BANDS = (CHILD, ADULT)
#: Subgroup columns the training card and ``report --by`` break metrics down by.
SUBGROUP_COLUMNS = ("source", "age_band", "view", "sex")

_DICOM_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def age_years(value: Any) -> Optional[float]:
    """Age in years from a number, a numeric string or a DICOM AS value; ``None`` if unknown.

    Values outside 0-130 years are treated as unknown (a header is untrusted input).
    """
    if value is None:
        return None
    if isinstance(value, (int, float)):
        years = float(value)
    else:
        text = str(value).strip()
        if not text:
            return None
        match = _DICOM_AGE.match(text)
        if match:
            years = int(match.group(1)) * _UNIT_YEARS[match.group(2).upper()]
        else:
            try:
                years = float(text)
            except ValueError:
                return None
    if math.isnan(years) or not 0 <= years <= 130:
        return None
    return years


def age_band(age: Any) -> str:
    """``child`` (< 18 years), ``adult`` or ``unknown``."""
    years = age_years(age)
    if years is None:
        return UNKNOWN
    return CHILD if years < ADULT_AGE else ADULT


def parse_band_defaults(specs: Iterable[str]) -> list[tuple[str, str]]:
    """``["kermany*=child", ...]`` -> ``[("kermany*", "child"), ...]``; raises ValueError."""
    parsed = []
    for spec in specs:
        pattern, sep, band = str(spec).partition("=")
        band = band.strip().lower()
        if not sep or not pattern.strip() or band not in AGE_BANDS:
            raise ValueError(f"--default-age-band wants PATTERN=child or PATTERN=adult, not {spec!r}")
        parsed.append((pattern.strip(), band))
    return parsed


def age_bands(ages: Sequence[Any], groups: Sequence[Any], defaults: Sequence[tuple[str, str]]) -> list[str]:
    """Band per row: from the age where known, else the first matching group pattern."""
    out = []
    for age, group in zip(ages, groups):
        band = age_band(age)
        if band == UNKNOWN:
            for pattern, default in defaults:
                if fnmatch.fnmatch(str(group).lower(), pattern.lower()):
                    band = default
                    break
        out.append(band)
    return out


def view_group(value: Any) -> str:
    """``AP`` (including AP supine / portable), ``PA``, or ``unknown``."""
    text = " ".join(str(value or "").upper().replace("_", " ").split())
    if text.startswith("AP"):
        return "AP"
    if text.startswith("PA"):
        return "PA"
    return UNKNOWN


def sex_group(value: Any) -> str:
    text = str(value or "").strip().upper()[:1]
    return {"M": "M", "F": "F"}.get(text, UNKNOWN)


def add_subgroup_columns(frame: Any, defaults: Sequence[tuple[str, str]] = (), group_column: str = "source") -> Any:
    """Add ``age_band``, ``view_group`` and ``sex_group`` columns to a labels/predictions table.

    ``age_band`` keeps an existing non-empty ``age_band`` value, else comes from an
    ``age`` column (years or DICOM AS), else from ``defaults`` matched on
    ``group_column``; ``view_group`` from ``view`` or ``view_position``; ``sex_group``
    from ``sex``. A pandas DataFrame in, a new one out.
    """
    out = frame.copy()
    n = len(out)

    def column(*names: str) -> list[Any]:
        for name in names:
            if name in out.columns:
                return out[name].tolist()
        return [""] * n

    bands = age_bands(column("age", "patient_age"), column(group_column), defaults)
    if "age_band" in out.columns:
        given = [str(v).strip().lower() for v in out["age_band"].fillna("")]
        bands = [g if g in AGE_BANDS else b for g, b in zip(given, bands)]
    out["age_band"] = bands
    out["view_group"] = [view_group(v) for v in column("view", "view_position")]
    out["sex_group"] = [sex_group(v) for v in column("sex")]
    return out
