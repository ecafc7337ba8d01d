"""``rekey rotate start | status | pause | resume | abort | approve``: two-phase key rotation.

A skin over `rekey.client`: inputs are checked before connecting, everything else is a client call.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar

from rekey.cli.context import with_client
from rekey.cli.output import EXIT_FAILED, emit_json, err, json_option, out
from rekey.client import (
    DEFAULT_BATCH,
    DEFAULT_IN_FLIGHT,
    DONE,
    MAX_BATCH,
    MAX_IN_FLIGHT,
    Progress,
    RekeyClient,
    RotationHandle,
    parse_duration,
    parse_rotation_id,
    rotation_id,
)


@click.group("rotate")
def cli() -> None:
    """Two-phase key rotation (RotateKeyWorkflow)."""


def _progress_dict(progress: Progress) -> dict[str, Any]:
    return dataclasses.asdict(progress)


def _print_progress(data: dict[str, Any]) -> None:
    out.print(
        f"{data['key_ref']}  phase {data['phase']}  v{data['old_primary']} -> v{data['new_version']}"
        f"  re-wrapped {data['rewrapped']}/{data['total']}  remaining {data['remaining']}"
        f"  conflicts {data['conflicts']}  failed {data['failed']}  throttled waits {data['throttled_waits']}"
        f"  rate {data['current_rate']:.0f}/s{'  PAUSED' if data['paused'] else ''}"
    )


async def _follow(rotation: RotationHandle) -> Progress:
    """Watch to the end with a progress bar on stderr; the rotation's result."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with ProgressBar(*columns, console=err) as bar:
        task = bar.add_task("PREPARING", total=None)

        def unavailable(exc: Exception) -> None:
            bar.console.log(f"progress unavailable for a moment: {type(exc).__name__}")

        final: Progress | None = None
        async for final in rotation.watch(on_unavailable=unavailable):
            bar.update(
                task,
                description=f"{final.phase:<15}",
                total=final.total or None,
                completed=final.rewrapped + final.conflicts + final.failed,
            )
    assert final is not None, "watch ends with the rotation's result"
    return final


@cli.command("start")
@click.argument("key_ref", metavar="KEYREF")
@click.option("--grace", default="24h", show_default=True, help="Wait before retiring old versions.")
@click.option(
    "--destroy-after", default=None, help="Destroy old versions this long after disabling (default never)."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH),
    default=DEFAULT_BATCH,
    show_default=True,
    help="Blobs per re-wrap activity (each is read, re-wrapped and swapped in pipelined chunks).",
)
@click.option(
    "--in-flight",
    type=click.IntRange(1, MAX_IN_FLIGHT),
    default=DEFAULT_IN_FLIGHT,
    show_default=True,
    help="Re-wrap activities running at once.",
)
@click.option("--wait", "wait_", is_flag=True, help="Show a progress bar and wait for the end.")
@json_option
def start(
    key_ref: str,
    grace: str,
    destroy_after: str | None,
    batch_size: int,
    in_flight: int,
    wait_: bool,
    json_out: bool,
) -> None:
    """Start rotating KEYREF; exits 0 when DONE (with --wait), 1 when ABORTED or failed."""
    rotation_id(key_ref)  # a bad key ref is bad input even when Temporal is down
    grace_s = parse_duration(grace, "--grace")
    destroy_s = None if destroy_after is None else parse_duration(destroy_after, "--destroy-after")

    async def run(client: RekeyClient) -> tuple[str, Progress | None]:
        rotation = await client.start_rotation(
            key_ref, grace=grace_s, destroy_after=destroy_s, batch_size=batch_size, in_flight=in_flight
        )
        return rotation.id, (await _follow(rotation) if wait_ else None)

    started, result = with_client(run)
    if result is None:
        if json_out:
            emit_json({"workflow_id": started})
        else:
            out.print(f"started {started}  (follow it: rekey rotate status {started})")
        return
    data = _progress_dict(result)
    emit_json(data) if json_out else _print_progress(data)
    if data["phase"] != DONE:
        sys.exit(EXIT_FAILED)


@cli.command("status")
@click.argument("id_text", metavar="ID")
@json_option
def status(id_text: str, json_out: bool) -> None:
    """Phase and progress of a rotation (ID is rotate:BACKEND:NAME, or the key ref)."""
    target = parse_rotation_id(id_text)
    data = _progress_dict(with_client(lambda client: client.rotation(target).status()))
    emit_json(data) if json_out else _print_progress(data)


def _signal_command(name: str, signal: Callable[[RotationHandle], Awaitable[None]], help_text: str) -> None:
    @cli.command(name, help=help_text)
    @click.argument("id_text", metavar="ID")
    def command(id_text: str) -> None:
        target = parse_rotation_id(id_text)
        with_client(lambda client: signal(client.rotation(target)))
        out.print(f"{name}: sent to {target}")


_signal_command("pause", RotationHandle.pause, "Pause the re-wrap sweep after the batches in flight.")
_signal_command("resume", RotationHandle.resume, "Resume a paused rotation.")
_signal_command("abort", RotationHandle.abort, "Abort before retirement: every blob stays readable.")
_signal_command("approve", RotationHandle.approve, "Commit now instead of waiting for the grace period.")
