"""Applicability statistics: fit, threshold, score, save/load, and the penultimate-feature hook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pneumobatch.applicability import ApplicabilityStats, FeatureHook, calibrate, fit
from pneumobatch.errors import ModelError


def features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(42).normal(size=(8, 32))  # data live near an 8-D subspace
    return rng.normal(size=(n, 8)) @ basis + 0.05 * rng.normal(size=(n, 32)) + shift


def test_threshold_flags_about_the_chosen_share_of_new_in_distribution_images():
    stats = fit(features(2000, 0), n_components=8)
    calibrate(stats, features(1000, 1), percentile=99.0)
    flagged = ~stats.flag(stats.score(features(4000, 2)))
    assert 0.003 < flagged.mean() < 0.03


def test_images_off_the_training_subspace_or_far_away_are_flagged():
    stats = fit(features(2000, 0), n_components=8)
    calibrate(stats, features(1000, 1))
    rng = np.random.default_rng(3)
    off_subspace = rng.normal(size=(200, 32))  # isotropic: large residual
    far = features(200, 4, shift=5.0)
    assert (~stats.flag(stats.score(off_subspace))).mean() > 0.95
    assert (~stats.flag(stats.score(far))).mean() > 0.95


def test_save_and_load_round_trip(tmp_path: Path):
    stats = fit(features(300, 0), n_components=8)
    calibrate(stats, features(100, 1))
    path = tmp_path / "m.applicability.safetensors"
    stats.save(path, {"n_train": 300})
    loaded = ApplicabilityStats.load(path)
    x = features(50, 5)
    np.testing.assert_allclose(loaded.score(x), stats.score(x), rtol=1e-4)
    assert loaded.threshold == pytest.approx(stats.threshold)


def test_a_file_that_is_not_applicability_statistics_is_refused(tmp_path: Path):
    from safetensors.numpy import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(ModelError):
        ApplicabilityStats.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError):
        ApplicabilityStats.load(tmp_path / "junk.safetensors")


def test_feature_hook_captures_the_classifier_input():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    hook = FeatureHook(net[3])
    x = torch.rand(3, 1, 16, 16)
    net(x)
    expected = net[2](net[1](net[0](x)))
    torch.testing.assert_close(hook.features, expected.detach())
    hook.close()
    hook.features = None
    net(x)
    assert hook.features is None
