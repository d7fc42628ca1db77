"""Prometheus metrics of the latest night, for node_exporter's textfile collector.

:func:`prometheus_text` turns the latest run.json and the analysis of
:func:`pneumobatch.operations.monitor.analysis.analyse` into the Prometheus text format
(0.0.4), written by ``prometheus_client`` (:func:`prometheus_client.generate_latest`), so
that names, label values and numbers are escaped and formatted as Prometheus reads them.
A sample whose value is unknown (a run without a finish time, a model without a drift
score) is left out; its metric keeps its HELP and TYPE lines.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from pneumobatch.operations.monitor.analysis import Night

#: One gauge: name, help text, and its samples as (labels, value); a value of None is left out.
GaugeSpec = tuple[str, str, Sequence[tuple[dict[str, str], Any]]]


class _Gauges:
    """A collector that yields fixed gauges (the metrics of one night; nothing is measured live)."""

    def __init__(self, gauges: Sequence[GaugeSpec]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for name, help_text, samples in self.gauges:
            names = list(dict.fromkeys(k for labels, _ in samples for k in labels))
            family = GaugeMetricFamily(name, help_text, labels=names)
            for labels, value in samples:
                if value is not None:
                    family.add_metric([str(labels[k]) for k in names], float(value))
            yield family


def night_gauges(nights: Sequence[Night], analysis: Mapping[str, Any]) -> list[GaugeSpec]:
    """The gauges of the latest night: run time, file counts, throughput, positive rate, drift, alerts."""
    last = nights[-1]
    finished = last.run.get("finished")
    ts = datetime.fromisoformat(finished).timestamp() if finished else None
    counts = last.run.get("counts") or {}
    models = last.monitoring.get("models", {})
    drift = {m: (d[-1] if d and d[-1]["run_json"] == str(last.path) else None) for m, d in analysis["drift"].items()}
    tonight = [a for a in analysis["alerts"] if a["run_json"] == str(last.path)]
    return [
        (
            "pneumobatch_last_success_timestamp_seconds",
            "End of the latest completed predict run (Unix time).",
            [({}, ts)],
        ),
        (
            "pneumobatch_files",
            "Files in the latest run by status.",
            [({"status": s}, counts.get(s)) for s in ("ok", "skipped", "error")],
        ),
        ("pneumobatch_errors", "Files that could not be read in the latest run.", [({}, counts.get("error"))]),
        ("pneumobatch_images_per_second", "Throughput of the latest run.", [({}, last.run.get("images_per_second"))]),
        (
            "pneumobatch_positive_rate",
            "Share of predicted images called positive at the operating point.",
            [({"model": m}, v["overall"].get("positive_rate")) for m, v in models.items()],
        ),
        (
            "pneumobatch_drift_score",
            "Largest PSI of any group of the latest run against the baseline.",
            [({"model": m}, d.get("drift_score") if d else None) for m, d in drift.items()],
        ),
        ("pneumobatch_alerts", "Monitoring alerts raised for the latest run.", [({}, len(tonight))]),
    ]


def prometheus_text(nights: Sequence[Night], analysis: Mapping[str, Any]) -> str:
    """node_exporter textfile-collector metrics for the latest night (Prometheus text format 0.0.4)."""
    return gauges_text(night_gauges(nights, analysis))


def gauges_text(gauges: Sequence[GaugeSpec]) -> str:
    """Fixed gauges in the Prometheus text format 0.0.4 (monitor's night, the listener's counts)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Gauges(gauges))
    return generate_latest(registry).decode("utf-8")
