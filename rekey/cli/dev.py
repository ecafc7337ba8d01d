"""``rekey dev up | down | status``: the embedded dev stack."""

from __future__ import annotations

from collections.abc import Callable

import click
from rich.table import Table

from rekey import devstack
from rekey.cli.context import settings
from rekey.cli.output import emit_json, err, json_option, out, table


@click.group("dev")
def cli() -> None:
    """The embedded dev stack: Temporal, OpenBao, moto."""


def _status_table(rows: list[devstack.ComponentStatus]) -> Table:
    status = table("component", "state", "pid", "endpoints", "note")
    for row in rows:
        endpoints = "  ".join(f"{k} {v}" for k, v in row.endpoints.items())
        status.add_row(row.name, row.state, str(row.pid or "-"), endpoints, row.note)
    return status


def _echo(json_out: bool) -> Callable[[str], None]:
    """Where the stack's step-by-step messages go: stderr, or nowhere next to JSON."""
    return (lambda _msg: None) if json_out else (lambda msg: err.print(msg))


@cli.command("up")
@json_option
def up(json_out: bool) -> None:
    """Start the dev stack (idempotent) and wait until every component answers."""
    current = settings()
    rows = devstack.up(current, echo=_echo(json_out))
    if json_out:
        emit_json([r.to_dict() for r in rows])
        return
    out.print(_status_table(rows))
    ui = next((r.endpoints.get("ui") for r in rows if r.endpoints.get("ui")), None)
    if ui:
        out.print(f"Temporal UI: {ui}")
    out.print(f"State directory: {current.home.resolve()}  (stop with: rekey dev down)")


@cli.command("down")
@json_option
def down(json_out: bool) -> None:
    """Stop exactly what `rekey dev up` started."""
    rows = devstack.down(settings(), echo=_echo(json_out))
    if json_out:
        emit_json([r.to_dict() for r in rows])
    else:
        out.print(_status_table(rows))


@cli.command("status")
@json_option
def status(json_out: bool) -> None:
    """Show each component, its state and endpoints."""
    rows = devstack.status(settings())
    if json_out:
        emit_json([r.to_dict() for r in rows])
    else:
        out.print(_status_table(rows))
