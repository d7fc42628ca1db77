"""The training loop: ``train(config, progress)``, labelled images in, a model card and weights out.

Reads the splits (:mod:`~pneumobatch.training.data`), then two-stage fine-tuning (head,
then the whole network) with batched augmentation (:mod:`~pneumobatch.training.augment`),
class imbalance handling and early stopping on the validation selection score
(:mod:`~pneumobatch.training.evaluate`), checkpointing every epoch for ``--resume``; then
temperature and operating points on validation
(:mod:`~pneumobatch.training.operating_points`), ``NAME.safetensors`` + ``NAME.json``,
applicability statistics and the curves figure.
"""

from __future__ import annotations

import fnmatch
import math
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pneumobatch import __version__
from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import TrainingError
from pneumobatch.io.atomicfile import atomic_write
from pneumobatch.model.device import autocast, resolve_device, resolve_training_precision
from pneumobatch.model.preprocess import InputSpec, normalize, prepare
from pneumobatch.model.registry import ARCHITECTURES, LoadedModel, create_model, save_model
from pneumobatch.training.applicability import fit_training_applicability
from pneumobatch.training.augment import AUGMENTATION, EXPORT_AUGMENTATION, augment, prepare_batch
from pneumobatch.training.config import BALANCE_CHOICES, TrainConfig
from pneumobatch.training.data import SPLITS, Dataset, decode_splits, labelled_splits
from pneumobatch.training.evaluate import MIN_PER_CLASS, auc_of, predict_logits, scored_subsets, selection_score
from pneumobatch.training.hierarchy import (
    CoarseLogits,
    coarse_logits,
    counts_by_fine,
    fine_nll,
    fine_targets,
    hierarchy_of,
    organism_counts,
)
from pneumobatch.training.operating_points import band_targets, choose_operating_points
from pneumobatch.training.plots import plot_curves


@dataclass
class History:
    """Per-epoch records (stage, losses, AUCs, seconds), kept in the checkpoint and the card."""

    epochs: list[dict[str, float]] = field(default_factory=list)


