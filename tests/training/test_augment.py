"""Export augmentation: every training image goes through a random export before predict's own preparation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pneumobatch.core.errors import TrainingError
from pneumobatch.model.preprocess import InputSpec
from pneumobatch.training.augment import export_round_trip, prepare_batch
from pneumobatch.training.config import TrainConfig
from pneumobatch.training.loop import exclude_groups


def radiograph(shape=(200, 160), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = 128 + 60 * np.sin(x / (5.0 + 4 * seed)) * np.cos(y / (13.0 - 2 * seed)) + rng.normal(0, 4, shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_export_round_trips_vary_resolution_and_encoding_and_return_a_reader_image():
    image = radiograph()
    rng = np.random.default_rng(0)
    outs = [export_round_trip(image, rng) for _ in range(60)]
    assert all(o.dtype == np.float32 and o.ndim == 2 and 0 <= o.min() and o.max() <= 1 for o in outs)
    sides = {max(o.shape) for o in outs}
    assert min(sides) < 200 < max(sides) and len(sides) > 20  # down- and up-sampled, many sizes
    assert sum(o.shape == image.shape for o in outs) >= 3  # some keep the size (then JPEG, blur or noise)
    changed = [np.abs(o * 255 - image).mean() for o in outs if o.shape == image.shape]
    assert any(c > 0.5 for c in changed)


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    raw = [radiograph(seed=i) for i in range(6)]
    spec = InputSpec(32, equalize=True)
    a = prepare_batch(raw, range(6), spec, np.random.default_rng([0, 1, 2]))
    b = prepare_batch(raw, range(6), spec, np.random.default_rng([0, 1, 2]))
    c = prepare_batch(raw, range(6), spec, np.random.default_rng([0, 1, 3]))
    assert a.shape == (6, 1, 32, 32) and str(a.dtype) == "torch.uint8"
    assert (a == b).all() and not (a == c).all()


def test_exclude_group_leaves_a_source_out_of_every_split_and_refuses_a_pattern_matching_nothing(tmp_path):
    frame = pd.DataFrame(
        {"source": ["NIH a", "RSNA b", "nih a", "kermany"], "split": ["train", "val", "test", "train"]}
    )
    config = TrainConfig(data=tmp_path, out_dir=tmp_path, name="x", exclude_group=("nih*",))
    kept, left_out = exclude_groups(frame, config)
    assert kept["source"].tolist() == ["RSNA b", "kermany"] and left_out == {"NIH a": 1, "nih a": 1}
    with pytest.raises(TrainingError, match="matches no source"):
        exclude_groups(frame, TrainConfig(data=tmp_path, out_dir=tmp_path, name="x", exclude_group=("Hannover*",)))


def test_paired_views_are_two_exports_of_the_same_images_and_the_consistency_term_measures_their_gap():
    import torch

    from pneumobatch.training.data import Dataset
    from pneumobatch.training.loop import _inputs, js_divergence

    raw = [radiograph(seed=i) for i in range(4)]
    data = Dataset(torch.zeros(0, 1, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), pd.DataFrame(), raw)
    [batch] = list(_inputs(data, [torch.tensor([2, 0, 3])], InputSpec(32, True), np.random.default_rng(0), views=2))
    assert batch.shape == (6, 1, 32, 32)
    first, second = batch[:3].float(), batch[3:].float()
    assert (first - second).abs().mean() > 0  # two different exports...
    other = (first - first.roll(1, 0)).abs().mean()
    assert (first - second).abs().mean() < 0.5 * other  # ...of the same images, not of others

    logits = torch.tensor([[2.0, -1.0], [0.0, 0.5]])
    assert js_divergence((logits, logits)).item() == pytest.approx(0.0, abs=1e-6)
    gap = js_divergence((logits, logits.flip(1))).item()
    assert 0 < gap <= np.log(2) and gap > js_divergence((logits, logits * 0.9)).item()
