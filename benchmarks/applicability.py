"""How often the applicability flag fires: on held-out chest X-rays and on non-chest images.

    python benchmarks/applicability.py ../shared/datasets/cxr/manifest.csv -m pneumonia -m etiology

In-distribution: the manifest's test split (never used to fit or to set the
threshold). Out-of-distribution, from what is installed here (no downloads):
CT/MR/ultrasound/secondary-capture images bundled with pydicom, matplotlib's
sample photographs and pictures, and the test chest images rotated 90/180 degrees,
inverted, or cropped to a corner. Prints one table row per set and model: n and
the share flagged (score above the model's threshold).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch

from pneumobatch.applicability import ApplicabilityStats, extract_features
from pneumobatch.models import load_model
from pneumobatch.preprocess import resize, to_uint8
from pneumobatch.readers import ReadOptions
from pneumobatch.readers.raster import read_raster
from pneumobatch.train import TrainConfig, decode_split, load_labels, remove_leakage


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = np.percentile(a, 0.5), np.percentile(a, 99.5)
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)


def dicom_images(size: int) -> list[np.ndarray]:
    folder = Path(pydicom.data.__file__).parent / "test_files"
    out = []
    for path in sorted(folder.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array
        except Exception:
            continue
        if arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            arr = arr[0]
        if arr.ndim == 3:
            arr = arr[..., :3].mean(-1)
        if min(arr.shape) < 16:
            continue
        out.append(to_uint8(resize(_minmax(arr), size)))
    return out


def picture_images(size: int) -> list[np.ndarray]:
    import matplotlib

    folder = Path(matplotlib.__file__).parent / "mpl-data"
    out = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg") and path.stat().st_size > 2000:
            try:
                image = read_raster(path, ReadOptions(min_side=size))
            except Exception:
                continue
            if min(image.pixels.shape) >= 32:
                out.append(to_uint8(resize(image.pixels, size)))
    ima = folder / "sample_data" / "s1045.ima.gz"
    if ima.exists():
        raw = np.frombuffer(gzip.decompress(ima.read_bytes()), np.uint16)
        side = int(np.sqrt(raw.size))
        out.append(to_uint8(resize(_minmax(raw[: side * side].reshape(side, side)), size)))
    return out


def transformed(images: torch.Tensor) -> dict[str, torch.Tensor]:
    s = images.shape[-1]
    corner = torch.nn.functional.interpolate(images[..., : s // 3, : s // 3].float(), size=(s, s), mode="bilinear")
    return {
        "test chest rotated 90°": torch.rot90(images, 1, (2, 3)),
        "test chest upside down": torch.flip(images, (2,)),
        "test chest inverted": 255 - images,
        "test chest, corner crop (1/9)": corner.round().clamp(0, 255).to(torch.uint8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("-m", "--model", action="append", default=None)
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for name in args.model or ["pneumonia"]:
        loaded = load_model(name, args.weights_dir)
        card = loaded.card
        stats = ApplicabilityStats.load(loaded.weights_path.with_name(f"{card.name}.applicability.safetensors"))
        config = TrainConfig(data=args.manifest, out_dir=args.manifest.parent, name=card.name, task=card.task)
        frame, task, _ = load_labels(config)
        frame, _ = remove_leakage(frame)
        test, _ = decode_split(frame[frame["split"] == "test"], task, card.input_size, args.workers)
        size = card.input_size
        sets = {"test chest X-rays (in distribution)": test.images}
        sets.update(transformed(test.images))
        sets["pydicom CT/MR/US/SC images"] = torch.from_numpy(np.stack(dicom_images(size))[:, None])
        sets["photographs and pictures (matplotlib)"] = torch.from_numpy(np.stack(picture_images(size))[:, None])
        for label, images in sets.items():
            flagged = ~stats.flag(stats.score(extract_features(loaded, images)))
            parts = {label: flagged}
            if label.startswith("test chest X-rays"):  # in distribution: also per source
                sources = test.frame["source"].astype(str).str.split(" \\(").str[0].to_numpy()
                parts.update({f"  test chest, {src}": flagged[sources == src] for src in sorted(set(sources))})
            for name, part in parts.items():
                rows.append({"model": card.name, "set": name, "n": len(part), "flagged": round(float(part.mean()), 3)})
                print(f"{card.name:10s} {name:50s} n={len(part):4d} flagged {part.mean():6.1%}", flush=True)
    print()
    print(pd.DataFrame(rows).pivot(index="set", columns="model", values="flagged").to_string())


if __name__ == "__main__":
    main()
