"""Temperature and operating points chosen on the validation split; ``pneumobatch retune``.

:func:`choose_operating_points` is the last step of ``train`` and all of ``retune``:
only the validation split chooses anything (temperature, pooled and per-age-band
thresholds); the test split is evaluated at what was chosen. :func:`retune` runs it
again for a trained model on the splits it was trained with, weights untouched.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import EXIT_FATAL, TrainingError
from pneumobatch.core.subgroups import parse_band_targets
from pneumobatch.core.tasks import TASKS, Task, get_task
from pneumobatch.evaluation import metrics
from pneumobatch.evaluation.metrics import fit_temperature
from pneumobatch.model.device import resolve_device
from pneumobatch.model.preprocess import input_spec
from pneumobatch.training.config import TrainConfig
from pneumobatch.training.data import Dataset, decode_splits, labelled_splits
from pneumobatch.training.evaluate import (
    class_indices,
    evaluate_probs,
    evaluate_subgroups,
    predict_logits,
    select_threshold,
)
from pneumobatch.training.hierarchy import CoarseLogits, fine_metrics

#: ``card.metrics`` entries written by the benchmarks after training, kept by a retune.
MEASURED_AFTER = ("export_invariance", "leave_one_source_out", "imbalance_methods")


def band_targets(config: TrainConfig) -> dict[str, float]:
    """``--band-target-recall`` parsed; a malformed one is an OptionError that exits 3, as it always has."""
    return parse_band_targets(config.band_target_recall, exit_code=EXIT_FATAL)


def choose_operating_points(
    card: ModelCard,
    net: nn.Module,
    val_set: Dataset,
    test_set: Dataset,
    config: TrainConfig,
    task: Task,
    device: torch.device,
) -> None:
    """Temperature, thresholds (pooled and per age band) on validation; metrics on validation and test.

    Sets ``card.temperature``, ``threshold``, ``thresholds`` and ``metrics``. Only the
    validation split chooses anything; the test split is evaluated at what was chosen.
    """
    targets_by_band = band_targets(config)
    batch = config.batch_size * 2
    val_logits = predict_logits(net, val_set.images, card.mean, card.std, device, batch)
    temperature = fit_temperature(val_logits.numpy(), val_set.targets.numpy())
    val_probs = torch.softmax(val_logits / temperature, 1).numpy()
    thresholds: dict[str, Any] = {}
    threshold = None
    val_bands = val_set.frame["sg_age_band"].to_numpy()
    if task.positive is not None and len(task.classes) == 2:
        pos = task.classes.index(task.positive)
        val_pos = val_set.targets.numpy() == pos
        if val_pos.all() or not val_pos.any():
            raise TrainingError("threshold selection needs both classes in the validation split")
        margin = config.recall_margin_level or None
        thresholds = select_threshold(val_pos, val_probs[:, pos], config.target_recall, margin)
        thresholds["target_recall"] = config.target_recall
        threshold = thresholds["recall_target"]
        by_band = metrics.band_thresholds(
            val_pos,
            val_probs[:, pos],
            val_bands,
            config.target_recall,
            band_targets=targets_by_band,
            margin_level=margin,
        )
        if by_band:
            thresholds["by_age_band"] = by_band
            targets = ", ".join(f"{b} {p['target_recall']:g}" for b, p in by_band.items())
            thresholds["age_band_rule"] = (
                f"the band's recall_target threshold (sensitivity target on validation: {targets}) applies when the "
                f"image's age is known (child < 18 years <= adult); otherwise the pooled threshold {threshold:.4f} "
                f"(target {config.target_recall:g})"
            )
    card.temperature, card.threshold, card.thresholds = temperature, threshold, thresholds
    if not card.binary and len(task.classes) > 2:
        card.decision = metrics.balanced_offsets(val_probs, val_set.targets.numpy(), list(task.classes))
    offsets = card.log_offsets

    val_pred = class_indices(card.decide_many(val_probs, val_bands), task)
    results: dict[str, Any] = {"val": evaluate_probs(val_probs, val_set.targets.numpy(), task, threshold, offsets)}
    results["val_subgroups"] = evaluate_subgroups(val_probs, val_set.targets.numpy(), val_pred, val_set.frame, task)
    if len(test_set.targets):
        test_logits = predict_logits(net, test_set.images, card.mean, card.std, device, batch)
        test_probs = torch.softmax(test_logits / temperature, 1).numpy()
        targets = test_set.targets.numpy()
        test_bands = test_set.frame["sg_age_band"].to_numpy()
        test_pred = class_indices(card.decide_many(test_probs, test_bands), task)
        results["test"] = evaluate_probs(test_probs, targets, task, threshold, offsets)
        results["test_subgroups"] = evaluate_subgroups(test_probs, targets, test_pred, test_set.frame, task)
        if not card.binary:
            classes = list(task.classes)
            results["test_per_class"] = metrics.class_table(test_probs, targets, test_pred, classes)
            argmax = metrics.decided(test_probs, classes, None)
            results["test_per_class_argmax"] = metrics.class_table(test_probs, targets, argmax, classes, n_bootstrap=0)
        tree = card.tree
        if tree is not None and isinstance(net, CoarseLogits):
            fine_logits = predict_logits(net.net, test_set.images, card.mean, card.std, device, batch)
            fine_probs = tree.probabilities(fine_logits.numpy(), temperature)[1]
            results["test_fine"] = fine_metrics(fine_probs, test_set.frame, tree, test_pred)
        if config.group_column and config.group_column in test_set.frame.columns:
            groups = test_set.frame[config.group_column].astype(str).to_numpy()
            results["test_by_" + config.group_column] = {
                g: evaluate_probs(test_probs[groups == g], targets[groups == g], task, threshold, offsets)
                for g in sorted(set(groups))
            }
    # the tables measured after training (export invariance, leave-one-source-out) stay; a retune
    # changes the thresholds they were scored at, so re-run their benchmarks after one
    card.metrics = {**{k: v for k, v in card.metrics.items() if k in MEASURED_AFTER}, **results}


def retune(
    name: str, config: TrainConfig, weights_dir: Optional[Path] = None, progress: Callable[[str], None] = lambda s: None
) -> ModelCard:
    """Choose a trained model's temperature and operating points again, without training.

    Loads model ``name``, decodes ``config.data``'s validation and test splits (the same
    splits, leakage rules and age bands as ``train``), runs
    :func:`choose_operating_points` with ``config``'s targets and rewrites the model
    card. The weights and applicability statistics are not touched; the card's
    ``training`` section gains a ``retuned`` entry saying when and with which targets.
    """
    from pneumobatch.model.registry import load_model, write_card

    loaded = load_model(name, weights_dir)
    card = loaded.card
    if card.task not in TASKS:
        raise TrainingError(
            f"model {card.name} has task {card.task!r}: retune knows the built-in tasks ({', '.join(TASKS)})"
        )
    task = get_task(card.task)
    if list(task.classes) != list(card.classes):
        raise TrainingError(
            f"model {card.name} predicts {', '.join(card.classes)}; this version's {card.task} task has "
            f"{', '.join(task.classes)}: train it again rather than retune it"
        )
    targets_by_band = band_targets(config)
    config = dataclasses.replace(config, task=card.task, name=card.name, input_size=card.input_size)
    frame, task, _, _, _ = labelled_splits(config)
    parts, _ = decode_splits(frame, task, input_spec(card), config.workers, ("val", "test"), progress)
    device = resolve_device(config.device)
    net = loaded.net.to(device).eval()
    scorer = CoarseLogits(net, card.tree).to(device) if card.tree is not None else net
    choose_operating_points(card, scorer, parts["val"], parts["test"], config, task, device)
    card.training["retuned"] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "pneumobatch retune",
        "target_recall": config.target_recall,
        "band_target_recall": targets_by_band,
        "recall_margin_level": config.recall_margin_level,
        "data": str(config.data),
        "note": "temperature and operating points (or a multi-class model's decision offsets) chosen again on the "
        "validation split; weights unchanged",
    }
    write_card(card, loaded.weights_path.with_suffix(".json"))
    return card
