"""Log levels the CLI chose for third-party loggers, kept so that a library imported later cannot undo them.

pydicom sets its logger to WARNING when it is first imported. ``predict`` does not import
pydicom in its main process (only the decoding workers read DICOM, and importing it costs
about a fifth of a second of start-up), so the level ``setup_logging`` chose is applied
again by the reader right after its own ``import pydicom`` (:func:`reapply`).
"""

from __future__ import annotations

import logging

#: logger name -> the level :func:`set_level` gave it
CHOSEN_LEVELS: dict[str, int] = {}


def set_level(name: str, level: int) -> None:
    """Set a logger's level and remember it for :func:`reapply`."""
    CHOSEN_LEVELS[name] = level
    logging.getLogger(name).setLevel(level)


def reapply(name: str) -> None:
    """Give a logger the level :func:`set_level` chose for it (if any) again."""
    if name in CHOSEN_LEVELS:
        logging.getLogger(name).setLevel(CHOSEN_LEVELS[name])
