"""``rekey codec-server``: lets the Temporal UI show the encrypted payloads."""

from __future__ import annotations

import sys

import click

from rekey.cli.context import settings
from rekey.codec_server import run_codec_server


@click.command("codec-server")
@click.option("--port", type=click.IntRange(0, 65535), default=8234, show_default=True)
def cli(port: int) -> None:
    """Serve /encode and /decode for the Temporal UI and CLI (payloads are AES-GCM encrypted).

    Callers need "Authorization: Bearer <token>", the token in <home>/codec/server-token
    (created 0600 on first start), e.g. temporal workflow show --codec-endpoint URL
    --codec-auth "Bearer $(cat <home>/codec/server-token)".
    """
    sys.exit(run_codec_server(settings().home, port))
