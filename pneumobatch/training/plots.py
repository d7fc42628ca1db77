"""The training curves figure (``NAME.curves.png``): loss, accuracy and validation AUC per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_curves(epochs_seen: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Write the loss and accuracy / AUC curves of the epochs recorded so far (``History.epochs``) to ``path``."""
    from matplotlib.figure import Figure

    epochs = list(range(1, len(epochs_seen) + 1))
    fig = Figure(figsize=(8, 3.2), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["train_loss"] for h in epochs_seen], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in epochs_seen], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    ax1.legend()
    ax2.plot(epochs, [h["train_accuracy"] for h in epochs_seen], "o-", label="train accuracy")
    ax2.plot(epochs, [h["val_auc"] for h in epochs_seen], "o-", label="validation AUC")
    ax2.set(xlabel="epoch", ylim=(0, 1.02), title=f"{title}: accuracy / AUC")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
