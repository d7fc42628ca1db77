"""The site file: its format, reading and checking it, and a model card with a site's temperature and thresholds applied.

``pneumobatch calibrate`` (:mod:`pneumobatch.operations.calibrate`) writes site files; ``predict --site`` and
``report --site`` apply them with :func:`site_card`, so that everything decides by the one rule of
:class:`~pneumobatch.core.card.ModelCard`. A site file is refused (:class:`SiteError`, exit code 2) for another
model name or other weights (SHA-256), and when it does not hold what applying it needs
(:data:`SITE_SCHEMA`, checked with ``jsonschema`` as the model card is; every number finite, which
JSON Schema does not check and Python's ``json`` does not ensure: it reads ``NaN`` and ``Infinity``;
the applied point's threshold present in every age band): a one-line message naming the file and
what is wrong. Only a regular file of at most :data:`~pneumobatch.core.files.SITE_FILE_LIMIT` bytes
is read (:func:`~pneumobatch.core.files.read_small_file`): a FIFO or a device is refused, never waited on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import SiteError
from pneumobatch.core.files import SITE_FILE_LIMIT, FileReadError, first_non_finite, read_small_file

log = logging.getLogger(__name__)


SITE_FORMAT = "pneumobatch-site"


SITE_SCHEMA_VERSION = 1


#: Operating points a site file can apply: the target-recall threshold or Youden's J.
APPLY_CHOICES = {"target": "recall_target", "youden": "youden"}

_THRESHOLD = {"type": "number", "minimum": 0, "maximum": 1}
#: A band's point: a band kept "shipped" may carry no threshold for a point its card lacked.
_BAND_POINT = {
    "type": "object",
    "required": ["threshold"],
    "properties": {"threshold": {"anyOf": [_THRESHOLD, {"type": "null"}]}},
}
_POOLED_POINT = {"type": "object", "required": ["threshold"], "properties": {"threshold": _THRESHOLD}}
#: What a site file must hold to be applied (JSON Schema; the rest of what calibrate writes is
#: provenance). Its JSON key ``target_sensitivity`` is the target recall (``target_recall`` in
#: Python and in the model card); it keeps that name so that site files already written still load.
SITE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "schema_version", "model", "temperature", "operating_points"],
    "properties": {
        "format": {"const": SITE_FORMAT},
        "schema_version": {"const": SITE_SCHEMA_VERSION},
        "model": {
            "type": "object",
            "required": ["name", "weights_sha256"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "weights_sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
            },
        },
        "temperature": {
            "type": "object",
            "required": ["site"],
            "properties": {"site": {"type": "number", "exclusiveMinimum": 0}},
        },
        "operating_points": {
            "type": "object",
            "required": ["pooled"],
            "properties": {
                "pooled": {
                    "type": "object",
                    "required": ["target", "youden"],
                    "properties": {"target": _POOLED_POINT, "youden": _POOLED_POINT},
                },
                "by_age_band": {
                    "type": ["object", "null"],
                    "additionalProperties": {
                        "type": "object",
                        "required": ["source", "target", "youden"],
                        "properties": {
                            "source": {"enum": ["site", "shipped"]},
                            "target": _BAND_POINT,
                            "youden": _BAND_POINT,
                        },
                    },
                },
            },
        },
        "apply": {"enum": list(APPLY_CHOICES)},
        "target_sensitivity": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    },
}
#: Parts without which a file is not a site file at all: where, and which keys must be there.
_ESSENTIAL = {
    (): {"model", "temperature", "operating_points"},
    ("model",): {"name"},
    ("temperature",): {"site"},
    ("operating_points",): {"pooled"},
}
_NOT_SITE, _VERSION, _LACKS, _INVALID = range(4)


def _kind(error: Any) -> int:
    """Which of load_site's messages a schema violation gets (the lowest one found wins)."""
    where = tuple(error.absolute_path)
    missing = set(error.validator_value) - set(error.instance) if error.validator == "required" else set()
    if (not where and error.validator == "type") or where[:1] == ("format",) or "format" in missing:
        return _NOT_SITE
    if where[:1] == ("schema_version",) or "schema_version" in missing:
        return _VERSION
    if missing & _ESSENTIAL.get(where, set()) or (error.validator == "type" and where in _ESSENTIAL and where):
        return _LACKS
    return _INVALID


