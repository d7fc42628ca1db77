"""Report inputs: the predictions CSV, run.json and the studies CSV beside it, the labels' selection.

Everything a user hands the report is checked here, with a one-line
:class:`~pneumobatch.core.errors.ReportError` or :class:`~pneumobatch.core.errors.LabelError`
naming the file; a damaged sidecar (run.json, studies CSV) becomes a warning and the
report derives what it can from the CSV.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from pneumobatch.core.card import PROB_PREFIX
from pneumobatch.core.errors import LabelError, Reason
from pneumobatch.io.predictions import restore_formulas


def report_version() -> str:
    """This pneumobatch's version, "unknown" when it cannot be told."""
    try:
        import pneumobatch

        version = getattr(pneumobatch, "__version__", None)
        if version:
            return str(version)
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            return dist_version("pneumobatch")
        except PackageNotFoundError:
            return "unknown"
    except Exception:  # a version string must never stop a report
        return "unknown"


def load_run(path: Path, warnings: list[str]) -> Optional[dict[str, Any]]:
    """run.json as a dict; None (with a warning when damaged) when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.append(f"{path.name} could not be read ({e}); run details derived from the CSV")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path.name} is not a JSON object; ignored")
        return None
    return data


def load_studies(path: Path, warnings: list[str]) -> Optional[pd.DataFrame]:
    """The studies CSV; None (with a warning when damaged) when absent or unusable."""
    if not path.is_file():
        return None
    try:
        frame = restore_formulas(pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="replace"))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        warnings.append(f"{path.name} could not be read ({e}); study predictions aggregated here")
        return None
    if "study_instance_uid" not in frame.columns:
        warnings.append(f"{path.name} has no study_instance_uid column; ignored")
        return None
    for col in frame.columns:
        if col.startswith(PROB_PREFIX) or col in ("threshold", "n_images"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def reasons_by_status(by_reason: Any) -> dict[str, dict[str, int]]:
    """``{status: {reason: n}}`` from run.json's flat ``{reason: n}`` (or nested form)."""
    if not isinstance(by_reason, dict):
        return {}
    out: dict[str, dict[str, int]] = {}
    for reason, n in by_reason.items():
        if isinstance(n, dict):  # already nested
            out.setdefault(str(reason), {}).update({str(k): v for k, v in n.items()})
            continue
        try:
            status = Reason(reason).status.value
        except ValueError:
            status = "other"
        out.setdefault(status, {})[str(reason)] = n
    return out


def elapsed_seconds(run: dict[str, Any]) -> Optional[float]:
    """Seconds spent predicting: run.json's ``seconds``, else finished - started."""
    if isinstance(run.get("seconds"), (int, float)):
        return float(run["seconds"])
    try:
        start = datetime.fromisoformat(str(run["started"]))
        end = datetime.fromisoformat(str(run["finished"]))
        return (end - start).total_seconds()
    except (KeyError, ValueError, TypeError):
        return None


def select_labels(labels: pd.DataFrame, where: Sequence[str]) -> pd.DataFrame:
    """Keep the label rows matching every ``COLUMN=VALUE`` (e.g. ``split=test``), case-insensitively."""
    for condition in where:
        column, sep, value = str(condition).partition("=")
        column = column.strip()
        if not sep or not column:
            raise LabelError(f"--where takes COLUMN=VALUE, not {condition!r}")
        if column not in labels.columns:
            raise LabelError(f"--where: labels have no column {column!r} (columns: {', '.join(labels.columns)})")
        labels = labels[labels[column].str.lower() == value.strip().lower()]
        if labels.empty:
            raise LabelError(f"--where {condition}: no label rows match")
    return labels
