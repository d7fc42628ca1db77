"""Readers (DICOM, PNG/JPEG) and content sniffing: what a nightly run relies on.

Every DICOM here is built in the test with pydicom. Encodings pydicom cannot write
are produced otherwise: JPEG baseline with Pillow, JPEG lossless (process 14, SV1)
with the small encoder below, since no installed package encodes it
(pylibjpeg-libjpeg only decodes, Pillow has no lossless JPEG). JPEG Extended
12-bit, written by nothing installed, comes from pydicom's bundled test files, which
also cross-check the rendering against pydicom's own. HTJ2K is decodable but not
tested: nothing installed writes it and no bundled file uses it.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image as PILImage
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.io import discovery
from pneumobatch.io.discovery import FileKind, sniff
from pneumobatch.io.readers import Image, ReadOptions, dicom_pixels, dicom_values, read_image
from pneumobatch.io.readers import dicom as dicom_reader
from pneumobatch.io.readers.dicom import read_dicom
from pneumobatch.io.readers.raster import read_raster

ROWS, COLS = 40, 48  # JPEG 2000 needs 32+ pixels a side; not square, to catch transposes
STUDY, SERIES, SOP = "1.2.826.0.1.3680043.2.1", "1.2.826.0.1.3680043.2.1.2", "1.2.826.0.1.3680043.2.1.2.3"


# --- building DICOM files -----------------------------------------------------------


def reference_pixels(bits: int, signed: bool, shape: tuple[int, ...] = (ROWS, COLS), seed: int = 0) -> np.ndarray:
    """Random stored values spanning the whole range of ``bits`` (both extremes present)."""
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    dtype = np.dtype(f"{'i' if signed else 'u'}{1 if bits <= 8 else 2}")
    pixels = np.random.default_rng(seed).integers(lo, hi, shape, endpoint=True).astype(dtype)
    pixels.flat[0], pixels.flat[-1] = lo, hi
    return pixels


def smooth_pixels(bits: int = 12) -> np.ndarray:
    """A gradient with a bright disc: what lossy codecs keep well."""
    y, x = np.mgrid[0:ROWS, 0:COLS]
    image = x / (COLS - 1) * 0.6 + 0.4 * ((y - ROWS / 2) ** 2 + (x - COLS / 2) ** 2 < 100)
    return np.round(image * ((1 << bits) - 1)).astype(np.uint8 if bits <= 8 else np.uint16)


def make_dataset(
    pixels: np.ndarray,
    *,
    bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
    modality: str | None = "DX",
    **attributes,
) -> Dataset:
    """A DX image (Explicit VR Little Endian) holding ``pixels`` (frames first if 3-D grey)."""
    colour = photometric in ("RGB", "YBR_FULL")
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else None
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = SOP
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, SOP
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-001"
    if modality is not None:
        ds.Modality = modality
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[1:3] if frames is not None else pixels.shape[:2]
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def write(ds: Dataset, path: Path, *, preamble: bool = True) -> Path:
    """Save ``ds``; without ``preamble`` the file starts directly with its first element."""
    ds.save_as(path, enforce_file_format=preamble)
    return path


def encode_jpeg_lossless_sv1(samples: np.ndarray, precision: int) -> bytes:
    """Encode a 2-D array as JPEG lossless (process 14, first-order prediction).

    Minimal codestream: one component, one Huffman table giving each difference
    category (0-16) a 5-bit code, no restart intervals. Signed samples are encoded as
    their two's-complement bit patterns, as DICOM requires.
    """
    rows, cols = samples.shape
    x = samples.astype(np.int64) & ((1 << precision) - 1)
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]  # Ra: the sample to the left
    pred[1:, 0] = x[:-1, 0]  # Rb: first column predicts from above
    pred[0, 0] = 1 << (precision - 1)
    diff = (x - pred) & 0xFFFF
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff).ravel()
    ssss = np.zeros_like(diff)
    for k in range(16):
        ssss[np.abs(diff) >= (1 << k)] = k + 1
    extra_bits = np.where(ssss == 16, 0, ssss)
    extra = np.where(diff >= 0, diff, diff + (1 << ssss) - 1) & ((1 << extra_bits) - 1)
    codes, lengths = (ssss << extra_bits) | extra, 5 + extra_bits
    bits = []
    step = 1 << 18
    for start in range(0, codes.size, step):
        c, n = codes[start : start + step], lengths[start : start + step]
        shifts = n[:, None] - 1 - np.arange(21)[None, :]
        bits.append(((c[:, None] >> np.maximum(shifts, 0)) & 1)[shifts >= 0].astype(np.uint8))
    stream = np.concatenate(bits)
    data = np.packbits(np.concatenate([stream, np.ones(-stream.size % 8, np.uint8)]))
    data = np.insert(data, np.flatnonzero(data == 0xFF) + 1, 0).tobytes()  # byte stuffing

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof = bytes([precision]) + struct.pack(">HH", rows, cols) + bytes([1, 1, 0x11, 0])
    dht = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, predictor 1, Pt 0
    return b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos) + data + b"\xff\xd9"


def jpeg_baseline(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode(ds: Dataset, pixels: np.ndarray, encoding: str, **compress_options) -> Dataset:
    """Re-encode ``ds`` (holding ``pixels``); options go to ``Dataset.compress``."""
    if encoding == "explicit-le":
        pass
    elif encoding == "implicit-le":
        ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
    elif encoding == "explicit-be":
        ds.file_meta.TransferSyntaxUID = uid.ExplicitVRBigEndian
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    elif encoding == "deflated":
        ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    elif encoding == "rle":
        ds.compress(uid.RLELossless, pixels, **compress_options)
    elif encoding == "jpeg-ls":
        ds.compress(uid.JPEGLSLossless, pixels, **compress_options)
    elif encoding == "jpeg-ls-near":
        ds.compress(uid.JPEGLSNearLossless, pixels, jls_error=2, **compress_options)
    elif encoding == "j2k-lossless":
        ds.compress(uid.JPEG2000Lossless, pixels, **compress_options)
    elif encoding == "j2k":
        ds.compress(uid.JPEG2000, pixels, j2k_cr=[3], **compress_options)
    elif encoding == "jpeg-lossless":
        frames = pixels if pixels.ndim == 3 else pixels[None]
        ds.PixelData = encapsulate([encode_jpeg_lossless_sv1(f, ds.BitsStored) for f in frames])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid.JPEGLosslessSV1
    elif encoding == "jpeg-baseline":
        ds.PixelData = encapsulate([jpeg_baseline(pixels)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    else:
        raise ValueError(encoding)
    return ds


#: Lossless encodings and the pydicom plugin expected to decode them first, per
#: shared/PERFORMANCE_NOTES.md and the project's dependencies ("" = native).
LOSSLESS = {
    "explicit-le": "",
    "implicit-le": "",
    "explicit-be": "",
    "deflated": "",
    "rle": "pylibjpeg",
    "jpeg-ls": "pyjpegls",
    "j2k-lossless": "pylibjpeg",
    "jpeg-lossless": "pylibjpeg",  # gdcm would come first, but is not a dependency
}
#: (bits stored, signed, photometric interpretation) for each lossless encoding
PIXEL_KINDS = [
    (8, False, "MONOCHROME2"),
    (12, False, "MONOCHROME2"),
    (12, False, "MONOCHROME1"),
    (16, False, "MONOCHROME2"),
    (16, True, "MONOCHROME2"),
]


def minmax64(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return (values - values.min()) / (values.max() - values.min())


@pytest.fixture
def spy_plugins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the decoding plugin of every decode attempt the DICOM reader makes."""
    calls: list[str] = []
    real = dicom_reader.decode_pixels

    def spy(*args, **kwargs):
        calls.append(kwargs.get("decoding_plugin", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(dicom_reader, "decode_pixels", spy)
    return calls


@pytest.fixture
def dx_file(tmp_path: Path):
    """Factory: write a DX file (12-bit unless ``pixels`` given) and return its path."""

    def factory(name: str = "image.dcm", pixels: np.ndarray | None = None, **kwargs) -> Path:
        pixels = reference_pixels(12, False) if pixels is None else pixels
        kwargs.setdefault("bits_stored", 12 if pixels.dtype.itemsize == 2 else 8)
        return write(make_dataset(pixels, **kwargs), tmp_path / name)

    return factory


def rejected(path: Path, options: ReadOptions | None = None) -> FileRejected:
    with pytest.raises(FileRejected) as info:
        read_dicom(path, options or ReadOptions())
    return info.value


# --- DICOM: pixel values per encoding -----------------------------------------------


@pytest.mark.parametrize("bits, signed, photometric", PIXEL_KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("encoding", list(LOSSLESS))
def test_lossless_encodings_return_original_pixels(
    tmp_path: Path, spy_plugins: list[str], encoding: str, bits: int, signed: bool, photometric: str
):
    pixels = reference_pixels(bits, signed)
    ds = encode(make_dataset(pixels, bits_stored=bits, photometric=photometric), pixels, encoding)
    image = read_dicom(write(ds, tmp_path / "x.dcm"), ReadOptions())

    expected = minmax64(pixels)  # no VOI: min-max of the stored values
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (ROWS, COLS)
    # 1e-6 is far below one grey level (1/65535): the stored values came back exactly
    np.testing.assert_allclose(image.pixels, expected, rtol=0, atol=1e-6)
    assert spy_plugins == [LOSSLESS[encoding]]  # the preferred plugin, first time
    assert image.meta["transfer_syntax"] == ds.file_meta.TransferSyntaxUID
    assert image.meta["photometric_interpretation"] == photometric


@pytest.mark.parametrize(
    "encoding, plugin, tolerance",
    [
        ("jpeg-baseline", "pillow", 1e-6),
        ("jpeg-ls-near", "pyjpegls", 6 / 4095),  # +-2 per value, and the min-max range may move by 2 at each end
        ("j2k", "pylibjpeg", 0.05),
    ],
)
def test_lossy_encodings_stay_close(tmp_path: Path, spy_plugins: list[str], encoding, plugin, tolerance):
    bits = 8 if encoding == "jpeg-baseline" else 12
    pixels = smooth_pixels(bits)
    ds = encode(make_dataset(pixels, bits_stored=bits), pixels, encoding)
    image = read_dicom(write(ds, tmp_path / "x.dcm"), ReadOptions())

    if encoding == "jpeg-baseline":  # exactly what Pillow decodes from the same bytes
        expected = minmax64(np.asarray(PILImage.open(io.BytesIO(jpeg_baseline(pixels)))))
    else:
        expected = minmax64(pixels)
    assert np.abs(image.pixels - expected).max() <= tolerance
    assert spy_plugins == [plugin]


def test_bits_stored_masks_high_bits(dx_file):
    """Bits above Bits Stored (old overlays, garbage) must not reach the image."""
    clean = reference_pixels(12, False)
    dirty = clean | np.uint16(0xA000)
    image = read_dicom(dx_file(pixels=dirty, bits_stored=12), ReadOptions())
    np.testing.assert_allclose(image.pixels, minmax64(clean), atol=1e-6)


def test_colour_is_converted_to_luminance(dx_file):
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]], [[0, 255, 0], [0, 0, 255], [128, 128, 128]]], np.uint8)
    image = read_dicom(dx_file(pixels=rgb, photometric="RGB", bits_stored=8), ReadOptions())
    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    np.testing.assert_allclose(image.pixels, luma / 255.0, atol=1e-6)