def site_problem(site: Any, path: Path | str) -> Optional[str]:
    """The one line saying what is wrong with the site document ``site`` read from (or to be
    written to) ``path``, or None when predict and report can apply it.

    :data:`SITE_SCHEMA`, then every number finite, then the applied operating point's threshold
    in every age band (a band kept "shipped" may lack the point that is not applied).
    """
    import jsonschema

    path = Path(path)
    errors = list(jsonschema.Draft202012Validator(SITE_SCHEMA).iter_errors(site))
    if errors:
        kind = min(map(_kind, errors))
        if kind == _NOT_SITE:
            return f"{path} is not a pneumobatch site file (made by pneumobatch calibrate)"
        if kind == _VERSION:
            version = site.get("schema_version")
            return f"site file {path} has schema version {version!r}; this pneumobatch reads {SITE_SCHEMA_VERSION}"
        if kind == _LACKS:
            return f"site file {path} lacks model, temperature or operating points"
        error = jsonschema.exceptions.best_match(errors)
        where = "/".join(map(str, error.absolute_path)) or "site"
        message = error.message if len(error.message) <= 120 else error.message[:117] + "..."
        return f"site file {path}: {where}: {message}"
    if (bad := first_non_finite(site)) is not None:
        return f"site file {path}: {'/'.join(map(str, bad[0])) or 'site'}: {bad[1]!r} is not a finite number"
    applied = site.get("apply", "target")
    for band, point in (site["operating_points"].get("by_age_band") or {}).items():
        if point[applied]["threshold"] is None:
            return (
                f"site file {path}: operating_points/by_age_band/{band}/{applied}/threshold: "
                f"null, but the file applies {applied}; calibrate again"
            )
    return None


def load_site(path: Path | str) -> dict[str, Any]:
    """Read and check a site file (:func:`site_problem`); :class:`SiteError` (one line: the file
    and what is wrong) when it is not one, or when the path names no regular file of at most
    :data:`~pneumobatch.core.files.SITE_FILE_LIMIT` bytes."""
    path = Path(path)
    try:
        raw = read_small_file(path, limit=SITE_FILE_LIMIT, what="site file")
    except FileReadError as e:
        raise SiteError(str(e)) from e
    try:
        site = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise SiteError(f"site file {path} is not readable JSON: {first or type(e).__name__}") from e
    if (problem := site_problem(site, path)) is not None:
        raise SiteError(problem)
    site["_path"] = str(path)
    site["_sha256"] = hashlib.sha256(raw).hexdigest()
    return site


def apply_site(card: ModelCard, site: dict[str, Any]) -> ModelCard:
    """A copy of ``card`` deciding with the site's temperature and thresholds.

    Raises :class:`SiteError` when the site file belongs to another model or other weights.
    """
    where = site.get("_path", "site file")
    model = site.get("model") or {}
    sha = str(model.get("weights_sha256") or "")
    if model.get("name") != card.name or sha.lower() != str(card.weights_sha256).lower():
        raise SiteError(
            f"{where} was fitted for model {model.get('name')} (weights {sha[:12] or 'unknown'}), "
            f"not {card.name} (weights {str(card.weights_sha256)[:12] or 'unknown'}); calibrate again for this model"
        )
    key = APPLY_CHOICES[site.get("apply", "target")]
    points = site["operating_points"]
    pooled = points["pooled"]
    bands = {
        band: {"recall_target": p["target"]["threshold"], "youden": p["youden"]["threshold"], "source": p["source"]}
        for band, p in (points.get("by_age_band") or {}).items()
    }
    thresholds: dict[str, Any] = {
        "recall_target": pooled["target"]["threshold"],
        "youden": pooled["youden"]["threshold"],
        "target_recall": site.get("target_sensitivity"),  # the site file's key for the target recall
        "applied": key,
        "source": "site",
    }
    if bands:
        thresholds["by_age_band"] = bands
    provenance = {
        "file": where,
        "sha256": site.get("_sha256", ""),
        "created": site.get("created"),
        "apply": site.get("apply", "target"),
        "target_sensitivity": site.get("target_sensitivity"),  # run.json key, as in the site file
        "fitted_on": site.get("fitted_on"),
        "temperature": site["temperature"]["site"],
        "thresholds": {
            "pooled": thresholds[key],
            **{b: {"threshold": v[key], "source": v["source"]} for b, v in bands.items()},
        },
        "shipped": {"threshold": card.threshold, "temperature": card.temperature, "thresholds": card.thresholds},
    }
    return dataclasses.replace(
        card,
        threshold=float(thresholds[key]),
        thresholds=thresholds,
        temperature=float(site["temperature"]["site"]),
        site=provenance,
    )


def site_card(card: ModelCard, path: Path | str) -> ModelCard:
    """``card`` with the site file at ``path`` applied (the one call predict and report need)."""
    return apply_site(card, load_site(path))


def shipped_card(card: ModelCard) -> ModelCard:
    """``card`` as shipped: a site file's temperature and thresholds undone.

    Predictions made with ``predict --site`` carry the site's card in run.json, with the
    shipped threshold, thresholds and temperature kept in ``card.site["shipped"]``.
    """
    if not card.site:
        return card
    shipped = card.site.get("shipped") or {}
    return dataclasses.replace(
        card,
        threshold=shipped.get("threshold", card.threshold),
        thresholds=dict(shipped.get("thresholds") or {}),
        temperature=float(shipped.get("temperature") or card.temperature),
        site={},
    )
