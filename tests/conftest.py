"""Fixtures every test folder shares: the tests' own ONNX cache and the tiny random models.

Plain helpers (the repository root, dataset builders, the one-line-error check) are in
``tests/helpers.py``. Tests marked ``slow`` (Ray, real subprocesses, Orthanc, training) are
left out by ``make test-fast`` (``pytest -m "not slow"``); ``make test`` (CI) runs everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pneumobatch.core.card import ModelCard
from pneumobatch.model.registry import create_model, save_model
from tests.helpers import save_tiny_model


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory) -> Path:
    """The tests' own cache of ONNX exports (inference.cache_dir), never the user's ~/.cache;
    subprocesses inherit it."""
    import os

    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("PNEUMOBATCH_CACHE")
    os.environ["PNEUMOBATCH_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("PNEUMOBATCH_CACHE", None)
    else:
        os.environ["PNEUMOBATCH_CACHE"] = previous


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Iterator[Path]:
    """Tiny randomly initialised pneumonia and etiology models (the shipped ones come from `train`).

    Built once per run and shared by every module: a test that changes a model copies the
    folder first. Teardown checks that none wrote into it."""
    folder = save_tiny_model(tmp_path_factory.mktemp("weights"))  # seed 0; the etiology model follows
    net3 = create_model("mobilenet_v3_small", 4, pretrained=False, input_size=40)
    card3 = ModelCard(
        name="tiny-etiology",
        task="etiology",
        classes=["normal", "bacterial", "viral", "covid-19"],
        architecture="mobilenet_v3_small",
        input_size=40,
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    save_model(net3.eval(), card3, folder)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    yield folder
    after = {f.name: f.read_bytes() for f in folder.iterdir()}
    assert after == before, "a test wrote into the shared weights_dir; copy it first (shutil.copytree)"
