"""``pneumobatch audit`` as a function: a site's own check for shortcuts, from a predict run.

:func:`run_audit` reads a predictions CSV, the run.json beside it (the model cards) and the
source folder the CSV was made from, and puts three questions to one model's calls:

- the **header shortcut** (:mod:`.header`): how well the DICOM header alone (scanner,
  station, view, protocol) predicts the model's positive call, as a cross-validated AUC,
  and the positive rate per header value;
- **export invariance** on a sample of the folder's images
  (:func:`pneumobatch.training.invariance.sample_invariance`, the test and table of
  ``pneumobatch invariance``), skipped with ``invariance=False``;
- **applicability**: the share the model flagged out of distribution (the CSV's
  ``applicable`` column), by the same header values.

The audit reads the images again and changes nothing: it never writes inside the source
folder, over the CSV or its run.json, or over an existing output without ``overwrite``
(checked before anything is read). A row whose path leaves the source folder is never
opened; rows whose image is gone or cannot be read are counted, not fatal.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import FileRejected, OptionError, OutputError, OutputExists, ReportError, Status
from pneumobatch.operations.audit.header import NO_HEADER, header_auc, header_features, value_rates

SCHEMA = "pneumobatch.audit/1"
#: The class that is not a positive call of a model without a binary positive class (etiology).
NORMAL = "normal"
#: Examples kept of each kind of row that could not be audited.
MAX_EXAMPLES = 10


@dataclass
class AuditConfig:
    """Options of ``pneumobatch audit``. ``output`` is the PDF; ``<stem>.json`` goes beside it."""

    predictions: Path
    source: Path
    output: Path = Path("audit.pdf")
    model: str = "pneumonia"
    run_json: Optional[Path] = None  # default: OUT.run.json beside the CSV
    weights_dir: Optional[Path] = None
    invariance: bool = True
    sample: int = 100
    seed: int = 0
    workers: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.predictions, self.source, self.output = Path(self.predictions), Path(self.source), Path(self.output)
        if self.run_json is not None:
            self.run_json = Path(self.run_json)

    @property
    def run_path(self) -> Path:
        from pneumobatch.evaluation.report.options import sidecar

        return self.run_json or sidecar(self.predictions, ".run.json")


@dataclass
class AuditResult:
    pdf: Path
    json: Path
    document: dict[str, Any]

    @property
    def not_read(self) -> int:
        """Rows of predicted images the audit could not read again (gone, unreadable, outside the folder)."""
        return int(self.document["rows"]["not_read"])


def output_paths(config: AuditConfig) -> tuple[Path, Path]:
    """The PDF and the JSON beside it (``OUT.json``)."""
    return config.output, config.output.with_suffix(".json")


def check_outputs(config: AuditConfig) -> None:
    """Refuse (exit 2) an output inside the source folder, one that would replace the CSV or its
    run.json, the PDF and JSON at one path, and an existing output without ``overwrite``; a
    link, folder or special file at an output is an :class:`OutputError` (exit 3)."""
    from pneumobatch.io.atomicfile import check_replaceable
    from pneumobatch.io.discovery import is_inside

    pdf, out_json = outputs = output_paths(config)
    if os.path.realpath(pdf) == os.path.realpath(out_json):
        raise OptionError(f"-o {pdf}: the PDF and its JSON would be one file; give -o a .pdf name")
    for out in outputs:
        if is_inside(out, config.source):
            raise OptionError(
                f"output {out} is inside the source folder {config.source}; the audit never writes beside its "
                "inputs: choose another -o"
            )
        check_replaceable(out, [config.predictions, config.run_path], OptionError)
        check_replaceable(out, (), OutputError)
        if out.exists() and not config.overwrite:
            raise OutputExists(f"{out} exists; pass --overwrite to replace it")


def load_inputs(config: AuditConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The predictions CSV and its run.json; a missing or unusable one is a one-line :class:`OptionError`."""
    from pneumobatch.evaluation.report.inputs import load_run
    from pneumobatch.io.predictions import load_predictions

    if not config.source.is_dir():
        raise OptionError(f"source folder {config.source} not found")
    try:
        predictions = load_predictions(config.predictions)
    except ReportError as exc:
        raise OptionError(str(exc)) from exc
    if "pred_label" not in predictions.columns:
        raise OptionError(f"{config.predictions} is not a pneumobatch predictions CSV: no column pred_label")
    run_path = config.run_path
    if not run_path.is_file():
        raise OptionError(
            f"{run_path} not found: the audit needs the run.json predict wrote beside {config.predictions.name} "
            "(it holds the model cards); pass --run-json"
        )
    problems: list[str] = []
    run = load_run(run_path, problems)
    if run is None or not isinstance(run.get("models"), list):
        raise OptionError(f"{run_path} is not a predict run.json{': ' + problems[0] if problems else ''}")
    return predictions, run


