"""``rekey codec-server``: lets the Temporal UI show the encrypted payloads."""

from __future__ import annotations

import sys

import click

from rekey.cli.context import settings
from rekey.cli.output import log_format_option
from rekey.codec_server import run_codec_server


@click.command("codec-server")
@click.option("--port", type=click.IntRange(0, 65535), default=8234, show_default=True)
@click.option(
    "--allow-encode",
    is_flag=True,
    help="Also serve POST /encode (off by default: the UI needs only /decode; "
    "`temporal workflow start --codec-endpoint` needs /encode).",
)
@log_format_option()
def cli(port: int, allow_encode: bool) -> None:
    """Serve /decode (and, with --allow-encode, /encode) for the Temporal UI and CLI.

    Callers need "Authorization: Bearer <token>", a fresh token written to
    <home>/codec/server-token (0600) at every start and deleted when the server stops, e.g.
    temporal workflow show --codec-endpoint URL --codec-auth "Bearer $(cat
    <home>/codec/server-token)" while it runs.
    """
    sys.exit(run_codec_server(settings().home, port, allow_encode=allow_encode))
