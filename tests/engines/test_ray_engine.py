"""``predict --engine ray``: the same rows as the local engine, on a local Ray instance.

One Ray instance (2 CPUs) serves the whole module: starting Ray is the slow part. Worker
deaths are injected by a setup hook that Ray runs in every worker process: it wraps the
reader and the model call so that the first process to find an "armed" marker file
renames it and dies on the spot (``os._exit``), as a node losing power would.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from click.testing import CliRunner
from PIL import Image
from pydicom.uid import generate_uid

from pneumobatch.cli import main
from pneumobatch.core.errors import EXIT_FILE_ERRORS, EXIT_USAGE, Status
from pneumobatch.predict import run_predict
from pneumobatch.predict_config import PredictConfig
from pneumobatch.testing.synthetic import write_cxr

CRASH_DIR = "PNEUMOBATCH_TEST_CRASH_DIR"  # where the armed/fired markers live (set for Ray workers)
BATCH = 3


def _die_once_when_armed() -> None:
    """Ray worker setup hook: a reader or model call dies once per armed marker."""
    import pneumobatch.model.inference as inference

    folder = Path(os.environ[CRASH_DIR])

    def dying(original, name: str):
        def call(self, *args, **kwargs):
            try:
                os.rename(folder / f"{name}.armed", folder / f"{name}.fired")  # atomic: one process wins
            except FileNotFoundError:
                return original(self, *args, **kwargs)
            os._exit(1)

        return call

    inference.StudyFiles.__getitem__ = dying(inference.StudyFiles.__getitem__, "reader")
    inference.Predictor.__call__ = dying(inference.Predictor.__call__, "model")


@pytest.fixture(scope="module")
def crash_dir(tmp_path_factory) -> Path:
    """A local Ray instance for this module (its workers carry the crash hook); yields the marker folder."""
    folder = tmp_path_factory.mktemp("crash")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        runtime_env={"worker_process_setup_hook": _die_once_when_armed, "env_vars": {CRASH_DIR: str(folder)}},
    )
    yield folder
    ray.shutdown()


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """DICOMs (a study of two, a lateral, a CT), PNG (one with a name that is not UTF-8), JPEG and junk."""
    root = tmp_path_factory.mktemp("ray") / "studies"
    rng = np.random.default_rng(0)
    study = generate_uid()
    (root / "p1" / "s1").mkdir(parents=True)
    for i, view in enumerate(["PA", "AP", "LL"]):
        write_cxr(
            root / "p1" / "s1" / f"IM{i}",
            rng.integers(0, 4096, (64, 56), dtype=np.uint16),
            bits_stored=12,
            view_position=view,
            study_instance_uid=study,
        )
    write_cxr(root / "p1" / "ct.dcm", rng.integers(0, 4096, (40, 40), dtype=np.uint16), bits_stored=12, modality="CT")
    (root / "exports").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (50 + i, 60), dtype=np.uint8)).save(root / "exports" / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (70, 60, 3), dtype=np.uint8)).save(root / "exports" / "rgb.jpg", quality=90)
    jpeg = (root / "exports" / "rgb.jpg").read_bytes()
    (root / "exports" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "exports" / "notes.txt").write_text("reported by Dr X\n")
    (root / "exports" / "empty.dcm").write_bytes(b"")
    (root / "exports" / "dangling").symlink_to(root / "nowhere")  # a problem found by discovery travels with its row
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / "exports" / os.fsdecode(b"caf\xe9.png"))
    return root


def _config(studies: Path, out: Path, weights_dir: Path, **options) -> PredictConfig:
    # the shipped model (discriminative, with applicability scores) and a tiny 4-class one
    models = ["pneumonia", str(weights_dir / "tiny-etiology.json")]
    return PredictConfig(inputs=[studies], output=out, models=models, batch_size=BATCH, **options)


@pytest.fixture(scope="module")
def reference(studies: Path, weights_dir: Path, tmp_path_factory) -> Path:
    """The local engine's CSV for ``studies``."""
    out = tmp_path_factory.mktemp("local") / "local.csv"
    run = run_predict(_config(studies, out, weights_dir, workers=0))
    assert run.exit_code == EXIT_FILE_ERRORS  # the truncated JPEG and the empty file
    return out


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same columns, rows in the same order, same text; numbers within float tolerance."""
    assert list(got.columns) == list(want.columns)
    numbers = [c for c in want.columns if c.startswith("prob_") or c == "ood_score"]
    pd.testing.assert_frame_equal(got.drop(columns=numbers), want.drop(columns=numbers))
    as_float = lambda frame: frame[numbers].replace("", "nan").astype(float).to_numpy()  # noqa: E731
    np.testing.assert_allclose(as_float(got), as_float(want), atol=1e-5, equal_nan=True)


def ray_args(studies: Path, out: Path, weights_dir: Path) -> list[str]:
    return [
        "predict",
        str(studies),
        "-o",
        str(out),
        "-m",
        "pneumonia",
        "-m",
        str(weights_dir / "tiny-etiology.json"),
        "--batch-size",
        str(BATCH),
        "--engine",
        "ray",
        "--quiet",
    ]


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_rows(
    crash_dir: Path, studies: Path, weights_dir: Path, reference: Path, tmp_path: Path
):
    out = tmp_path / "ray.csv"
    result = CliRunner().invoke(main, ray_args(studies, out, weights_dir))
    assert result.exit_code == EXIT_FILE_ERRORS, result.output
    got, want = read_csv(out), read_csv(reference)
    assert_same_rows(got, want)
    assert {"ok", "skipped", "error"} <= set(got.status)
    assert {"caf\\xe9.png", "dangling"} <= {p.rsplit("/", 1)[-1] for p in got.path}
    assert got.prob_pneumonia.replace("", np.nan).dropna().astype(float).std() > 1e-3  # files are told apart
    assert "Doe" not in out.read_text()
    assert_same_rows(read_csv(out.with_name("ray.studies.csv")), read_csv(reference.with_name("local.studies.csv")))
    info = json.loads(out.with_name("ray.run.json").read_text())
    local_info = json.loads(reference.with_name("local.run.json").read_text())
    assert info["counts"] == local_info["counts"]
    assert info["engine"]["name"] == "ray" and info["engine"]["actors"] == 1 and info["device"] == "ray: 1 cpu actor"


@pytest.mark.slow
def test_ray_engine_writes_heatmaps_beside_the_local_engines_rows(
    crash_dir: Path, studies: Path, weights_dir: Path, reference: Path, tmp_path: Path
):
    out = tmp_path / "ray.csv"
    result = CliRunner().invoke(main, ray_args(studies, out, weights_dir) + ["--heatmaps", "all"])
    assert result.exit_code == EXIT_FILE_ERRORS, result.output
    got = read_csv(out)
    assert_same_rows(got.drop(columns=["heatmap"]), read_csv(reference))
    ok = got[got.status == "ok"]
    assert len(ok) and (ok.heatmap != "").all() and (got.loc[got.status != "ok", "heatmap"] == "").all()
    assert all(Image.open(tmp_path / h).mode == "RGB" for h in ok.heatmap)
    assert json.loads(out.with_name("ray.run.json").read_text())["heatmaps"]["written"] == len(ok)


@pytest.mark.slow
def test_killed_ray_run_resumes_to_the_same_rows_though_workers_die(
    crash_dir: Path, studies: Path, weights_dir: Path, reference: Path, tmp_path: Path
):
    """A killed run, resumed while a read task and the model actor each die once mid-batch
    (one Ray run less than two tests: Ray's start-up is what makes these tests slow)."""
    out = tmp_path / "ray.csv"

    def stop_after_six(done: int, total: int) -> None:
        if done >= 6:
            raise KeyboardInterrupt  # the job killed mid-run (what reached the journal is kept)

    with pytest.raises(KeyboardInterrupt):
        run_predict(_config(studies, out, weights_dir, engine="ray"), stop_after_six)
    journaled = read_csv(out.with_name("ray.csv.partial"))
    n_files = read_csv(reference).path.nunique()
    assert 2 <= journaled.path.nunique() < n_files and not out.exists()

    for name in ("reader", "model"):
        (crash_dir / f"{name}.armed").touch()
    result = CliRunner().invoke(main, [*ray_args(studies, out, weights_dir), "--resume"])
    assert result.exit_code == EXIT_FILE_ERRORS, result.output
    assert {p.name for p in crash_dir.iterdir()} == {"reader.fired", "model.fired"}  # both died, once each
    got = read_csv(out)
    assert_same_rows(got, read_csv(reference))  # so every file has exactly its one row per model
    info = json.loads(out.with_name("ray.run.json").read_text())
    assert info["files_processed_this_run"] == n_files - journaled.path.nunique()  # journaled files were not read again
    assert info["counts"]["ok"] == (got.drop_duplicates("path").status == Status.OK.value).sum()


@pytest.mark.slow
def test_device_or_actors_the_cluster_lacks_are_usage_errors(
    crash_dir: Path, studies: Path, weights_dir: Path, tmp_path: Path
):
    if ray.cluster_resources().get("GPU"):
        pytest.skip("checks the error for a cluster without a GPU")
    result = CliRunner().invoke(main, [*ray_args(studies, tmp_path / "o.csv", weights_dir), "--device", "cuda"])
    assert result.exit_code == EXIT_USAGE and "no GPU" in result.stderr
    result = CliRunner().invoke(main, [*ray_args(studies, tmp_path / "o.csv", weights_dir), "--device", "cuda:1"])
    assert result.exit_code == EXIT_USAGE and "Ray gives each actor one GPU" in result.stderr
    # two CPU actors would leave no CPU for reading on this 2-CPU instance: refused, not a hang
    result = CliRunner().invoke(main, [*ray_args(studies, tmp_path / "o.csv", weights_dir), "--ray-actors", "2"])
    assert result.exit_code == EXIT_USAGE and "--ray-actors 2" in result.stderr


def test_engine_ray_without_ray_installed_names_the_extra(studies: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = CliRunner().invoke(main, ["predict", str(studies), "-o", str(tmp_path / "o.csv"), "--engine", "ray"])
    assert result.exit_code == EXIT_USAGE, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'pneumobatch[ray]'" in lines[0] and "Traceback" not in result.output


def test_ray_options_need_engine_ray(studies: Path, tmp_path: Path):
    result = CliRunner().invoke(main, ["predict", str(studies), "-o", str(tmp_path / "o.csv"), "--ray-actors", "2"])
    assert result.exit_code == EXIT_USAGE and "--engine ray" in result.stderr
