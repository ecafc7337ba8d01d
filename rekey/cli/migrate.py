"""``rekey migrate start | status | pause | resume | abort | approve | release-claim``: state moves from one
enclave generation to the next (MigrateGenerationWorkflow). A skin over `rekey.client.migrations`."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar
from rich.text import Text

from rekey.cli.context import store, with_client
from rekey.cli.migration_options import MigrationOptions, migration_options
from rekey.cli.output import EXIT_DENIED, EXIT_FAILED, emit_json, err, json_option, out
from rekey.client import RekeyClient, parse_duration
from rekey.client.migrations import (
    MigrateInput,
    MigrationHandle,
    MigrationProgress,
    migration_handle,
    migration_request,
    parse_waves,
    release_claim,
    start_migration,
)

DONE = "DONE"


@click.group("migrate")
def cli() -> None:
    """Generation migration: hardware-sealed state moves to a patched generation in waves."""


def _print(progress: MigrationProgress) -> None:
    wave = f"wave {progress.wave}/{progress.waves}" if progress.waves else "no waves yet"
    out.print(
        Text(
            f"{progress.from_generation} -> {progress.to_generation}  phase {progress.phase}  {wave}"
            f"  moved {progress.moved}/{progress.total}  remaining {progress.remaining}"
            f"  conflicts {progress.conflicts}  attestations {progress.attestations}"
            + (
                f"  kms re-bound {progress.kms_moved}/{progress.kms_moved + progress.kms_remaining}"
                if progress.kms_blobs or progress.kms_moved
                else ""
            )
            + ("  PAUSED" if progress.paused else "")
        )
    )
    for host in progress.hosts:
        out.print(
            Text(
                f"  {host.host_id}  wave {host.wave}  {host.state}  moved {host.moved}/{host.total}"
                f"  remaining {host.remaining}  conflicts {host.conflicts}"
                + (f"  kms {host.kms_moved}/{host.kms_total}" if host.kms_total else "")
            )
        )
    for label, value in (
        ("held", progress.held),
        ("commits at", progress.commit_due),
        ("note", progress.note),
    ):
        if value:
            out.print(Text(f"  {label}: {value}"))
    for reason in progress.reasons:
        out.print(Text(f"  reason: {reason}"))


async def _follow(migration: MigrationHandle) -> MigrationProgress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    final: MigrationProgress | None = None
    with ProgressBar(*columns, console=err) as bar:
        tasks: dict[int, Any] = {}
        async for final in migration.watch():
            for count in final.wave_counts:
                hosts = [h for h in final.hosts if h.host_id in count.hosts]
                total = sum(h.total for h in hosts) or None
                if count.wave not in tasks:
                    tasks[count.wave] = bar.add_task(f"wave {count.wave}/{final.waves}", total=total)
                bar.update(tasks[count.wave], total=total, completed=sum(h.moved for h in hosts))
    if final is None:  # pragma: no cover - watch ends with the result
        raise click.ClickException("the migration ended without a result")
    return final


def _exit_code(progress: MigrationProgress) -> int:
    if progress.phase == DONE:
        return 0
    return EXIT_DENIED if progress.refused else EXIT_FAILED


@cli.command("start")
@click.option("--from", "from_generation", required=True, metavar="OLD", help="Generation the state is on.")
@click.option("--to", "to_generation", required=True, metavar="NEW", help="Generation it moves to.")
@migration_options
@json_option
def start(from_generation: str, to_generation: str, migration: MigrationOptions, json_out: bool) -> None:
    """Start migrating OLD's state, hardware-sealed and KMS-wrapped, to NEW (or attach to the running one).

    With --wait: exits 0 on DONE, 1 on ROLLED_BACK or failure, 3 when refused at ATTESTING."""
    request = checked_request(from_generation, to_generation, migration)
    outcome = with_client(lambda client: run_start(client, request, migration.wait, json_out))
    code = report_start(outcome, json_out)
    if code:
        sys.exit(code)


def checked_request(from_generation: str, to_generation: str, options: MigrationOptions) -> MigrateInput:
    """The start input the options describe; a bad option raises before anything is sent."""
    return migration_request(
        from_generation,
        to_generation,
        waves=parse_waves(options.waves),
        grace=parse_duration(options.grace, "--grace"),
        on_failure=options.on_failure,
        gate_sample=options.gate_sample,
        allow_same_svn=options.allow_same_svn,
        jitter=parse_duration(options.jitter, "--jitter"),
    )


@dataclasses.dataclass
class StartOutcome:
    id: str
    started: bool
    result: MigrationProgress | None = None


async def run_start(client: RekeyClient, request: MigrateInput, wait: bool, json_out: bool) -> StartOutcome:
    """Start (or attach to) the migration of ``request``; with ``wait``, follow it to its end."""
    migration = await start_migration(
        client.temporal,
        request.from_generation,
        request.to_generation,
        waves=request.waves,
        grace=request.grace_seconds,
        on_failure=request.on_failure,
        gate_sample=request.gate_sample,
        allow_same_svn=request.allow_same_svn,
        jitter=request.jitter_seconds,
        task_queue=client.task_queue,
    )
    outcome = StartOutcome(migration.id, bool(migration.started))
    if not json_out:
        verb = "started" if outcome.started else "attached to the running"
        out.print(Text(f"{verb} {migration.id}"))
    if wait:
        outcome.result = await (migration.result() if json_out else _follow(migration))
    return outcome


def report_start(outcome: StartOutcome, json_out: bool, extra: dict[str, Any] | None = None) -> int:
    """Print what a start did (JSON: with ``extra``); the exit code it ends with."""
    if json_out:
        data: dict[str, Any] = {"id": outcome.id, "started": outcome.started}
        if outcome.result is not None:
            data |= dataclasses.asdict(outcome.result)
        emit_json(data if extra is None else extra | {"migration": data})
    elif outcome.result is not None:
        _print(outcome.result)
    return 0 if outcome.result is None else _exit_code(outcome.result)


@cli.command("status")
@click.argument("migration_id", metavar="ID")
@json_option
def status(migration_id: str, json_out: bool) -> None:
    """Phase, wave, per-host counts and reasons of migration ID (no worker needed)."""

    async def run(client: RekeyClient) -> MigrationProgress | None:
        return await migration_handle(client.temporal, migration_id).status()

    progress = with_client(run)
    if progress is None:
        emit_json({"id": migration_id, "phase": ""}) if json_out else out.print(
            Text(f"{migration_id}: waiting for a worker to take it up")
        )
        return
    emit_json(dataclasses.asdict(progress)) if json_out else _print(progress)


def _update_command(name: str, help_text: str) -> None:
    @cli.command(name, help=help_text)
    @click.argument("migration_id", metavar="ID")
    def command(migration_id: str) -> None:
        async def run(client: RekeyClient) -> str:
            handle = migration_handle(client.temporal, migration_id)
            answer: str = await getattr(handle, name)()
            return answer

        out.print(Text(with_client(run)))


_update_command("pause", "Pause: the hand-off stops after the batch in flight; a pause holds the commit.")
_update_command("resume", "Resume a paused migration, or one stopped (held) once its cause is fixed.")
_update_command("abort", "Abort before NARROWING: every moved blob goes back to its old copy (ROLLED_BACK).")
_update_command("approve", "Commit now instead of after the grace period (only in AWAITING_COMMIT).")


@cli.command("release-claim")
@click.argument("migration_id", metavar="ID")
def release_claim_command(migration_id: str) -> None:
    """Release the generation claims of migration ID, whose workflow was terminated.

    A migration claims both its generations at ATTESTING and releases them when it ends DONE or
    ROLLED_BACK; one terminated by an operator keeps them, and every later migration involving
    either generation is refused. Refused (exit 3, nothing released) while ID still runs."""

    async def run(client: RekeyClient) -> list[str]:
        with store() as sealed_store:
            released = await release_claim(client.temporal, sealed_store, migration_id)
        return [claim.generation for claim in released]

    generations = with_client(run)
    out.print(
        Text(
            f"released the claims of {migration_id} on {', '.join(generations)}"
            if generations
            else f"{migration_id} holds no claims"
        )
    )
