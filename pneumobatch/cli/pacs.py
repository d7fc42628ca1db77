"""``pneumobatch pull`` and ``push``: the archive options they share, and their failures,
summary and exit code; the transfers are :mod:`pneumobatch.operations.pacs`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pneumobatch.cli.common import LibraryDefault, option_group, setup_logging
from pneumobatch.core.errors import EXIT_OK


def _archive_options(config: str):
    """The options naming an archive, shared by pull and push (credentials are never options);
    ``config`` (``module:Class``) gives the defaults."""
    return option_group(
        click.option("--url", help="DICOMweb base URL, e.g. https://pacs.example.org/dicom-web."),
        click.option(
            "--dimse", metavar="HOST:PORT", help="DIMSE archive address (C-FIND, C-GET, C-STORE) instead of --url."
        ),
        click.option("--calling-ae", help="Our AE title for DIMSE. [default: PNEUMOBATCH]"),
        click.option("--called-ae", help="The archive's AE title for DIMSE. [default: ANY-SCP]"),
        click.option(
            "--config",
            type=click.Path(dir_okay=False, path_type=Path),
            help="PACS config file (mode 0600) with url/dimse, AE titles and credentials. [default: $PNEUMOBATCH_PACS_CONFIG]",
        ),
        click.option(
            "--ca-bundle",
            type=click.Path(exists=True, dir_okay=False),
            help="CA certificates to verify the archive's TLS certificate with (verification is on unless the config file says tls_verify = false).",
        ),
        click.option(
            "--tls", is_flag=True, default=False, help="DIMSE over TLS (the archive's certificate is verified)."
        ),
        click.option(
            "--tls-cert",
            type=click.Path(exists=True, dir_okay=False),
            help="Our TLS certificate (PEM) for DIMSE over TLS, presented to the archive.",
        ),
        click.option(
            "--tls-key", type=click.Path(exists=True, dir_okay=False), help="The private key of --tls-cert (PEM)."
        ),
        click.option(
            "--ledger",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Ledger of what was fetched and delivered (SQLite). Share one between pull and push in a nightly job.",
        ),
        click.option(
            "--retries",
            type=click.IntRange(0, 10),
            cls=LibraryDefault,
            library_default=f"{config}.retries",
            show_default=True,
            help="Retries of a study that failed, with a growing wait.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No summary (for cron); failures still go to stderr."),
        click.option("-v", "--verbose", count=True),
    )


#: the archive options that name the connection (the others: ledger, retries, quiet, verbose)
CONNECTION_OPTIONS = ("url", "dimse", "calling_ae", "called_ae", "config", "ca_bundle", "tls", "tls_cert", "tls_key")


def _connection(archive: dict, **more):
    """The archive the options name (:func:`~pneumobatch.operations.pacs.connection.connect_options`)."""
    from pneumobatch.operations.pacs.connection import connect_options

    return connect_options(**{name: archive[name] for name in CONNECTION_OPTIONS}, **more)


def _finish(result, quiet: bool) -> None:
    """A pull or push result: failures on stderr (always), its summary unless --quiet, its exit code."""
    for failure in result.failures:
        click.echo(f"failed: {failure}", err=True)
    if not quiet:
        click.echo(result.summary())
    if result.exit_code != EXIT_OK:
        sys.exit(result.exit_code)


@click.command("pull", short_help="Fetch new chest radiograph studies from a PACS into a folder.")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--date", "on", metavar="YYYYMMDD", help="Studies of this one day (also: today, yesterday, Nd).")
@click.option(
    "--since",
    metavar="YYYYMMDD",
    help="Studies from this day on (also: today, yesterday, Nd for N days ago). [default: yesterday]",
)
@click.option("--until", metavar="YYYYMMDD", help="Studies up to this day. [default: today]")
@click.option(
    "--modality", "modalities", multiple=True, help="ModalitiesInStudy to search for; repeatable. [default: CR, DX, DR]"
)
@click.option(
    "--body-part",
    "body_parts",
    multiple=True,
    help="Fetch only series whose BodyPartExamined is this (or empty); repeatable.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    cls=LibraryDefault,
    library_default="pneumobatch.operations.pacs.connection:DEFAULT_DEADLINE",
    show_default=True,
    metavar="SECONDS",
    help="The most one request to the archive may take in all (a search, an instance), however slowly it trickles.",
)
@click.option(
    "--study-timeout",
    type=click.FloatRange(min=0, min_open=True),
    cls=LibraryDefault,
    library_default="pneumobatch.operations.pacs.pull:PullConfig.study_timeout",
    show_default=True,
    metavar="SECONDS",
    help="The most one study may take, retries included; what was fetched is kept for the next run.",
)
@click.option(
    "--move-to",
    metavar="AET",
    help="Retrieve by C-MOVE to this AE title (the archive's name for us) instead of C-GET; "
    "without it, an archive refusing C-GET is asked by C-MOVE to --calling-ae.",
)
@click.option(
    "--move-port",
    type=click.IntRange(1, 65535),
    help="The port our C-MOVE receiver listens on while pulling (the archive knows it). [default: 11112]",
)
@_archive_options("pneumobatch.operations.pacs.pull:PullConfig")
def pull_command(
    output: Path,
    on,
    since,
    until,
    modalities,
    body_parts,
    request_timeout,
    study_timeout,
    move_to,
    move_port,
    **archive,
) -> None:
    """Fetch the studies of a date window from a PACS into OUTPUT, for predict.

    \b
    Files land in OUTPUT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm.
    Over DIMSE: C-FIND, then C-GET, or C-MOVE (--move-to) to a receiver of our own
    on --move-port while the pull runs; --tls for DIMSE over TLS.
    A ledger (default OUTPUT.ledger.sqlite, beside the folder) records every instance
    fetched: the next run fetches only what is new, and a killed run resumes without
    fetching anything twice. Credentials come from PNEUMOBATCH_PACS_USERNAME /
    PNEUMOBATCH_PACS_PASSWORD or PNEUMOBATCH_PACS_TOKEN, or a 0600 --config file.

    \b
    An instance that arrives unusable (not DICOM, over 256 MiB, garbled) fails alone:
    it is listed, the night goes on, and the next run asks for it again.

    \b
    Exit codes: 0 everything fetched; 1 some studies or instances failed (listed on
    stderr); 2 usage error; 3 the archive cannot be searched (unreachable, refused,
    answering garbage); 130/143 interrupted: run the same command again to go on.
    """
    from dataclasses import replace

    from pneumobatch.operations.pacs.pull import PullConfig, date_window, run_pull

    setup_logging(archive["verbose"], archive["quiet"])
    pull_config = PullConfig(
        connection=replace(_connection(archive, move_to=move_to, move_port=move_port), deadline=request_timeout),
        output=output,
        study_date=date_window(on, since, until),
        modalities=modalities,
        body_parts=body_parts,
        ledger=archive["ledger"],
        retries=archive["retries"],
        study_timeout=study_timeout,
    )
    _finish(run_pull(pull_config), archive["quiet"])


@click.command("push", short_help="Send one DICOM SR per study and model back to a PACS.")
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The folder predict read (headers are copied from its files; otherwise fetched from the archive).",
)
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    help="Push only this model's results; repeatable. [default: every model in the CSV]",
)
@click.option(
    "--heatmaps",
    is_flag=True,
    help="Also send each positive image's heatmap (predict --heatmaps) as a DICOM Secondary Capture "
    "with a burned-in legend, in the image's study; the SR references it.",
)
@_archive_options("pneumobatch.operations.pacs.push:PushConfig")
def push_command(predictions: Path, source, models, heatmaps: bool, **archive) -> None:
    """Send PREDICTIONS back to a PACS: one DICOM SR per study and model.

    \b
    TID 1500 Comprehensive SR in the source study (new series): per image and finding,
    Present/Absent at the operating point used, the probability and threshold, the
    model, its version and weights SHA-256, the image's SOP Instance UID; marked NOT
    FOR DIAGNOSTIC USE. UIDs are deterministic: pushing again never duplicates an SR.
    Each SR is searched for after sending and only then recorded in the ledger
    (default PREDICTIONS.ledger.sqlite).

    \b
    Exit codes: 0 every SR delivered; 1 some failed after retries (listed on stderr);
    2 usage error; 3 predictions unreadable or archive unusable.
    """
    from pneumobatch.operations.pacs.push import PushConfig, run_push

    setup_logging(archive["verbose"], archive["quiet"])
    push_config = PushConfig(
        predictions=predictions,
        connection=_connection(archive),
        source=source,
        ledger=archive["ledger"],
        models=models,
        retries=archive["retries"],
        heatmaps=heatmaps,
    )
    _finish(run_push(push_config), archive["quiet"])
