"""Small helpers shared by the metric modules: JSON-safe values, ratios, curve thinning."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

#: Curves kept in the JSON output are thinned to at most this many points.
MAX_CURVE_POINTS = 2000


def jsonable(value: Any) -> Any:
    """Turn numpy scalars and arrays, tuples and NaN/inf into JSON-safe values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [
            v if (t := type(v)) is int or t is str or (t is float and math.isfinite(v)) else jsonable(v) for v in value
        ]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def finite_or_none(value: Any) -> Optional[float]:
    """A finite float or None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def ratio(num: float, den: float) -> Optional[float]:
    """``num / den`` as a float, None when ``den`` is zero."""
    return float(num) / float(den) if den else None


def thin(*arrays: np.ndarray, limit: int = MAX_CURVE_POINTS) -> list[list[Any]]:
    """Keep at most ``limit`` evenly spaced points of parallel curve arrays (ends kept)."""
    n = len(arrays[0])
    if n <= limit:
        idx = np.arange(n)
    else:
        idx = np.unique(np.linspace(0, n - 1, limit).round().astype(int))
    return [jsonable(np.asarray(a)[idx]) for a in arrays]


def as_indices(values: Sequence[Any], classes: Sequence[str], what: str) -> np.ndarray:
    """Class names -> indices into ``classes``; ValueError naming ``what`` for an unknown one."""
    lookup = {c: i for i, c in enumerate(classes)}
    try:
        return np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))
    except KeyError as e:
        raise ValueError(f"{what} holds {e.args[0]!r}, not one of {list(classes)}") from None
