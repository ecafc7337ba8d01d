"""``rekey rotate start | status | list | failures | pause | resume | abort | approve |
approve-destroy | cancel-destroy``: two-phase key rotation.

A skin over `rekey.client`: inputs are checked before connecting, everything else is a client call.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar
from rich.text import Text

from rekey.cli.context import store, with_client
from rekey.cli.output import EXIT_FAILED, emit_json, err, json_option, out, table
from rekey.client import (
    BLOCKED,
    DEFAULT_BATCH,
    DEFAULT_IN_FLIGHT,
    DONE,
    MAX_BATCH,
    MAX_IN_FLIGHT,
    PHASES,
    Progress,
    RekeyClient,
    RotationHandle,
    RotationReport,
    check_update_id,
    key_ref_of,
    parse_duration,
    parse_rotation_id,
    rotation_failures,
    rotation_id,
)


@click.group("rotate")
def cli() -> None:
    """Two-phase key rotation (RotateKeyWorkflow)."""


def _progress_line(progress: Progress) -> str:
    line = (
        f"{progress.key_ref}  phase {progress.phase}  v{progress.old_primary} -> v{progress.new_version}"
        f"  re-wrapped {progress.rewrapped}/{progress.total}  remaining {progress.remaining}"
        f"  conflicts {progress.conflicts}  failed {progress.failed}"
        f"  throttled waits {progress.throttled_waits}  rate {progress.current_rate:.0f}/s"
    )
    return line + ("  PAUSED" if progress.paused else "")


def _print_progress(progress: Progress) -> None:
    out.print(Text(_progress_line(progress)))
    for label, value in (
        ("blocked in", progress.blocked_in and f"{progress.blocked_in}: {progress.blocked_reason}"),
        ("commits at", progress.commit_due),
        ("destroys at", progress.destroy_due),
        ("disabled", ", ".join(f"v{v}" for v in progress.disabled)),
        ("destroyed", ", ".join(f"v{v}" for v in progress.destroyed)),
        ("note", progress.note),
    ):
        if value:
            out.print(Text(f"  {label}: {value}"))


def _report_dict(report: RotationReport) -> dict[str, Any]:
    return {
        **dataclasses.asdict(report.progress),
        "workflow_id": report.info.id,
        "workflow_status": report.info.status,
        "worker_polling": report.worker_polling,
        "pending_activities": [dataclasses.asdict(p) for p in report.pending],
    }


async def _follow(rotation: RotationHandle) -> Progress:
    """Watch to the end with a progress bar on stderr; the rotation's result (`RotationBlocked`
    if it stops in BLOCKED)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with ProgressBar(*columns, console=err) as bar:
        task = bar.add_task("PREPARING", total=None)

        def unavailable(exc: Exception) -> None:
            bar.console.log(Text(f"progress unavailable for a moment: {type(exc).__name__}"))

        final: Progress | None = None
        async for final in rotation.watch(on_unavailable=unavailable):
            bar.update(
                task,
                description=f"{final.phase:<16}",
                total=final.total or None,
                completed=final.rewrapped + final.conflicts + final.failed,
            )
    assert final is not None, "watch ends with the rotation's result"
    return final