@pytest.mark.parametrize("encoding", ["explicit-le", "rle", "jpeg-ls", "j2k-lossless", "jpeg-lossless"])
def test_multi_frame_reads_first_frame(tmp_path: Path, encoding: str):
    frames = np.stack([reference_pixels(12, False, seed=s) for s in range(3)])
    ds = encode(make_dataset(frames, bits_stored=12), frames, encoding)
    image = read_dicom(write(ds, tmp_path / "x.dcm"), ReadOptions())
    np.testing.assert_allclose(image.pixels, minmax64(frames[0]), atol=1e-6)
    assert image.meta["frames"] == 3


def test_file_without_preamble(tmp_path: Path):
    pixels = reference_pixels(12, False)
    path = write(make_dataset(pixels, bits_stored=12), tmp_path / "IM0001", preamble=False)
    assert path.read_bytes()[:2] == b"\x02\x00"  # the file meta's first tag, no preamble
    assert sniff(path) is FileKind.DICOM
    np.testing.assert_allclose(read_dicom(path, ReadOptions()).pixels, minmax64(pixels), atol=1e-6)


@pytest.mark.parametrize("implicit, little", [(True, True), (False, True), (False, False)])
def test_file_without_file_meta_guesses_encoding(tmp_path: Path, implicit: bool, little: bool):
    pixels = reference_pixels(16, True)
    ds = make_dataset(pixels)
    if not little:
        ds.PixelData = pixels.astype(">i2").tobytes()
    del ds.file_meta
    path = tmp_path / "raw"
    ds.save_as(path, implicit_vr=implicit, little_endian=little)
    assert sniff(path) is FileKind.DICOM
    image = read_dicom(path, ReadOptions())
    np.testing.assert_allclose(image.pixels, minmax64(pixels), atol=1e-6)
    assert image.meta["sop_instance_uid"] == SOP


