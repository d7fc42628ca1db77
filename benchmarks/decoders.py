"""The decoders pneumobatch uses against the maintained alternatives, per format, on this CPU (one core).

Issue 27 asked for the fastest maintained decoder per format with the same pixels. For each
format it times the one the readers use and every alternative that is installed, checks
the pixels are identical, and prints ms per image and the ratio; then the whole read of a
deflated DICOM with the inflater the reader uses (Intel ISA-L, ``isal``) and with zlib.

- PNG 8/16-bit, 1024 px: Pillow (libpng/zlib) vs ``pyspng`` (libspng);
- JPEG q90, 1024 px: Pillow (libjpeg-turbo) vs ``simplejpeg`` (libjpeg-turbo);
- JPEG-LS, 2048 x 2500 12-bit: ``pyjpegls`` (CharLS, pydicom's plugin) vs ``imagecodecs`` (CharLS);
- deflate, 2048 x 2500 12-bit: zlib vs ``isal`` vs ``zlib-ng``.

The images are smooth 12-bit fields with noise (radiograph-like statistics), made here.

    python benchmarks/decoders.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def radiograph(h: int = 2500, w: int = 2048, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    field = 2000 + 800 * np.sin(x / 300) * np.cos(y / 400) + rng.normal(0, 20, (h, w))
    return field.clip(0, 4095).astype(np.uint16)


def ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1000


def row(fmt: str, ours: str, t_ours: float, other: str, t_other: float, same: bool) -> None:
    print(f"{fmt:22s} {ours:14s} {t_ours:7.1f} ms   {other:12s} {t_other:7.1f} ms   "
          f"time ratio {t_ours / t_other:4.2f}   same pixels: {same}")  # fmt: skip


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    full = radiograph()
    small = np.asarray(Image.fromarray((full >> 4).astype(np.uint8)).resize((1024, 1250), Image.BILINEAR))
    png8, png16, jpeg = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(small).save(png8, format="PNG")
    Image.fromarray(small.astype(np.uint16) * 16).save(png16, format="PNG")
    Image.fromarray(small).save(jpeg, format="JPEG", quality=90)
    pil = lambda data: np.asarray(Image.open(io.BytesIO(data)))  # noqa: E731
    r = args.repeat
    print(f"one core; ms per image, mean of {r} after one warm-up")
    if has("pyspng"):
        import pyspng

        for name, buf in (("PNG 8-bit 1024 px", png8), ("PNG 16-bit 1024 px", png16)):
            data = buf.getvalue()
            same = np.array_equal(pil(data).astype(np.int64), pyspng.load(data).squeeze().astype(np.int64))
            t_pil, t_spng = ms(lambda d=data: pil(d), r), ms(lambda d=data: pyspng.load(d), r)
            row(name, "Pillow", t_pil, "pyspng", t_spng, same)
    if has("simplejpeg"):
        import simplejpeg

        data = jpeg.getvalue()
        same = np.array_equal(pil(data), simplejpeg.decode_jpeg(data, colorspace="GRAY").squeeze())
        row("JPEG q90 1024 px", "Pillow", ms(lambda: pil(data), r), "simplejpeg",
            ms(lambda: simplejpeg.decode_jpeg(data, colorspace="GRAY"), r), same)  # fmt: skip
    if has("imagecodecs") and has("jpeg_ls"):
        import imagecodecs
        import jpeg_ls

        data = imagecodecs.jpegls_encode(full)
        buf = np.frombuffer(data, np.uint8)
        same = np.array_equal(jpeg_ls.decode(buf), imagecodecs.jpegls_decode(data))
        row("JPEG-LS 2048x2500", "pyjpegls", ms(lambda: jpeg_ls.decode(buf), r), "imagecodecs",
            ms(lambda: imagecodecs.jpegls_decode(data), r), same)  # fmt: skip
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw = packer.compress(full.tobytes()) + packer.flush()
    if has("isal"):
        from isal import isal_zlib

        same = isal_zlib.decompress(raw, -15) == zlib.decompress(raw, -15)
        row("deflate 2048x2500", "isal", ms(lambda: isal_zlib.decompress(raw, -15), r), "zlib",
            ms(lambda: zlib.decompress(raw, -15), r), same)  # fmt: skip
    if has("zlib_ng"):
        from zlib_ng import zlib_ng

        same = zlib_ng.decompress(raw, -15) == zlib.decompress(raw, -15)
        row("deflate 2048x2500", "zlib-ng", ms(lambda: zlib_ng.decompress(raw, -15), r), "zlib",
            ms(lambda: zlib.decompress(raw, -15), r), same)  # fmt: skip
    whole_deflated_read(full, r)


def whole_deflated_read(pixels: np.ndarray, repeat: int) -> None:
    """The reader on a Deflated Explicit VR Little Endian radiograph, with ISA-L and with zlib
    (alternated, twice each; the second round printed)."""
    import pneumobatch.io.readers.dicom as dicom_reader
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.testing.synthetic import write_cxr

    fast = dicom_reader.inflate_codec()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "deflated.dcm"
        write_cxr(path, pixels, "deflate", bits_stored=12)
        times, images = {}, {}
        original = dicom_reader.inflate_codec
        try:
            for codec in (fast, zlib, fast, zlib):
                dicom_reader.inflate_codec = lambda c=codec: c
                times[codec.__name__] = ms(lambda: dicom_reader.read_dicom(path, ReadOptions()), repeat)
                images[codec.__name__] = dicom_reader.read_dicom(path, ReadOptions()).pixels
        finally:
            dicom_reader.inflate_codec = original
        same = bool(np.array_equal(images[fast.__name__], images["zlib"]))
        row("whole deflated read", fast.__name__.split(".")[0], times[fast.__name__], "zlib", times["zlib"], same)


if __name__ == "__main__":
    main()
