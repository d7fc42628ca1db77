"""What a training run is asked for: :class:`TrainConfig`, with no torch import.

The CLI reads its ``train`` option defaults and choices from here when it starts;
:func:`pneumobatch.training.loop.train` (which needs torch) runs the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pneumobatch.core.card import TARGET_RECALL

#: How ``--balance`` handles class imbalance.
BALANCE_CHOICES = ("source", "weights", "oversample", "undersample", "none")
#: Where ``train`` writes NAME.safetensors and NAME.json unless told otherwise.
DEFAULT_OUT_DIR = Path("weights")


@dataclass
class TrainConfig:
    """Options of ``pneumobatch train`` (the README gives the options that produced the shipped weights)."""

    data: Path
    out_dir: Path
    name: str
    task: str = "pneumonia"
    label_column: str = "finding"
    split_column: str = "split"
    patient_column: str = "patient_id"
    group_column: Optional[str] = "source"  # per-group test metrics ("per source")
    architecture: str = "efficientnet_lite0"
    init: str = "imagenet"  # imagenet | random | path to a .safetensors of the same architecture
    input_size: int = 192
    batch_size: int = 32
    head_epochs: int = 1
    epochs: int = 6
    patience: int = 3
    lr: float = 3e-4
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    balance: str = "source"  # source | weights | oversample | undersample | none
    age_column: str = "age"
    view_column: str = "view"
    sex_column: str = "sex"
    default_age_band: tuple[str, ...] = ()  # PATTERN=child|adult for groups whose ages are not given
    hflip: bool = False
    target_recall: float = TARGET_RECALL
    band_target_recall: tuple[str, ...] = ()  # BAND=RECALL: that age band's operating point aims at RECALL instead
    #: the recall_target threshold is where validation sensitivity's one-sided lower bound at this level reaches
    #: the target (0: where the sensitivity itself does)
    recall_margin_level: float = 0.8
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    resume: bool = False
    max_images: Optional[int] = None  # for smoke tests: use at most this many per split
    equalize: bool = True  # histogram-equalise grey levels before the resize, in training and in predict
    export_augment: bool = True  # send every training image through a random export (augment.export_round_trip)
    #: weight of the consistency term: each image through two random exports per step, their probabilities
    #: pulled together (Jensen-Shannon); 0: one export per image and no such term
    consistency: float = 0.0
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32
    invariance_test: bool = True  # the export-invariance test on the test split, recorded in the card
    exclude_group: tuple[str, ...] = ()  # --group-column values (globs) left out of every split: leave-one-source-out

    @classmethod
    def for_card(cls, card, data: Path, out_dir: Optional[Path] = None) -> TrainConfig:
        """The config under which ``train`` saw ``data`` for a model: its name and task, and the age
        bands its card defaults to (what the benchmarks evaluate a shipped model on)."""
        return cls(
            data=Path(data),
            out_dir=Path(out_dir) if out_dir is not None else Path(data).parent,
            name=card.name,
            task=card.task,
            default_age_band=tuple(card.data.get("age_band_defaults", ())),
        )
