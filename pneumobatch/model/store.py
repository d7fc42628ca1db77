"""Model files on disk, without torch: where they are, their cards, hashes and applicability statistics.

A model is ``NAME.json`` (the card) and ``NAME.safetensors`` (the weights) in a weights
folder, with ``NAME.applicability.safetensors`` and ``NAME.onnx`` beside them when the card
names them. Everything here reads and checks those files with numpy and the standard
library only, so that ``predict`` on ONNX Runtime (:mod:`pneumobatch.model.runtime`) never
imports torch; building networks from the weights is :mod:`pneumobatch.model.registry`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from pneumobatch.core.card import ModelCard, validate_card
from pneumobatch.core.errors import ModelError
from pneumobatch.io.atomicfile import atomic_write

DEFAULT_MODEL = "pneumonia"


def default_weights_dir() -> Path:
    """``$PNEUMOBATCH_WEIGHTS`` or the repository's ``weights/`` folder."""
    env = os.environ.get("PNEUMOBATCH_WEIGHTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "weights"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_card(card: ModelCard, path: Path) -> None:
    """Write a model card (``NAME.json``) atomically."""
    atomic_write(path, (json.dumps(card.to_dict(), indent=2) + "\n").encode())


def resolve_model_paths(name_or_path: str, weights_dir: Optional[Path] = None) -> tuple[Path, Path]:
    """Find ``(card.json, weights.safetensors)`` for a model name or a path to either file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".json", ".safetensors") and candidate.exists():
        stem = candidate.with_suffix("")
    else:
        stem = (weights_dir or default_weights_dir()) / name_or_path
    card_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not card_path.exists() or not weights_path.exists():
        known = ", ".join(c.name for c in list_models(weights_dir)) or "none"
        raise ModelError(
            f"model {name_or_path!r} not found (looked for {card_path} and {weights_path}); installed models: {known}"
        )
    return card_path, weights_path


def read_card(card_path: Path) -> ModelCard:
    """A model card from disk, checked (:func:`~pneumobatch.core.card.validate_card`) before any use."""
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{card_path}: unreadable model card ({exc})") from exc
    try:
        validate_card(data)
        return ModelCard.from_dict(data)
    except ModelError as exc:
        raise ModelError(f"{card_path}: invalid model card: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{card_path}: invalid model card ({exc})") from exc


def verify_weights(card: ModelCard, weights_path: Path) -> None:
    """The weights file must be the one the card was written for (its SHA-256)."""
    actual = sha256_file(weights_path)
    if actual != str(card.weights_sha256).strip().lower():  # hex digests compare case-insensitively
        raise ModelError(
            f"{weights_path}: SHA-256 {actual[:12]}… does not match the card "
            f"({card.weights_sha256[:12]}…); the weights file was changed or corrupted"
        )


def load_applicability(card: ModelCard, weights_path: Path, verify: bool) -> Optional[Any]:
    """The applicability statistics a card names (``applicability.file`` beside the weights), verified."""
    info = card.applicability or {}
    if not info.get("file"):
        return None
    from pneumobatch.model.applicability.stats import ApplicabilityStats

    path = weights_path.with_name(Path(str(info["file"])).name)  # never outside the weights folder
    if not path.exists():
        raise ModelError(f"{path}: applicability statistics named by the card are missing")
    if verify and sha256_file(path) != str(info.get("sha256", "")).lower():
        raise ModelError(f"{path}: SHA-256 does not match the card; the file was changed or corrupted")
    stats = ApplicabilityStats.load(path)
    if info.get("threshold") is not None:
        # the card's threshold is the one images are flagged by (``stats.flag``); pneumobatch
        # writes the same number into the card and the file, but only the card is edited by hand
        try:
            stats.threshold = float(info["threshold"])
        except (TypeError, ValueError) as exc:
            raise ModelError(
                f"model {card.name}: applicability threshold {info['threshold']!r} is not a number"
            ) from exc
    return stats


def list_models(weights_dir: Optional[Path] = None) -> list[ModelCard]:
    """Cards of the models installed in a weights folder, by name."""
    folder = weights_dir or default_weights_dir()
    cards = []
    for card_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if card_path.with_suffix(".safetensors").exists():
            try:
                cards.append(read_card(card_path))
            except ModelError:
                continue
    return cards