# --- DICOM: files written by other software (pydicom's bundled test files) ----------

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


def pydicom_reference(ds: Dataset) -> np.ndarray:
    """pydicom's own rendering (Modality LUT, then VOI LUT or window), scaled to [0, 1]."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    pixels = pixel_array(ds, index=0)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:
        return minmax64(pixels.astype(np.float64) @ [0.299, 0.587, 0.114])
    values = apply_modality_lut(pixels, ds)
    if "WindowCenter" not in ds:
        return minmax64(values)
    bits = ds.BitsStored
    y_min, y_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    y_min, y_max = (y * ds.get("RescaleSlope", 1) + ds.get("RescaleIntercept", 0) for y in (y_min, y_max))
    return (apply_voi_lut(values, ds) - y_min) / (y_max - y_min)


@pytest.mark.parametrize(
    "name, plugin",
    [
        ("JPGExtended.dcm", "pylibjpeg"),  # JPEG Extended 12-bit
        ("MR_small_jp2klossless.dcm", "pylibjpeg"),  # signed, window 600/1600
        ("693_J2KI.dcm", "pylibjpeg"),  # lossy J2K, 14-bit signed, rescale and window
        ("MR_small_RLE.dcm", "pylibjpeg"),
        ("JPEGLSNearLossless_16.dcm", "pyjpegls"),
        ("examples_palette.dcm", ""),  # PALETTE COLOR
        ("SC_ybr_full_422_uncompressed.dcm", ""),  # YBR_FULL_422
        ("MR_small_bigendian.dcm", ""),
    ],
)
def test_files_from_other_software_match_pydicoms_rendering(tmp_path: Path, spy_plugins, name: str, plugin: str):
    source = PYDICOM_FILES / name
    if not source.is_file():
        pytest.skip(f"{name} is not bundled with this pydicom")
    ds = pydicom.dcmread(source)
    ds.Modality = "DX"
    image = read_dicom(write(ds, tmp_path / name), ReadOptions())
    np.testing.assert_allclose(image.pixels, pydicom_reference(ds), atol=1e-5)
    assert spy_plugins[0] == plugin and len(spy_plugins) == 1


# --- DICOM: Modality LUT, VOI, MONOCHROME1 (hand-computed) --------------------------

STORED = np.array([[0, 100, 200], [220, 250, 400]], np.uint16)  # 2 x 3
# with Rescale Slope 2, Intercept -100 the modality values are:
MODALITY = np.array([[-100, 100, 300], [340, 400, 700]], np.float64)


@pytest.mark.parametrize(
    "function, width, expected",
    [
        # LINEAR, C=300 W=201: y = (x - 299.5) / 200 + 0.5, clipped to [0, 1]
        ("LINEAR", 201, [[0, 0, 0.5025], [0.7025, 1, 1]]),
        # LINEAR_EXACT, C=300 W=200: y = (x - 300) / 200 + 0.5
        ("LINEAR_EXACT", 200, [[0, 0, 0.5], [0.7, 1, 1]]),
        # SIGMOID, C=300 W=200: y = 1 / (1 + exp(-4 (x - 300) / 200))
        ("SIGMOID", 200, 1 / (1 + np.exp(-4 * (MODALITY - 300) / 200))),
        (None, 201, [[0, 0, 0.5025], [0.7025, 1, 1]]),  # absent: LINEAR
    ],
)
def test_rescale_then_window(dx_file, function, width, expected):
    extra = {"VOILUTFunction": function} if function else {}
    path = dx_file(pixels=STORED, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=300, WindowWidth=width, **extra)
    np.testing.assert_allclose(read_dicom(path, ReadOptions()).pixels, expected, atol=1e-6)


def test_first_of_several_windows_is_used_and_monochrome1_inverted(dx_file):
    path = dx_file(
        pixels=STORED,
        photometric="MONOCHROME1",
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=[300, 1000],
        WindowWidth=[201, 50],
    )
    expected = 1 - np.array([[0, 0, 0.5025], [0.7025, 1, 1]])
    np.testing.assert_allclose(read_dicom(path, ReadOptions()).pixels, expected, atol=1e-6)


@pytest.mark.parametrize("function, width", [("LINEAR", 0.5), ("LINEAR", -10), ("LINEAR_EXACT", 0), ("SIGMOID", 0)])
def test_unusable_window_falls_back_to_minmax(dx_file, function, width):
    path = dx_file(pixels=STORED, WindowCenter=300, WindowWidth=width, VOILUTFunction=function)
    np.testing.assert_allclose(read_dicom(path, ReadOptions()).pixels, minmax64(STORED), atol=1e-6)


def test_garbage_window_values_fall_back_to_minmax(tmp_path: Path):
    path = write(make_dataset(STORED, bits_stored=12, WindowCenter="12345", WindowWidth="54321"), tmp_path / "x.dcm")
    path.write_bytes(path.read_bytes().replace(b"12345", b"abcde").replace(b"54321", b"12x45"))
    np.testing.assert_allclose(read_dicom(path, ReadOptions()).pixels, minmax64(STORED), atol=1e-6)


def voi_lut_item(first: int, data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first, 16]
    item.add_new(0x00283006, "US", data)  # LUT Data
    return item


def test_voi_lut_sequence_wins_over_window_and_is_scaled_by_its_range(dx_file):
    stored = np.array([[9, 10, 11], [12, 13, 20]], np.uint16)
    # 4 entries from 10: 0, 1000, 3000, 4000 (a 12-bit LUT declaring 16 bits);
    # values below the first entry take the first, above the last take the last
    lut = Sequence([voi_lut_item(10, [0, 1000, 3000, 4000])])
    path = dx_file(pixels=stored, VOILUTSequence=lut, WindowCenter=0, WindowWidth=2)
    expected = [[0, 0, 0.25], [0.75, 1, 1]]
    np.testing.assert_allclose(read_dicom(path, ReadOptions()).pixels, expected, atol=1e-6)


def test_modality_lut_sequence(dx_file):
    item = Dataset()
    item.LUTDescriptor = [3, 0, 16]
    item.add_new(0x00283006, "US", [500, 100, 300])  # LUT Data: stored 0, 1, 2 -> 500, 100, 300
    item.ModalityLUTType = "US"
    path = dx_file(pixels=np.array([[0, 1], [2, 2]], np.uint16), ModalityLUTSequence=Sequence([item]))
    np.testing.assert_allclose(read_dicom(path, ReadOptions()).pixels, [[1, 0], [0.5, 0.5]], atol=1e-6)


def test_signed_rescaled_window(dx_file):
    stored = np.array([[-1000, -24], [0, 1000]], np.int16)
    # slope 1, intercept 1024 -> 24, 1000, 1024, 2024; C=1024 W=2000 LINEAR_EXACT
    path = dx_file(
        pixels=stored, bits_stored=16, RescaleSlope=1, RescaleIntercept=1024,
        WindowCenter=1024, WindowWidth=2000, VOILUTFunction="LINEAR_EXACT",
    )  # fmt: skip
    expected = [[0, 0.488], [0.5, 1]]
    np.testing.assert_allclose(read_dicom(path, ReadOptions()).pixels, expected, atol=1e-6)


def test_constant_image_is_finite(dx_file):
    image = read_dicom(dx_file(pixels=np.full((4, 4), 7, np.uint16)), ReadOptions())
    assert np.isfinite(image.pixels).all() and image.pixels.min() >= 0 and image.pixels.max() <= 1


def hand_written_window(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The reader's window before it used pydicom's ``apply_windowing``, kept as the reference."""

    def ramp(values: np.ndarray, lower: float, width: float) -> np.ndarray:
        out = np.subtract(values, lower, dtype=np.float32)
        out *= np.float32(1.0 / width)
        return np.clip(out, 0.0, 1.0, out=out)

    center = dicom_values.as_float(dicom_values.first_value(dicom_values.header_value(ds, "WindowCenter")))
    width = dicom_values.as_float(dicom_values.first_value(dicom_values.header_value(ds, "WindowWidth")))
    if center is None or width is None:
        return None
    function = dicom_values.as_text(dicom_values.header_value(ds, "VOILUTFunction")).upper() or "LINEAR"
    if function == "SIGMOID":
        if width <= 0:
            return None
        x = values.astype(np.float32, copy=False)
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(np.float32(-4.0 / width) * (x - np.float32(center))))
    if function == "LINEAR_EXACT":
        return ramp(values, center - width / 2, width) if width > 0 else None
    if width < 1:
        return None
    if width == 1:
        return (values > center - 0.5).astype(np.float32)
    return ramp(values, center - 0.5 - (width - 1) / 2, width - 1)


