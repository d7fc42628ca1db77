"""What several commands share: option types, choices and defaults read from the library, logging.

The defaults and choice lists live in the library (the config dataclasses, the constants of
the modules that use them); the options here read them, some only when first needed, so
that importing the CLI does not import torch, scikit-learn, matplotlib or reportlab.
Options written as ``NAME=VALUE`` are parameter types: a malformed value is a Click error
naming the option, before any work starts.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Callable, Optional

import click

from pneumobatch.core.errors import EXIT_FATAL, EXIT_USAGE

#: Target recalls an operating point may be asked for (train on validation data, report on the evaluated data).
RECALL_RANGE = click.FloatRange(0.5, 1.0)


def option_group(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Several ``click.option`` decorators as one, in the order given (options several commands share)."""

    def add(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return add


def library_value(where: str) -> Any:
    """``"module:Name.attr"``: a class attribute or constant; ``"module:function.param"``: a parameter's default."""
    module, _, path = where.partition(":")
    owner: Any = importlib.import_module(module)
    *owners, name = path.split(".")
    for part in owners:
        owner = getattr(owner, part)
    if inspect.isfunction(owner):
        return inspect.signature(owner).parameters[name].default
    return getattr(owner, name)


class LibraryChoice(click.Choice):
    """A choice list read from a library constant when first needed (so importing the
    CLI, or running ``report``, does not import torch for ``inference.PRECISIONS``)."""

    def __init__(self, module: str, name: str) -> None:
        self._where = (module, name)
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        module, name = self._where
        return tuple(getattr(importlib.import_module(module), name))

    @choices.setter
    def choices(self, value: object) -> None:  # set by click.Choice.__init__; read from the library instead
        pass


class LibraryDefault(click.Option):
    """An option whose default is read from the library when first needed (``library_default``,
    see :func:`library_value`): the config of a command whose module imports scikit-learn or
    torch is not imported until that command runs or shows its help."""

    def __init__(self, *args: Any, library_default: str, **kwargs: Any) -> None:
        self.library_default = library_default
        super().__init__(*args, **kwargs)

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        return library_value(self.library_default)


class FormatParam(click.ParamType):
    """A ``NAME=VALUE`` option checked by the library's parser; a bad value fails as a Click
    error naming the option, with the exit code the library gives it (``exit_code``)."""

    exit_code = EXIT_USAGE

    def fail(self, message: str, param: Optional[click.Parameter] = None, ctx: Optional[click.Context] = None):
        error = click.BadParameter(message, ctx, param)
        error.exit_code = self.exit_code
        raise error

    def fail_with(self, exc: Exception, param: Optional[click.Parameter], ctx: Optional[click.Context]):
        """The library's one-line message without its leading ``--option`` (Click names the option)."""
        message = str(exc)
        if message.startswith("--"):
            message = message.split(" ", 1)[-1]
        self.fail(message, param, ctx)


class CheckedText(FormatParam):
    """A ``NAME=VALUE`` option the library parses later from its text (the training config and the
    report options record the text as given); checked here, with the library's own parser
    (``parser``: ``"module:function"``, called on ``[value]``), so a bad value fails before any work."""

    exit_code = EXIT_FATAL  # as when train/retune (TrainingError) or report (LabelError) found it malformed
    parser = ""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> str:
        from pneumobatch.core.errors import OptionError

        module, _, function = self.parser.partition(":")
        try:
            getattr(importlib.import_module(module), function)([value])
        except OptionError as exc:
            self.fail_with(exc, param, ctx)
        return str(value)


class BandTargetRecall(CheckedText):
    """``BAND=RECALL`` (``adult=0.90``)."""

    name = "band_target_recall"
    parser = "pneumobatch.core.subgroups:parse_band_targets"


class DefaultAgeBand(CheckedText):
    """``PATTERN=child|adult``."""

    name = "default_age_band"
    parser = "pneumobatch.core.subgroups:parse_band_defaults"


class AlertLimit(FormatParam):
    """``NAME=NUMBER`` for monitor's alert limits -> ``(name, number)``."""

    name = "limit"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> tuple[str, float]:
        if isinstance(value, tuple):
            return value
        from pneumobatch.core.errors import OptionError
        from pneumobatch.operations.monitor.run import parse_limits

        try:
            ((name, number),) = parse_limits([value]).items()
        except OptionError as exc:
            self.fail_with(exc, param, ctx)
        return name, number


def setup_logging(verbose: int, quiet: bool, *, import_pydicom: bool = True) -> None:
    """Log level from -v/-q; warnings and third-party loggers quiet unless asked for.

    ``import_pydicom`` False (``predict``: its main process reads no DICOM) leaves pydicom
    unimported; the DICOM reader applies the level chosen here after importing it."""
    level = (
        logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Warnings raised while reading one file (numpy overflow on a hostile rescale slope, a
    # malformed DICOM value) are about that file, whose row says what happened: they go to
    # logging and are shown only with -v, never with -q. Decoding workers inherit this.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose and not quiet else logging.CRITICAL)
    # pydicom logs every failed decoder attempt at ERROR with a traceback; the reader turns
    # those failures into reason codes in the CSV, so its log is noise unless asked for.
    from pneumobatch.core.logs import set_level

    if import_pydicom:
        import pydicom.config  # noqa: F401 - pydicom sets its logger's level on import; import it first
    set_level("pydicom", logging.DEBUG if verbose > 1 else logging.CRITICAL)
    # pynetdicom logs a failed connection at ERROR; pull/push report it once, as a one-line error
    set_level("pynetdicom", logging.DEBUG if verbose > 1 else logging.CRITICAL)
