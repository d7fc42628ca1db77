"""Training: labelled images in, a model card and safetensors weights out.

Pipeline: load a manifest or class-per-folder tree -> map labels to the task's
classes -> split (the manifest's, else stratified and grouped by patient) ->
decode every image once with the prediction readers and cache it at the model's
input size -> two-stage fine-tuning (head, then the whole network) with batched
augmentation, class imbalance handling, early stopping on validation AUC ->
temperature scaling and operating points on the validation split -> test-split
metrics (overall and per source) -> ``NAME.safetensors`` + ``NAME.json`` + curves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pneumobatch import __version__
from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import FileRejected, TrainingError
from pneumobatch.core.subgroups import (
    AGE_BANDS,
    TRAINING_COLUMNS,
    add_subgroup_columns,
    parse_band_defaults,
    parse_band_targets,
)
from pneumobatch.core.tasks import TASKS, Task, custom_task, get_task
from pneumobatch.evaluation import metrics
from pneumobatch.evaluation.metrics import fit_temperature
from pneumobatch.io.atomicfile import atomic_write
from pneumobatch.io.discovery import sniff
from pneumobatch.io.readers import ReadOptions, read_image
from pneumobatch.model.device import autocast, resolve_device, resolve_precision
from pneumobatch.model.preprocess import normalize, resize, to_uint8
from pneumobatch.model.registry import ARCHITECTURES, LoadedModel, create_model, save_model
from pneumobatch.training.config import BALANCE_CHOICES, TrainConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ""}
#: A subgroup enters model selection and gets its own operating point only with at
#: least this many validation images of each class it is scored on.
MIN_PER_CLASS = metrics.MIN_PER_CLASS_PER_BAND


@dataclass
class Dataset:
    """Decoded, resized images of one split held in memory."""

    images: torch.Tensor  # uint8 (N, 1, S, S)
    targets: torch.Tensor  # int64 (N,)
    frame: pd.DataFrame  # the manifest rows, aligned with images


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def load_labels(config: TrainConfig) -> tuple[pd.DataFrame, Task, dict[str, int]]:
    """Rows with ``path`` (absolute), ``cls`` and ``split`` (may be empty), plus counts dropped."""
    data = Path(config.data)
    if data.is_file():
        frame = _read_manifest(data, config)
    elif data.is_dir():
        frame = _read_folder_tree(data)
    else:
        raise TrainingError(f"{data}: no such manifest or folder")
    if config.task == "custom":
        task = custom_task(frame["label"].dropna().astype(str).tolist())
    else:
        try:
            task = get_task(config.task)
        except KeyError as exc:
            raise TrainingError(str(exc.args[0])) from None
    frame["cls"] = [task.map_label(v) for v in frame["label"]]
    unplaced = frame[frame["cls"].isna()]
    dropped = {str(k): int(v) for k, v in unplaced["label"].astype(str).value_counts().items()}
    frame = frame[frame["cls"].notna()].reset_index(drop=True)
    if frame.empty:
        raise TrainingError(f"no label maps to the classes of task {task.name}: {task.classes}")
    if dropped:
        log.info("dropped %d images whose label task %s cannot place: %s", len(unplaced), task.name, dropped)
    return frame, task, dropped


def _read_manifest(path: Path, config: TrainConfig) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{path}: cannot read manifest ({exc})") from exc
    for column in ("path", config.label_column):
        if column not in frame.columns:
            raise TrainingError(f"{path}: manifest has no {column!r} column (columns: {', '.join(frame.columns)})")
    frame = frame.rename(columns={config.label_column: "label"}).copy()
    frame["path"] = [str((path.parent / p).resolve()) for p in frame["path"]]
    frame["split"] = (
        frame[config.split_column].str.strip().str.lower().replace(_SPLIT_ALIASES)
        if config.split_column in frame.columns
        else ""
    )
    frame["patient"] = frame[config.patient_column] if config.patient_column in frame.columns else ""
    return frame


def _read_folder_tree(root: Path) -> pd.DataFrame:
    """``root/CLASS/*`` or ``root/SPLIT/CLASS/*`` (the public pediatric dataset's layout)."""
    rows = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    split_dirs = {
        _SPLIT_ALIASES.get(p.name.lower(), p.name.lower()): p
        for p in subdirs
        if _SPLIT_ALIASES.get(p.name.lower(), p.name.lower()) in SPLITS
    }
    layout = split_dirs.items() if split_dirs else [("", root)]
    for split, folder in layout:
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for file in sorted(class_dir.rglob("*")):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append({"path": str(file.resolve()), "label": class_dir.name, "split": split, "patient": ""})
    if not rows:
        raise TrainingError(f"{root}: no images found in class folders (root/CLASS/* or root/SPLIT/CLASS/*)")
    return pd.DataFrame(rows)


def assign_splits(frame: pd.DataFrame, config: TrainConfig) -> pd.DataFrame:
    """Keep given splits; otherwise a stratified split grouped by patient.

    Images without a patient id each form their own group. The test share is cut
    first, then validation from the rest, each with ``StratifiedGroupKFold`` so no
    patient appears on two sides.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    frame = frame.copy()
    given = frame["split"].isin(SPLITS)
    if given.all():
        return frame
    if given.any():
        raise TrainingError(
            f"split column has values other than {SPLITS} for {int((~given).sum())} rows; "
            "give every row a split or none"
        )
    groups = np.where(frame["patient"].astype(str).str.len() > 0, frame["patient"].astype(str), "img:" + frame["path"])
    frame["split"] = "train"
    remaining = np.arange(len(frame))
    for split, share in (("test", config.test_fraction), ("val", config.val_fraction / (1 - config.test_fraction))):
        n_splits = max(2, int(round(1 / share)))
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=config.seed)
        _, held = next(cv.split(remaining, frame["cls"].to_numpy()[remaining], groups[remaining]))
        frame.loc[frame.index[remaining[held]], "split"] = split
        remaining = np.delete(remaining, held)
    return frame


def labelled_splits(config: TrainConfig) -> tuple[pd.DataFrame, Task, dict[str, int], dict[str, int], str]:
    """The labelled images of ``config.data`` with their split and subgroups, as training sees them.

    Returns the frame, the task, the labels dropped, what was left out to keep the splits
    disjoint, and where the split came from. ``train`` and ``retune`` (and the
    benchmarks) all start here, so they see the same splits.
    """
    frame, task, dropped = load_labels(config)
    split_source = "manifest" if frame["split"].isin(SPLITS).all() else "stratified, grouped by patient"
    frame = assign_splits(frame, config)
    frame, leakage = remove_leakage(frame)
    return annotate_subgroups(frame, config), task, dropped, leakage, split_source


def annotate_subgroups(frame: pd.DataFrame, config: TrainConfig) -> pd.DataFrame:
    """Add the reporting subgroups ``sg_source``, ``sg_age_band``, ``sg_view``, ``sg_sex`` (and ``sg_age``)."""
    try:
        defaults = parse_band_defaults(config.default_age_band)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    return add_subgroup_columns(
        frame,
        defaults,
        config.group_column,
        age_columns=(config.age_column,),
        view_columns=(config.view_column,),
        sex_columns=(config.sex_column,),
        names=TRAINING_COLUMNS,
    )


def remove_leakage(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """No test image, and no patient of a test image, in train or validation.

    A file listed twice in one split is kept once. A file (same path, or the same
    bytes under another name) listed in the test split and elsewhere is dropped from
    the other splits; likewise for validation vs train. A patient id found in two
    splits is an error: the manifest's split is not patient-disjoint.
    """
    import hashlib

    removed = {"duplicate_rows": 0, "same_file_in_two_splits": 0}
    before = len(frame)
    frame = frame.drop_duplicates(subset=["path", "split"]).reset_index(drop=True)
    removed["duplicate_rows"] = before - len(frame)

    def digest(path: str) -> str:
        try:
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            return "unreadable:" + path

    frame = frame.assign(_digest=[digest(p) for p in frame["path"]])
    rank = frame["split"].map({"test": 0, "val": 1, "train": 2}).fillna(3)
    first = rank.groupby(frame["_digest"]).transform("min")
    leaked = rank > first
    removed["same_file_in_two_splits"] = int(leaked.sum())
    frame = frame[~leaked].drop(columns="_digest").reset_index(drop=True)

    patients = frame[frame["patient"].astype(str).str.len() > 0]
    spread = patients.groupby("patient")["split"].nunique()
    crossing = spread[spread > 1]
    if len(crossing):
        raise TrainingError(
            f"{len(crossing)} patient ids appear in more than one split (e.g. {crossing.index[0]!r}); "
            "the split must be patient-disjoint"
        )
    return frame, removed


def _decode_one(args: tuple[str, int]) -> Optional[np.ndarray]:
    path, size = args
    try:
        image = read_image(Path(path), sniff(Path(path)), ReadOptions(min_side=size))
    except (FileRejected, OSError):
        return None
    return to_uint8(resize(image.pixels, size))


def decode_split(frame: pd.DataFrame, task: Task, size: int, workers: int) -> tuple[Dataset, int]:
    """Decode and resize every image once, exactly as ``predict`` does."""
    jobs = [(p, size) for p in frame["path"]]
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            arrays = list(pool.map(_decode_one, jobs, chunksize=32))
    else:
        arrays = [_decode_one(job) for job in jobs]
    keep = [i for i, a in enumerate(arrays) if a is not None]
    failed = len(arrays) - len(keep)
    if failed:
        log.warning("%d images could not be read and were left out", failed)
    frame = frame.iloc[keep].reset_index(drop=True)
    images = (
        torch.from_numpy(np.stack([arrays[i] for i in keep])[:, None])
        if keep
        else torch.zeros(0, 1, size, size, dtype=torch.uint8)
    )
    index = {c: i for i, c in enumerate(task.classes)}
    targets = torch.tensor([index[c] for c in frame["cls"]], dtype=torch.long)
    return Dataset(images, targets, frame), failed


# --------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, generator: torch.Generator, hflip: bool) -> torch.Tensor:
    """Radiograph-safe augmentation of a float batch (B, 1, H, W) in [0, 1].

    Per image: rotation within ±15°, zoom within ±10 %, shift within ±5 %,
    brightness and contrast within ±20 %, optional horizontal flip.
    """
    b = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator).to(x.device)

    angle = uniform(-15, 15) * math.pi / 180
    scale = uniform(0.9, 1.1)
    tx, ty = uniform(-0.05, 0.05), uniform(-0.05, 0.05)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if hflip:
        flip = torch.rand(b, generator=generator).to(x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    brightness = uniform(0.8, 1.2).view(-1, 1, 1, 1)
    contrast = uniform(0.8, 1.2).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * brightness).clamp(0, 1)


# ----------------------------------------------------------- operating points, metrics


def select_threshold(y_true: np.ndarray, scores: np.ndarray, target_recall: float) -> dict[str, float]:
    """The card's ``recall_target`` and ``youden`` thresholds (:func:`pneumobatch.evaluation.metrics.select_threshold`)."""
    try:
        return metrics.select_threshold(np.asarray(y_true).astype(bool), scores, target_recall)
    except ValueError:
        raise TrainingError("threshold selection needs both classes in the validation split") from None


def evaluate_probs(probs: np.ndarray, targets: np.ndarray, task: Task, threshold: Optional[float]) -> dict[str, Any]:
    """The card's metrics of one split (:func:`pneumobatch.evaluation.metrics.card_metrics`)."""
    return metrics.card_metrics(probs, targets, task.classes, task.positive, threshold)


@torch.no_grad()
def predict_logits(
    net: nn.Module, images: torch.Tensor, mean, std, device: torch.device, batch_size: int
) -> torch.Tensor:
    net.eval()
    out = []
    dtype = resolve_precision("auto", device)
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out.append(net(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _auc_of(logits: torch.Tensor, targets: torch.Tensor, task: Task) -> float:
    probs = torch.softmax(logits, 1).numpy()
    return float(evaluate_probs(probs, targets.numpy(), task, None).get("auc", float("nan")))


# ------------------------------------------------------------------------ training


def _class_weights(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    counts = torch.bincount(targets, minlength=n_classes).float().clamp(min=1)
    return counts.sum() / (n_classes * counts)


def _epoch_order(
    targets: torch.Tensor, balance: str, generator: torch.Generator, sample_weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Indices for one epoch: a permutation, a class-balanced or a source-and-class-balanced resample."""
    n = len(targets)
    if balance == "source" and sample_weights is not None:
        return torch.multinomial(sample_weights, n, replacement=True, generator=generator)
    if balance not in ("oversample", "undersample"):
        return torch.randperm(n, generator=generator)
    counts = torch.bincount(targets)
    per_class = int(counts.max()) if balance == "oversample" else int(counts[counts > 0].min())
    chunks = []
    for c in torch.nonzero(counts).flatten().tolist():
        members = torch.nonzero(targets == c).flatten()
        draw = (
            torch.randint(len(members), (per_class,), generator=generator)
            if balance == "oversample"
            else torch.randperm(len(members), generator=generator)[:per_class]
        )
        chunks.append(members[draw])
    order = torch.cat(chunks)
    return order[torch.randperm(len(order), generator=generator)]


def _sample_weights(frame: pd.DataFrame, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-image sampling weights balancing classes, and sources within each class.

    Every class gets the same share of an epoch. Within a class, a source's share is
    proportional to the square root of its image count: a large source cannot
    dominate a class (so "looks like source X" explains less of the label), and a
    tiny source is not repeated dozens of times per epoch.
    """
    y = targets.numpy()
    groups = frame["sg_source"].to_numpy()
    weights = np.zeros(len(y), dtype=np.float64)
    present = [c for c in range(n_classes) if (y == c).any()]
    for c in present:
        in_class = y == c
        names, counts = np.unique(groups[in_class], return_counts=True)
        shares = np.sqrt(counts) / np.sqrt(counts).sum()
        for name, count, share in zip(names, counts, shares):
            weights[in_class & (groups == name)] = share / count / len(present)
    return torch.from_numpy(weights)


def _scored_subsets(frame: pd.DataFrame, targets: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Row masks of the subgroups (sources, age bands) that model selection scores.

    A subgroup counts when at least two classes have ``MIN_PER_CLASS`` images in it;
    only the rows of those classes are kept, so the score is a within-group AUC.
    """
    subsets = {"all": np.ones(len(targets), dtype=bool)}
    for column in ("sg_source", "sg_age_band"):
        values = frame[column].to_numpy()
        for value in sorted(set(values) - {"unknown"}):
            in_group = values == value
            big = [c for c in range(n_classes) if ((targets == c) & in_group).sum() >= MIN_PER_CLASS]
            if len(big) >= 2:
                subsets[f"{column[3:]}={value}"] = in_group & np.isin(targets, big)
    return subsets


def _within_auc(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes present in ``mask``."""
    from sklearn.metrics import roc_auc_score

    y, p = targets[mask], probs[mask]
    aucs = [roc_auc_score(y == c, p[:, c]) for c in np.unique(y)]
    return float(np.mean(aucs)) if len(np.unique(y)) > 1 else float("nan")


def selection_score(
    probs: np.ndarray, targets: np.ndarray, subsets: dict[str, np.ndarray]
) -> tuple[float, dict[str, float]]:
    """Mean of the pooled AUC and the within-source / within-age-band AUCs.

    The pooled AUC alone rewards telling sources apart (children from adults); the
    within-group AUCs only reward telling classes apart inside one population.
    """
    parts = {name: _within_auc(probs, targets, mask) for name, mask in subsets.items()}
    finite = [v for v in parts.values() if v == v]
    return (float(np.mean(finite)) if finite else float("nan")), parts


def _class_indices(names: np.ndarray, task: Task) -> np.ndarray:
    index = {c: i for i, c in enumerate(task.classes)}
    return np.asarray([index[n] for n in names], dtype=np.int64)


def evaluate_subgroups(
    probs: np.ndarray, targets: np.ndarray, pred: np.ndarray, frame: pd.DataFrame, task: Task
) -> dict[str, Any]:
    """Per source, age band, view and sex: counts, AUC with bootstrap CI, sensitivity/specificity."""
    classes = list(task.classes)
    y_true = [classes[i] for i in targets]
    y_pred = [classes[i] for i in pred]
    binary = task.positive is not None and len(classes) == 2
    out: dict[str, Any] = {}
    for column in ("sg_source", "sg_age_band", "sg_view", "sg_sex"):
        table = metrics.subgroup_metrics(
            frame[column].tolist(),
            y_true,
            probs,
            classes,
            y_pred=y_pred,
            positive=task.positive if binary else None,
            n_bootstrap=500,
            seed=0,
        )
        if binary:  # at the operating point actually applied to each row (per age band)
            pos = classes.index(task.positive)
            values = frame[column].astype(str).to_numpy()
            for row in table["groups"]:
                mask = values == row["value"]
                rates = metrics.confusion_rates(targets[mask] == pos, pred[mask] == pos)
                row.update({k: rates[k] for k in ("sensitivity", "specificity", "ppv", "npv")})
                row["notes"] = [n for n in row.get("notes", []) if not n.startswith("no shipped threshold")] + [
                    "sensitivity, specificity, PPV, NPV at the card's operating point (its age band's when known)"
                ]
                metrics.blank_unsupported(row, task.positive, metrics.MIN_PER_CLASS)
        out[column[3:]] = table
    pairs: dict[str, Any] = {}
    if not binary and "normal" in classes:
        from sklearn.metrics import roc_auc_score

        normal = classes.index("normal")
        for band in AGE_BANDS:
            in_band = frame["sg_age_band"].to_numpy() == band
            for c, name in enumerate(classes):
                mask = in_band & np.isin(targets, [normal, c])
                n_pos, n_neg = int((targets[mask] == c).sum()), int((targets[mask] == normal).sum())
                if c == normal or n_pos == 0 or n_neg == 0:
                    continue
                entry: dict[str, Any] = {"n_normal": n_neg, f"n_{name}": n_pos}
                if min(n_pos, n_neg) >= 5:
                    entry["auc"] = float(roc_auc_score(targets[mask] == c, probs[mask, c]))
                else:
                    entry["note"] = "too few images for an AUC"
                pairs[f"{band}: normal vs {name}"] = entry
        out["normal_vs_class_by_age_band"] = pairs
    return out


def train(config: TrainConfig, progress: Callable[[str], None] = lambda s: None) -> ModelCard:
    """Run a full training and write the model; returns its card."""
    if config.architecture not in ARCHITECTURES:
        raise TrainingError(f"unknown architecture {config.architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    if config.balance not in BALANCE_CHOICES:
        raise TrainingError(f"--balance must be one of {', '.join(BALANCE_CHOICES)}, not {config.balance!r}")
    _band_targets(config)  # fail before hours of training, not after
    started = time.time()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = resolve_device(config.device)
    amp_dtype = resolve_precision("auto", device)  # mixed precision on CUDA, fp32 on the CPU

    frame, task, dropped, leakage, split_source = labelled_splits(config)
    if sum(leakage.values()):
        progress(f"left out to keep splits disjoint: {leakage}")
    if config.max_images:
        frame = frame.groupby("split").head(config.max_images)
    splits: dict[str, Dataset] = {}
    unreadable = 0
    for split in SPLITS:
        part = frame[frame["split"] == split]
        if part.empty and split != "test":
            raise TrainingError(f"the {split} split is empty")
        progress(f"decoding {len(part)} {split} images")
        splits[split], failed = decode_split(part, task, config.input_size, config.workers)
        unreadable += failed
    train_set, val_set, test_set = splits["train"], splits["val"], splits["test"]

    arch = ARCHITECTURES[config.architecture]
    pretrained = config.init == "imagenet"
    net = create_model(config.architecture, len(task.classes), pretrained=pretrained, input_size=config.input_size)
    if config.init not in ("imagenet", "random"):
        from safetensors.torch import load_file

        net.load_state_dict(load_file(config.init), strict=True)
    net = net.to(device).to(memory_format=torch.channels_last)
    mean, std = arch.mean, arch.std

    weights = _class_weights(train_set.targets, len(task.classes)) if config.balance == "weights" else None
    sample_weights = (
        _sample_weights(train_set.frame, train_set.targets, len(task.classes)) if config.balance == "source" else None
    )
    val_subsets = _scored_subsets(val_set.frame, val_set.targets.numpy(), len(task.classes))
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
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                if len(idx) < 2:
                    continue  # BatchNorm needs two samples
                x = train_set.images[idx].to(device).float() / 255.0
                x = augment(x, generator, config.hflip)
                x = normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
                y = train_set.targets[idx].to(device)
                with autocast(device, amp_dtype):
                    logits = net(x)
                loss = criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                correct += int((logits.argmax(1) == y).sum())
            val_logits = predict_logits(net, val_set.images, mean, std, device, config.batch_size * 2)
            val_loss = float(F.cross_entropy(val_logits, val_set.targets, weight=weights))
            val_auc = _auc_of(val_logits, val_set.targets, task)
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
            if score > best["auc"]:
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
            "augmentation": "rotation ±15°, zoom ±10%, shift ±5%, brightness/contrast ±20%"
            + (", horizontal flip" if config.hflip else ""),
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
    )
    choose_operating_points(card, net, val_set, test_set, config, task, device)
    card.training["seconds"] = round(time.time() - started, 1)
    weights_path = save_model(net.cpu(), card, config.out_dir)
    _fit_applicability(LoadedModel(card, net.eval(), weights_path), splits["train"], val_set, progress)
    _plot_curves(history, config.out_dir / f"{config.name}.curves.png", config.name)
    if ckpt_path.exists():
        os.remove(ckpt_path)  # our own intermediate file; the final weights supersede it
    return card


def _band_targets(config: TrainConfig) -> dict[str, float]:
    """``--band-target-recall`` parsed; a malformed one is a :class:`TrainingError`."""
    try:
        return parse_band_targets(config.band_target_recall)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


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
    band_targets = _band_targets(config)
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
        thresholds = select_threshold(val_pos, val_probs[:, pos], config.target_recall)
        thresholds["target_recall"] = config.target_recall
        threshold = thresholds["recall_target"]
        by_band = metrics.band_thresholds(
            val_pos, val_probs[:, pos], val_bands, config.target_recall, band_targets=band_targets
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

    val_pred = _class_indices(card.decide_many(val_probs, val_bands), task)
    results: dict[str, Any] = {"val": evaluate_probs(val_probs, val_set.targets.numpy(), task, threshold)}
    results["val_subgroups"] = evaluate_subgroups(val_probs, val_set.targets.numpy(), val_pred, val_set.frame, task)
    if len(test_set.targets):
        test_logits = predict_logits(net, test_set.images, card.mean, card.std, device, batch)
        test_probs = torch.softmax(test_logits / temperature, 1).numpy()
        targets = test_set.targets.numpy()
        test_bands = test_set.frame["sg_age_band"].to_numpy()
        test_pred = _class_indices(card.decide_many(test_probs, test_bands), task)
        results["test"] = evaluate_probs(test_probs, targets, task, threshold)
        results["test_subgroups"] = evaluate_subgroups(test_probs, targets, test_pred, test_set.frame, task)
        if config.group_column and config.group_column in test_set.frame.columns:
            groups = test_set.frame[config.group_column].astype(str).to_numpy()
            results["test_by_" + config.group_column] = {
                g: evaluate_probs(test_probs[groups == g], targets[groups == g], task, threshold)
                for g in sorted(set(groups))
            }
    card.metrics = results


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
    if task.positive is None:
        raise TrainingError(
            f"model {card.name} ({card.task}) decides by the most probable class: it has no operating point to retune"
        )
    band_targets = _band_targets(config)
    config = dataclasses.replace(config, task=card.task, name=card.name, input_size=card.input_size)
    frame, task, _, _, _ = labelled_splits(config)
    parts = {}
    for split in ("val", "test"):
        part = frame[frame["split"] == split]
        progress(f"decoding {len(part)} {split} images")
        parts[split], _ = decode_split(part, task, card.input_size, config.workers)
    device = resolve_device(config.device)
    choose_operating_points(card, loaded.net.to(device).eval(), parts["val"], parts["test"], config, task, device)
    card.training["retuned"] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "pneumobatch retune",
        "target_recall": config.target_recall,
        "band_target_recall": band_targets,
        "data": str(config.data),
        "note": "temperature and operating points chosen again on the validation split; weights unchanged",
    }
    write_card(card, loaded.weights_path.with_suffix(".json"))
    return card


def _fit_applicability(
    loaded: LoadedModel, train_set: Dataset, val_set: Dataset, progress: Callable[[str], None]
) -> None:
    """Applicability statistics on the train split, threshold on validation; recorded in the card."""
    from pneumobatch.model.applicability import features, stats

    progress("fitting applicability statistics (train split; threshold on validation)")
    fitted = features.fit_features(loaded, train_set.images, val_set.images)
    info = stats.summary(
        fitted,
        stats.DEFAULT_PERCENTILE,
        fitted_on="train split (threshold: val split)",
        **{"class": "all"},
        n_train=len(train_set.images),
        n_val=len(val_set.images),
    )
    features.attach(loaded, fitted, info)


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


def _plot_curves(history: History, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    epochs = list(range(1, len(history.epochs) + 1))
    fig = Figure(figsize=(8, 3.2), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["train_loss"] for h in history.epochs], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history.epochs], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    ax1.legend()
    ax2.plot(epochs, [h["train_accuracy"] for h in history.epochs], "o-", label="train accuracy")
    ax2.plot(epochs, [h["val_auc"] for h in history.epochs], "o-", label="validation AUC")
    ax2.set(xlabel="epoch", ylim=(0, 1.02), title=f"{title}: accuracy / AUC")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
