"""Model files: safetensors + card round trip, integrity check, registry errors."""

import json

import pytest
import torch

from pneumobatch.core.card import ModelCard
from pneumobatch.core.errors import ModelError
from pneumobatch.model.registry import create_model, list_models, load_model, save_model


def _card(name="m"):
    return ModelCard(
        name=name,
        task="pneumonia",
        classes=["normal", "pneumonia"],
        architecture="mobilenet_v3_small",
        input_size=32,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        positive="pneumonia",
        threshold=0.3,
    )


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = create_model("mobilenet_v3_small", 2, pretrained=False, input_size=32).eval()
    save_model(net, _card(), tmp_path)
    loaded = load_model("m", tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), net(x))
    assert loaded.card.threshold == 0.3 and len(loaded.card.weights_sha256) == 64
    assert [c.name for c in list_models(tmp_path)] == ["m"]


def test_tampered_weights_and_bad_cards_are_refused(tmp_path):
    net = create_model("mobilenet_v3_small", 2, pretrained=False, input_size=32)
    path = save_model(net, _card(), tmp_path)
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelError, match="SHA-256"):
        load_model("m", tmp_path)
    (tmp_path / "m.json").write_text(json.dumps({"name": "m"}))
    with pytest.raises(ModelError, match="lacks"):
        load_model("m", tmp_path)
    with pytest.raises(ModelError, match="not found"):
        load_model("other", tmp_path)


def test_pretrained_lite0_loads_offline_and_unknown_architectures_fail():
    net = create_model("efficientnet_lite0", 2, pretrained=True, input_size=64)
    assert net._fc.out_features == 2
    with pytest.raises(ModelError, match="offline"):
        create_model("resnet18", 2, pretrained=True, input_size=64)
    with pytest.raises(ModelError, match="known"):
        create_model("vgg99", 2, pretrained=False, input_size=64)


def test_operating_points_are_only_thresholds():
    card = _card()
    card.thresholds = {
        "recall_target": 0.12,
        "recall_target_sensitivity": 0.98,
        "youden": 0.3,
        "youden_specificity": 0.9,
        "target_recall": 0.95,
    }
    assert card.operating_points() == {"recall_target": 0.12, "youden": 0.3}
