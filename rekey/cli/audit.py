"""``rekey audit verify | export``: the signed, hash-chained audit log of key operations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from audit import AuditLog, trusted_public_keys
from rekey.cli.context import settings
from rekey.cli.output import EXIT_FAILED, emit_json, error_line, out, table


@click.group("audit")
def cli() -> None:
    """The signed, hash-chained audit log of key operations."""


def _details_text(details: Any) -> str:
    if isinstance(details, str):
        return details
    return json.dumps(details, sort_keys=True, separators=(", ", ": "), ensure_ascii=False)


@cli.command("verify")
@click.option(
    "--public-key",
    "public_key_paths",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trust this Ed25519 public key (PEM; repeatable). Default: every *.pub.pem in <home>/audit/.",
)
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
def verify(public_key_paths: tuple[Path, ...], json_out: bool) -> None:
    """Check the chain and every signature; name the first bad record (exit 1)."""
    current = settings()
    keys = trusted_public_keys(current.home, public_key_paths)
    with AuditLog(current.store_url, None) as log:
        report = log.verify(keys)
    if json_out:
        emit_json(report.to_dict(), sort_keys=True)
    if not report.ok:
        error_line(str(report.reason))
        raise click.exceptions.Exit(EXIT_FAILED)
    if not json_out:
        noun = "record" if report.count == 1 else "records"
        line = f"{report.count} {noun} verified"
        if report.last_seq is not None:
            line += f" (last: record {report.last_seq}, hash {report.last_hash})"
        out.print(line, markup=False)


@cli.command("export")
@click.option("--json", "json_out", is_flag=True, help="Print JSON (an array of records).")
def export(json_out: bool) -> None:
    """Print every record as stored (no verification; see `rekey audit verify`)."""
    current = settings()
    with AuditLog(current.store_url, None) as log:
        records = log.export()
    if json_out:
        emit_json(records, sort_keys=True)
        return
    listing = table("seq", "time", "actor", "event", "subject", "details", "signer")
    for rec in records:
        # Text cells: values from the database are never read as rich markup.
        listing.add_row(
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
    out.print(listing)
    out.print(f"{len(records)} records (not verified; run rekey audit verify)", markup=False)