def pick_model(name: str, run: dict[str, Any], predictions: pd.DataFrame, source: Path) -> ModelCard:
    """The card of the model named ``name`` (or of the one model with that task) in run.json."""
    from pneumobatch.evaluation.labels.cards import card_from_run, describe_model

    entries = {str(m.get("name")): m for m in run["models"] if isinstance(m, dict)}
    if name not in entries:
        by_task = [n for n, m in entries.items() if m.get("task") == name]
        if len(by_task) != 1:
            raise OptionError(f"--model {name}: not in {source.name} (models: {', '.join(entries) or 'none'})")
        name = by_task[0]
    rows = predictions[predictions["model"].isin([name, ""])]
    card = card_from_run(entries[name]) or describe_model(rows, entries[name])
    if not card.binary and NORMAL not in card.classes:
        raise OptionError(f"--model {name}: no positive class and no {NORMAL!r} class, so no positive call to audit")
    return card


def positive_calls(rows: pd.DataFrame, card: ModelCard) -> np.ndarray:
    """Whether each row's call is positive: the positive class of a binary card, else any class
    but ``normal`` (etiology: any pneumonia). Calls come from ``pred_label`` (derived from the
    probabilities where it is empty, as the report does)."""
    from pneumobatch.evaluation.labels.join import prediction_classes

    labels, _ = prediction_classes(rows, card)
    return labels == card.positive if card.binary else labels != NORMAL


def _flag(value: Any) -> Optional[bool]:
    return {"true": True, "false": False}.get(str(value).strip().lower())


def read_headers(rows: pd.DataFrame, source: Path) -> tuple[list[int], list[dict[str, Any]], dict[str, Any]]:
    """The header features of each row's file under ``source``: the rows read, their features,
    and the counts (with examples) of rows outside the folder, gone or unreadable, and changed
    since predict (read all the same)."""
    from pneumobatch.io.discovery import resolve_inside

    kept: list[int] = []
    features: list[dict[str, Any]] = []
    problems: dict[str, dict[str, Any]] = {
        kind: {"count": 0, "examples": []} for kind in ("outside_source", "missing", "unreadable", "changed")
    }
    reasons: Counter[str] = Counter()

    def count(kind: str, rel: str) -> None:
        problems[kind]["count"] += 1
        if len(problems[kind]["examples"]) < MAX_EXAMPLES:
            problems[kind]["examples"].append(rel)

    for i, row in enumerate(rows.to_dict("records")):
        rel = str(row["path"])
        path = resolve_inside(source, rel)
        if path is None:
            count("outside_source", rel)
            continue
        try:
            st = path.stat()
        except OSError:
            count("missing", rel)
            continue
        try:
            features.append(header_features(path))
        except FileRejected as exc:
            count("unreadable", rel)
            reasons[exc.reason.value] += 1
            continue
        except OSError:
            count("unreadable", rel)
            reasons["unreadable"] += 1
            continue
        kept.append(i)
        if str(row.get("file_size", "")) not in ("", str(st.st_size)):
            count("changed", rel)
    problems["unreadable"]["by_reason"] = dict(reasons)
    return kept, features, problems


def _applicability(flags: list[Optional[bool]]) -> dict[str, Any]:
    from pneumobatch.evaluation.metrics.intervals import exact_interval

    scored = [f for f in flags if f is not None]
    k = sum(1 for f in scored if f is False)
    return {
        "scored": len(scored),
        "not_applicable": k,
        "rate": k / len(scored) if scored else None,
        "ci": exact_interval(k, len(scored)),
    }


def audit_invariance(
    config: AuditConfig, card: ModelCard, progress: Callable[[str], None]
) -> tuple[dict[str, Any], list[str]]:
    """The export-invariance table of the audited model on a sample of the source folder, and notes.

    The model is loaded by its name from ``weights_dir``; weights other than the run's are noted.
    """
    from pneumobatch.model.registry import load_model
    from pneumobatch.training.invariance import InvarianceConfig, sample_invariance

    notes = []
    model = load_model(card.name, config.weights_dir)
    if card.weights_sha256 and model.card.weights_sha256.lower() != card.weights_sha256.lower():
        notes.append(
            f"the invariance test used {card.name} weights {model.card.weights_sha256[:12]}…, not the run's "
            f"{card.weights_sha256[:12]}…: the header and applicability parts describe the run, this part those weights"
        )
    invariance_config = InvarianceConfig(
        folder=config.source,
        models=(card.name,),
        weights_dir=config.weights_dir,
        sample=config.sample,
        seed=config.seed,
        workers=config.workers,
    )
    try:
        result = sample_invariance(invariance_config, progress, models=[model])
    except OptionError as exc:  # no file to test: said, not fatal
        return {"skipped": str(exc)}, notes
    table = result.pop(model.card.name)
    over = [r for r in table["rows"] if r["passes"] is False]
    return {**result, "table": table, "over": over}, notes


