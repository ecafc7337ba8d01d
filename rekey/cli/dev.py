"""``rekey dev up | down | status``: the embedded dev stack."""

from __future__ import annotations

import math
from collections.abc import Callable

import click
from rich.table import Table

from rekey import devstack
from rekey.cli.context import settings
from rekey.cli.output import emit_json, err, json_option, out, table


@click.group("dev")
def cli() -> None:
    """The embedded dev stack: Temporal, OpenBao, moto, the Azure emulator, optionally throttled."""


def _status_table(rows: list[devstack.ComponentStatus]) -> Table:
    status = table("component", "state", "pid", "endpoints", "note")
    for row in rows:
        endpoints = "  ".join(f"{k} {v}" for k, v in row.endpoints.items())
        status.add_row(row.name, row.state, str(row.pid or "-"), endpoints, row.note)
    return status


def _echo(json_out: bool) -> Callable[[str], None]:
    """Where the stack's step-by-step messages go: stderr, or nowhere next to JSON."""
    return (lambda _msg: None) if json_out else (lambda msg: err.print(msg))


def _rate(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise click.BadParameter(f"must be a positive number of requests/s, not {value:g}")
    return value


def _throttle_line(choice: devstack.ThrottleChoice) -> str:
    if choice.profile is None:
        return "Throttle profile: none"
    return f"Throttle profile: {choice.label()}  (kept by later `dev up`; clear with --throttle-profile none)"


@cli.command("up")
@click.option(
    "--throttle-profile",
    type=click.Choice([*devstack.PROFILE_NAMES, "none"]),
    help="Run a backend throttled like the real service: vault-quota (OpenBao rate-limit quota), "
    "aws-kms (throttling proxy in front of moto), managed-hsm, managed-hsm-sustained (Azure "
    "emulator). Kept for later `dev up`; `none` clears it.",
)
@click.option(
    "--throttle-rate",
    type=float,
    callback=_rate,
    metavar="R",
    help="The profile's limit for cryptographic operations in requests/s (default: the documented figure).",
)
@json_option
def up(throttle_profile: str | None, throttle_rate: float | None, json_out: bool) -> None:
    """Start the dev stack (idempotent) and wait until every component answers."""
    current = settings()
    choice = devstack.choose(throttle_profile, throttle_rate, devstack.read_choice(current))
    rows = devstack.up(current, echo=_echo(json_out), throttle=choice)
    if json_out:
        emit_json([r.to_dict() for r in rows])
        return
    out.print(_status_table(rows))
    ui = next((r.endpoints.get("ui") for r in rows if r.endpoints.get("ui")), None)
    if ui:
        out.print(f"Temporal UI: {ui}")
    out.print(_throttle_line(choice))
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
    current = settings()
    rows = devstack.status(current)
    if json_out:
        emit_json([r.to_dict() for r in rows])
    else:
        out.print(_status_table(rows))
        out.print(_throttle_line(devstack.read_choice(current)))
