"""``rekey generation register | list | diff``: enclave generations (measured builds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from rekey.cli.context import store
from rekey.cli.output import EXIT_DOWNGRADE, emit_json, json_option, out, table
from sealing.generation import GenerationManifest, ManifestError, diff, load_manifest, parse_manifest
from sealing.store import RecordNotFound, SealedStateStore


@click.group("generation")
def cli() -> None:
    """Enclave generations (measured builds)."""


def _registered(sealed_store: SealedStateStore, generation_id: str) -> GenerationManifest:
    try:
        document = sealed_store.get_generation(generation_id)
    except RecordNotFound:
        raise ManifestError(f"generation {generation_id!r} is not registered") from None
    return parse_manifest(json.loads(document), f"generation {generation_id}")


@cli.command("register")
@click.argument("manifest", metavar="MANIFEST", type=click.Path(path_type=Path))
@json_option
def register(manifest: Path, json_out: bool) -> None:
    """Register a generation from its manifest (idempotent for an identical manifest)."""
    parsed = load_manifest(manifest)
    with store(create=True) as sealed_store:
        created = sealed_store.put_generation(parsed.id, parsed.canonical_json())
    if json_out:
        emit_json(parsed.model_dump() | {"created": created})
    else:
        verb = "registered" if created else "already registered:"
        out.print(f"{verb} generation {parsed.id} ({parsed.platform}, svn {parsed.svn})")


@cli.command("list")
@json_option
def list_(json_out: bool) -> None:
    """List registered generations."""
    with store() as sealed_store:
        rows = sealed_store.list_generations()
    items: list[dict[str, Any]] = [json.loads(doc) | {"registered_at": at.isoformat()} for _, doc, at in rows]
    if json_out:
        emit_json(items)
        return
    listing = table("id", "platform", "svn", "product", "debug", "tcb", "measurement")
    for i in items:
        listing.add_row(
            i["id"],
            i["platform"],
            str(i["svn"]),
            str(i["product_id"]),
            str(i["debug"]).lower(),
            i["tcb"],
            i["measurement"][:16] + "…",
        )
    out.print(listing if items else "no generations registered")


@cli.command("diff")
@click.argument("old", metavar="GEN_A")
@click.argument("new", metavar="GEN_B")
@json_option
@click.option("--markdown", is_flag=True, help="Print a Markdown table (for a change review).")
def diff_(old: str, new: str, json_out: bool, markdown: bool) -> None:
    """Show every field old -> new and flag what matters for sealed state.

    Exits 4 when the SVN goes down (a downgrade)."""
    with store() as sealed_store:
        result = diff(_registered(sealed_store, old), _registered(sealed_store, new))
    if json_out:
        emit_json(result.to_dict())
    elif markdown:
        out.print(result.to_markdown(), markup=False)
    else:
        fields = table("field", old, new, "")
        for f in result.fields:
            fields.add_row(f.field, str(f.old), str(f.new), "[bold]changed[/]" if f.changed else "")
        out.print(fields)
        for flag in result.flags():
            out.print(f"[bold yellow]! {flag}[/]")
    if result.svn_lowered:
        raise click.exceptions.Exit(EXIT_DOWNGRADE)
