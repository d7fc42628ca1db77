"""The model's input: equalisation makes an export's grey levels uninformative; old cards are resized only."""

from __future__ import annotations

import numpy as np
import pytest

from pneumobatch.core.card import ModelCard, validate_card
from pneumobatch.core.errors import ModelError
from pneumobatch.model.preprocess import EQUALIZE_LEVELS, InputSpec, equalize, input_spec, prepare, prepare_image


def chest_like(seed: int = 0, shape=(300, 240)) -> np.ndarray:
    """A smooth image with structure (not noise: neighbouring pixels are alike, as in a radiograph)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
    img = 0.5 + 0.3 * np.sin(6 * x + rng.uniform(0, 3)) * np.cos(4 * y) + 0.1 * rng.standard_normal(shape)
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.mark.parametrize(
    "mapping",
    [
        lambda x: x**0.8,
        lambda x: x**1.2,
        lambda x: np.clip((x - 0.2) / 0.6, 0, 1),  # a VOI window that clips both tails
        lambda x: 0.1 + 0.5 * x,  # contrast and brightness
    ],
    ids=["gamma0.8", "gamma1.2", "window", "contrast"],
)
def test_an_equalised_input_does_not_change_under_a_monotone_grey_level_mapping(mapping):
    image = np.round(chest_like() * 255) / 255  # an 8-bit export
    spec = InputSpec(64, equalize=True)
    same = np.abs(prepare(image, spec).astype(int) - prepare(mapping(image).astype(np.float32), spec)).mean()
    plain = np.abs(
        prepare(image, InputSpec(64)).astype(int) - prepare(mapping(image).astype(np.float32), InputSpec(64))
    )
    assert same < 1.0  # grey levels out of 255; only the window's clipped tails move
    assert plain.mean() > 8 * max(same, 0.5)  # without it the input moves a lot


def test_equalize_gives_mid_ranks_in_0_1():
    image = np.array([[0.0, 0.0, 0.5, 1.0]], dtype=np.float32)
    out = equalize(image)
    np.testing.assert_allclose(out, [[0.25, 0.25, 0.625, 0.875]])  # ties share one value
    assert equalize(chest_like()).dtype == np.float32 and EQUALIZE_LEVELS >= 4096


def test_a_card_without_preprocessing_is_resized_only_and_a_new_card_equalises():
    base = dict(name="m", task="pneumonia", classes=["normal", "pneumonia"], architecture="x", mean=[0.5] * 3)
    old = ModelCard.from_dict({**base, "input_size": 32, "std": [0.2] * 3})
    new = ModelCard.from_dict({**base, "input_size": 32, "std": [0.2] * 3, "preprocessing": {"intensity": "equalize"}})
    assert input_spec(old) == InputSpec(32, False) and input_spec(new) == InputSpec(32, True)
    assert input_spec(new).key == "32-eq" and input_spec(old).key == "32"
    image = chest_like()
    assert not np.array_equal(prepare(image, input_spec(old)), prepare(image, input_spec(new)))


def test_a_card_naming_an_unknown_intensity_step_is_refused():
    card = ModelCard(
        name="m",
        task="pneumonia",
        classes=["normal", "pneumonia"],
        architecture="x",
        input_size=32,
        mean=[0.5] * 3,
        std=[0.2] * 3,
        preprocessing={"intensity": "clahe"},
    ).to_dict()
    card["weights_sha256"] = "0" * 64
    with pytest.raises(ModelError, match="preprocessing"):
        validate_card(card)


def _dicoms(tmp_path):
    """DICOMs through every display mapping: min-max, a window, MONOCHROME1, a rescale, 8-bit,
    and the compressed encodings; plus every DICOM of sample_studies/."""
    from pneumobatch.testing.synthetic import write_cxr
    from tests.helpers import ROOT

    rng = np.random.default_rng(5)
    field = (chest_like(1, (320, 280)) * 3000 + 400 + rng.normal(0, 30, (320, 280))).clip(0, 4095).astype(np.uint16)
    cases = {
        "minmax": {},
        "window": {"window": (1800.0, 2200.0)},
        "mono1": {"monochrome1": True},
        "rescale": {"extra": {"RescaleSlope": -2, "RescaleIntercept": 9000}},
        "jpegls": {"encoding": "jpegls"},
        "rle": {"encoding": "rle"},
        "j2k": {"encoding": "j2k-lossless"},
    }
    paths = []
    for name, options in cases.items():
        encoding = options.pop("encoding", "explicit")
        paths.append(
            write_cxr(tmp_path / f"{name}.dcm", field, encoding, bits_stored=12, **options) and tmp_path / f"{name}.dcm"
        )
    write_cxr(tmp_path / "u8.dcm", (field >> 4).astype(np.uint8))
    paths.append(tmp_path / "u8.dcm")
    from pneumobatch.io.discovery import FileKind, sniff

    paths += [p for p in sorted((ROOT / "sample_studies").rglob("*")) if p.is_file() and sniff(p) is FileKind.DICOM]
    return paths


def test_a_deferred_dicom_gives_the_same_model_input_to_the_last_bit(tmp_path):
    """predict reads DICOMs as a table of display values per stored value (ReadOptions.defer_pixels)
    and equalises through the stored values' histogram: the inputs must be those of the image."""
    from pneumobatch.core.errors import FileRejected
    from pneumobatch.io.discovery import sniff
    from pneumobatch.io.readers import ReadOptions, read_image
    from pneumobatch.model.preprocess import prepare_image

    deferred = 0
    for path in _dicoms(tmp_path):
        try:
            plain = read_image(path, sniff(path), ReadOptions(include_lateral=True))
        except FileRejected:
            continue
        lazy = read_image(path, sniff(path), ReadOptions(include_lateral=True, defer_pixels=True))
        deferred += lazy.pixels is None
        for spec in (InputSpec(192, True), InputSpec(192, False), InputSpec(64, True)):
            np.testing.assert_array_equal(prepare_image(lazy, spec), prepare(plain.pixels, spec), err_msg=str(path))
        np.testing.assert_array_equal(lazy.display_pixels(), plain.pixels, err_msg=str(path))
    assert deferred >= 12


