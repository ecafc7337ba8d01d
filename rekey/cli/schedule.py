"""``rekey schedule create | list | pause | unpause | trigger | delete``: scheduled rotation.

A skin over `rekey.client`: inputs are checked before connecting, everything else is a client call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import click

from rekey.cli.context import with_client
from rekey.cli.output import emit_json, json_option, out, table
from rekey.client import InvalidDuration, RekeyClient, parse_duration, parse_schedule_id, schedule_id


@click.group("schedule")
def cli() -> None:
    """Scheduled rotation (Temporal Schedules, overlap policy skip)."""


@cli.command("create")
@click.argument("key_ref", metavar="KEYREF")
@click.option("--every", required=True, help="Interval, e.g. 30d or 90d.")
@click.option("--jitter", default="0", show_default=True, help="Random delay added to each run.")
@click.option("--grace", default="24h", show_default=True, help="Wait before disabling old versions.")
@click.option(
    "--destroy-after",
    default=None,
    help="Destroy old versions this long after disabling them (default: never).",
)
def create(key_ref: str, every: str, jitter: str, grace: str, destroy_after: str | None) -> None:
    """Rotate KEYREF every DUR: each run starts the key's rotation, or records in the audit log
    that one is running (a key has one rotation at a time, whoever starts it)."""
    schedule_id(key_ref)  # a bad key ref is bad input even when Temporal is down
    every_s = parse_duration(every, "--every")
    if every_s <= 0:
        raise InvalidDuration("--every must be longer than 0s")
    grace_s = parse_duration(grace, "--grace")
    destroy_s = None if destroy_after is None else parse_duration(destroy_after, "--destroy-after")
    jitter_s = parse_duration(jitter, "--jitter")
    created = with_client(
        lambda client: client.create_schedule(
            key_ref, every=every_s, jitter=jitter_s, grace=grace_s, destroy_after=destroy_s
        )
    )
    out.print(f"created {created}: rotate {key_ref} every {every}")


@cli.command("list")
@json_option
def list_(json_out: bool) -> None:
    """List rotation schedules."""
    schedules = with_client(lambda client: client.list_schedules())
    rows: list[dict[str, Any]] = [
        {
            "id": s.id,
            "paused": s.paused,
            "next_runs": [t.isoformat() for t in s.next_runs][:3],
            "recent": list(s.recent_launches)[-3:],
        }
        for s in schedules
    ]
    if json_out:
        emit_json(rows)
        return
    listing = table("schedule", "paused", "next runs")
    for row in rows:
        listing.add_row(row["id"], str(row["paused"]).lower(), ", ".join(t[:19] for t in row["next_runs"]))
    out.print(listing if rows else "no rotation schedules")


def _schedule_command(
    name: str, action: Callable[[RekeyClient, str], Awaitable[str]], help_text: str
) -> None:
    @cli.command(name, help=help_text)
    @click.argument("id_text", metavar="ID")
    def command(id_text: str) -> None:
        target = parse_schedule_id(id_text)
        with_client(lambda client: action(client, target))
        out.print(f"{name}: {target}")


_schedule_command("pause", RekeyClient.pause_schedule, "Stop starting rotations from this schedule.")
_schedule_command("unpause", RekeyClient.unpause_schedule, "Start rotations from this schedule again.")
_schedule_command("trigger", RekeyClient.trigger_schedule, "Start a rotation now (even while paused).")
_schedule_command("delete", RekeyClient.delete_schedule, "Delete the schedule (running rotations go on).")
