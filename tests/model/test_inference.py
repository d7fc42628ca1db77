"""How predict splits the machine by default (inference.default_split): from the cores at hand."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumobatch.model.device import available_cores, default_split
from pneumobatch.model.preprocess import InputSpec, input_spec
from tests.helpers import ROOT


def test_available_cores_is_the_affinity_mask():
    assert available_cores() == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize("cores, workers, threads", [(1, 0, 1), (2, 2, 1), (3, 3, 1), (4, 4, 1), (16, 16, 4)])
def test_cpu_decodes_on_every_core_and_gives_the_network_a_quarter(cores: int, workers: int, threads: int):
    """One worker per core; a single core decodes in the main process (no hand-over)."""
    split = default_split(torch.device("cpu"), cores)
    assert (split.workers, split.threads, split.batch_size) == (workers, threads, 16)


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 1), (16, 15)])
def test_cuda_decodes_on_every_core_but_one_with_larger_batches(cores: int, workers: int):
    split = default_split(torch.device("cuda"), cores)
    assert (split.workers, split.threads, split.batch_size) == (workers, 1, 64)


def test_default_is_taken_from_this_machine():
    assert default_split(torch.device("cpu")) == default_split(torch.device("cpu"), available_cores())


def test_onnxruntime_gives_the_shipped_models_probabilities_and_applicability_scores():
    pytest.importorskip("onnxruntime")
    from pneumobatch.model.inference import Predictor
    from pneumobatch.model.registry import load_model

    cpu = torch.device("cpu")
    models = [load_model("pneumonia")]  # etiology has the same architecture
    applicability = {m.card.name: m.applicability for m in models}
    assert all(applicability.values())
    spec = input_spec(models[0].card)
    s = spec.size
    inputs = {spec: torch.randint(0, 256, (5, 1, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))}
    eager, onnx = (
        Predictor(models, cpu, None, applicability, backend="torch"),
        Predictor(models, cpu, None, applicability),
    )
    assert (eager.backend, onnx.backend) == ("torch", "onnxruntime")
    eager_scores: dict = {}
    onnx_scores: dict = {}
    expected, got = eager(inputs, eager_scores), onnx(inputs, onnx_scores)
    np.testing.assert_allclose(got["pneumonia"], expected["pneumonia"], atol=1e-5)
    np.testing.assert_allclose(onnx_scores["pneumonia"], eager_scores["pneumonia"], rtol=1e-4)


def test_precision_or_gpu_keeps_pytorch():
    from pneumobatch.model.device import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "torch"
    assert resolve_backend("auto", torch.device("cuda"), None) == "torch"
    assert resolve_backend("torch", torch.device("cpu"), None) == "torch"


def test_backend_option_chooses_the_forward_pass_and_refuses_what_cannot_run(weights_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    import json

    import pandas as pd
    from click.testing import CliRunner

    from pneumobatch.cli import main
    from pneumobatch.testing.synthetic import write_cxr

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(4):
        write_cxr(tmp_path / "in" / f"{i}.dcm", rng.integers(0, 4096, (96, 96)).astype(np.uint16), bits_stored=12)
    base = [
        "predict",
        str(tmp_path / "in"),
        "-m",
        "tiny",
        "--weights-dir",
        str(weights_dir),
        "--quiet",
        "--device",
        "cpu",
    ]
    probs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.csv"
        result = CliRunner().invoke(main, base + ["--backend", backend, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads(out.with_suffix(".run.json").read_text())["backend"] == backend
        probs[backend] = pd.read_csv(out).sort_values("path")["prob_pneumonia"].to_numpy()
    np.testing.assert_allclose(probs["onnxruntime"], probs["torch"], atol=2e-6)
    refused = CliRunner().invoke(
        main, base + ["--backend", "onnxruntime", "--precision", "bf16", "-o", str(tmp_path / "x.csv")]
    )
    assert refused.exit_code == 2 and refused.output.count("\n") == 1 and "fp32 on the CPU only" in refused.output
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_forward_batches_are_full_and_results_keep_discovery_order_whatever_fails(weights_dir, tmp_path, workers: int):
    """Workers decode a few files per task; the network still sees batches of exactly
    --batch-size decoded files, and every file (decoded or not) comes back in order with its
    own probabilities."""
    from PIL import Image

    from pneumobatch.io.discovery import walk
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.model.inference import DECODE_CHUNK, Predictor, run_inference
    from pneumobatch.model.registry import load_model

    rng = np.random.default_rng(1)
    broken = {2, 3, 9, 17, 18, 19, 20, 21, 30}  # a run of broken files longer than a decoding task
    for i in range(33):
        if i in broken:
            (tmp_path / f"{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        else:
            Image.fromarray(rng.integers(0, 256, (40 + i, 48), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    entries = [e for _, e in walk([tmp_path])]
    model = load_model("tiny", weights_dir)
    batches: list[int] = []

    class Recording(Predictor):
        def __call__(self, inputs, scores=None, cams=None):
            batches.append(len(next(iter(inputs.values()))))
            return super().__call__(inputs, scores, cams)

    cpu = torch.device("cpu")
    results = list(
        run_inference(
            entries, Recording([model], cpu, None, backend="torch"), ReadOptions(), batch_size=7, workers=workers
        )
    )
    assert DECODE_CHUNK < 7
    assert [r.entry.path.name for r in results] == [f"{i:03d}.png" for i in range(33)]
    assert [i for i, r in enumerate(results) if not r.probs] == sorted(broken)
    assert batches == [7, 7, 7, 3]  # 24 decoded files
    one_by_one = {
        r.entry.path.name: r.probs["tiny"]
        for r in run_inference(
            entries, Predictor([model], cpu, None, backend="torch"), ReadOptions(), batch_size=1, workers=0
        )
        if r.probs
    }
    for r in results:
        if r.probs:
            np.testing.assert_allclose(r.probs["tiny"], one_by_one[r.entry.path.name], atol=1e-5)


def test_workers_never_hand_the_main_process_file_descriptors(tmp_path, monkeypatch):
    """Decoded pixels come back through the worker's pipe. Shared-memory tensors made each
    worker serve file descriptors on a side connection; a SIGTERM to the main process in the
    middle of that handshake made the worker print a traceback to the user's terminal (seen
    in CI). A worker records, before each file, whether it has started such a server."""
    from multiprocessing import resource_sharer

    from PIL import Image

    from pneumobatch.io.discovery import walk
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.model.inference import StudyFiles, make_loader

    ramp = np.add.outer(np.arange(40), np.arange(48)).astype(np.uint8)  # 0..86
    for i in range(16):
        Image.fromarray(ramp + 10 * i).save(tmp_path / f"{i:02d}.png")
    entries = [e for _, e in walk([tmp_path])]
    read = StudyFiles.__getitem__

    def recording(self, index):
        item = read(self, index)
        item["meta"]["fd_server"] = getattr(resource_sharer._resource_sharer, "_listener", None) is not None
        return item

    monkeypatch.setattr(StudyFiles, "__getitem__", recording)  # workers fork after this
    seen, pixels = [], []
    for items, inputs, _ in make_loader(entries, [InputSpec(32)], ReadOptions(), batch_size=2, workers=2):
        seen += [item["meta"]["fd_server"] for item in items]
        pixels += [int(x[0, 0, 0]) for x in inputs[InputSpec(32)]]
    assert len(seen) == 16 and not any(seen)
    assert len(pixels) == 16 and all(
        b - a == 10 for a, b in zip(pixels, pixels[1:])
    )  # each file's own pixels, in order


def test_the_onnx_export_is_cached_by_weights_and_a_damaged_cache_file_is_replaced(weights_dir, tmp_path, monkeypatch):
    """A second run loads the export instead of exporting again and gives the same numbers;
    other weights get their own file; a damaged file, or an export of other weights put in
    its place, is exported again; an unwritable cache folder costs only the export."""
    pytest.importorskip("onnxruntime")
    from pneumobatch.model.inference import Predictor
    from pneumobatch.model.onnx import cache_dir
    from pneumobatch.model.registry import load_model

    monkeypatch.setenv("PNEUMOBATCH_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    cpu = torch.device("cpu")
    inputs = {
        InputSpec(32): torch.randint(
            0, 256, (3, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
    }
    first = Predictor([load_model("tiny", weights_dir)], cpu, None)
    expected = first(inputs)["tiny"]
    files = sorted((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(files) == 1 and files[0].stat().st_size > 0

    exports = []
    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    np.testing.assert_array_equal(Predictor([load_model("tiny", weights_dir)], cpu, None)(inputs)["tiny"], expected)
    assert exports == []

    changed = load_model("tiny", weights_dir)
    with torch.no_grad():
        list(changed.net.parameters())[-1].add_(torch.tensor([1.0, -1.0]))  # the classifier's bias
    assert np.abs(Predictor([changed], cpu, None)(inputs)["tiny"] - expected).max() > 0.1
    assert exports == [1] and len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 2

    other = next(f for f in (tmp_path / "cache" / "onnx").glob("*.onnx") if f != files[0])
    files[0].write_bytes(other.read_bytes())  # a valid export of other weights under this name
    np.testing.assert_allclose(
        Predictor([load_model("tiny", weights_dir)], cpu, None)(inputs)["tiny"], expected, atol=1e-6
    )
    assert exports == [1, 1] and files[0].read_bytes() != other.read_bytes()

    files[0].write_bytes(b"not an onnx model")
    np.testing.assert_allclose(
        Predictor([load_model("tiny", weights_dir)], cpu, None)(inputs)["tiny"], expected, atol=1e-6
    )
    assert exports == [1, 1, 1] and files[0].stat().st_size > 100

    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("PNEUMOBATCH_CACHE", str(blocked))
    np.testing.assert_allclose(
        Predictor([load_model("tiny", weights_dir)], cpu, None)(inputs)["tiny"], expected, atol=1e-6
    )
    monkeypatch.setenv("PNEUMOBATCH_CACHE", "off")
    assert cache_dir() is None


def test_the_onnx_cache_keeps_the_most_recently_used_exports_and_nothing_else_is_touched(
    weights_dir, tmp_path, monkeypatch
):
    """A site that retrains monthly must not fill its disk with exports: writing a new one
    deletes all but the ONNX_CACHE_KEEP most recently used (a cache hit counts as a use);
    files the cache did not name are left alone."""
    pytest.importorskip("onnxruntime")
    import os

    from pneumobatch.model.inference import Predictor
    from pneumobatch.model.onnx import ONNX_CACHE_KEEP
    from pneumobatch.model.registry import load_model

    folder = tmp_path / "cache" / "onnx"
    monkeypatch.setenv("PNEUMOBATCH_CACHE", str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    Predictor([load_model("tiny", weights_dir)], cpu, None).prepare()
    (used,) = folder.glob("*.onnx")
    old = []
    for i in range(ONNX_CACHE_KEEP + 2):  # exports of other weights, used 1..10 days ago
        path = folder / f"{i:064x}.onnx"
        path.write_bytes(b"an old export")
        os.utime(path, (0, 1e9 - 86400 * (i + 1)))
        old.append(path)
    mine = folder / "notes.onnx"
    mine.write_text("not the cache's")
    os.utime(mine, (0, 1))
    os.utime(used, (0, 1))  # used long ago ...
    Predictor([load_model("tiny", weights_dir)], cpu, None).prepare()  # ... and now: a hit
    assert used.stat().st_mtime > 1e9

    changed = load_model("tiny", weights_dir)
    with torch.no_grad():
        list(changed.net.parameters())[-1].add_(1.0)
    Predictor([changed], cpu, None).prepare()  # a new export: the cache is pruned
    left = set(folder.iterdir())
    new = left - set(old) - {used, mine}
    assert len(new) == 1 and used in left and mine in left
    assert left & set(old) == set(old[: ONNX_CACHE_KEEP - 2])  # the most recently used of the old ones


def test_predict_gives_the_callers_torch_threads_back(weights_dir, tmp_path):
    """A library caller's thread setting survives a run that used --threads 1."""
    from PIL import Image

    from pneumobatch.predict import run_predict
    from pneumobatch.predict_config import PredictConfig

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)).save(tmp_path / "a.png")
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        run = run_predict(
            PredictConfig(
                inputs=[tmp_path],
                output=tmp_path / "out" / "p.csv",
                models=["tiny"],
                weights_dir=weights_dir,
                workers=0,
                threads=1,
            )
        )
        assert run.exit_code == 0 and torch.get_num_threads() == 3
        json_path = tmp_path / "out" / "p.run.json"
        assert '"threads": 1' in json_path.read_text()
    finally:
        torch.set_num_threads(previous)