@pytest.mark.parametrize("dtype, top", [(np.uint16, 4095), (np.uint16, 65535), (np.int32, 3000), (np.uint8, 255)])
def test_a_full_size_image_is_counted_and_equalised_per_stored_value_exactly(dtype, top):
    """A full-size radiograph (2500x2048, counted in chunks) gets bincount's counts and the equalised
    values of its pixels, to the last bit."""
    from pneumobatch.model.preprocess import equalize, equalize_table, value_counts

    rng = np.random.default_rng(3)
    index = rng.normal(top / 2, top / 8, (2500, 2048)).clip(0, top).astype(dtype)
    table = np.sort(rng.random(top + 1).astype(np.float32))
    np.testing.assert_array_equal(value_counts(index, top + 1), np.bincount(index.ravel(), minlength=top + 1))
    np.testing.assert_array_equal(
        value_counts(index[:10, :10], top + 1), np.bincount(index[:10, :10].ravel(), minlength=top + 1)
    )
    np.testing.assert_array_equal(equalize_table(table, index), equalize(table[index]))


def test_a_deferred_png_or_jpeg_gives_the_same_model_input_to_the_last_bit(tmp_path):
    """8-bit PNG/JPEG exports are read as their grey levels and a 256-entry table when predict
    defers pixels: every model input and the displayed image are those of the image as read."""
    from PIL import Image as PILImage

    from pneumobatch.io.discovery import FileKind, sniff
    from pneumobatch.io.readers import ReadOptions, read_image
    from tests.helpers import ROOT

    rng = np.random.default_rng(7)
    grey = (chest_like(1, (600, 520)) * 200 + 20 + rng.normal(0, 6, (600, 520))).clip(0, 255).astype(np.uint8)
    PILImage.fromarray(grey).save(tmp_path / "l.png")
    PILImage.fromarray(grey).save(tmp_path / "l.jpg", quality=90)
    PILImage.fromarray(np.stack([grey, grey // 2, 255 - grey], -1)).convert("RGB").save(tmp_path / "rgb.jpg")
    PILImage.fromarray(np.stack([grey, grey, grey, np.full_like(grey, 200)], -1)).save(tmp_path / "rgba.png")
    PILImage.fromarray(grey).convert("P").save(tmp_path / "p.png")
    PILImage.fromarray(grey.astype(np.uint16) * 16).save(tmp_path / "sixteen.png")
    paths = sorted(tmp_path.glob("*.*"))
    samples = [p for p in sorted((ROOT / "sample_studies").rglob("*")) if p.is_file()]
    paths += [p for p in samples if sniff(p) in (FileKind.PNG, FileKind.JPEG)]
    deferred = set()
    for path in paths:
        for min_side in (0, 192):
            plain = read_image(path, sniff(path), ReadOptions(min_side=min_side))
            lazy = read_image(path, sniff(path), ReadOptions(min_side=min_side, defer_pixels=True))
            if lazy.pixels is None:
                deferred.add(path.name)
            for spec in (InputSpec(192, True), InputSpec(192, False)):
                np.testing.assert_array_equal(prepare_image(lazy, spec), prepare(plain.pixels, spec), err_msg=str(path))
            np.testing.assert_array_equal(lazy.display_pixels(), plain.pixels, err_msg=str(path))
    assert deferred >= {"l.png", "l.jpg", "rgb.jpg", "rgba.png", "p.png"} and "sixteen.png" not in deferred
