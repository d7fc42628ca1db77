"""How often the applicability flag fires: on held-out chest X-rays and on non-chest images.

    python benchmarks/applicability.py ../shared/datasets/cxr/manifest.csv -m pneumonia -m etiology

In-distribution: the manifest's test split (never used to fit or to set the
threshold). Out-of-distribution, from what is installed here (no downloads):
CT/MR/ultrasound/secondary-capture images bundled with pydicom, matplotlib's
sample photographs and pictures, scikit-image's bundled sample images when it is
installed (``pip install scikit-image``: photographs, textures, text, a fundus photo,
microscopy, a CT phantom), and the test chest images rotated by 90, 180 or 270
degrees, flipped upside down, grey-inverted, or cropped to a corner. Prints one
table row per set and model: n and the share flagged (score above the model's
threshold). ``--record`` writes the table into each model card
(``applicability.measured``), with the command and the date.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch

from pneumobatch.io.readers import ReadOptions
from pneumobatch.io.readers.raster import read_raster
from pneumobatch.model.applicability.features import extract_features
from pneumobatch.model.preprocess import resize, to_uint8
from pneumobatch.model.registry import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend_agreement import decoded_split  # noqa: E402 - the benchmarks' shared split loader


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


def raster_images(paths, size: int) -> list[np.ndarray]:
    """The PNG/JPEG files among ``paths`` that read and are at least 32 px, at ``size``."""
    out = []
    for path in sorted(paths):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            try:
                image = read_raster(path, ReadOptions(min_side=size))
            except Exception:
                continue
            if min(image.pixels.shape) >= 32:
                out.append(to_uint8(resize(image.pixels, size)))
    return out


def picture_images(size: int) -> list[np.ndarray]:
    import matplotlib

    folder = Path(matplotlib.__file__).parent / "mpl-data"
    out = raster_images((p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 2000), size)
    ima = folder / "sample_data" / "s1045.ima.gz"
    if ima.exists():
        raw = np.frombuffer(gzip.decompress(ima.read_bytes()), np.uint16)
        side = int(np.sqrt(raw.size))
        out.append(to_uint8(resize(_minmax(raw[: side * side].reshape(side, side)), size)))
    return out


def skimage_images(size: int) -> list[np.ndarray]:
    try:
        import skimage
    except ImportError:
        return []
    return raster_images((Path(skimage.__file__).parent / "data").iterdir(), size)


def transformed(images: torch.Tensor) -> dict[str, torch.Tensor]:
    s = images.shape[-1]
    corner = torch.nn.functional.interpolate(images[..., : s // 3, : s // 3].float(), size=(s, s), mode="bilinear")
    return {
        "test chest rotated 90°": torch.rot90(images, 1, (2, 3)),
        "test chest rotated 180°": torch.rot90(images, 2, (2, 3)),
        "test chest rotated 270°": torch.rot90(images, 3, (2, 3)),
        "test chest upside down (flipped)": torch.flip(images, (2,)),
        "test chest inverted": 255 - images,
        "test chest, corner crop (1/9)": corner.round().clamp(0, 255).to(torch.uint8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("-m", "--model", action="append", default=None)
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="write the flag rates into each model card")
    args = parser.parse_args()
    rows = []
    loaded_models = {}
    for name in args.model or ["pneumonia"]:
        loaded = load_model(name, args.weights_dir)
        card = loaded.card
        loaded_models[card.name] = loaded
        stats = loaded.applicability  # verified against the card's SHA-256 when the model loaded
        if stats is None:
            raise SystemExit(f"model {card.name} has no applicability statistics (pneumobatch fit-applicability)")
        test = decoded_split(card, args.manifest, "test", args.workers)
        size = card.input_size
        sets = {"test chest X-rays (in distribution)": test.images}
        sets.update(transformed(test.images))
        sets["pydicom CT/MR/US/SC images"] = torch.from_numpy(np.stack(dicom_images(size))[:, None])
        sets["photographs and pictures (matplotlib)"] = torch.from_numpy(np.stack(picture_images(size))[:, None])
        if extra := skimage_images(size):
            sets["scikit-image sample images"] = torch.from_numpy(np.stack(extra)[:, None])
        for label, images in sets.items():
            flagged = ~stats.flag(stats.score(extract_features(loaded, images)))
            parts = {label: flagged}
            if label.startswith("test chest X-rays"):  # in distribution: also per source
                sources = test.frame["source"].astype(str).str.split(" \\(").str[0].to_numpy()
                parts.update({f"  test chest, {src}": flagged[sources == src] for src in sorted(set(sources))})
            for name, part in parts.items():
                rows.append({"model": card.name, "set": name, "n": len(part), "flagged": round(float(part.mean()), 4)})
                print(f"{card.name:10s} {name:50s} n={len(part):4d} flagged {part.mean():6.1%}", flush=True)
    print()
    table = pd.DataFrame(rows)
    print(table.pivot(index="set", columns="model", values="flagged").to_string())
    if args.record:
        record(loaded_models, table, args)


def record(loaded_models: dict, table: pd.DataFrame, args: argparse.Namespace) -> None:
    """Write each model's rows into its card as ``applicability.measured``."""
    from datetime import date

    from pneumobatch.model.registry import write_card

    command = "python benchmarks/applicability.py " + " ".join(sys.argv[1:])
    for name, loaded in loaded_models.items():
        mine = table[table["model"] == name]
        loaded.card.applicability["measured"] = {
            "command": command.replace(" --record", ""),
            "date": date.today().isoformat(),
            "test_split": "the manifest's test split (never used to fit the statistics or set the threshold)",
            "flagged": {row.set.strip(): {"n": int(row.n), "share": float(row.flagged)} for row in mine.itertuples()},
        }
        write_card(loaded.card, loaded.weights_path.with_suffix(".json"))
        print(f"recorded the flag rates in {loaded.weights_path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
