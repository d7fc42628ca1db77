"""``pneumobatch monitor`` as a function: its options, its result, and parsing ``--limit``.

:func:`run_monitor` reads the nights, analyses them
(:mod:`pneumobatch.operations.monitor.analysis`), adds labelled performance when a labels
file is given, and writes the JSON, the PDF (:mod:`pneumobatch.operations.monitor.pdf`) and
the Prometheus textfile (:mod:`pneumobatch.operations.monitor.prometheus`), each atomically.
Before anything is read or written, :func:`check_outputs` refuses outputs that would replace
an input (a run.json, the predictions CSV beside it, the labels) or one another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pneumobatch.core.errors import OptionError, OutputError, ReportError
from pneumobatch.operations.monitor.analysis import (
    DEFAULT_BASELINE,
    DEFAULT_LIMITS,
    analyse,
    labelled_performance,
    load_nights,
    predictions_path,
)
from pneumobatch.operations.monitor.prometheus import prometheus_text


def parse_limits(specs: Sequence[str]) -> dict[str, float]:
    """``["psi=0.1", ...]`` -> ``{"psi": 0.1}``; :class:`OptionError` names the known limits."""
    out = {}
    for spec in specs:
        name, sep, value = str(spec).partition("=")
        name = name.strip().replace("-", "_")
        try:
            if not sep or name not in DEFAULT_LIMITS:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise OptionError(
                f"--limit wants NAME=NUMBER with NAME one of {', '.join(DEFAULT_LIMITS)}, not {spec!r}"
            ) from None
    return out


@dataclass
class MonitorConfig:
    """Options of ``pneumobatch monitor``."""

    run_jsons: Sequence[Path]
    output: Path = Path("monitor.pdf")
    baseline: int = DEFAULT_BASELINE
    limits: dict[str, float] = field(default_factory=dict)
    labels: Optional[Path] = None
    key: Optional[str] = None
    label_column: str = "label"
    window: int = 7
    prometheus: Optional[Path] = None  # default: OUT.prom beside the PDF


@dataclass
class MonitorResult:
    pdf: Path
    json: Path
    prometheus: Path
    document: dict[str, Any]

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return self.document["alerts"]


def output_paths(config: MonitorConfig) -> tuple[Path, Path, Path]:
    """The PDF, the JSON beside it (``OUT.json``) and the Prometheus textfile (``--prometheus``, else ``OUT.prom``)."""
    pdf = Path(config.output)
    return pdf, pdf.with_suffix(".json"), Path(config.prometheus) if config.prometheus else pdf.with_suffix(".prom")


def check_outputs(config: MonitorConfig) -> None:
    """Refuse outputs that would replace an input or one another (:class:`OptionError`, exit 2),
    and a link, folder or special file at an output (:class:`OutputError`, exit 3, as predict's).

    The inputs are the run.json files, the predictions CSV each belongs to (read for the
    labelled metrics; always a user's data) and the labels file.
    """
    from pneumobatch.io.atomicfile import check_replaceable

    inputs = [Path(p) for p in config.run_jsons]
    inputs += [predictions_path(p) for p in inputs]
    inputs += [Path(config.labels)] if config.labels is not None else []
    outputs = output_paths(config)
    for i, out in enumerate(outputs):
        check_replaceable(out, (), OutputError)
        check_replaceable(out, inputs, OptionError)
        for other in outputs[:i]:
            if os.path.realpath(out) == os.path.realpath(other):
                raise OptionError(
                    f"{out} would be written twice (PDF {outputs[0]}, JSON {outputs[1]}, Prometheus {outputs[2]}); "
                    "choose another -o or --prometheus"
                )


def run_monitor(config: MonitorConfig) -> MonitorResult:
    """Analyse the runs and write ``OUT.pdf``, ``OUT.json`` and the Prometheus textfile (atomically)."""
    from pneumobatch.evaluation.labels.reading import read_labels
    from pneumobatch.io.atomicfile import atomic_write
    from pneumobatch.operations.monitor.pdf import render

    check_outputs(config)
    nights, notes = load_nights(config.run_jsons)
    if len(nights) < 2:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise ReportError(f"monitoring needs at least two runs with a monitoring block, got {len(nights)}{why}")
    document = analyse(nights, config.baseline, config.limits)
    document["notes"] = notes
    if config.labels is not None:
        document["labelled"] = labelled_performance(
            nights, read_labels(config.labels), key=config.key, label_column=config.label_column, window=config.window
        )
        document["notes"] += document["labelled"]["notes"]
    pdf, out_json, prom = output_paths(config)
    atomic_write(out_json, json.dumps(document, indent=2) + "\n")
    atomic_write(pdf, lambda tmp: render(document, tmp))
    atomic_write(prom, prometheus_text(nights, document))
    return MonitorResult(pdf, out_json, prom, document)
