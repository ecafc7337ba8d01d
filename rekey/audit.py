"""The ``rekey audit`` command group (verify, export) over the audit log of `audit`, whose
format is specified in docs/audit-log-format.md."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from audit import AuditError, AuditLog, trusted_public_keys
from rekey.config import Settings, load_settings
from sealing.store import StoreError

__all__ = ["audit_group", "make_audit_group"]


@contextlib.contextmanager
def _cli_errors() -> Iterator[None]:
    # One line, exit 1, whether run by the rekey CLI (it prints "error: ...") or on its own.
    try:
        yield
    except (AuditError, StoreError) as exc:
        raise click.ClickException(str(exc)) from exc


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True, default=str))


def _details_text(details: Any) -> str:
    if isinstance(details, str):
        return details
    return json.dumps(details, sort_keys=True, separators=(", ", ": "), ensure_ascii=False)


def make_audit_group(settings_factory: Callable[[], Settings]) -> click.Group:
    """The ``audit`` command group; ``settings_factory`` is called inside each command (pass
    the CLI's settings accessor so ``--home`` is honoured)."""
    group = click.Group("audit", help="The signed, hash-chained audit log of key operations.")

    @group.command("verify")
    @click.option(
        "--public-key",
        "public_key_paths",
        multiple=True,
        type=click.Path(path_type=Path, dir_okay=False),
        help="Trust this Ed25519 public key (PEM; repeatable). Default: every *.pub.pem in <home>/audit/.",
    )
    @click.option("--json", "json_out", is_flag=True, help="Print JSON.")
    @click.pass_context
    def verify_command(ctx: click.Context, public_key_paths: tuple[Path, ...], json_out: bool) -> None:
        """Check the chain and every signature; name the first bad record (exit 1)."""
        settings = settings_factory()
        with _cli_errors():
            keys = trusted_public_keys(settings.home, public_key_paths)
            with AuditLog(settings.store_url, None) as log:
                report = log.verify(keys)
        if json_out:
            _echo_json(report.to_dict())
        if not report.ok:
            click.echo(f"error: {report.reason}", err=True)
            ctx.exit(1)
        if not json_out:
            noun = "record" if report.count == 1 else "records"
            line = f"{report.count} {noun} verified"
            if report.last_seq is not None:
                line += f" (last: record {report.last_seq}, hash {report.last_hash})"
            click.echo(line)

    @group.command("export")
    @click.option("--json", "json_out", is_flag=True, help="Print JSON (an array of records).")
    def export_command(json_out: bool) -> None:
        """Print every record as stored (no verification; see `rekey audit verify`)."""
        settings = settings_factory()
        with _cli_errors(), AuditLog(settings.store_url, None) as log:
            records = log.export()
        if json_out:
            _echo_json(records)
            return
        console = Console(
            highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200, markup=False
        )
        table = RichTable(
            "seq", "time", "actor", "event", "subject", "details", "signer", box=None, pad_edge=False
        )
        for rec in records:
            # Text cells: values from the database are never read as rich markup.
            table.add_row(
                *(
                    Text(str(value))
                    for value in (
                        rec["seq"],
                        rec["recorded_at"],
                        rec["actor"],
                        rec["event"],
                        rec["subject"],
                        _details_text(rec["details"]),
                        rec["key_id"],
                    )
                )
            )
        console.print(table)
        console.print(f"{len(records)} records (not verified; run rekey audit verify)")

    return group


audit_group: click.Group = make_audit_group(lambda: load_settings())
"""The group with settings from ``REKEY_HOME``/``./.rekey``; the ``rekey`` CLI registers
``make_audit_group(<its settings accessor>)`` instead so that ``--home`` applies."""