def _invariance_verdict(part: dict[str, Any]) -> str:
    from pneumobatch.evaluation.invariance import GOAL, MIN_IMAGES

    if "skipped" in part:
        return f"export invariance not tested: {part['skipped']}"
    table, over = part["table"], part["over"]
    n = part["n_images"]
    if table["passes"] is None:
        return (
            f"export invariance on {n} images: no subgroup has the {MIN_IMAGES} images needed to judge "
            f"(see the table; --sample more)"
        )
    if not over:
        return f"export invariance on {n} images: no subgroup of {MIN_IMAGES}+ images moves by more than {GOAL}"
    shown = ", ".join(f"{r['export']} on {'all images' if r['subgroup'] == 'all' else r['subgroup']}" for r in over[:8])
    return (
        f"export invariance on {n} images: {len(over)} row{'s' if len(over) > 1 else ''} over {GOAL} "
        f"({shown}{', …' if len(over) > 8 else ''}): this site's exports change the answers there"
    )


def _applicability_verdict(overall: dict[str, Any], values: dict[str, Any]) -> str:
    if not overall["scored"]:
        return "applicability: the CSV has no applicability flag for this model (its applicable column is empty)"
    worst = max(
        (
            (field, v)
            for field, block in values.items()
            for v in block["values"]
            if 10 <= v["not_applicable"]["n"] < overall["scored"] and v["value"] != NO_HEADER
        ),
        key=lambda fv: fv[1]["not_applicable"]["rate"],
        default=None,
    )
    text = (
        f"applicability: {overall['not_applicable']} of {overall['scored']} images "
        f"({overall['rate']:.0%}) flagged out of distribution"
    )
    if worst is not None and worst[1]["not_applicable"]["rate"] > overall["rate"]:
        field, v = worst
        text += f"; most in {field}={v['value']} ({v['not_applicable']['k']} of {v['not_applicable']['n']})"
    return text


def build_audit(config: AuditConfig, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every number of the audit as one JSON-ready dict (no files written)."""
    from pneumobatch.evaluation.report.inputs import report_version
    from pneumobatch.evaluation.report.options import RESEARCH_ONLY

    predictions, run = load_inputs(config)
    card = pick_model(config.model, run, predictions, config.predictions)
    rows = predictions[predictions["model"].isin([card.name, ""])].drop_duplicates("path").reset_index(drop=True)
    ok = rows[rows["status"] == Status.OK.value].reset_index(drop=True)
    notes: list[str] = []
    roots = [os.path.realpath(r) for r in run.get("roots") or []]
    if roots and os.path.realpath(config.source) not in roots:
        notes.append(f"the run read {', '.join(run['roots'])}, not {config.source}: paths are looked up in the latter")
    progress(f"reading the headers of {len(ok)} predicted images under {config.source}")
    kept, features, problems = read_headers(ok, config.source)
    audited = ok.iloc[kept].reset_index(drop=True)
    positive = positive_calls(audited, card) if len(audited) else np.zeros(0, dtype=bool)
    flags = [_flag(v) for v in audited.get("applicable", pd.Series([""] * len(audited)))]
    header = header_auc(features, positive, config.seed)
    values = value_rates(features, positive, flags)
    applicability = {"overall": _applicability(flags)}
    if config.invariance:
        progress(f"export invariance of {card.name} on up to {config.sample} files of {config.source}")
        invariance, more = audit_invariance(config, card, progress)
        notes += more
    else:
        invariance = {"skipped": "--no-invariance"}
    n_not_read = sum(problems[k]["count"] for k in ("outside_source", "missing", "unreadable"))
    if problems["changed"]["count"]:
        notes.append(
            f"{problems['changed']['count']} images changed size since predict read them; audited as they are now"
        )
    return {
        "schema": SCHEMA,
        "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
        "pneumobatch_version": report_version(),
        "research_use_only": RESEARCH_ONLY,
        "inputs": {
            "predictions": str(config.predictions),
            "run_json": str(config.run_path),
            "source": str(config.source),
            "model": card.name,
            "task": card.task,
            "positive_call": card.positive if card.binary else f"any class but {NORMAL}",
            "weights_sha256": card.weights_sha256,
        },
        "rows": {
            "model_rows": int(len(rows)),
            "predicted": int(len(ok)),
            "not_predicted": int(len(rows) - len(ok)),
            "audited": int(len(audited)),
            "positive_calls": int(positive.sum()),
            "not_read": int(n_not_read),
            **problems,
        },
        "verdicts": {
            "header": header["verdict"],
            "invariance": _invariance_verdict(invariance),
            "applicability": _applicability_verdict(applicability["overall"], values),
        },
        "header": header,
        "values": values,
        "applicability": applicability,
        "invariance": invariance,
        "notes": notes,
    }


def run_audit(config: AuditConfig, progress: Callable[[str], None] = lambda s: None) -> AuditResult:
    """Check the outputs, build the audit and write ``OUT.json`` and the PDF (atomically)."""
    from pneumobatch.io.atomicfile import atomic_write
    from pneumobatch.operations.audit.pdf import render

    check_outputs(config)
    document = build_audit(config, progress)
    pdf, out_json = output_paths(config)
    atomic_write(out_json, json.dumps(document, indent=1, allow_nan=False, default=str) + "\n")
    atomic_write(pdf, lambda tmp: render(document, tmp))
    return AuditResult(pdf, out_json, document)
