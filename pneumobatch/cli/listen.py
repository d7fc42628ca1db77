"""``pneumobatch listen``: its options, the start line, the counts on exit; the listener is
:mod:`pneumobatch.operations.pacs.listen`."""

from __future__ import annotations

from pathlib import Path

import click

from pneumobatch.cli.common import LibraryDefault, setup_logging

_CONFIG = "pneumobatch.operations.pacs.listen:ListenConfig"


@click.command("listen", short_help="Receive radiographs from a PACS or modality (C-STORE SCP) into a spool.")
@click.argument("spool", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="AET@ADDRESS",
    help="A caller that may send: its AE title and IP address, network (10.1.2.0/24) or host name. Repeatable; "
    "nothing is accepted from anyone else.",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), cls=LibraryDefault, library_default=f"{_CONFIG}.port", show_default=True
)
@click.option(
    "--bind", cls=LibraryDefault, library_default=f"{_CONFIG}.bind", show_default=True, help="Address to listen on."
)
@click.option(
    "--ae-title", cls=LibraryDefault, library_default=f"{_CONFIG}.ae_title", show_default=True, help="Our AE title."
)
@click.option(
    "--study-timeout",
    type=click.FloatRange(min=0, min_open=True),
    cls=LibraryDefault,
    library_default=f"{_CONFIG}.study_timeout",
    show_default=True,
    metavar="SECONDS",
    help="A study is complete when no instance of it came for this long.",
)
@click.option(
    "--tls-cert", type=click.Path(exists=True, dir_okay=False), help="Our TLS certificate (PEM): DIMSE over TLS."
)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="The private key of --tls-cert (PEM).")
@click.option(
    "--ca-bundle",
    type=click.Path(exists=True, dir_okay=False),
    help="With --tls-cert: the CA certificates callers' certificates must be signed by (required).",
)
@click.option(
    "--metrics",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Prometheus textfile with the counts (for node_exporter), rewritten as they change.",
)
@click.option("-q", "--quiet", is_flag=True, help="No start line and no counts on exit.")
@click.option("-v", "--verbose", count=True)
def listen_command(spool: Path, quiet: bool, verbose: int, **options) -> None:
    """Receive CR, DX and Secondary Capture images into SPOOL (C-STORE SCP), in the foreground.

    \b
    Files land in SPOOL/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm,
    each written whole; a study is announced complete in SPOOL's journal when no
    instance of it came for --study-timeout seconds, and `predict --spool SPOOL`
    predicts the complete studies not yet predicted. Only callers given with --allow
    may associate. SIGTERM or SIGINT: finish the associations in progress, print the
    counts, exit 0 (run it under systemd, see docs/listen.md).

    \b
    Exit codes: 0 stopped by SIGTERM/SIGINT; 2 usage error (also: no --allow, TLS
    files unreadable); 3 cannot listen (port taken, spool unusable, another listener
    on SPOOL).
    """
    from pneumobatch.operations.pacs.listen import ListenConfig, run_listen

    setup_logging(verbose, quiet)
    config = ListenConfig(
        spool=spool,
        allow=options["allow"],
        port=options["port"],
        bind=options["bind"],
        ae_title=options["ae_title"],
        study_timeout=options["study_timeout"],
        tls_cert=options["tls_cert"],
        tls_key=options["tls_key"],
        ca_bundle=options["ca_bundle"],
        metrics=options["metrics"],
    )

    def ready(host: str, port: int) -> None:
        if not quiet:
            tls = " over TLS" if config.tls_cert else ""
            click.echo(f"listening on {host}:{port}{tls} as {config.ae_title}; spool {spool}", err=True)

    result = run_listen(config, ready)
    if not quiet:
        click.echo(result.summary())