def test_the_model_layer_decides_applicability_as_the_csv_did():
    """``ApplicabilityStats.flag`` (``score <= threshold``) with the card's threshold is the rule the
    CSV writer applied inline before (``score <= card.applicability["threshold"]``), to the bit."""
    from pneumobatch.io.discovery import walk
    from pneumobatch.io.readers import ReadOptions
    from pneumobatch.model.inference import Predictor, run_inference
    from pneumobatch.model.registry import load_model

    model = load_model("pneumonia")
    card, stats = model.card, model.applicability
    threshold = float(card.applicability["threshold"])
    assert stats.threshold == threshold
    edge = np.array([threshold, np.nextafter(threshold, np.inf), np.nextafter(threshold, -np.inf), np.nan, 0.0])
    predictor = Predictor([model], torch.device("cpu"), None, {card.name: stats}, backend="torch")
    flags = predictor.applicable({card.name: edge})[card.name]
    assert flags.tolist() == [bool(s <= threshold) for s in edge] == [True, False, True, False, True]

    samples = ROOT / "sample_studies"  # holds a flagged CT slice
    entries = [entry for _, entry in walk([samples])]
    results = list(run_inference(entries, predictor, ReadOptions(), batch_size=4, workers=0))
    scored = [r for r in results if r.ood_scores]
    assert scored
    for result in scored:
        score = result.ood_scores[card.name]
        assert result.applicable == {card.name: bool(score <= threshold)}
    assert {r.applicable[card.name] for r in scored} == {True, False}
    assert all(not r.applicable for r in results if not r.ood_scores)


