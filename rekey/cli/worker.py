"""``rekey worker``: host the rotation workflow and its activities on task queue ``rekey``."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from rekey.cli.context import settings
from rekey.cli.output import err
from rekey.client import parse_duration
from rekey.worker import run_worker


@click.command("worker")
@click.option(
    "--shutdown-timeout",
    default="30s",
    show_default=True,
    help="On SIGTERM or SIGINT, how long running activities get to finish before they are cancelled.",
)
def cli(shutdown_timeout: str) -> None:
    """Run a rekey worker (task queue `rekey`) until SIGTERM or SIGINT, then stop gracefully."""
    timeout = parse_duration(shutdown_timeout, "--shutdown-timeout")
    current = settings()
    # The worker's own lines (start, the shutdown notice) go to stderr, one a line.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    worker_log = logging.getLogger("rekey.worker")
    level = worker_log.level
    worker_log.addHandler(handler)
    worker_log.setLevel(logging.INFO)
    try:
        err.print(f"rekey worker on task queue rekey, Temporal {current.temporal_address}")
        asyncio.run(run_worker(current, shutdown_timeout=timeout))
    finally:
        # Run in-process (tests, an embedding tool), the next run must not print every line twice.
        worker_log.removeHandler(handler)
        worker_log.setLevel(level)
