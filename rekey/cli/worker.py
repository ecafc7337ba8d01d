"""``rekey worker``: host the rotation workflow and its activities on task queue ``rekey``."""

from __future__ import annotations

import asyncio
import logging

import click

from rekey.cli.context import settings
from rekey.cli.output import err, log_format_option
from rekey.client import parse_duration
from rekey.logs import configured, register_secret
from rekey.worker import run_worker

log = logging.getLogger("rekey.worker")


@click.command("worker")
@click.option(
    "--shutdown-timeout",
    default="30s",
    show_default=True,
    help="On SIGTERM or SIGINT, how long running activities get to finish before they are cancelled.",
)
@log_format_option(configure=False)
def cli(shutdown_timeout: str, log_format: str) -> None:
    """Run a rekey worker (task queue `rekey`) until SIGTERM or SIGINT, then stop gracefully."""
    timeout = parse_duration(shutdown_timeout, "--shutdown-timeout")
    current = settings()
    # The credentials this process holds never reach a log line, whatever logs them.
    register_secret(current.resolved_vault_token())
    register_secret(current.azure_token)
    # The worker's own lines (start, the shutdown notice) go to stderr, one a line; with
    # --log-format json every logger's events do, as JSON.
    with configured(log_format, text_logger="rekey.worker"):
        banner = f"rekey worker on task queue rekey, Temporal {current.temporal_address}"
        if log_format == "json":
            log.info(banner, extra={"temporal_address": current.temporal_address})
        else:
            err.print(banner)
        asyncio.run(run_worker(current, shutdown_timeout=timeout, log_format=log_format))
