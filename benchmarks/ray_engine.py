"""Local engine vs Ray engine on this machine, and the per-stage rates behind a cluster estimate.

    python benchmarks/ray_engine.py [--size 1024] [--per-encoding 10] [--model pneumonia]

On one folder of generated DICOMs (the encodings of ``benchmarks/throughput.py``), in one
run: images/s of ``run_predict`` with the local engine and with the Ray engine (a local Ray
instance using every core, started beforehand and timed apart), their ratio, the Ray
engine's fixed cost per run (a run on a single file), and the per-stage rates a cluster
estimate is built from: decode + resize in one process (one core), the model forward pass
on this CPU, and the driver's rate of turning results into journal rows. Finally the
expected throughput on N nodes, each stage scaled by what a node has (the GPU forward rate
is a parameter: no GPU was available where these figures were first taken).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from decode import chest_like  # noqa: E402 - the benchmarks' shared test image

from pneumobatch.core.errors import Status
from pneumobatch.io.discovery import walk
from pneumobatch.io.predictions import OutputPaths, PredictionWriter, columns_for, result_rows
from pneumobatch.io.results import FileResult
from pneumobatch.model.inference import create_predictor
from pneumobatch.model.registry import load_model
from pneumobatch.predict import run_predict
from pneumobatch.predict_config import PredictConfig
from pneumobatch.testing.synthetic import ENCODINGS, write_cxr


def make_studies(folder: Path, size: int, per_encoding: int, encodings: tuple[str, ...]) -> None:
    """``per_encoding`` chest-like DICOMs of ``size`` x ``size`` in each encoding."""
    for encoding in encodings:
        for i in range(per_encoding):
            pixels = np.roll(chest_like(size, seed=i), i * size // 29, axis=1)
            if encoding == "jpeg-baseline":
                write_cxr(folder / f"{encoding}_{i}.dcm", (pixels >> 4).astype(np.uint8), encoding)
            else:
                write_cxr(folder / f"{encoding}_{i}.dcm", pixels, encoding, bits_stored=12, window=(2048.0, 3600.0))


def decode_rate(entries, size: int, reduced: bool = True, workers: int = 0) -> float:
    """images/s of reading and preparing ``entries`` in this process (as one of predict's workers)."""
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.model.decoding import read_entry
    from pneumobatch.model.preprocess import InputSpec

    options = ReadOptions(min_side=size if reduced else None)
    t0 = time.perf_counter()
    n = sum(read_entry(e, [InputSpec(size)], options)["inputs"] is not None for e in entries)
    return n / (time.perf_counter() - t0)


def timed_predict(folder: Path, out: Path, args: argparse.Namespace, **options) -> tuple[float, int]:
    """Seconds of one ``run_predict`` and the files it predicted."""
    config = PredictConfig(
        inputs=[folder],
        output=out,
        models=[args.model],
        batch_size=args.batch_size,
        workers=args.workers,
        overwrite=True,
        **options,
    )
    t0 = time.perf_counter()
    run = run_predict(config)
    seconds = time.perf_counter() - t0
    if run.counts["ok"] != run.counts["files"]:
        raise SystemExit(f"predict failed: {run.counts}")
    return seconds, run.counts["files"]


def forward_rate(predictor, size: int, batch_size: int, batches: int) -> float:
    """Images/s of the model call predict makes (normalisation, forward pass, softmax) on
    uint8 batches, after one warm-up batch (which also loads or exports the ONNX model)."""
    x = {
        size: torch.randint(
            0, 256, (batch_size, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
    }
    predictor(x)
    t0 = time.perf_counter()
    for _ in range(batches):
        predictor(x)
    return batches * batch_size / (time.perf_counter() - t0)


def driver_rate(entries, model, n_results: int, batch_size: int, folder: Path) -> float:
    """Results per second the driver turns into fsynced journal rows (its share of any run)."""
    cards = [model.card]
    probs = {model.card.name: np.array([0.3, 0.7], dtype=np.float32)}
    results = [FileResult(entries[i % len(entries)], Status.OK, probs=probs) for i in range(n_results)]
    paths = OutputPaths(folder / "driver.csv")
    t0 = time.perf_counter()
    with PredictionWriter(paths, columns_for(cards, False), resume=False, overwrite=True) as writer:
        batch: list[dict] = []
        for result in results:
            batch += result_rows(result, cards, "file", False)
            if len(batch) >= batch_size:
                writer.append(batch)
                batch = []
        writer.append(batch)
    return n_results / (time.perf_counter() - t0)


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--per-encoding", type=int, default=10)
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--model", default="pneumonia")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--workers", type=int, default=None, help="local engine's decoding processes (default: predict's)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="local and Ray runs, interleaved; the fastest of each counts"
    )
    parser.add_argument(
        "--gpu-rate",
        type=float,
        default=1000.0,
        help="model forward images/s on one GPU for the estimate (an assumption unless measured)",
    )
    parser.add_argument("--cores-per-node", type=int, default=16)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    args = parser.parse_args()

    import ray

    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "studies"
        folder.mkdir()
        make_studies(folder, args.size, args.per_encoding, tuple(args.encodings.split(",")))
        entries = [e for _, e in walk([folder])]
        single = Path(tmp) / "single"
        single.mkdir()
        (single / entries[0].path.name).write_bytes(entries[0].path.read_bytes())
        n = len(entries)
        print(
            f"{n} DICOMs of {args.size}x{args.size} ({args.encodings}); model {model.card.name} "
            f"({model.card.architecture} @ {model.card.input_size}px), batch {args.batch_size}"
        )

        t0 = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False)
        start_s = time.perf_counter() - t0
        cpus = int(ray.cluster_resources().get("CPU", 0))
        local_s = ray_s = single_s = float("inf")
        for _ in range(args.repeat):  # interleaved: a shared machine's load shifts between runs
            single_s = min(single_s, timed_predict(single, Path(tmp) / "single.csv", args, engine="ray")[0])
            local_s = min(local_s, timed_predict(folder, Path(tmp) / "local.csv", args)[0])
            ray_s = min(ray_s, timed_predict(folder, Path(tmp) / "ray.csv", args, engine="ray")[0])
        ray.shutdown()

        decode_core = decode_rate(entries, model.card.input_size, reduced=True, workers=0)
        predictor = create_predictor([model], torch.device("cpu"), "fp32")
        forward_cpu = forward_rate(predictor, model.card.input_size, args.batch_size, max(2, n // args.batch_size))
        driver = driver_rate(entries, model, 20_000, args.batch_size, Path(tmp))

    local_rate, ray_rate = n / local_s, n / ray_s
    marginal = f"{(n - 1) / (ray_s - single_s):7.1f} images/s" if ray_s > single_s else "not measurable (noise)"
    print(f"fastest of {args.repeat} interleaved runs each (start-up once):")
    workers = f"{args.workers} workers" if args.workers is not None else "default split"
    print(f"local engine ({workers}):{' ' * max(1, 26 - len(workers))}{local_rate:7.1f} images/s ({local_s:.1f} s)")
    print(f"Ray engine (local Ray, {cpus} CPUs, 1 CPU actor): {ray_rate:7.1f} images/s ({ray_s:.1f} s)")
    print(f"local / Ray (Ray's overhead on this machine):  {local_rate / ray_rate:7.2f}x")
    print(f"Ray start-up (ray.init, once per job):         {start_s:7.1f} s")
    print(f"Ray run on a single file (fixed cost per run): {single_s:7.1f} s")
    print(f"Ray marginal rate beyond the fixed cost:       {marginal}")
    print("per-stage rates on this machine:")
    print(f"  decode + resize, one process (per core):     {decode_core:7.1f} images/s")
    print(f"  model forward on this CPU ({torch.get_num_threads()} threads):       {forward_cpu:7.1f} images/s")
    print(f"  driver: results -> journal rows:             {driver:7.0f} results/s")
    per_node = min(args.cores_per_node * decode_core, args.gpus_per_node * args.gpu_rate)
    print(
        f"estimate, nodes of {args.cores_per_node} cores + {args.gpus_per_node} GPU(s) at an assumed "
        f"{args.gpu_rate:.0f} images/s each:"
    )
    for nodes in (1, 2, 4, 8, 16, 32):
        print(
            f"  {nodes:>2} node(s): {min(nodes * per_node, driver):8.0f} images/s"
            f"{'  (driver-bound)' if nodes * per_node > driver else ''}"
        )
    fixed = start_s + single_s
    print(f"pays off (fixed cost {fixed:.0f} s: start-up + a one-file run) once a job has more images than:")
    for nodes in (2, 4, 16):
        cluster = min(nodes * per_node, driver)
        print(
            f"  {nodes:>2} nodes vs one such node on the local engine (at best {per_node:.0f} images/s): "
            f"{fixed / (1 / per_node - 1 / cluster):8,.0f}"
        )


if __name__ == "__main__":
    main_()
