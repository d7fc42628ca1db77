"""Reduced-resolution decoding (readers/reduced.py): the model sees the same picture, faster.

Every file is a real DICOM written by pneumobatch.testing.synthetic (or pydicom for signed data).
Each test reads a file twice, in full (``ReadOptions()``) and for a 192 px model
(``ReadOptions(min_side=192)``), and compares the two after the model's own resize.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.io.readers import ReadOptions, decode_side
from pneumobatch.io.readers.dicom import read_dicom
from pneumobatch.io.readers.reduced import TRANSFER_SYNTAXES, j2k_header, reduction
from pneumobatch.model.preprocess import resize
from pneumobatch.testing.synthetic import ENCODINGS, write_cxr

SIZE = 192  # the shipped models' input size
ROWS, COLS = 1200, 1000  # not square (catches transposes); J2K and JPEG reduce to 1/2
#: Largest difference of one pixel of the 192 px model input, full vs reduced decode, on
#: a [0, 1] scale: 0.03 is 8 grey levels of the uint8 input (measured <= 0.025 even at 1/4
#: scale, a larger step than the 1/2 these files get). Both
#: decodes are low-pass filters of the same image that differ in their kernels. The mean
#: difference is smaller: <= 0.004 with a VOI window, <= 0.009 without one, because then
#: the display range is the image's own min-max and the reduced image has averaged away
#: some of the noise that sets the extremes.
MAX_DIFF = 0.03
MEAN_DIFF = 0.012
REDUCED = {name for name, syntax in ENCODINGS.items() if syntax in TRANSFER_SYNTAXES}


def anatomy(bits: int, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> np.ndarray:
    """Chest-like structure (body, two lungs, ribs) plus detector noise, in ``bits`` bits."""
    y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j]
    body = np.exp(-((x / 0.85) ** 8 + (y / 0.95) ** 8))
    lungs = np.exp(-((((np.abs(x) - 0.4) / 0.28) ** 2 + ((y + 0.05) / 0.55) ** 2) ** 2))
    image = 0.15 + 0.6 * body - 0.35 * lungs + 0.06 * np.sin(28 * (y + 0.15 * x**2)) * lungs
    image = np.clip(image, 0, 1) + np.random.default_rng(seed).normal(0, 0.003, image.shape)
    top = (1 << bits) - 1
    return np.clip(np.round(image * top), 0, top).astype(np.uint8 if bits <= 8 else np.uint16)


def model_inputs(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(full, reduced) model inputs of one file, and the shape the reduced decode produced."""
    full = read_dicom(path, ReadOptions())
    fast = read_dicom(path, ReadOptions(min_side=SIZE))
    assert full.pixels.shape == (ROWS, COLS)
    return resize(full.pixels, SIZE), resize(fast.pixels, SIZE), fast.pixels.shape


def assert_close(full: np.ndarray, fast: np.ndarray) -> None:
    diff = np.abs(full - fast)
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())


def test_every_codec_that_can_reduces_and_the_others_do_not():
    assert REDUCED == {"j2k-lossless", "j2k", "jpeg-baseline"}