def hand_written_display(path: Path) -> np.ndarray:
    """What the reader showed before: Modality LUT, the hand-written window (else min-max), MONOCHROME1 inverted."""
    ds = pydicom.dcmread(path)
    values = dicom_pixels._modality_lut(ds.pixel_array, ds)
    display = hand_written_window(values, ds)
    if display is None:
        display = dicom_pixels._minmax(values)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        display = 1.0 - display
    return dicom_pixels._finish(display)


WINDOWS = [  # (center, width): narrow, a threshold (LINEAR width 1), fractional, wide, wider than the data
    (2048, 4096), (1000, 1), (1000, 2), (1500.3, 700.7), (-200, 3000), (0.5, 0.25), (3000, 1e30), (5000, 10),
]  # fmt: skip


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID", None, "NOT_A_FUNCTION"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize(
    "bits, signed, slope, intercept",
    [(12, False, None, None), (12, False, 2, -100), (16, True, 1, 1024), (14, False, 0.5, -3)],
)
@pytest.mark.parametrize("shape", [(ROWS, COLS), (260, 256)])  # windowed directly / through a table
def test_pydicom_windowing_matches_the_hand_written_window(
    dx_file, function, photometric, bits, signed, slope, intercept, shape
):
    stored = reference_pixels(bits, signed, shape)
    rescale = {} if slope is None else {"RescaleSlope": slope, "RescaleIntercept": intercept}
    extra = {"VOILUTFunction": function} if function else {}
    for i, (center, width) in enumerate(WINDOWS):
        path = dx_file(f"w{i}.dcm", pixels=stored, bits_stored=bits, photometric=photometric,
                       WindowCenter=center, WindowWidth=width, **rescale, **extra)  # fmt: skip
        expected = hand_written_display(path)
        got = read_dicom(path, ReadOptions()).pixels
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0, err_msg=f"window {center}/{width}")


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("width", [0.5, 0, -10, 1e-3])
def test_pydicom_windowing_keeps_the_width_guard(dx_file, function, width):
    path = dx_file(pixels=STORED, WindowCenter=300, WindowWidth=width, VOILUTFunction=function)
    np.testing.assert_allclose(read_dicom(path, ReadOptions()).pixels, hand_written_display(path), atol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_a_window_wider_than_float32_is_no_window(dx_file):
    """Beyond float32's range the old formula overflowed (a constant image); such a width is now ignored."""
    path = dx_file(pixels=STORED, WindowCenter=300, WindowWidth=1e39)
    assert np.ptp(hand_written_display(path)) == 0
    np.testing.assert_allclose(read_dicom(path, ReadOptions()).pixels, minmax64(STORED), atol=1e-6)


# --- DICOM: metadata ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:The value length")
def test_metadata_is_sanitised_and_never_holds_the_patient_name(tmp_path: Path):
    ds = make_dataset(reference_pixels(12, False), bits_stored=12)
    ds.PatientName = "Secret^Name"
    ds.PatientID = "ID\x07-42\x1b[31m" + "9" * 200
    ds.SeriesInstanceUID = "1.2.3.abc"
    ds.ViewPosition = " ap "
    ds.Manufacturer = "ACME\x07 Medical" + "x" * 100
    ds.StationName = "ER\n1"
    image = read_dicom(write(ds, tmp_path / "x.dcm"), ReadOptions())
    meta = image.meta
    assert "Secret" not in repr(meta)
    assert meta["manufacturer"].startswith("ACME Medical") and len(meta["manufacturer"]) == 64
    assert meta["station_name"] == "ER1" and meta["manufacturer_model_name"] == ""
    assert meta["patient_id"].startswith("ID-42[31m") and len(meta["patient_id"]) <= 128
    assert all(ch.isprintable() for ch in meta["patient_id"])
    assert meta["study_instance_uid"] == STUDY
    assert meta["series_instance_uid"] == ""  # not a UID
    assert meta["sop_instance_uid"] == SOP
    assert meta["view_position"] == "AP" and meta["modality"] == "DX"
    assert meta["transfer_syntax"] == uid.ExplicitVRLittleEndian
    assert meta["photometric_interpretation"] == "MONOCHROME2" and meta["frames"] == 1
    assert set(meta) == {
        "study_instance_uid", "series_instance_uid", "sop_instance_uid", "view_position", "modality",
        "patient_id", "age_band", "age_years", "transfer_syntax", "photometric_interpretation", "frames",
        "manufacturer", "manufacturer_model_name", "station_name",
    }  # fmt: skip


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_uids_follow_the_one_uid_rule(tmp_path: Path):
    """PS3.5 9.1 (pneumobatch.core.uids): a leading-zero component is no UID, so the
    file is grouped as a file without one (never under an identifier the archive refuses)."""
    ds = make_dataset(reference_pixels(12, False), bits_stored=12)
    ds.StudyInstanceUID = "1.2.826.0.01.3680043"
    ds.SeriesInstanceUID = SERIES + "\x00"  # DICOM's NUL padding is no part of the UID
    meta = read_dicom(write(ds, tmp_path / "x.dcm"), ReadOptions()).meta
    assert meta["study_instance_uid"] == "" and meta["series_instance_uid"] == SERIES


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_a_transfer_syntax_uid_with_a_leading_zero_is_corrupt(tmp_path: Path):
    ds = make_dataset(reference_pixels(12, False), bits_stored=12)
    path = write(ds, tmp_path / "x.dcm")  # Explicit VR Little Endian, renamed with a leading zero:
    path.write_bytes(path.read_bytes().replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.01", 1))
    error = rejected(path)
    assert error.reason is Reason.CORRUPT and error.detail == "invalid Transfer Syntax UID"


def test_missing_modality_is_accepted(dx_file):
    image = read_dicom(dx_file(modality=None), ReadOptions())
    assert image.meta["modality"] == ""


# --- DICOM: every reason code -------------------------------------------------------


def test_rejections_after_the_header_carry_its_metadata(dx_file):
    for path, options in [
        (dx_file("ct.dcm", modality="CT"), ReadOptions()),
        (dx_file("lat.dcm", ViewPosition="LL"), ReadOptions()),
        (dx_file("big.dcm"), ReadOptions(max_pixels=10)),
    ]:
        error = rejected(path, options)
        assert error.meta["sop_instance_uid"] == SOP and error.meta["study_instance_uid"] == STUDY
        assert "Doe" not in repr(error.meta)
    assert rejected(dx_file("gone.dcm").with_name("missing.dcm")).meta == {}


@pytest.mark.parametrize("modality", ["CT", "MR", "SR"])
def test_not_cxr(dx_file, modality):
    error = rejected(dx_file(modality=modality))
    assert error.reason is Reason.NOT_CXR and modality in error.detail


def test_no_pixels_for_sr_like_documents(tmp_path: Path):
    ds = make_dataset(reference_pixels(8, False))
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, keyword)
    ds.Modality = "SR"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = uid.BasicTextSRStorage
    assert rejected(write(ds, tmp_path / "sr.dcm")).reason is Reason.NO_PIXELS


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "lat", "LLD"])
def test_lateral_views_skipped_unless_included(dx_file, view):
    path = dx_file(ViewPosition=view)
    assert rejected(path).reason is Reason.LATERAL
    assert isinstance(read_dicom(path, ReadOptions(include_lateral=True)), Image)


