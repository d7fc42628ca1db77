"""Training data: labelled images in, decoded splits out.

A manifest or class-per-folder tree -> rows with the task's classes -> the split (the
manifest's, else stratified and grouped by patient) -> disjoint splits -> reporting
subgroups -> every image decoded once with the prediction readers at the model's
input size. ``train``, ``retune``, ``fit-applicability`` and the benchmarks all read
their images here, so they see the same labels, splits and pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from PIL import Image as PILImage

from pneumobatch.core.errors import EXIT_FATAL, FileRejected, TrainingError
from pneumobatch.core.subgroups import TRAINING_COLUMNS, add_subgroup_columns, parse_band_defaults
from pneumobatch.core.tasks import Task, custom_task, get_task
from pneumobatch.io.discovery import sniff
from pneumobatch.io.readers import ReadOptions, read_image
from pneumobatch.model.preprocess import InputSpec, prepare
from pneumobatch.training.config import TrainConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ""}


#: Longest side the training images are kept at for export augmentation (the dataset's own limit).
NATIVE_MAX_SIDE = 1024


@dataclass
class Dataset:
    """Decoded images of one split held in memory: the model's inputs, or (``raw``) the
    images as read, for augmentation that goes through an export before :func:`prepare`."""

    images: torch.Tensor  # uint8 (N, 1, S, S); empty (0, 1, S, S) where ``raw`` holds the images
    targets: torch.Tensor  # int64 (N,)
    frame: pd.DataFrame  # the manifest rows, aligned with images
    raw: Optional[list[np.ndarray]] = None  # uint8 (H, W) as read, longest side <= NATIVE_MAX_SIDE


def load_labels(
    data: Path,
    task: str,
    *,
    label_column: str = TrainConfig.label_column,
    split_column: str = TrainConfig.split_column,
    patient_column: str = TrainConfig.patient_column,
) -> tuple[pd.DataFrame, Task, dict[str, int]]:
    """Rows with ``path`` (absolute), ``cls`` and ``split`` (may be empty), plus counts dropped.

    ``data`` is a manifest CSV (columns ``path``, ``label_column`` and optionally
    ``split_column`` and ``patient_column``) or a class-per-folder tree; ``task`` a
    built-in task's name or ``custom`` (the classes are the labels found).
    """
    data = Path(data)
    if data.is_file():
        frame = _read_manifest(data, label_column, split_column, patient_column)
    elif data.is_dir():
        frame = _read_folder_tree(data)
    else:
        raise TrainingError(f"{data}: no such manifest or folder")
    if task == "custom":
        found = custom_task(frame["label"].dropna().astype(str).tolist())
    else:
        try:
            found = get_task(task)
        except KeyError as exc:
            raise TrainingError(str(exc.args[0])) from None
    frame["cls"] = [found.map_label(v) for v in frame["label"]]
    frame["organism"] = [found.organism(v) or "" for v in frame["label"]]
    unplaced = frame[frame["cls"].isna()]
    dropped = {str(k): int(v) for k, v in unplaced["label"].astype(str).value_counts().items()}
    frame = frame[frame["cls"].notna()].reset_index(drop=True)
    if frame.empty:
        raise TrainingError(f"no label maps to the classes of task {found.name}: {found.classes}")
    if dropped:
        log.info("dropped %d images whose label task %s cannot place: %s", len(unplaced), found.name, dropped)
    return frame, found, dropped


def _read_manifest(path: Path, label_column: str, split_column: str, patient_column: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{path}: cannot read manifest ({exc})") from exc
    for column in ("path", label_column):
        if column not in frame.columns:
            raise TrainingError(f"{path}: manifest has no {column!r} column (columns: {', '.join(frame.columns)})")
    frame = frame.rename(columns={label_column: "label"}).copy()
    frame["path"] = [str((path.parent / p).resolve()) for p in frame["path"]]
    frame["split"] = (
        frame[split_column].str.strip().str.lower().replace(_SPLIT_ALIASES) if split_column in frame.columns else ""
    )
    frame["patient"] = frame[patient_column] if patient_column in frame.columns else ""
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
    frame, task, dropped = load_labels(
        config.data,
        config.task,
        label_column=config.label_column,
        split_column=config.split_column,
        patient_column=config.patient_column,
    )
    split_source = "manifest" if frame["split"].isin(SPLITS).all() else "stratified, grouped by patient"
    frame = assign_splits(frame, config)
    frame, leakage = remove_leakage(frame)
    return annotate_subgroups(frame, config), task, dropped, leakage, split_source


def annotate_subgroups(frame: pd.DataFrame, config: TrainConfig) -> pd.DataFrame:
    """Add the reporting subgroups ``sg_source``, ``sg_age_band``, ``sg_view``, ``sg_sex`` (and ``sg_age``).

    A malformed ``config.default_age_band`` is an :class:`~pneumobatch.core.errors.OptionError`.
    """
    # a malformed --default-age-band exits 3, as training's other errors do
    defaults = parse_band_defaults(config.default_age_band, exit_code=EXIT_FATAL)
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


def _decode_one(args: tuple[str, Optional[InputSpec]]) -> Optional[np.ndarray]:
    path, spec = args
    try:
        image = read_image(Path(path), sniff(Path(path)), ReadOptions(min_side=spec.size if spec else None))
    except (FileRejected, OSError):
        return None
    if spec is not None:
        return prepare(image.pixels, spec)
    pixels = image.pixels
    if max(pixels.shape) > NATIVE_MAX_SIDE:
        scale = NATIVE_MAX_SIDE / max(pixels.shape)
        pil = PILImage.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
        pixels = np.asarray(pil.resize(size, PILImage.Resampling.BILINEAR, reducing_gap=2.0))
    return np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def decode_split(
    frame: pd.DataFrame, task: Task, spec: InputSpec, workers: int, *, raw: bool = False
) -> tuple[Dataset, int]:
    """Decode and prepare every image once, exactly as ``predict`` does; returns the split and how many failed.

    With ``raw``, the images are kept as read (8-bit, longest side at most
    :data:`NATIVE_MAX_SIDE`) in ``Dataset.raw`` instead, for augmentation through exports.
    """
    jobs = [(p, None if raw else spec) for p in frame["path"]]
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
    empty = torch.zeros(0, 1, spec.size, spec.size, dtype=torch.uint8)
    images = torch.from_numpy(np.stack([arrays[i] for i in keep])[:, None]) if keep and not raw else empty
    index = {c: i for i, c in enumerate(task.classes)}
    targets = torch.tensor([index[c] for c in frame["cls"]], dtype=torch.long)
    return Dataset(images, targets, frame, [arrays[i] for i in keep] if raw else None), failed


def decode_splits(
    frame: pd.DataFrame,
    task: Task,
    spec: InputSpec,
    workers: int,
    splits: Sequence[str] = SPLITS,
    progress: Callable[[str], None] = lambda s: None,
    check: Callable[[str, pd.DataFrame], None] = lambda split, rows: None,
    raw: Sequence[str] = (),
) -> tuple[dict[str, Dataset], int]:
    """Each of ``splits`` of ``frame`` prepared for ``spec`` (:func:`decode_split`), in turn;
    those in ``raw`` kept as read.

    ``check(split, rows)`` runs on a split's rows before they are decoded and may raise
    (a split that is empty or too small for the caller). Returns the datasets by split
    and how many images could not be read.
    """
    datasets: dict[str, Dataset] = {}
    unreadable = 0
    for split in splits:
        rows = frame[frame["split"] == split]
        check(split, rows)
        progress(f"decoding {len(rows)} {split} images")
        datasets[split], failed = decode_split(rows, task, spec, workers, raw=split in raw)
        unreadable += failed
    return datasets, unreadable
