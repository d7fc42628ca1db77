"""Time ``read_dicom`` on a 2048 x 2048 12-bit chest-X-ray-like image in each transfer syntax.

Pinned to one core. Prints, per encoding, the plugin the reader picks, the decode alone
(pydicom with that plugin, frame 0) and the whole read (header, gates, decode, VOI), in
ms per image and images/s. The files are built with the test suite's helpers
(tests/io/test_readers.py), so this needs the test extras (pytest) installed.

    python benchmarks/decode.py [--size 2048] [--seconds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import pixel_array

ROOT = Path(__file__).resolve().parents[1]
ENCODINGS = [
    "explicit-le",
    "deflated",
    "rle",
    "jpeg-baseline",
    "jpeg-lossless",
    "jpeg-ls",
    "jpeg-ls-near",
    "j2k-lossless",
    "j2k",
]


def chest_like(size: int, seed: int = 0) -> np.ndarray:
    """Smooth 12-bit anatomy-like structure plus detector noise (compresses like a CXR)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    body = np.exp(-((x / 0.85) ** 8 + (y / 0.95) ** 8))
    lungs = np.exp(-((((np.abs(x) - 0.4) / 0.28) ** 2 + ((y + 0.05) / 0.55) ** 2) ** 2))
    ribs = 0.06 * np.sin(28 * (y + 0.15 * x**2)) * lungs
    image = 0.15 + 0.6 * body - 0.35 * lungs + ribs + 0.25 * np.exp(-(x**2 / 0.01 + (y - 0.2) ** 2 / 0.5))
    image = np.clip(image, 0, 1) * 3800 + 100 + rng.normal(0, 12, image.shape)
    return np.clip(np.round(image), 0, 4095).astype(np.uint16)


def per_image(fn, seconds: float) -> float:
    """Median seconds per call over at least 3 calls and about ``seconds`` in total."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per measurement")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    spec = importlib.util.spec_from_file_location("test_readers", ROOT / "tests" / "io" / "test_readers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.io.readers import dicom as reader

    pixels12 = chest_like(args.size)
    print(f"{args.size}x{args.size}, one core; ms per image (images/s)")
    print(f"{'encoding':<14} {'plugin':<10} {'MB':>6} {'decode only':>16} {'read_dicom':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for encoding in ENCODINGS:
            bits = 8 if encoding == "jpeg-baseline" else 12
            pixels = (pixels12 >> 4).astype(np.uint8) if bits == 8 else pixels12
            ds = helpers.make_dataset(pixels, bits_stored=bits, WindowCenter=2048, WindowWidth=4096)
            kwargs = {"encoding_plugin": "pylibjpeg"} if encoding == "rle" else {}  # fast encoder
            helpers.encode(ds, pixels, encoding, **kwargs)
            path = helpers.write(ds, Path(tmp) / f"{encoding}.dcm")

            tsyntax = ds.file_meta.TransferSyntaxUID
            plugin = reader._decoding_plugins(tsyntax)[0]
            loaded = pydicom.dcmread(path)
            loaded.PixelData  # noqa: B018 - read the bytes outside the timing
            decode = per_image(partial(pixel_array, loaded, index=0, decoding_plugin=plugin), args.seconds)
            full = per_image(partial(reader.read_dicom, path, ReadOptions()), args.seconds)
            size_mb = path.stat().st_size / 1e6
            print(
                f"{encoding:<14} {plugin or 'native':<10} {size_mb:6.2f} "
                f"{decode * 1e3:8.1f} ({1 / decode:5.1f}) {full * 1e3:8.1f} ({1 / full:5.1f})"
            )


if __name__ == "__main__":
    main()
