"""``rekey key create | show | list``: KMS keys on the three backends."""

from __future__ import annotations

from typing import Any

import click

from kms_adapters.errors import KmsError
from kms_adapters.keyref import InvalidKeyRef
from rekey.backends import adapter_for, lister_for
from rekey.cli.context import settings
from rekey.cli.output import emit_json, json_option, out, table
from rekey.config import ConfigError


@click.group("key")
def cli() -> None:
    """KMS keys."""


def _print_key(data: dict[str, Any]) -> None:
    out.print(
        f"{data['key_ref']}  type {data['type']}  rotation {data['rotation_mode']}"
        f"  primary version {data['primary_version']}  release policy {data['release_policy'] or '-'}"
    )
    versions = table("version", "state", "created")
    for v in data["versions"]:
        primary = " (primary)" if v["primary"] else ""
        versions.add_row(str(v["version"]), v["state"] + primary, (v["created_at"] or "")[:19])
    out.print(versions)
    for note in data["notes"]:
        out.print(f"note: {note}")


@cli.command("create")
@click.argument("key_ref", metavar="KEYREF")
@click.option(
    "--rotation-mode",
    type=click.Choice(["native", "key-per-version"]),
    default=None,
    help="AWS only: one KMS key per version (default, retirable) or RotateKeyOnDemand.",
)
@json_option
def create(key_ref: str, rotation_mode: str | None, json_out: bool) -> None:
    """Create a key (a no-op if it exists): vault:NAME, aws:NAME, azure:NAME."""
    info, created = adapter_for(settings(), key_ref).create(rotation_mode=rotation_mode)  # type: ignore[arg-type]
    data = info.to_dict() | {"created": created}
    if json_out:
        emit_json(data)
        return
    out.print(f"{'created' if created else 'exists:'} {key_ref}")
    _print_key(data)


@cli.command("show")
@click.argument("key_ref", metavar="KEYREF")
@json_option
def show(key_ref: str, json_out: bool) -> None:
    """Show a key's versions, their state, the primary and the rotation mode."""
    data = adapter_for(settings(), key_ref).describe().to_dict()
    emit_json(data) if json_out else _print_key(data)


@cli.command("list")
@click.argument("backends", nargs=-1, type=click.Choice(["vault", "aws", "azure"]))
@json_option
def list_(backends: tuple[str, ...], json_out: bool) -> None:
    """List the keys on each backend (default: all three) with primary version and rotation mode."""
    current = settings()
    rows: list[dict[str, Any]] = []
    for backend in backends or ("vault", "aws", "azure"):
        try:
            lister = lister_for(current, backend)
            for name in lister.list_names():  # type: ignore[attr-defined]
                try:  # a key rekey cannot use (unsafe name, not in allowed_keys) is not listed
                    adapter = adapter_for(current, f"{backend}:{name}")
                except InvalidKeyRef:
                    continue
                rows.append(adapter.describe().to_dict())
        except (KmsError, ConfigError) as exc:  # one unreachable backend does not hide the others
            rows.append({"key_ref": f"{backend}:", "error": str(exc)})
    if json_out:
        emit_json(rows)
        return
    keys = table("key", "type", "rotation", "primary", "versions")
    for row in rows:
        if "error" in row:
            keys.add_row(row["key_ref"], "", "", "", f"unavailable: {row['error']}")
            continue
        states = ", ".join(f"v{v['version']} {v['state']}" for v in row["versions"])
        keys.add_row(row["key_ref"], row["type"], row["rotation_mode"], str(row["primary_version"]), states)
    out.print(keys if rows else "no keys")
