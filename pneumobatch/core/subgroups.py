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
from dataclasses import dataclass
from typing import Any, Optional

from pneumobatch.core.errors import EXIT_USAGE, OptionError

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


def _option_error(message: str, exit_code: int) -> OptionError:
    """An :class:`OptionError` that exits with ``exit_code`` (its class's is :data:`EXIT_USAGE`)."""
    error = OptionError(message)
    error.exit_code = exit_code
    return error


def parse_band_defaults(specs: Iterable[str], *, exit_code: int = EXIT_USAGE) -> list[tuple[str, str]]:
    """``["kermany*=child", ...]`` -> ``[("kermany*", "child"), ...]``.

    A malformed spec raises :class:`~pneumobatch.core.errors.OptionError` naming
    ``--default-age-band``, with ``exit_code`` (``train``, ``retune`` and ``report`` keep
    the exit code 3 they have always given it).
    """
    parsed = []
    for spec in specs:
        pattern, sep, band = str(spec).partition("=")
        band = band.strip().lower()
        if not sep or not pattern.strip() or band not in AGE_BANDS:
            raise _option_error(f"--default-age-band wants PATTERN=child or PATTERN=adult, not {spec!r}", exit_code)
        parsed.append((pattern.strip(), band))
    return parsed


def parse_band_targets(specs: Iterable[str], *, exit_code: int = EXIT_USAGE) -> dict[str, float]:
    """``["adult=0.90"]`` -> ``{"adult": 0.9}`` (a sensitivity between 0.5 and 1).

    A malformed spec raises :class:`~pneumobatch.core.errors.OptionError` naming
    ``--band-target-recall``, with ``exit_code`` (``train`` and ``retune`` keep the
    exit code 3 they have always given it).
    """
    parsed = {}
    for spec in specs:
        band, sep, value = str(spec).partition("=")
        band = band.strip().lower()
        try:
            target = float(value)
        except ValueError:
            target = float("nan")
        if not sep or band not in AGE_BANDS or not 0.5 <= target <= 1.0:
            raise _option_error(
                f"--band-target-recall wants child=R or adult=R with R between 0.5 and 1, not {spec!r}", exit_code
            )
        parsed[band] = target
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


@dataclass(frozen=True)
class SubgroupColumns:
    """Names of the columns :func:`add_subgroup_columns` adds; None leaves one out."""

    age_band: str = "age_band"
    view: str = "view_group"
    sex: str = "sex_group"
    source: Optional[str] = None  # the group column's value, "unknown" where empty
    age_years: Optional[str] = None  # the age in years, None where unknown


#: The columns ``report --by age_band / view_group / sex_group`` uses.
REPORT_COLUMNS = SubgroupColumns()
#: The columns training adds to its manifest (prefixed: they never clash with the manifest's own).
TRAINING_COLUMNS = SubgroupColumns("sg_age_band", "sg_view", "sg_sex", source="sg_source", age_years="sg_age")


def add_subgroup_columns(
    frame: Any,
    defaults: Sequence[tuple[str, str]] = (),
    group_column: Optional[str] = "source",
    *,
    age_columns: Sequence[str] = ("age", "patient_age"),
    view_columns: Sequence[str] = ("view", "view_position"),
    sex_columns: Sequence[str] = ("sex",),
    names: SubgroupColumns = REPORT_COLUMNS,
) -> Any:
    """Add age band, view group and sex group columns (named by ``names``) to a table.

    The age band keeps an existing non-empty value of its column, else comes from the
    first of ``age_columns`` present (years or DICOM AS), else from ``defaults``
    matched on ``group_column``; the view group from the first of ``view_columns``;
    the sex group from the first of ``sex_columns``. ``names.source`` and
    ``names.age_years``, when set, also get the group and the age in years. A pandas
    DataFrame in, a new one out.
    """
    out = frame.copy()
    n = len(out)

    def column(*candidates: Optional[str]) -> list[Any]:
        for name in candidates:
            if name and name in out.columns:
                return out[name].tolist()
        return [""] * n

    groups = column(group_column)
    ages = column(*age_columns)
    bands = age_bands(ages, groups, defaults)
    if names.age_band in out.columns:
        given = [str(v).strip().lower() for v in out[names.age_band].fillna("")]
        bands = [g if g in AGE_BANDS else b for g, b in zip(given, bands)]
    if names.source:
        out[names.source] = [str(g) or UNKNOWN for g in groups]
    out[names.age_band] = bands
    out[names.view] = [view_group(v) for v in column(*view_columns)]
    out[names.sex] = [sex_group(v) for v in column(*sex_columns)]
    if names.age_years:
        out[names.age_years] = [age_years(v) for v in ages]
    return out