def test_too_large_refused_without_decoding(dx_file, spy_plugins):
    error = rejected(dx_file(), ReadOptions(max_pixels=ROWS * COLS - 1))
    assert error.reason is Reason.TOO_LARGE
    assert spy_plugins == []
    assert isinstance(read_dicom(dx_file(), ReadOptions(max_pixels=ROWS * COLS)), Image)


@pytest.mark.parametrize("encoding", ["j2k-lossless", "jpeg-ls", "jpeg-lossless"])
def test_codestream_larger_than_header_is_too_large(tmp_path: Path, spy_plugins, encoding):
    """Decoders allocate what the codestream declares: a lying header must not help."""
    pixels = reference_pixels(12, False)
    ds = encode(make_dataset(pixels, bits_stored=12), pixels, encoding)
    ds.Rows, ds.Columns = 8, 8
    error = rejected(write(ds, tmp_path / "x.dcm"), ReadOptions(max_pixels=1000))
    assert error.reason is Reason.TOO_LARGE and "codestream" in error.detail
    assert spy_plugins == []


def test_deflate_bomb_is_refused_before_inflating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ds = make_dataset(reference_pixels(8, False, (8, 8)))
    ds.add_new(0x00091010, "OB", bytes(24 * 1024 * 1024))  # 24 MiB of zeros: ~24 KiB deflated
    ds.add_new(0x00090010, "LO", "BOMB")
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    path = write(ds, tmp_path / "bomb.dcm")
    assert path.stat().st_size < 100_000

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed a deflate bomb")

    monkeypatch.setattr(dicom_reader.pydicom, "dcmread", no_parse)
    assert rejected(path, ReadOptions(max_pixels=1000)).reason is Reason.TOO_LARGE