@cli.command("start")
@click.argument("key_ref", metavar="KEYREF")
@click.option("--grace", default="24h", show_default=True, help="Wait before disabling old versions.")
@click.option(
    "--destroy-after",
    default=None,
    help="Destroy old versions this long after disabling them (default: never; approve-destroy shortens it).",
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
    """Start rotating KEYREF, or attach to its running rotation (a key has one at a time).

    Exits 0 when DONE (with --wait), 1 when ABORTED, BLOCKED or failed."""
    rotation_id(key_ref)  # a bad key ref is bad input even when Temporal is down
    grace_s = parse_duration(grace, "--grace")
    destroy_s = None if destroy_after is None else parse_duration(destroy_after, "--destroy-after")

    async def run(client: RekeyClient) -> tuple[RotationHandle, Progress | None]:
        rotation = await client.start_rotation(
            key_ref, grace=grace_s, destroy_after=destroy_s, batch_size=batch_size, in_flight=in_flight
        )
        if not rotation.started and not json_out:
            err.print(
                Text(
                    f"a rotation of {rotation.key_ref} is running already: attached to {rotation.id}"
                    " (its own options apply, not these)"
                )
            )
        return rotation, (await _follow(rotation) if wait_ else None)

    rotation, result = with_client(run)
    if result is None:
        if json_out:
            emit_json({"workflow_id": rotation.id, "started": rotation.started})
        elif rotation.started:
            out.print(Text(f"started {rotation.id}  (follow it: rekey rotate status {rotation.id})"))
        return
    emit_json(dataclasses.asdict(result)) if json_out else _print_progress(result)
    if result.phase != DONE:
        sys.exit(EXIT_FAILED)


@cli.command("status")
@click.argument("id_text", metavar="ID")
@json_option
def status(id_text: str, json_out: bool) -> None:
    """Phase and progress of a rotation (ID is rotate:BACKEND:NAME, or the key ref).

    Answers from Temporal alone: no worker is needed; it says when none is polling."""
    target = parse_rotation_id(id_text)
    report = with_client(lambda client: client.rotation(target).report())
    failed = _recorded_failures(report.progress)
    if json_out:
        emit_json({**_report_dict(report), **failed})
        return
    _print_progress(report.progress)
    if report.info.status != "RUNNING":
        out.print(Text(f"  workflow: {report.info.status}"))
    elif not report.worker_polling:
        out.print(Text(f"  warning: no rekey worker is polling task queue {report.info.task_queue!r}"))
    for pending in report.pending:
        failure = f", last failure: {pending.last_failure}" if pending.last_failure else ""
        out.print(
            Text(f"  waiting on {pending.activity} ({pending.state}, attempt {pending.attempt}{failure})")
        )
    if failed.get("failures_recorded"):
        out.print(
            Text(f"  {failed['failures_recorded']} blobs not re-wrapped: rekey rotate failures {target}")
        )
    if report.progress.phase == BLOCKED:
        out.print(Text(f"  next: fix the cause, then `rekey rotate resume {target}` (or abort)"))


def _recorded_failures(progress: Progress, first: int = 20) -> dict[str, Any]:
    """How many blobs the store records as not re-wrapped (and the first ``first``), or why
    the store could not say (it may be on another machine: status itself needs only Temporal)."""
    from sealing.store import StoreError

    if not progress.new_version:
        return {"failures_recorded": 0, "failures": []}
    try:
        opened = store()
        try:
            rows = rotation_failures(opened, progress.key_ref, progress.new_version, limit=first)
            count = opened.count_rewrap_failures(progress.key_ref, progress.new_version)
        finally:
            opened.close()
    except StoreError as exc:
        return {"failures_recorded": None, "failures_error": str(exc)}
    return {"failures_recorded": count, "failures": [dataclasses.asdict(r) for r in rows]}


@cli.command("list")
@click.option("--key", "key_ref", default=None, metavar="KEYREF", help="Only rotations of this key.")
@click.option("--phase", type=click.Choice(PHASES), default=None, help="Only rotations in this phase.")
@click.option("--running", is_flag=True, help="Only running rotations.")
@json_option
def list_(key_ref: str | None, phase: str | None, running: bool, json_out: bool) -> None:
    """Rotations, newest first (Temporal's list may lag a start by a moment)."""
    if key_ref is not None:
        rotation_id(key_ref)
    rows = with_client(
        lambda client: client.list_rotations(running_only=running, key_ref=key_ref, phase=phase)
    )
    if json_out:
        emit_json([dataclasses.asdict(row) for row in rows])
        return
    if not rows:
        out.print("no rotations")
        return
    grid = table("ID", "STATUS", "PHASE", "STARTED", "CLOSED")
    for row in rows:
        closed = row.closed_at.isoformat(timespec="seconds") if row.closed_at else ""
        grid.add_row(
            *(
                Text(c)
                for c in (row.id, row.status, row.phase, row.started_at.isoformat(timespec="seconds"), closed)
            )
        )
    out.print(grid)


@cli.command("failures")
@click.argument("id_text", metavar="ID")
@click.option(
    "--version",
    "version",
    type=click.IntRange(1),
    default=None,
    help="The rotation's new version (default: the one its status shows).",
)
@click.option("--after", default=None, metavar="BLOB_ID", help="Page on after this blob id.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@json_option
def failures(id_text: str, version: int | None, after: str | None, limit: int, json_out: bool) -> None:
    """Every blob the rotation could not re-wrap that is still below its new version, and why."""
    target = parse_rotation_id(id_text)
    key_ref = key_ref_of(target)
    if version is None:
        version = with_client(lambda client: client.rotation(target).status()).new_version
        if not version:
            out.print("the rotation has not made its new version yet: no failures")
            return
    rows = rotation_failures(store(), key_ref, version, after=after, limit=limit)
    if json_out:
        emit_json({"key_ref": key_ref, "version": version, "failures": [dataclasses.asdict(r) for r in rows]})
        return
    if not rows:
        out.print(Text(f"no blob of {key_ref} is left below v{version} by a failure"))
        return
    grid = table("BLOB", "ATTEMPTS", "LAST SEEN", "REASON")
    for row in rows:
        grid.add_row(
            Text(row.blob_id),
            str(row.attempts),
            row.last_seen.isoformat(timespec="seconds"),
            Text(row.reason),
        )
    out.print(grid)


def _update_command(name: str, help_text: str) -> None:
    method = getattr(RotationHandle, name.replace("-", "_"))

    @cli.command(name, help=help_text)
    @click.argument("id_text", metavar="ID")
    @click.option(
        "--update-id",
        default=None,
        metavar="TEXT",
        help="Name this request: sent again with the same id (after a timeout), it gets the first answer.",
    )
    @json_option
    def command(id_text: str, update_id: str | None, json_out: bool) -> None:
        target = parse_rotation_id(id_text)
        if update_id is not None:
            check_update_id(update_id, "--update-id")  # bad input even when Temporal is down
        answer = with_client(lambda client: method(client.rotation(target), update_id=update_id))
        emit_json({"workflow_id": target, "update": name, "answer": answer}) if json_out else out.print(
            Text(f"{target}: {answer}")
        )


_update_command("pause", "Pause: the sweep stops after the batches in flight; a commit or destroy waits.")
_update_command("resume", "Resume a paused rotation, or a BLOCKED one once its cause is fixed.")
_update_command("abort", "Abort before the old versions are disabled: every blob stays readable.")
_update_command(
    "approve", "Disable the old versions now instead of after the grace period (AWAITING_COMMIT)."
)
_update_command(
    "approve-destroy", "Destroy the old versions now, not after the destroy delay (AWAITING_DESTROY)."
)
_update_command("cancel-destroy", "Keep the old versions disabled and never destroy them (AWAITING_DESTROY).")
