"""The site file: its format, reading and checking it, and a model card with a site's temperature and thresholds applied.

``pneumobatch calibrate`` (:mod:`pneumobatch.operations.calibrate`) writes site files; ``predict --site`` and
``report --site`` apply them with :func:`site_card`, so that everything decides by the one rule of
:class:`~pneumobatch.core.card.ModelCard`. A site file is refused (:class:`SiteError`, exit code 2) for another
model name or other weights (SHA-256).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import SiteError

log = logging.getLogger(__name__)


SITE_FORMAT = "pneumobatch-site"


SITE_SCHEMA_VERSION = 1


#: Operating points a site file can apply: the target-sensitivity threshold or Youden's J.
APPLY_CHOICES = {"target": "recall_target", "youden": "youden"}


def load_site(path: Path | str) -> dict[str, Any]:
    """Read and check a site file; :class:`SiteError` (one line) when it is not one."""
    path = Path(path)
    try:
        site = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteError(f"site file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SiteError(
            f"site file {path} is not readable JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    if not isinstance(site, dict) or site.get("format") != SITE_FORMAT:
        raise SiteError(f"{path} is not a pneumobatch site file (made by pneumobatch calibrate)")
    if site.get("schema_version") != SITE_SCHEMA_VERSION:
        raise SiteError(
            f"site file {path} has schema version {site.get('schema_version')!r}; this pneumobatch reads {SITE_SCHEMA_VERSION}"
        )
    try:
        site["model"]["name"], site["temperature"]["site"], site["operating_points"]["pooled"]  # noqa: B018 - presence check
    except (KeyError, TypeError):
        raise SiteError(f"site file {path} lacks model, temperature or operating points") from None
    site["_path"] = str(path)
    site["_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
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
        "target_recall": site.get("target_sensitivity"),
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
        "target_sensitivity": site.get("target_sensitivity"),
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