def test_deflated_file_is_inflated_once_and_read_as_pydicom_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The zip-bomb check's inflated bytes are the ones parsed: pydicom does not inflate the
    file a second time, and the image is the one pydicom's own reading gives."""
    pixels = reference_pixels(12, False)
    ds = make_dataset(pixels, bits_stored=12)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 1500, 2000
    path = write(encode(ds, pixels, "deflated"), tmp_path / "x.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid.DeflatedExplicitVRLittleEndian
    expected = read_dicom(path, ReadOptions()).pixels
    stored = pydicom.dcmread(path).pixel_array
    inflations = []
    codec = dicom_reader.inflate_codec()
    assert codec.__name__ == "isal.isal_zlib"  # the fast inflater is the one used

    class Counting:
        error = codec.error

        @staticmethod
        def decompressobj(*args):
            inflations.append(args)
            return codec.decompressobj(*args)

    monkeypatch.setattr(dicom_reader, "inflate_codec", lambda: Counting)

    def no_dcmread(*args, **kwargs):
        raise AssertionError("pydicom inflated the file again")

    monkeypatch.setattr(dicom_reader.pydicom, "dcmread", no_dcmread)
    image = read_dicom(path, ReadOptions())
    assert len(inflations) == 1
    np.testing.assert_array_equal(image.pixels, expected)
    window = np.clip((stored.astype(np.float32) - (1500 - 0.5 - 999.5)) / 1999, 0, 1)  # PS3.3 C.11.2.1.2.1
    np.testing.assert_allclose(image.pixels, 1 - window, atol=2e-3)


def test_isal_and_zlib_inflate_a_deflated_file_to_the_same_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pixels = reference_pixels(12, False)
    path = write(encode(make_dataset(pixels, bits_stored=12), pixels, "deflated"), tmp_path / "x.dcm")
    fast = read_dicom(path, ReadOptions()).pixels
    monkeypatch.setattr(dicom_reader, "inflate_codec", lambda: zlib)
    np.testing.assert_array_equal(read_dicom(path, ReadOptions()).pixels, fast)
    truncated = tmp_path / "t.dcm"
    truncated.write_bytes(path.read_bytes()[:-4096])
    for codec in (zlib, __import__("isal.isal_zlib", fromlist=["isal_zlib"])):
        monkeypatch.setattr(dicom_reader, "inflate_codec", lambda codec=codec: codec)
        with pytest.raises(FileRejected):
            read_dicom(truncated, ReadOptions())


def test_deflated_uid_elsewhere_in_the_header_is_not_inflated(tmp_path: Path):
    ds = make_dataset(reference_pixels(12, False), bits_stored=12)
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091010, "LO", uid.DeflatedExplicitVRLittleEndian)
    assert isinstance(read_dicom(write(ds, tmp_path / "x.dcm"), ReadOptions()), Image)


