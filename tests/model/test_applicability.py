"""Applicability statistics: fit, threshold, score, save/load, and the feature tap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pneumobatch.core.errors import ModelError
from pneumobatch.model.applicability.features import FeatureTap
from pneumobatch.model.applicability.stats import HEAD, LEGACY_METHOD, ApplicabilityStats, calibrate, fit


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


def test_feature_tap_captures_the_classifier_input_and_stage_statistics():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    tap = FeatureTap(net, net[3], [HEAD, "0"])
    x = torch.rand(3, 1, 16, 16)
    net(x)
    conv = net[0](x)
    torch.testing.assert_close(tap.features[HEAD], net[2](net[1](conv)).detach())
    torch.testing.assert_close(
        tap.features["0"], torch.cat([conv.mean((2, 3)), conv.std((2, 3), correction=0)], 1).detach()
    )
    tap.close()
    tap.features = {}
    net(x)
    assert tap.features == {}


def test_a_layer_the_network_lacks_is_a_model_error():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    with pytest.raises(ModelError, match="lacks"):
        FeatureTap(net, net[1], ["7"])


def test_layers_are_scaled_so_that_one_far_layer_flags_the_image():
    train = {HEAD: features(2000, 0), "stage": features(2000, 10)}
    val = {HEAD: features(500, 1), "stage": features(500, 11)}
    stats = fit(train, n_components=8)
    calibrate(stats, val)
    assert set(stats.scales) == {HEAD, "stage"}
    near = {HEAD: features(300, 2), "stage": features(300, 12)}
    odd_texture = {HEAD: features(300, 2), "stage": features(300, 12, shift=8.0)}  # the head alone sees nothing
    assert (~stats.flag(stats.score(near))).mean() < 0.05
    assert (~stats.flag(stats.score(odd_texture))).mean() > 0.95


def test_multilayer_round_trip_and_legacy_single_layer_files_load(tmp_path: Path):
    from safetensors.numpy import save_file

    stats = fit({HEAD: features(300, 0), "_blocks.2": features(300, 7)}, n_components=8)
    calibrate(stats, {HEAD: features(100, 1), "_blocks.2": features(100, 8)})
    path = tmp_path / "m.applicability.safetensors"
    stats.save(path, {})
    again = ApplicabilityStats.load(path)
    x = {HEAD: features(40, 5), "_blocks.2": features(40, 9)}
    np.testing.assert_allclose(again.score(x), stats.score(x), rtol=1e-4)
    assert again.layer_names == [HEAD, "_blocks.2"]

    head = stats.layers[HEAD]  # a file written by pneumobatch before the multi-layer method
    legacy = tmp_path / "old.applicability.safetensors"
    save_file(
        {
            "mean": head.mean.astype(np.float32),
            "components": head.components.astype(np.float32),
            "variances": head.variances.astype(np.float32),
        },
        str(legacy),
        metadata={
            "method": LEGACY_METHOD,
            "maha_scale": repr(head.maha_scale),
            "resid_scale": repr(head.resid_scale),
            "threshold": "1.5",
            "info": "{}",
        },
    )
    old = ApplicabilityStats.load(legacy)
    assert old.layer_names == [HEAD] and old.threshold == 1.5
    np.testing.assert_allclose(old.score(x[HEAD]), head.score(x[HEAD]), rtol=1e-4)


def test_a_layer_whose_pca_keeps_every_dimension_scores_stored_statistics_sanely(tmp_path: Path):
    # 16 features, 32 components asked: no residual is left, and the float32 file's
    # rounding must not turn into huge scores for ordinary images
    rng = np.random.default_rng(0)
    train, val, new = (rng.normal(size=(n, 16)) * np.linspace(0.1, 3, 16) for n in (500, 200, 200))
    stats = fit({"stage": train}, n_components=32)
    calibrate(stats, {"stage": val})
    assert not stats.layers["stage"].has_residual
    path = tmp_path / "s.applicability.safetensors"
    stats.save(path, {})
    scores = ApplicabilityStats.load(path).score({"stage": new})
    assert np.median(scores) < 1.5 and (~stats.flag(scores)).mean() < 0.05


def test_orientation_check_catches_what_the_distance_passes_and_round_trips(tmp_path: Path):
    from pneumobatch.model.applicability.stats import OrientationCheck

    # "turned" images: like the training images but for a small shift along one direction the
    # distance barely notices (about the size of the residual noise); a linear probe sees it plainly
    direction = np.zeros(32)
    direction[5] = 0.35
    train, val, new = features(2000, 0), features(1000, 1), features(1000, 2)
    turned_train, turned_new = features(800, 3) + direction, features(500, 4) + direction
    stats = fit(train, n_components=8)
    calibrate(stats, val)
    distance_only = (~stats.flag(stats.score(turned_new))).mean()
    assert distance_only < 0.5

    stats.orientation = OrientationCheck.fit(train, {"turned": turned_train})
    calibrate(stats, val)
    assert (~stats.flag(stats.score(turned_new))).mean() > 0.95
    assert (~stats.flag(stats.score(new))).mean() < 0.03  # upright images still pass
    # the check's term equals the distance score's scale at its own threshold
    o = stats.orientation
    at_threshold = np.zeros((1, 32))
    at_threshold[0] = o.weight * (o.log_odds_threshold - o.bias) / (o.weight @ o.weight)
    assert o.term(at_threshold)[0] == pytest.approx(o.scale)

    path = tmp_path / "o.applicability.safetensors"
    stats.save(path, {})
    again = ApplicabilityStats.load(path)
    assert again.orientation is not None and again.orientation.transforms == ("turned",)
    np.testing.assert_allclose(again.score(turned_new), stats.score(turned_new), rtol=1e-3)
    assert (again.flag(again.score(turned_new)) == stats.flag(stats.score(turned_new))).mean() > 0.99


def test_fit_applicability_command_records_statistics_and_replaces_a_damaged_file(weights_dir: Path, tmp_path: Path):
    import json
    import shutil

    from click.testing import CliRunner

    from pneumobatch.cli import main
    from tests.helpers import make_dataset

    manifest = make_dataset(tmp_path / "data")
    folder = tmp_path / "w"
    folder.mkdir()
    for f in weights_dir.glob("tiny.*"):
        shutil.copy(f, folder / f.name)
    fit_cmd = ["fit-applicability", "tiny", str(manifest), "--weights-dir", str(folder), "--workers", "1"]
    predict = [
        "predict",
        str(tmp_path / "data" / "images"),
        "-m",
        "tiny",
        "--weights-dir",
        str(folder),
        "--quiet",
        "--overwrite",
        "-o",
        str(tmp_path / "p.csv"),
    ]
    result = CliRunner().invoke(main, fit_cmd)
    assert result.exit_code == 0, result.output
    card = json.loads((folder / "tiny.json").read_text())["applicability"]
    assert card["file"] == "tiny.applicability.safetensors" and card["n_train"] == 30 and card["n_val"] == 10
    assert card["orientation_check"]["transforms"] == [
        "rotated 90",
        "rotated 180",
        "rotated 270",
        "upside down",
        "inverted",
    ]
    assert CliRunner().invoke(main, predict).exit_code == 0

    (folder / "tiny.applicability.safetensors").write_bytes(b"damaged")
    refused = CliRunner().invoke(main, predict)
    assert refused.exit_code == 3 and "SHA-256 does not match" in refused.output
    again = CliRunner().invoke(main, fit_cmd)  # the damaged file does not stop its own replacement
    assert again.exit_code == 0, again.output
    assert CliRunner().invoke(main, predict).exit_code == 0