@pytest.mark.parametrize("windowed", [False, True], ids=["min-max", "window"])
@pytest.mark.parametrize("monochrome1", [False, True], ids=["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_reduced_decode_gives_the_model_the_same_image(
    tmp_path: Path, encoding: str, monochrome1: bool, windowed: bool
):
    eight_bit = encoding == "jpeg-baseline"
    pixels = anatomy(8 if eight_bit else 12)
    window = ((120.0, 200.0) if eight_bit else (1900.0, 3000.0)) if windowed else None
    path = tmp_path / "x.dcm"
    write_cxr(path, pixels, encoding, bits_stored=None if eight_bit else 12, monochrome1=monochrome1, window=window)

    full, fast, shape = model_inputs(path)

    assert_close(full, fast)
    if encoding in REDUCED:  # the largest reduction leaving both sides >= 384 (192 x margin): 1/2
        assert shape == (ROWS // 2, COLS // 2)
        assert min(shape) >= decode_side(ReadOptions(min_side=SIZE)) > SIZE
    else:
        assert shape == (ROWS, COLS)
        np.testing.assert_array_equal(full, fast)
    # MONOCHROME1 is inverted on the reduced image too: the lungs (dark) stay dark
    centre_lung, mediastinum = fast[SIZE // 2, SIZE // 5], fast[SIZE // 2, SIZE // 2]
    assert centre_lung < mediastinum


def test_rescale_and_voi_lut_apply_to_the_reduced_image(tmp_path: Path):
    pixels = anatomy(12)
    lut = Dataset()  # a gamma curve over the 12-bit range
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new(0x00283006, "US", [int(v) for v in np.sqrt(np.arange(4096) / 4095) * 4000])  # LUT Data
    path = tmp_path / "x.dcm"
    write_cxr(
        path,
        pixels,
        "j2k-lossless",
        bits_stored=12,
        window=(100.0, 50.0),  # the LUT must win
        extra={"VOILUTSequence": Sequence([lut]), "RescaleSlope": 1, "RescaleIntercept": 0},
    )
    full, fast, shape = model_inputs(path)
    assert shape == (ROWS // 2, COLS // 2)
    assert_close(full, fast)

    write_cxr(
        path,
        pixels,
        "j2k",
        bits_stored=12,
        window=(-500.0, 3000.0),
        extra={"RescaleSlope": 0.5, "RescaleIntercept": -1500},
    )
    full, fast, shape = model_inputs(path)
    assert shape == (ROWS // 2, COLS // 2)
    assert_close(full, fast)
    assert 0.2 < fast.mean() < 0.8  # the window sits on the rescaled values, not the stored ones


@pytest.mark.parametrize("bits", [12, 16])
def test_signed_jpeg2000_with_rescale_and_window(tmp_path: Path, bits: int):
    stored = anatomy(bits).astype(np.int32) - (1 << (bits - 1))
    pixels = stored.astype(np.int16)
    path = tmp_path / "x.dcm"
    ds = write_cxr(path, anatomy(8), "explicit")  # a header to reuse
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 1
    ds.RescaleSlope, ds.RescaleIntercept = 2, 100
    ds.WindowCenter, ds.WindowWidth = 100, 2 * (1 << bits) * 0.8
    ds.PixelData = pixels.tobytes()
    ds.compress(uid.JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    ds.save_as(path)
    full, fast, shape = model_inputs(path)
    assert shape == (ROWS // 2, COLS // 2)
    assert_close(full, fast)


def test_header_disagreeing_with_the_codestream_falls_back_to_pydicom(tmp_path: Path):
    path = tmp_path / "x.dcm"
    ds = write_cxr(path, anatomy(12), "j2k-lossless", bits_stored=12)
    ds.BitsStored, ds.HighBit = 16, 15  # the codestream says 12 bits: pydicom knows what to do
    ds.save_as(path)
    full, fast, shape = model_inputs(path)
    assert shape == (ROWS, COLS)
    np.testing.assert_array_equal(full, fast)


def test_colour_jpeg_is_decoded_in_full(tmp_path: Path):
    path = tmp_path / "x.dcm"
    ds = write_cxr(path, anatomy(8), "jpeg-baseline")
    rgb = np.repeat(anatomy(8)[..., None], 3, axis=2)
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([buffer.getvalue()])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.save_as(path)
    full, fast, shape = model_inputs(path)
    assert shape == (ROWS, COLS)
    np.testing.assert_array_equal(full, fast)


def test_multi_frame_reads_the_first_frame_reduced(tmp_path: Path):
    first, second = anatomy(12, seed=1), 4095 - anatomy(12, seed=2)
    path = tmp_path / "x.dcm"
    ds = write_cxr(path, first, "explicit", bits_stored=12)
    frames = np.stack([first, second])
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    ds.compress(uid.JPEG2000Lossless, frames, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    ds.save_as(path)
    full, fast, shape = model_inputs(path)
    assert shape == (ROWS // 2, COLS // 2)
    assert_close(full, fast)


@pytest.mark.parametrize("encoding", sorted(REDUCED))
def test_damaged_codestreams_are_corrupt_or_an_image_never_a_crash(tmp_path: Path, encoding: str):
    pixels = anatomy(8 if encoding == "jpeg-baseline" else 12, 256, 256)
    path = tmp_path / "x.dcm"
    write_cxr(path, pixels, encoding, bits_stored=None if encoding == "jpeg-baseline" else 12)
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(FileRejected) as info:
        read_dicom(path, ReadOptions(min_side=32))
    assert info.value.reason is Reason.CORRUPT
    rng = np.random.default_rng(5)
    for _ in range(20):
        data = bytearray(original)
        for offset in rng.integers(len(data) - len(data) // 2, len(data), rng.integers(1, 8)):  # in the pixels
            data[offset] = rng.integers(0, 256)
        path.write_bytes(bytes(data))
        try:
            image = read_dicom(path, ReadOptions(min_side=32))
        except FileRejected:
            continue
        assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
        assert np.isfinite(image.pixels).all() and 0 <= image.pixels.min() <= image.pixels.max() <= 1


def test_reduction_keeps_both_sides_at_least_the_side():
    assert reduction(2048, 2048, 240, 5) == 3  # 256 px
    assert reduction(2048, 2048, 384, 5) == 2  # 512 px: a 192 px model with the margin
    assert reduction(2048, 2048, 240, 2) == 2  # only 2 decomposition levels in the codestream
    assert reduction(2048, 1000, 240, 5) == 2  # the short side decides: 250
    assert reduction(300, 300, 240, 5) == 0
    assert reduction(481, 481, 240, 5) == 1  # 241 (rounded up, as JPEG 2000 does)


def test_j2k_header_reads_size_precision_sign_and_levels(tmp_path: Path):
    path = tmp_path / "x.dcm"
    write_cxr(path, anatomy(12, 300, 200), "j2k-lossless", bits_stored=12)
    from pydicom.encaps import get_frame

    frame = get_frame(pydicom.dcmread(path).PixelData, 0, number_of_frames=1)
    header = j2k_header(frame)
    assert (header.columns, header.rows, header.components, header.precision, header.signed) == (200, 300, 1, 12, False)
    assert header.levels is not None and 1 <= header.levels <= 32
    assert j2k_header(frame[:20]) is None
