"""``rekey migrate start | status | pause | resume | abort | approve``: sealed state moves from one
enclave generation to the next (MigrateGenerationWorkflow). A skin over `rekey.client.migrations`."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar
from rich.text import Text

from rekey.cli.context import with_client
from rekey.cli.output import EXIT_DENIED, EXIT_FAILED, emit_json, err, json_option, out
from rekey.client import RekeyClient, parse_duration
from rekey.client.migrations import (
    MigrationHandle,
    MigrationProgress,
    migration_handle,
    parse_waves,
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
            + ("  PAUSED" if progress.paused else "")
        )
    )
    for host in progress.hosts:
        out.print(
            Text(
                f"  {host.host_id}  wave {host.wave}  {host.state}  moved {host.moved}/{host.total}"
                f"  remaining {host.remaining}  conflicts {host.conflicts}"
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
@click.option("--waves", default="1,10,50,100", show_default=True, help="Cumulative percentages of hosts.")
@click.option("--grace", default="24h", show_default=True, help="Wait before deleting the old copies.")
@click.option("--on-failure", type=click.Choice(["rollback", "pause"]), default="rollback", show_default=True)
@click.option("--gate-sample", type=click.IntRange(0, 1000), default=5, show_default=True)
@click.option("--allow-same-svn", is_flag=True, help="Admit a new generation with the old one's SVN.")
@click.option("--wait", "wait_", is_flag=True, help="Show a progress bar per wave and wait for the end.")
@json_option
def start(
    from_generation: str,
    to_generation: str,
    waves: str,
    grace: str,
    on_failure: str,
    gate_sample: int,
    allow_same_svn: bool,
    wait_: bool,
    json_out: bool,
) -> None:
    """Start migrating OLD's hardware-sealed state to NEW (or attach to the running migration).

    With --wait: exits 0 on DONE, 1 on ROLLED_BACK or failure, 3 when refused at ATTESTING."""
    wave_list = parse_waves(waves)
    grace_s = parse_duration(grace, "--grace")

    async def run(client: RekeyClient) -> MigrationProgress | str:
        migration = await start_migration(
            client.temporal,
            from_generation,
            to_generation,
            waves=wave_list,
            grace=grace_s,
            on_failure=on_failure,
            gate_sample=gate_sample,
            allow_same_svn=allow_same_svn,
            task_queue=client.task_queue,
        )
        if not wait_:
            return migration.id
        return await (migration.result() if json_out else _follow(migration))

    result = with_client(run)
    if isinstance(result, str):
        emit_json({"id": result}) if json_out else out.print(Text(f"started {result}"))
        return
    emit_json(dataclasses.asdict(result)) if json_out else _print(result)
    sys.exit(_exit_code(result))


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
