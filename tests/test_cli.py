"""Every command: a one-line error on stderr and its documented exit code.

Exit codes (pneumobatch.core.errors): 0 ok, 1 completed with file errors, 2 usage (including a
--device this machine lacks), 3 fatal (model missing or corrupt, output not writable).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pneumobatch.cli import main
from pneumobatch.core.errors import EXIT_FATAL, EXIT_INTERNAL, EXIT_USAGE
from tests.helpers import one_line_error

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without a GPU")


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return folder


@pytest.fixture()
def blocked(tmp_path: Path) -> Path:
    """A path below a regular file: no folder can be made there, whoever runs the test."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "out"


# ------------------------------------------------------------------------ predict


@needs_no_gpu
def test_predict_without_gpu(images: Path, tmp_path: Path, weights_dir: Path):
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(images),
            "-o",
            str(tmp_path / "p.csv"),
            "--weights-dir",
            str(weights_dir),
            "-m",
            "tiny",
            "--device",
            "cuda",
        ],
    )
    one_line_error(result, EXIT_USAGE, "--device cuda", "no CUDA GPU")


def test_predict_missing_model(images: Path, tmp_path: Path, weights_dir: Path):
    result = CliRunner().invoke(
        main, ["predict", str(images), "-o", str(tmp_path / "p.csv"), "--weights-dir", str(weights_dir), "-m", "nope"]
    )
    one_line_error(result, EXIT_FATAL, "'nope' not found")


def test_predict_unwritable_output(images: Path, blocked: Path, weights_dir: Path):
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(images),
            "-o",
            str(blocked / "p.csv"),
            "--weights-dir",
            str(weights_dir),
            "-m",
            "tiny",
            "--device",
            "cpu",
        ],
    )
    one_line_error(result, EXIT_FATAL, "cannot write")


# ------------------------------------------------------------------------- report


@pytest.fixture()
def predictions(images: Path, tmp_path: Path, weights_dir: Path) -> Path:
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(images),
            "-o",
            str(out),
            "--weights-dir",
            str(weights_dir),
            "-m",
            "tiny",
            "-q",
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_report_has_no_device_option(predictions: Path, tmp_path: Path):
    """report never imports torch, so it cannot lack a GPU; asking for one is a usage error."""
    result = CliRunner().invoke(main, ["report", str(predictions), "-o", str(tmp_path / "r.pdf"), "--device", "cuda"])
    assert result.exit_code == EXIT_USAGE and "Traceback" not in result.output


def test_report_missing_model(predictions: Path, tmp_path: Path):
    result = CliRunner().invoke(main, ["report", str(predictions), "-o", str(tmp_path / "r.pdf"), "--model", "nope"])
    one_line_error(result, EXIT_FATAL, "'nope'")


def test_report_unwritable_output(predictions: Path, blocked: Path):
    result = CliRunner().invoke(main, ["report", str(predictions), "-o", str(blocked / "r.pdf")])
    one_line_error(result, EXIT_FATAL, "cannot write")


# -------------------------------------------------------------------------- train


@needs_no_gpu
def test_train_without_gpu(images: Path, tmp_path: Path):
    result = CliRunner().invoke(main, ["train", str(images), "-o", str(tmp_path / "w"), "--device", "cuda"])
    one_line_error(result, EXIT_USAGE, "no CUDA GPU")


def test_train_missing_init_model(images: Path, tmp_path: Path):
    result = CliRunner().invoke(
        main,
        [
            "train",
            str(images),
            "-o",
            str(tmp_path / "w"),
            "--device",
            "cpu",
            "--init",
            str(tmp_path / "missing.safetensors"),
        ],
    )
    one_line_error(result, EXIT_FATAL, "missing.safetensors")


def test_train_unwritable_output(images: Path, blocked: Path):
    result = CliRunner().invoke(main, ["train", str(images), "-o", str(blocked), "--device", "cpu"])
    one_line_error(result, EXIT_FATAL, "cannot write")


def test_choices_come_from_the_library():
    from pneumobatch.core.tasks import TASKS
    from pneumobatch.io.predictions import STUDY_FROM
    from pneumobatch.model.device import PRECISIONS
    from pneumobatch.training.config import BALANCE_CHOICES

    params = {c: {p.name: p for p in main.commands[c].params} for c in ("predict", "train")}
    assert tuple(params["predict"]["precision"].type.choices) == PRECISIONS
    assert tuple(params["predict"]["study_from"].type.choices) == STUDY_FROM
    assert tuple(params["train"]["balance"].type.choices) == BALANCE_CHOICES
    assert tuple(params["train"]["task"].type.choices) == (*TASKS, "custom")


def test_cli_and_report_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pneumobatch.cli, pneumobatch.evaluation.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_run_predict_is_a_library_call_without_click(tmp_path: Path, weights_dir: Path):
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from pneumobatch.predict import run_predict; from pneumobatch.predict_config import PredictConfig; "
        f"run = run_predict(PredictConfig(inputs=[Path({str(tmp_path)!r})], output=Path({str(tmp_path / 'p.csv')!r}), "
        f"models=['tiny'], weights_dir=Path({str(weights_dir)!r}), workers=0, device='cpu')); "
        "print(run.counts['files'], run.exit_code, 'click' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0", "False"]
    assert (tmp_path / "p.run.json").is_file() and (tmp_path / "p.studies.csv").is_file()


def test_a_bug_is_one_line_and_exit_4_not_the_file_errors_code(
    images: Path, tmp_path: Path, weights_dir: Path, monkeypatch
):
    import pneumobatch.predict

    def broken(config, progress=None):
        raise KeyError("column that should be there")

    monkeypatch.setattr(pneumobatch.predict, "run_predict", broken)
    args = ["predict", str(images), "-o", str(tmp_path / "p.csv"), "--weights-dir", str(weights_dir), "-m", "tiny"]
    result = CliRunner().invoke(main, args)
    one_line_error(result, EXIT_INTERNAL, "internal error (KeyError", "PNEUMOBATCH_TRACEBACK=1")
    monkeypatch.setenv("PNEUMOBATCH_TRACEBACK", "1")  # for a bug report: the exception itself
    assert isinstance(CliRunner().invoke(main, args).exception, KeyError)
