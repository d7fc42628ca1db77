"""Exception types, the reason codes written to the ``reason`` column, and exit codes.

Every reason code a user can see in a CSV is defined here, once. Every error type
carries the exit code the CLI gives it, so the CLI translates errors in one place:

====  ==================================================================================
0     success
1     the run completed but some files could not be read (they are listed in the CSV)
2     usage error: bad option or argument; an existing output without --resume or
      --overwrite; a --device that this machine does not have (e.g. cuda without a GPU);
      a --site file that is not one or was fitted for another model or weights
3     fatal error: model missing or corrupt, output not writable (disk full, a link or a
      special file at -o), training data unusable, predictions or labels unusable,
      archive unreachable or refusing us (pull, push)
4     internal error: a bug in pneumobatch, not a problem with your files (one line;
      PNEUMOBATCH_TRACEBACK=1 shows the traceback for a bug report)
130   interrupted by SIGINT (Ctrl-C); 143 interrupted by SIGTERM: rows written so far
      are kept, run again with --resume
====  ==================================================================================
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """Outcome of one file: ``ok`` (predicted), ``skipped`` (by rule) or ``error``."""

    OK = "ok"
    SKIPPED = "skipped"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


class Reason(str, Enum):
    """Short, stable codes for why a file was skipped or could not be read."""

    # skipped by rule: the file is fine but is not something the model should see
    NOT_IMAGE = "not-image"  # not DICOM, PNG or JPEG (README, .txt, DICOMDIR, ...)
    NOT_CXR = "not-cxr"  # DICOM whose Modality is not CR/DX/DR (CT, MR, SR, ...)
    NO_PIXELS = "no-pixels"  # DICOM without Pixel Data (SR, KOS, presentation state)
    LATERAL = "lateral"  # ViewPosition LL/RL/LATERAL; include with --include-lateral
    NOT_CHEST = "not-chest"  # DICOM header names another body part (knee, hand, teeth, ...)
    BROKEN_LINK = "broken-link"  # a symbolic link whose target does not exist
    EXTERNAL_LINK = "external-link"  # a link leading outside the input folder (see --follow-external-links)
    SPECIAL_FILE = "special-file"  # FIFO, socket or device: never opened
    OUT_OF_DISTRIBUTION = "out-of-distribution"  # unlike the model's training images (with --skip-ood)
    # errors: the file should have been predicted but could not be
    TOO_LARGE = "too-large"  # more pixels than --max-pixels (decompression-bomb guard)
    EMPTY = "empty"  # zero-byte file
    BLANK_IMAGE = "blank-image"  # decoded, but (nearly) constant, not finite, or too small to hold a radiograph
    CORRUPT = "corrupt"  # truncated or undecodable data
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported-transfer-syntax"  # no decoder for it
    UNSUPPORTED_PIXELS = "unsupported-pixels"  # e.g. colour DICOM, odd bit depths
    UNREADABLE = "unreadable"  # permission denied or other OS error
    READ_FAILED = "read-failed"  # an unexpected failure while reading; detail names it

    def __str__(self) -> str:
        return self.value

    @property
    def status(self) -> Status:
        return Status.SKIPPED if self in _SKIP_REASONS else Status.ERROR


_SKIP_REASONS = {
    Reason.NOT_IMAGE,
    Reason.NOT_CXR,
    Reason.NO_PIXELS,
    Reason.LATERAL,
    Reason.NOT_CHEST,
    Reason.BROKEN_LINK,
    Reason.EXTERNAL_LINK,
    Reason.SPECIAL_FILE,
    Reason.OUT_OF_DISTRIBUTION,
}


EXIT_OK, EXIT_FILE_ERRORS, EXIT_USAGE, EXIT_FATAL = 0, 1, 2, 3
EXIT_INTERNAL = 4  # a bug in pneumobatch (an error it did not anticipate): please report it
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal's number, as shells report it


class PneumobatchError(Exception):
    """Base class of the package's errors; ``exit_code`` is what the CLI exits with."""

    exit_code: int = EXIT_FATAL


class FileRejected(PneumobatchError):
    """A file is skipped by rule or could not be read; becomes a CSV row, never a crash.

    ``reason`` is the code written to the CSV, ``detail`` a short human sentence,
    ``meta`` what was learnt from the header before the file was rejected (UIDs, view),
    so that skipped DICOMs still carry their study in the CSV.
    """

    def __init__(self, reason: Reason, detail: str = "", meta: dict | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
        self.meta = dict(meta or {})

    @property
    def status(self) -> Status:
        return self.reason.status


class ModelError(PneumobatchError):
    """A model could not be found, verified or loaded."""


class LabelError(PneumobatchError):
    """A labels file could not be read or joined to predictions."""


class OptionError(PneumobatchError):
    """Options that cannot work together (e.g. the same model given twice)."""

    exit_code = EXIT_USAGE


class SiteError(PneumobatchError):
    """A site file (``predict --site``, ``calibrate``) is unusable or belongs to another model or weights."""

    exit_code = EXIT_USAGE


class DeviceError(PneumobatchError, ValueError):
    """The requested --device cannot be used (unknown, or CUDA without a GPU)."""

    exit_code = EXIT_USAGE


class OutputError(PneumobatchError):
    """The output cannot be written or resumed."""


class OutputExists(OutputError):
    """The output (or an interrupted run's journal) exists and no --resume/--overwrite was given."""

    exit_code = EXIT_USAGE


class ArchiveError(PneumobatchError):
    """A PACS/archive cannot be reached, refuses us, or its configuration is unusable
    (``pull``, ``push``). Per-study failures are counted, not raised: they give exit 1."""


class ResumeMismatch(OutputError):
    """``--resume`` on an output this run did not write: another tool's file, other models or weights."""

    exit_code = EXIT_USAGE


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM; exits with 128 + the signal number.

    A :class:`KeyboardInterrupt`, not an :class:`Exception`: the signal handler raises it
    wherever the main process is, and there an ``except Exception`` meant for one bad file
    (a reader, a decoder's fallback) must not turn the stop into that file's error row.
    """

    def __init__(self, signum: int) -> None:
        import signal

        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name}; rows written so far are kept, run the same command with --resume to finish"
        )
        self.signum = signum
        self.exit_code = 128 + signum


class ReportError(PneumobatchError):
    """A report cannot be made: predictions unreadable, unknown model, bad output path."""


class TrainingError(PneumobatchError):
    """Training cannot start or go on (data, labels, splits, options)."""


class EngineUnavailable(PneumobatchError):
    """``--engine ray`` cannot start: Ray is not installed, or the cluster cannot be reached."""

    exit_code = EXIT_USAGE


class EngineError(PneumobatchError):
    """The Ray cluster gave up during a run (the rows written so far are kept for ``--resume``)."""
