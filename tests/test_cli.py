"""Every command: a one-line error on stderr and its documented exit code.

Exit codes (pneumobatch.core.errors): 0 ok, 1 completed with file errors, 2 usage (including a
--device this machine lacks), 3 fatal (model missing or corrupt, output not writable).
"""

from __future__ import annotations

from pathlib import Path

import click
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

    params = {c: {p.name: p for p in main.get_command(None, c).params} for c in ("predict", "train")}
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


# ------------------------------------------------------- options parsed by Click


def usage_error(result, code: int, option: str, *needles: str) -> None:
    """A Click error for a bad option value: exit ``code``, the message naming the option, no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: Invalid value for '{option}': "), result.stderr
    for needle in needles:
        assert needle in last, last


def test_a_malformed_limit_is_a_usage_error_naming_the_option(tmp_path: Path):
    run_json = tmp_path / "r.run.json"
    run_json.write_text("{}")
    for bad in ("bogus=1", "psi", "psi=high"):
        result = CliRunner().invoke(main, ["monitor", str(run_json), "--limit", bad])
        usage_error(result, EXIT_USAGE, "--limit", "NAME=NUMBER", "psi, ks_d", repr(bad))


def test_limits_reach_the_monitor_config_as_numbers(monkeypatch, tmp_path: Path):
    import pneumobatch.operations.monitor.run as analysis

    seen = {}

    def fake(config):
        seen["config"] = config
        raise analysis.ReportError("stop here")

    monkeypatch.setattr(analysis, "run_monitor", fake)
    run_json = tmp_path / "r.run.json"
    run_json.write_text("{}")
    args = ["monitor", str(run_json), "--limit", "psi=0.1", "--limit", "min-images=50", "--limit", "psi=0.3"]
    one_line_error(CliRunner().invoke(main, args), EXIT_FATAL, "stop here")
    assert seen["config"].limits == analysis.parse_limits(["psi=0.1", "min-images=50", "psi=0.3"])
    assert seen["config"].limits == {"psi": 0.3, "min_images": 50.0}


def test_malformed_band_options_fail_before_any_work_with_the_exit_code_they_had(images: Path, tmp_path: Path):
    """--band-target-recall and --default-age-band were TrainingError/LabelError (exit 3) once the
    data were read; now Click names the option at once, with the same exit code."""
    out = str(tmp_path / "w")
    cases = [
        (["train", str(images), "-o", out, "--band-target-recall", "adult=2"], "--band-target-recall", "'adult=2'"),
        (["train", str(images), "-o", out, "--default-age-band", "x=teen"], "--default-age-band", "'x=teen'"),
        (["retune", "tiny", str(images), "--band-target-recall", "elderly=0.9"], "--band-target-recall", "child=R"),
        (["retune", "tiny", str(images), "--default-age-band", "kermany"], "--default-age-band", "PATTERN=child"),
    ]
    for args, option, needle in cases:
        usage_error(CliRunner().invoke(main, args), EXIT_FATAL, option, needle)
    assert not (tmp_path / "w").exists()


def test_well_formed_band_options_reach_the_train_config_as_given():
    ctx = main.get_command(None, "train").make_context(
        "train", [".", "--band-target-recall", "Adult=0.90", "--default-age-band", "kermany*=child"]
    )
    assert ctx.params["band_target_recall"] == ("Adult=0.90",)
    assert ctx.params["default_age_band"] == ("kermany*=child",)


def test_report_default_age_band_is_checked_by_click(tmp_path: Path):
    predictions = tmp_path / "p.csv"
    predictions.write_text("path\n")
    args = ["report", str(predictions), "-o", str(tmp_path / "r.pdf"), "--default-age-band", "x=teen"]
    usage_error(CliRunner().invoke(main, args), EXIT_FATAL, "--default-age-band", "'x=teen'")


# ------------------------------------------------------- defaults from the library


def test_every_default_is_the_librarys():
    """Each command's option defaults are its config's (or library function's) defaults, defined once."""
    import dataclasses
    import inspect

    from pneumobatch.evaluation.report.options import ReportOptions
    from pneumobatch.operations.audit.run import AuditConfig
    from pneumobatch.operations.calibrate import CalibrateConfig
    from pneumobatch.operations.monitor.run import MonitorConfig
    from pneumobatch.operations.pacs.listen import ListenConfig
    from pneumobatch.operations.pacs.pull import PullConfig
    from pneumobatch.operations.pacs.push import PushConfig
    from pneumobatch.predict_config import PredictConfig
    from pneumobatch.training.applicability import fit_from_manifest
    from pneumobatch.training.config import TrainConfig

    def field_defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    expected = {
        "predict": field_defaults(PredictConfig),
        "train": field_defaults(TrainConfig),
        "retune": field_defaults(TrainConfig),
        "report": field_defaults(ReportOptions),
        "calibrate": field_defaults(CalibrateConfig),
        "monitor": field_defaults(MonitorConfig),
        "audit": field_defaults(AuditConfig),
        "pull": field_defaults(PullConfig),
        "push": field_defaults(PushConfig),
        "listen": field_defaults(ListenConfig),
        "fit-applicability": {
            n: p.default for n, p in inspect.signature(fit_from_manifest).parameters.items() if p.default is not p.empty
        },
    }
    checked = 0
    for command, defaults in expected.items():
        ctx = main.get_command(None, command).make_context(command, ["--help"], resilient_parsing=True)
        for param in main.get_command(None, command).params:
            if not isinstance(param, click.Option) or param.is_flag or param.multiple or param.count:
                continue
            field = param.name  # one name for one thing: the option's Python name is the config field's
            if defaults.get(field) is not None:
                assert param.get_default(ctx) == defaults[field], (command, param.name)
                checked += 1
    assert checked >= 40


def test_cli_imports_no_heavy_library():
    import subprocess
    import sys

    heavy = ("torch", "sklearn", "matplotlib", "reportlab")
    code = f"import sys, pneumobatch.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------- checks in the library


def test_train_preflight_is_a_library_call(tmp_path: Path):
    from pneumobatch.core.errors import OutputExists
    from pneumobatch.training.config import TrainConfig
    from pneumobatch.training.preflight import check_train_inputs

    out = tmp_path / "w"
    out.mkdir()
    (out / "m.safetensors").write_bytes(b"")
    config = TrainConfig(data=tmp_path, out_dir=out, name="m", device="cpu")
    with pytest.raises(OutputExists, match="m.safetensors exists; pass --overwrite"):
        check_train_inputs(config)
    check_train_inputs(config, overwrite=True)
    check_train_inputs(TrainConfig(data=tmp_path, out_dir=out, name="m", device="cpu", resume=True))


def test_the_cli_refuses_an_unknown_backend_itself():
    result = CliRunner().invoke(main, ["predict", ".", "--backend", "tensorrt"])
    assert result.exit_code == EXIT_USAGE and "'tensorrt' is not one of" in result.output