def _class_weights(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    counts = torch.bincount(targets, minlength=n_classes).float().clamp(min=1)
    return counts.sum() / (n_classes * counts)


#: No image is drawn more than this many times an epoch, on average, by the balancing samplers: a class
#: of six images (fungal) gets at most 120 draws, not a fifth of the epoch; the rest goes to the others.
MAX_DRAWS_PER_IMAGE = 20


def class_shares(counts: np.ndarray, cap: float = MAX_DRAWS_PER_IMAGE) -> np.ndarray:
    """Each present class's share of an epoch of ``counts.sum()`` draws: equal shares, except that a
    class's share is at most ``cap`` draws per image (water-filling: what a capped class cannot take
    is shared equally by the others)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    shares = np.zeros(len(counts))
    free = counts > 0
    budget = 1.0
    while free.any():
        equal = budget / free.sum()
        limit = cap * counts / n
        capped = free & (limit < equal)
        if not capped.any():
            shares[free] = equal
            break
        shares[capped] = limit[capped]
        budget -= limit[capped].sum()
        free &= ~capped
    return shares


def _epoch_order(
    targets: torch.Tensor, balance: str, generator: torch.Generator, sample_weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Indices for one epoch: a permutation; a class-balanced resample of the same length (``oversample``,
    with replacement, shares by :func:`class_shares`); every class cut to the smallest one's size
    (``undersample``, a new subset each epoch); or a source-and-class-balanced resample (``source``)."""
    n = len(targets)
    if balance == "source" and sample_weights is not None:
        return torch.multinomial(sample_weights, n, replacement=True, generator=generator)
    if balance not in ("oversample", "undersample"):
        return torch.randperm(n, generator=generator)
    counts = torch.bincount(targets)
    if balance == "oversample":
        y = targets.numpy()
        shares = class_shares(counts.numpy())
        weights = torch.from_numpy(shares[y] / counts.numpy()[y].clip(min=1))
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    per_class = int(counts[counts > 0].min())
    chunks = []
    for c in torch.nonzero(counts).flatten().tolist():
        members = torch.nonzero(targets == c).flatten()
        chunks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    order = torch.cat(chunks)
    return order[torch.randperm(len(order), generator=generator)]


def _sample_weights(frame: pd.DataFrame, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-image sampling weights balancing classes, and sources within each class.

    Every class gets the same share of an epoch (at most :data:`MAX_DRAWS_PER_IMAGE` draws
    per image: :func:`class_shares`). Within a class, a source's share is
    proportional to the square root of its image count: a large source cannot
    dominate a class (so "looks like source X" explains less of the label), and a
    tiny source is not repeated dozens of times per epoch.
    """
    y = targets.numpy()
    groups = frame["sg_source"].to_numpy()
    weights = np.zeros(len(y), dtype=np.float64)
    class_share = class_shares(np.bincount(y, minlength=n_classes))
    for c in range(n_classes):
        in_class = y == c
        if not in_class.any():
            continue
        names, counts = np.unique(groups[in_class], return_counts=True)
        shares = np.sqrt(counts) / np.sqrt(counts).sum()
        for name, count, share in zip(names, counts, shares):
            weights[in_class & (groups == name)] = share / count * class_share[c]
    return torch.from_numpy(weights)


def exclude_groups(frame: pd.DataFrame, config: TrainConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """``frame`` without the rows whose ``config.group_column`` matches a ``config.exclude_group``
    glob (case-insensitive), and how many rows of each value were left out."""
    if not config.exclude_group:
        return frame, {}
    if not config.group_column or config.group_column not in frame.columns:
        raise TrainingError(f"--exclude-group needs the manifest's {config.group_column!r} column")
    values = frame[config.group_column].astype(str)
    hit = np.zeros(len(frame), dtype=bool)
    for pattern in config.exclude_group:
        matched = np.array([fnmatch.fnmatch(v.lower(), pattern.lower()) for v in values])
        if not matched.any():
            raise TrainingError(f"--exclude-group {pattern!r} matches no {config.group_column} value")
        hit |= matched
    left_out = {str(k): int(v) for k, v in values[hit].value_counts().items()}
    return frame[~hit].reset_index(drop=True), left_out


def js_divergence(logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean Jensen-Shannon divergence between the softmax outputs of two views of the same images
    (AugMix's consistency term: zero when both exports get the same probabilities)."""
    p, q = (torch.softmax(x, dim=1).clamp_min(1e-7) for x in logits)
    m = 0.5 * (p + q)
    return 0.5 * ((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1)).mean()


def _inputs(
    dataset: Dataset, batches: list[torch.Tensor], spec: InputSpec, rng: np.random.Generator, views: int = 1
) -> Iterator[torch.Tensor]:
    """The uint8 inputs of each batch: prepared images, or (``dataset.raw``) each image through
    ``views`` independent random exports and ``predict``'s preparation (view after view: the
    batch's images, then the same images again), made one batch ahead in a thread (Pillow
    and NumPy release the GIL) so that it overlaps the network's step."""
    if dataset.raw is None:
        yield from (dataset.images[idx] for idx in batches)
        return

    def make(k: int):
        return pool.submit(prepare_batch, dataset.raw, batches[k].tolist() * views, spec, rng)

    with ThreadPoolExecutor(1) as pool:
        pending = make(0) if batches else None
        for k in range(len(batches)):
            current = pending.result()
            if k + 1 < len(batches):
                pending = make(k + 1)
            yield current


def _prepared(dataset: Dataset, spec: InputSpec) -> Dataset:
    """``dataset`` with its model inputs made from ``raw`` without augmentation (for the applicability fit)."""
    if dataset.raw is None:
        return dataset
    images = torch.from_numpy(np.stack([prepare(a.astype(np.float32) / 255.0, spec) for a in dataset.raw])[:, None])
    return Dataset(images, dataset.targets, dataset.frame)


def record_export_invariance(
    loaded: LoadedModel, frame: pd.DataFrame, workers: int, progress: Callable[[str], None]
) -> None:
    """The export-invariance table of the test split (``frame``: its rows with their subgroups), in the card."""
    from pneumobatch.model.registry import write_card
    from pneumobatch.training.invariance import measure_invariance

    progress(f"export-invariance test on the {len(frame)} test images")
    columns = {"sg_source": "source", "sg_age_band": "age_band", "sg_view": "view"}
    result = measure_invariance(
        [loaded],
        [Path(p) for p in frame["path"]],
        frame[list(columns)].rename(columns=columns),
        age_bands=frame["sg_age_band"].tolist(),
        workers=min(workers, 1),  # originals and exports are small: one decoding worker keeps up
        progress=progress,
    )
    loaded.card.metrics["export_invariance"] = {
        "data": f"test split ({result['n_images']} images)",
        "exports": result["exports"],
        **result[loaded.card.name],
    }
    write_card(loaded.card, loaded.weights_path.with_suffix(".json"))


def train(config: TrainConfig, progress: Callable[[str], None] = lambda s: None) -> ModelCard:
    """Run a full training and write the model; returns its card."""
    if config.architecture not in ARCHITECTURES:
        raise TrainingError(f"unknown architecture {config.architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    if config.balance not in BALANCE_CHOICES:
        raise TrainingError(f"--balance must be one of {', '.join(BALANCE_CHOICES)}, not {config.balance!r}")
    band_targets(config)  # fail before hours of training, not after
    started = time.time()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = resolve_device(config.device)
    amp_dtype = resolve_training_precision(config.precision, device)
    spec = InputSpec(config.input_size, config.equalize)

    frame, task, dropped, leakage, split_source = labelled_splits(config)
    if sum(leakage.values()):
        progress(f"left out to keep splits disjoint: {leakage}")
    frame, excluded = exclude_groups(frame, config)
    if excluded:
        progress(f"left out of every split (--exclude-group): {excluded}")
    if config.max_images:
        frame = frame.groupby("split").head(config.max_images)

    def not_empty(split: str, rows: pd.DataFrame) -> None:
        if rows.empty and split != "test":
            raise TrainingError(f"the {split} split is empty")

    raw = ("train",) if config.export_augment else ()
    paired = config.export_augment and config.consistency > 0
    splits, unreadable = decode_splits(frame, task, spec, config.workers, SPLITS, progress, not_empty, raw)
    train_set, val_set, test_set = splits["train"], splits["val"], splits["test"]
    for split in ("train", "val"):
        if not len(splits[split].targets):
            raise TrainingError(f"none of the {split} images could be read (paths are relative to the manifest)")

    arch = ARCHITECTURES[config.architecture]
    pretrained = config.init == "imagenet"
    tree = hierarchy_of(frame, task)
    n_outputs = len(tree.fine) if tree is not None else len(task.classes)
    net = create_model(config.architecture, n_outputs, pretrained=pretrained, input_size=config.input_size)
    if config.init not in ("imagenet", "random"):
        from safetensors.torch import load_file

        net.load_state_dict(load_file(config.init), strict=True)
    net = net.to(device).to(memory_format=torch.channels_last)
    mean, std = arch.mean, arch.std
    # what validation, selection and operating points score: the coarse logits of a two-level network
    scorer = CoarseLogits(net, tree).to(device) if tree is not None else net
    train_fine = fine_targets(train_set.frame, tree) if tree is not None else None

    weights = _class_weights(train_set.targets, len(task.classes)) if config.balance == "weights" else None
    sample_weights = (
        _sample_weights(train_set.frame, train_set.targets, len(task.classes)) if config.balance == "source" else None
    )
    val_subsets = scored_subsets(val_set.frame, val_set.targets.numpy(), len(task.classes))
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    generator = torch.Generator().manual_seed(config.seed)
    head_params = list(arch.head(net).parameters())
    head_ids = {id(p) for p in head_params}
    stages = ([("head", config.head_epochs)] if pretrained and config.head_epochs > 0 else []) + [
        ("full", config.epochs)
    ]

    ckpt_path = config.out_dir / f"{config.name}.checkpoint.pt"
    history = History()
    best = {"auc": -1.0, "state": None, "epoch": -1}
    start_stage, start_epoch, state = 0, 0, None
    if config.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        history.epochs = list(state["history"])
        best = {"auc": state["best_auc"], "state": state["best_state"], "epoch": state["best_epoch"]}
        start_stage, start_epoch = state["stage"], state["epoch"] + 1
        generator.set_state(state["generator"])
        progress(f"resuming from {ckpt_path} at stage {stages[start_stage][0]}, epoch {start_epoch + 1}")
    config.out_dir.mkdir(parents=True, exist_ok=True)

    for stage_index, (stage, n_epochs) in enumerate(stages):
        if stage_index < start_stage:
            continue
        for p in net.parameters():
            p.requires_grad = stage == "full" or id(p) in head_ids
        params = [p for p in net.parameters() if p.requires_grad]
        lr = config.head_lr if stage == "head" else config.lr
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
        steps_per_epoch = max(
            1,
            math.ceil(
                len(_epoch_order(train_set.targets, config.balance, torch.Generator().manual_seed(0), sample_weights))
                / config.batch_size
            ),
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=n_epochs * steps_per_epoch, pct_start=0.15
        )
        first_epoch = start_epoch if stage_index == start_stage else 0
        if state is not None and stage_index == start_stage and first_epoch > 0:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        stale = 0
        for epoch in range(first_epoch, n_epochs):
            net.train()
            order = _epoch_order(train_set.targets, config.balance, generator, sample_weights)
            total, seen, correct = 0.0, 0, 0
            t0 = time.time()
            batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            batches = [b for b in batches if len(b) >= 2]  # BatchNorm needs two samples
            exports = np.random.default_rng([config.seed, stage_index, epoch])
            views = 2 if paired else 1
            for idx, inputs in zip(batches, _inputs(train_set, batches, spec, exports, views)):
                x = inputs.to(device).float() / 255.0
                x = augment(x, generator, config.hflip)
                x = normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
                y = train_set.targets[idx].to(device).repeat(views)
                with autocast(device, amp_dtype):
                    logits = net(x)
                if tree is not None:
                    fine = logits.float()
                    logits = coarse_logits(fine, scorer.parents, len(task.classes))
                    y_fine = train_fine[idx].to(device).repeat(views)
                    loss = criterion(logits, y) + fine_nll(fine, logits, y_fine, scorer.parents)
                else:
                    loss = criterion(logits.float(), y)
                if paired:  # the same images through two exports must get the same probabilities
                    loss = loss + config.consistency * js_divergence(logits.float().chunk(2))
                    logits, y = logits[: len(idx)], y[: len(idx)]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                correct += int((logits.argmax(1) == y).sum())
            val_logits = predict_logits(scorer, val_set.images, mean, std, device, config.batch_size * 2)
            val_loss = float(F.cross_entropy(val_logits, val_set.targets, weight=weights))
            val_auc = auc_of(val_logits, val_set.targets, task)
            score, parts = selection_score(torch.softmax(val_logits, 1).numpy(), val_set.targets.numpy(), val_subsets)
            record = {
                "stage": stage,
                "epoch": epoch + 1,
                "train_loss": total / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
                "val_loss": val_loss,
                "val_auc": val_auc,
                "val_selection": score,
                "val_auc_within": parts,
                "seconds": time.time() - t0,
            }
            history.epochs.append(record)
            within = ", ".join(f"{k} {v:.3f}" for k, v in parts.items() if k != "all")
            progress(
                f"{stage} epoch {epoch + 1}/{n_epochs}: loss {record['train_loss']:.3f}, val loss {val_loss:.3f}, "
                f"val AUC {val_auc:.4f}, selection {score:.4f} ({within}) ({record['seconds']:.0f}s)"
            )
            if best["state"] is None or score > best["auc"]:  # a NaN score (one class in val) still keeps a state
                best = {
                    "auc": score,
                    "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                    "epoch": len(history.epochs),
                }
                stale = 0
            else:
                stale += 1
            checkpoint = {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "stage": stage_index,
                "epoch": epoch,
                "history": history.epochs,
                "best_auc": best["auc"],
                "best_state": best["state"],
                "best_epoch": best["epoch"],
                "generator": generator.get_state(),
            }
            # the one atomic writer: a kill mid-save keeps the last checkpoint, a planted link is replaced, not followed
            atomic_write(ckpt_path, lambda tmp, checkpoint=checkpoint: torch.save(checkpoint, tmp))
            if stage == "full" and stale >= config.patience:
                progress(f"early stop: validation AUC has not improved for {config.patience} epochs")
                break
        state = None

    net.load_state_dict(best["state"])
    card = ModelCard(
        name=config.name,
        task=task.name,
        classes=list(task.classes),
        architecture=config.architecture,
        input_size=config.input_size,
        mean=list(mean),
        std=list(std),
        positive=task.positive,
        data=_data_summary(config, splits, dropped, unreadable, split_source, leakage),
        training={
            "init": config.init,
            "balance": config.balance,
            "class_weights": weights.tolist() if weights is not None else None,
            "model_selection": "mean of pooled and within-source / within-age-band validation AUCs (groups with >= "
            f"{MIN_PER_CLASS} images of two classes or more)",
            "augmentation": (EXPORT_AUGMENTATION + "; then " if config.export_augment else "")
            + AUGMENTATION
            + (", horizontal flip" if config.hflip else ""),
            "consistency": {
                "weight": config.consistency,
                "loss": "Jensen-Shannon divergence between the probabilities of two random exports of each image",
            }
            if paired
            else None,
            "precision": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "fp32",
            "excluded_groups": excluded,
            "stages": [{"stage": s, "epochs": n} for s, n in stages],
            "batch_size": config.batch_size,
            "lr": config.lr,
            "head_lr": config.head_lr,
            "weight_decay": config.weight_decay,
            "optimizer": "AdamW + one-cycle",
            "early_stopping": f"validation AUC, patience {config.patience}",
            "best_epoch": best["epoch"],
            "seed": config.seed,
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "seconds": round(time.time() - started, 1),
            "history": history.epochs,
        },
        pneumobatch_version=__version__,
        preprocessing={"intensity": "equalize" if config.equalize else "none"},
    )
    if tree is not None:
        card.hierarchy = {
            **tree.to_dict(),
            "counts": counts_by_fine([(s, d.frame) for s, d in splits.items()], tree),
            "organisms": organism_counts(frame, tree),
        }
    choose_operating_points(card, scorer, val_set, test_set, config, task, device)
    card.training["seconds"] = round(time.time() - started, 1)
    weights_path = save_model(net.cpu(), card, config.out_dir)
    train_inputs = _prepared(train_set, spec)
    loaded = LoadedModel(card, net.eval(), weights_path)
    fit_training_applicability(loaded, train_inputs, val_set, progress)
    if config.invariance_test and len(test_set.targets):
        record_export_invariance(loaded, test_set.frame, config.workers, progress)
    plot_curves(history.epochs, config.out_dir / f"{config.name}.curves.png", config.name)
    if ckpt_path.exists():
        os.remove(ckpt_path)  # our own intermediate file; the final weights supersede it
    return card


def _data_summary(
    config: TrainConfig,
    splits: dict[str, Dataset],
    dropped: dict[str, int],
    unreadable: int,
    split_source: str,
    leakage: dict[str, int],
) -> dict[str, Any]:
    train_ages = [a for a in splits["train"].frame["sg_age"] if a is not None and a == a]
    summary: dict[str, Any] = {
        "source": str(config.data),
        "label_column": config.label_column,
        "counts": {
            s: {str(k): int(v) for k, v in d.frame["cls"].value_counts().sort_index().items()}
            for s, d in splits.items()
        },
        "counts_by_age_band": {
            s: {f"{b} / {c}": int(n) for (b, c), n in d.frame.groupby(["sg_age_band", "cls"]).size().items()}
            for s, d in splits.items()
        },
        "age_band_defaults": list(config.default_age_band),
        "age_range_years": [round(min(train_ages), 1), round(max(train_ages), 1)] if train_ages else None,
        "dropped_unmapped_labels": dropped,
        "unreadable_images": unreadable,
        "left_out_for_disjoint_splits": leakage,
        "split": split_source,
    }
    if config.group_column and config.group_column in splits["train"].frame.columns:
        summary["counts_by_" + config.group_column] = {
            s: {f"{g} / {c}": int(n) for (g, c), n in d.frame.groupby([config.group_column, "cls"]).size().items()}
            for s, d in splits.items()
        }
    return summary