def test_the_cards_applicability_threshold_is_the_one_images_are_flagged_by(tmp_path: Path):
    """A card edited by hand flags by its own threshold, as the CSV did; a threshold that is no number is refused."""
    import json
    import shutil

    from pneumobatch.core.errors import ModelError
    from pneumobatch.model.registry import default_weights_dir, load_model

    for name in ("pneumonia.json", "pneumonia.safetensors", "pneumonia.applicability.safetensors"):
        shutil.copy(default_weights_dir() / name, tmp_path / name)
    card_path = tmp_path / "pneumonia.json"
    card = json.loads(card_path.read_text())
    card["applicability"]["threshold"] = 0.75
    card_path.write_text(json.dumps(card))
    stats = load_model("pneumonia", tmp_path).applicability
    assert stats.threshold == 0.75 and stats.flag(np.array([0.75, 0.76])).tolist() == [True, False]
    card["applicability"]["threshold"] = "high"
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelError, match="applicability threshold 'high' is not a number"):
        load_model("pneumonia", tmp_path)


_ORPHAN = """
import os, sys, time
from pneumobatch.model.inference import end_with_parent
parent = os.getpid()
for delay in (0.0, 1.0):  # 0: the parent is still there; 1: it is dead before the worker arms itself
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # the test reads the parent's stdout to its end
        time.sleep(delay)
        end_with_parent(parent)
        time.sleep(60)  # "whatever it is doing"
        os._exit(0)
    print(pid, flush=True)
time.sleep(0.5)
os.kill(parent, 9)  # kill -9 of the main process
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_decoding_worker_ends_within_two_seconds_of_its_parents_kill_9():
    """``end_with_parent`` (the workers' init): a worker dies with its parent whatever it is
    doing, also when the parent died before the worker armed itself (an orphan already)."""
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _ORPHAN], capture_output=True, env=env, timeout=60)
    workers = [int(line) for line in proc.stdout.split()]
    try:
        assert proc.returncode == -signal.SIGKILL and len(workers) == 2, proc.stderr.decode()
        deadline = time.monotonic() + 2.5  # the second one arms itself 1 s after its fork
        while time.monotonic() < deadline and any(_running(w) for w in workers):
            time.sleep(0.05)
        assert not [w for w in workers if _running(w)], "workers outlived their parent"
    finally:
        for w in workers:
            if _running(w):
                os.kill(w, signal.SIGKILL)


_KILLED_EXPORT = """
import os, sys, time
from pathlib import Path
import torch
from pneumobatch.model.inference import Predictor
from pneumobatch.model.registry import load_model

def slow_disk(fd):  # the export is written; the kill lands before its rename
    print("writing", flush=True)
    time.sleep(60)

os.fsync = slow_disk
Predictor([load_model("tiny", Path(sys.argv[1]))], torch.device("cpu"), None).prepare()
"""


@pytest.mark.slow
def test_a_writer_killed_while_caching_an_export_leaves_nothing_the_next_run_trips_on(
    weights_dir, tmp_path, monkeypatch
):
    """``kill -9`` of a run writing the ONNX cache: no half export under the cache's name (the
    rename is atomic), and its temporary file (13 MB for EfficientNet-Lite0) is deleted by a
    later run, whether that run exports (a miss) or finds the export (a hit)."""
    pytest.importorskip("onnxruntime")
    import subprocess
    import sys

    from pneumobatch.model.inference import Predictor
    from pneumobatch.model.onnx import STALE_TEMP_SECONDS
    from pneumobatch.model.registry import load_model

    cache = tmp_path / "cache"
    env = dict(os.environ, PNEUMOBATCH_CACHE=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT, str(weights_dir)], stdout=subprocess.PIPE, env=env)
    try:
        assert writer.stdout.readline() == b"writing\n"
    finally:
        writer.kill()
        writer.wait(10)
    folder = cache / "onnx"
    (left,) = folder.iterdir()
    assert left.name.startswith(".") and ".onnx.tmp-" in left.name and not list(folder.glob("*.onnx"))
    night = left.stat().st_mtime - STALE_TEMP_SECONDS - 3600
    os.utime(left, (night, night))  # the next night

    monkeypatch.setenv("PNEUMOBATCH_CACHE", str(cache))
    cpu = torch.device("cpu")
    inputs = {
        InputSpec(32): torch.randint(
            0, 256, (2, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
    }
    expected = Predictor([load_model("tiny", weights_dir)], cpu, None, backend="torch")(inputs)["tiny"]
    np.testing.assert_allclose(
        Predictor([load_model("tiny", weights_dir)], cpu, None)(inputs)["tiny"], expected, atol=1e-5
    )
    (export,) = folder.iterdir()  # a miss: exported, cached whole, the killed writer's file deleted
    assert not export.name.startswith(".")

    stale = folder / ("." + export.name + ".tmp-abcd1234")
    stale.write_bytes(b"half an export")
    os.utime(stale, (night, night))
    fresh = folder / ("." + export.name + ".tmp-efgh5678")
    fresh.write_bytes(b"another run writing now")
    Predictor([load_model("tiny", weights_dir)], cpu, None).prepare()  # a hit
    assert set(folder.iterdir()) == {export, fresh}  # a writer at work now is left alone