@pytest.mark.parametrize("encoding", ["explicit-le", "j2k-lossless", "rle", "deflated"])
def test_truncated_file_is_corrupt(tmp_path: Path, encoding: str):
    pixels = reference_pixels(12, False)
    path = write(encode(make_dataset(pixels, bits_stored=12), pixels, encoding), tmp_path / "x.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data) // 3])  # cut inside the pixel data
    assert rejected(path).reason is Reason.CORRUPT


def test_truncated_before_pixel_data_is_corrupt_not_no_pixels(dx_file):
    path = dx_file()
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xe0\x7f\x10\x00")])  # stop at the (7FE0,0010) tag
    assert rejected(path).reason is Reason.CORRUPT


@pytest.mark.parametrize("encoding", ["j2k-lossless", "jpeg-ls", "jpeg-lossless", "jpeg-baseline", "rle"])
def test_garbage_compressed_pixel_data_is_corrupt(tmp_path: Path, encoding: str):
    bits = 8 if encoding == "jpeg-baseline" else 12
    pixels = reference_pixels(bits, False)
    ds = encode(make_dataset(pixels, bits_stored=bits), pixels, encoding)
    garbage = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    ds.PixelData = encapsulate([garbage])
    assert rejected(write(ds, tmp_path / "x.dcm")).reason is Reason.CORRUPT


def test_garbage_after_a_valid_header_is_corrupt(dx_file):
    path = dx_file()
    data = path.read_bytes()
    start = data.index(b"\xe0\x7f\x10\x00")
    garbage = np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    path.write_bytes(data[:start] + garbage)
    assert rejected(path).reason is Reason.CORRUPT


def test_unsupported_transfer_syntax_names_it(tmp_path: Path):
    ds = make_dataset(reference_pixels(12, False), bits_stored=12)
    ds.file_meta.TransferSyntaxUID = uid.JPEG2000MC  # JPEG 2000 Part 2: no decoder anywhere
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(100)])
    error = rejected(write(ds, tmp_path / "x.dcm"))
    assert error.reason is Reason.UNSUPPORTED_TRANSFER_SYNTAX
    assert "JPEG 2000 Part 2" in error.detail


def test_missing_plugin_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pixels = reference_pixels(12, False)
    path = write(encode(make_dataset(pixels, bits_stored=12), pixels, "j2k-lossless"), tmp_path / "x.dcm")

    class NoPlugins:
        available_plugins = ()

    monkeypatch.setattr(dicom_reader, "get_decoder", lambda tsyntax: NoPlugins())
    error = rejected(path)
    assert error.reason is Reason.UNSUPPORTED_TRANSFER_SYNTAX
    assert "JPEG 2000" in error.detail and "pip install" in error.detail and "pylibjpeg-openjpeg" in error.detail


def test_details_never_quote_header_values(dx_file, monkeypatch: pytest.MonkeyPatch):
    path = dx_file()

    def failing(*args, **kwargs):
        raise ValueError("invalid literal for int() with base 10: 'Doe^Jane'")

    monkeypatch.setattr(dicom_reader, "decode_pixels", failing)
    error = rejected(path)
    assert error.reason is Reason.CORRUPT and "Doe" not in str(error) and "invalid literal" in error.detail


def test_unsupported_photometric_interpretation(dx_file):
    assert rejected(dx_file(photometric="HSV")).reason is Reason.UNSUPPORTED_PIXELS


def test_vanished_file_is_unreadable(tmp_path: Path):
    assert rejected(tmp_path / "gone.dcm").reason is Reason.UNREADABLE


def test_empty_file_via_read_image(tmp_path: Path):
    path = tmp_path / "empty.dcm"
    path.touch()
    assert sniff(path) is FileKind.EMPTY
    with pytest.raises(FileRejected) as info:
        read_image(path, FileKind.EMPTY)
    assert info.value.reason is Reason.EMPTY


@pytest.mark.parametrize("encoding", ["explicit-le", "implicit-le", "rle", "j2k-lossless", "jpeg-ls", "deflated"])
def test_mutated_files_never_raise_anything_else(tmp_path: Path, encoding: str):
    """Untrusted bytes: any outcome is an Image or a FileRejected, never a crash."""
    pixels = reference_pixels(12, False, (32, 32))
    original = write(encode(make_dataset(pixels, bits_stored=12), pixels, encoding), tmp_path / "x.dcm").read_bytes()
    rng = np.random.default_rng(3)
    path = tmp_path / "mutant.dcm"
    for _ in range(25):
        data = bytearray(original)
        for offset in rng.integers(0, len(data), rng.integers(1, 8)):
            data[offset] = rng.integers(0, 256)
        if rng.random() < 0.3:
            data = data[: rng.integers(0, len(data))]
        path.write_bytes(bytes(data))
        try:
            image = read_dicom(path, ReadOptions())
        except FileRejected:
            continue
        assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
        assert np.isfinite(image.pixels).all() and 0 <= image.pixels.min() <= image.pixels.max() <= 1


