"""``rekey worker``: host the rotation workflow and its activities on task queue ``rekey``."""

from __future__ import annotations

import asyncio
import contextlib

import click

from rekey.cli.context import settings
from rekey.cli.output import err
from rekey.worker import run_worker


@click.command("worker")
def cli() -> None:
    """Run a rekey worker (task queue `rekey`) until interrupted."""
    current = settings()
    err.print(f"rekey worker on task queue rekey, Temporal {current.temporal_address}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker(current))
