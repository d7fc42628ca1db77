"""What ``pneumobatch monitor`` reads from a run.json, and the one line saying what is wrong with one.

A run.json is an ordinary file a person can edit (or a spreadsheet, a script, a bad disk can
damage), so every part of it the analysis reads is checked before the night is used:
:data:`RUN_SCHEMA` (JSON Schema, checked with ``jsonschema`` as the model card is) for the
shapes and ranges, then what a schema cannot say: numbers are finite, a group has no more
positive or flagged images than scored ones, ``finished`` is an ISO 8601 time. A night that
fails is left out of the analysis with a note (:func:`night_problem` gives its text); the
message names the place in the file and the rule, never the value found there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from pneumobatch.core.files import first_non_finite
from pneumobatch.operations.monitor.record import DIMENSIONS, QUANTILE_LEVELS

_COUNT = {"type": "integer", "minimum": 0, "maximum": 2**53}
_RATE = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
#: The numbers of one group (or of all files) of one model in one night (``record._stats``).
_STATS: dict[str, Any] = {
    "type": "object",
    "required": ["files", "ok", "skipped", "error", "n_scored", "quantiles"],
    "properties": {
        **{k: _COUNT for k in ("files", "ok", "skipped", "error", "n_scored", "n_positive", "n_flagged")},
        "quantiles": {
            "type": ["array", "null"],
            "items": {"type": "number", "minimum": 0, "maximum": 1},
            "minItems": len(QUANTILE_LEVELS),
            "maxItems": len(QUANTILE_LEVELS),
        },
        "positive_rate": _RATE,
        "flag_rate": _RATE,
        "mean": _RATE,
        "by_reason": {"type": "object", "additionalProperties": _COUNT},
        "class_counts": {"type": "object", "additionalProperties": _COUNT},
        "fine_counts": {"type": "object", "additionalProperties": _COUNT},
    },
}
_MODEL: dict[str, Any] = {
    "type": "object",
    "required": ["overall"],
    "properties": {
        "classes": {"type": "array", "items": {"type": "string"}},
        "fine_classes": {"type": "array", "items": {"type": "string"}},
        "overall": _STATS,
        "by": {
            "type": "object",
            "properties": {dim: {"type": "object", "additionalProperties": _STATS} for dim in DIMENSIONS},
        },
    },
}
#: The parts of a run.json that monitor reads.
RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["monitoring"],
    "properties": {
        "started": {"type": ["string", "null"]},
        "finished": {"type": ["string", "null"]},
        "images_per_second": {"type": ["number", "null"], "minimum": 0},
        "counts": {
            "type": ["object", "null"],
            "properties": {k: _COUNT for k in ("files", "ok", "skipped", "error")},
        },
        "models": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "weights_sha256": {"type": ["string", "null"], "pattern": "^[0-9a-fA-F]{64}$"},
                    "card": {"type": ["object", "null"]},
                },
            },
        },
        "monitoring": {
            "type": "object",
            "required": ["models"],
            "properties": {"models": {"type": "object", "additionalProperties": _MODEL}},
        },
    },
}

_TYPE_NAMES = {
    "object": "an object",
    "array": "a list",
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
}


def _place(parts: Any) -> str:
    """``monitoring/models/NAME/...``: keys come from the file, so they are shortened and made printable."""

    def safe(part: Any) -> str:
        text = "".join(c if c.isprintable() else "?" for c in str(part))
        return text if len(text) <= 40 else text[:37] + "..."

    return "/".join(safe(p) for p in parts) or "run.json"


def _rule(error: Any) -> str:
    """What a schema violation means, from the schema's side only (the value found is never quoted)."""
    kind, want = error.validator, error.validator_value
    if kind == "type":
        names = [want] if isinstance(want, str) else list(want)
        return "must be " + " or ".join(_TYPE_NAMES.get(t, t) for t in names)
    if kind == "required":
        missing = [k for k in want if isinstance(error.instance, dict) and k not in error.instance]
        return f"lacks {', '.join(missing)}"
    if kind in ("minItems", "maxItems") and error.schema.get("minItems") == error.schema.get("maxItems"):
        return f"must hold {want} values"
    words = {
        "minItems": "at least {} values",
        "maxItems": "at most {} values",
        "minimum": "at least {}",
        "maximum": "at most {}",
        "pattern": "a SHA-256 in hex",
    }
    return f"must be {words[kind].format(want)}" if kind in words else f"is not valid ({kind})"


def _bad_counts(run: dict[str, Any]) -> Optional[str]:
    """A group with more positive or flagged images than scored ones (a binomial test needs k <= n)."""
    for name, model in run["monitoring"]["models"].items():
        groups = [(("overall",), model["overall"])]
        for dim, by_group in (model.get("by") or {}).items():
            if dim in DIMENSIONS:
                groups += [(("by", dim, g), stats) for g, stats in by_group.items()]
        for where, stats in groups:
            for key in ("n_positive", "n_flagged"):
                if key in stats and stats[key] > stats["ok"]:
                    return f"{_place(('monitoring', 'models', name, *where, key))}: larger than ok (the images scored)"
            for key in ("class_counts", "fine_counts"):
                if key in stats and sum(stats[key].values()) > stats["ok"]:
                    return f"{_place(('monitoring', 'models', name, *where, key))}: add up to more than ok"
    return None


def night_problem(run: Any) -> Optional[str]:
    """What is wrong with a parsed run.json for monitoring (place and rule, one line), or None."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(RUN_SCHEMA).iter_errors(run))
    if error is not None:
        return f"{_place(error.absolute_path)}: {_rule(error)}"
    for key in ("monitoring", "counts", "images_per_second"):
        if (bad := first_non_finite(run.get(key))) is not None:
            return f"{_place((key, *bad[0]))}: must be a finite number"
    if run.get("finished"):
        try:
            datetime.fromisoformat(run["finished"]).timestamp()
        except (ValueError, OverflowError, OSError):
            return "finished: must be an ISO 8601 date and time"
    return _bad_counts(run)