# --- PNG and JPEG -------------------------------------------------------------------


def save_png(path: Path, image: PILImage.Image, **params) -> Path:
    image.save(path, format="PNG", **params)
    return path


def test_png_8bit_gray(tmp_path: Path):
    pixels = reference_pixels(8, False)
    image = read_raster(save_png(tmp_path / "a.png", PILImage.fromarray(pixels)), ReadOptions())
    np.testing.assert_allclose(image.pixels, pixels / 255.0, atol=1e-6)
    assert image.pixels.dtype == np.float32 and image.meta["format"] == "png"


def test_png_16bit_is_minmax_scaled(tmp_path: Path):
    pixels = (reference_pixels(12, False) + 100).astype(np.uint16)  # 12 bits used of 16
    image = read_raster(save_png(tmp_path / "a.png", PILImage.fromarray(pixels)), ReadOptions())
    np.testing.assert_allclose(image.pixels, minmax64(pixels), atol=1e-6)


# pure colours: luminance per ITU-R 601-2 (Pillow rounds to 8 bits)
COLOURS = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [10, 20, 30]]], np.uint8)
LUMA = (COLOURS.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255.0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_colour_png_becomes_luminance_alpha_ignored(tmp_path: Path, mode: str):
    image = PILImage.fromarray(COLOURS)
    if mode == "RGBA":
        rgba = np.concatenate([COLOURS, np.full(COLOURS.shape[:2] + (1,), 7, np.uint8)], axis=2)
        image = PILImage.fromarray(rgba)  # nearly transparent: must not darken anything
    elif mode == "P":
        image = image.quantize(colors=len(COLOURS[0]))
        assert image.mode == "P"
    read = read_raster(save_png(tmp_path / "a.png", image), ReadOptions())
    np.testing.assert_allclose(read.pixels, LUMA, atol=1 / 255)


def test_jpeg(tmp_path: Path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_baseline(smooth_pixels(8)))
    image = read_raster(path, ReadOptions())
    np.testing.assert_allclose(image.pixels, np.asarray(PILImage.open(path)) / 255.0, atol=1e-6)
    assert image.meta["format"] == "jpeg"


def test_jpeg_draft_keeps_at_least_min_side(tmp_path: Path):
    pixels = np.tile(smooth_pixels(8), (4, 4))  # 160 x 192
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_baseline(pixels))
    image = read_raster(path, ReadOptions(min_side=20))
    assert image.pixels.shape == (40, 48)  # decoded at 1/4 scale, both sides still >= 20 x the resize margin


def test_truncated_jpeg_is_corrupt(tmp_path: Path):
    data = jpeg_baseline(reference_pixels(8, False, (64, 64)))
    path = tmp_path / "a.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileRejected) as info:
        read_raster(path, ReadOptions())
    assert info.value.reason is Reason.CORRUPT


def png_bytes(width: int, height: int, idat: bytes) -> bytes:
    """A 1-bit greyscale PNG with the given (compressed) image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return discovery.PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("valid_data", [True, False])
def test_huge_png_refused_quickly_without_decoding(tmp_path: Path, valid_data: bool):
    width = height = 12_000  # 144 megapixels, a few KiB on disk
    if valid_data:
        compressor = zlib.compressobj(9)
        row = bytes(1 + width // 8)  # filter byte + packed bits
        idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    else:  # undecodable: refusing it as too-large proves nothing was decoded
        idat = b"not zlib data"
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes(width, height, idat))
    start = time.perf_counter()
    with pytest.raises(FileRejected) as info:
        read_raster(path, ReadOptions())
    assert info.value.reason is Reason.TOO_LARGE
    assert time.perf_counter() - start < 1.0


def test_random_bytes_are_not_an_image(tmp_path: Path):
    path = tmp_path / "blob.bin"
    path.write_bytes(np.random.default_rng(4).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    assert sniff(path) is FileKind.OTHER
    with pytest.raises(FileRejected) as info:
        read_image(path, sniff(path))
    assert info.value.reason is Reason.NOT_IMAGE


# --- discovery: sniff ---------------------------------------------------------------


def test_sniff_by_content_not_extension(tmp_path: Path, dx_file):
    assert sniff(dx_file("with_preamble.dcm")) is FileKind.DICOM
    no_preamble = write(make_dataset(reference_pixels(8, False)), tmp_path / "IM0002", preamble=False)
    assert sniff(no_preamble) is FileKind.DICOM
    png = save_png(tmp_path / "actually_png.dcm", PILImage.fromarray(reference_pixels(8, False)))
    assert sniff(png) is FileKind.PNG
    jpeg = tmp_path / "photo.png"
    jpeg.write_bytes(jpeg_baseline(smooth_pixels(8)))
    assert sniff(jpeg) is FileKind.JPEG
    text = tmp_path / "README"
    text.write_text("Export of study 1.2.3\nDo not edit.\n")
    assert sniff(text) is FileKind.OTHER
    short = tmp_path / "short.dcm"
    short.write_bytes(b"\x08\x00")
    assert sniff(short) is FileKind.OTHER
    empty = tmp_path / "empty"
    empty.touch()
    assert sniff(empty) is FileKind.EMPTY


def test_read_image_dispatches_on_kind(tmp_path: Path, dx_file):
    png = save_png(tmp_path / "a.png", PILImage.fromarray(reference_pixels(8, False)))
    assert read_image(png, sniff(png)).pixels.shape == (ROWS, COLS)
    dcm = dx_file()
    assert read_image(dcm, sniff(dcm)).meta["sop_instance_uid"] == SOP
