"""``rekey generation register | list | show | diff``: enclave generations (measured builds), and
which one supersedes which (``register --supersedes OLD [--auto-migrate]``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from attestation.platforms import PLATFORMS
from rekey.cli.context import store
from rekey.cli.migration_options import NAMES, MigrationOptions, migration_options
from rekey.cli.output import EXIT_DOWNGRADE, EXIT_FAILED, emit_json, error_line, json_option, out, table
from sealing.generation import (
    GenerationManifest,
    ManifestError,
    diff,
    load_manifest,
    manifest_from_claims,
    parse_manifest,
)
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


def _manifest(
    manifest: Path | None,
    evidence_path: Path | None,
    platform: str | None,
    generation_id: str | None,
    collateral_path: Path | None,
    jwks_path: Path | None,
    at_text: str | None,
) -> GenerationManifest:
    """The manifest to register: read from MANIFEST, or built from verified evidence."""
    evidence_only = {
        "--platform": platform,
        "--id": generation_id,
        "--collateral": collateral_path,
        "--jwks": jwks_path,
        "--at": at_text,
    }
    if evidence_path is None:
        if manifest is None:
            raise click.UsageError("give a MANIFEST, or --from-evidence FILE --platform P --id ID")
        stray = [name for name, value in evidence_only.items() if value is not None]
        if stray:
            raise click.UsageError(f"{', '.join(stray)}: only with --from-evidence")
        return load_manifest(manifest)
    if manifest is not None:
        raise click.UsageError("give a MANIFEST or --from-evidence FILE, not both")
    if platform is None or generation_id is None:
        raise click.UsageError("--from-evidence needs --platform P and --id ID")
    from rekey.cli.attest import parse_at, verified_claims  # the platform verifiers: only for this

    claims = verified_claims(
        evidence_path, platform, collateral_path=collateral_path, jwks_path=jwks_path, at=parse_at(at_text)
    )
    return manifest_from_claims(claims, generation_id, source=f"{evidence_path}")


def _option_names(names: tuple[str, ...]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)


@cli.command("register")
@click.argument("manifest", metavar="[MANIFEST]", type=click.Path(path_type=Path), required=False)
@click.option(
    "--from-evidence",
    "evidence_path",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="Build the manifest from this verified evidence instead (with --platform and --id).",
)
@click.option(
    "--platform", type=click.Choice(PLATFORMS), default=None, help="With --from-evidence: its platform."
)
@click.option(
    "--id", "generation_id", default=None, metavar="ID", help="With --from-evidence: the generation id."
)
@click.option(
    "--collateral",
    "collateral_path",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="With --from-evidence: as for attest verify (sgx/tdx collateral, sev-snp VCEK).",
)
@click.option(
    "--jwks",
    "jwks_path",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="With --from-evidence --platform maa: the provider's JWKS.",
)
@click.option(
    "--at",
    "at_text",
    default=None,
    metavar="TIME",
    help="With --from-evidence: verify as of this ISO 8601 time (default now).",
)
@click.option(
    "--supersedes",
    default=None,
    metavar="OLD",
    help="Record that this generation supersedes the registered generation OLD (a patch).",
)
@click.option(
    "--auto-migrate",
    is_flag=True,
    help="With --supersedes: then start migrate:<OLD>:<NEW> (the options below as for migrate start).",
)
@migration_options
@json_option
@click.pass_context
def register(
    ctx: click.Context,
    manifest: Path | None,
    evidence_path: Path | None,
    platform: str | None,
    generation_id: str | None,
    collateral_path: Path | None,
    jwks_path: Path | None,
    at_text: str | None,
    supersedes: str | None,
    auto_migrate: bool,
    migration: MigrationOptions,
    json_out: bool,
) -> None:
    """Register a generation from its manifest (idempotent for an identical manifest).

    With --supersedes OLD the succession is stored with it (refused, nothing stored, if OLD is
    not registered, is this generation, is superseded by another one already, or it would make
    a cycle). With --auto-migrate the migration of OLD's state to it starts next: if that start
    fails the registration stays, the command exits 1, and `rekey migrate start` starts it.

    With --from-evidence FILE --platform P --id ID instead of MANIFEST, the manifest is what the
    evidence proves (verified as `rekey attest verify` does): a deploy pipeline registers exactly
    what runs. Evidence that does not verify registers nothing (exit 2)."""
    given = [n for n in NAMES if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
    if auto_migrate and supersedes is None:
        raise click.UsageError("--auto-migrate needs --supersedes OLD")
    if given and not auto_migrate:
        raise click.UsageError(f"{_option_names(tuple(given))}: only with --auto-migrate")
    parsed = _manifest(manifest, evidence_path, platform, generation_id, collateral_path, jwks_path, at_text)
    request = None
    if auto_migrate and supersedes is not None:
        from rekey.cli.migrate import checked_request  # loads the Temporal SDK: only for this

        request = checked_request(supersedes, parsed.id, migration)  # bad options: nothing stored
    with store(create=True) as sealed_store:
        created = sealed_store.put_generation(parsed.id, parsed.canonical_json(), supersedes=supersedes)
    registration = parsed.model_dump() | {"created": created, "supersedes": supersedes}
    if not json_out:
        verb = "registered" if created else "already registered:"
        succession = f", supersedes {supersedes}" if supersedes else ""
        out.print(
            f"{verb} generation {parsed.id} ({parsed.platform}, svn {parsed.svn}){succession}", markup=False
        )
    if request is None:
        if json_out:
            emit_json(registration)
        return
    sys.exit(_auto_migrate(request, migration.wait, json_out, registration))


def _auto_migrate(request: Any, wait: bool, json_out: bool, registration: dict[str, Any]) -> int:
    """Start the migration the registration asked for; the exit code. A start that fails
    (Temporal unreachable, say) is one error line saying the registration stays."""
    from rekey.cli.context import with_client
    from rekey.cli.migrate import report_start, run_start
    from rekey.client import RekeyClientError

    workflow_id = f"migrate:{request.from_generation}:{request.to_generation}"
    try:
        outcome = with_client(lambda client: run_start(client, request, wait, json_out))
    except RekeyClientError as exc:
        if json_out:
            emit_json(registration | {"migration": {"id": workflow_id, "started": False, "error": str(exc)}})
        error_line(
            f"generation {request.to_generation} is registered (superseding {request.from_generation}),"
            f" but {workflow_id} did not start: {exc}; start it with"
            f" `rekey migrate start --from {request.from_generation} --to {request.to_generation}`"
        )
        return EXIT_FAILED
    return report_start(outcome, json_out, registration)


def _with_succession(item: dict[str, Any], successions: dict[str, str]) -> dict[str, Any]:
    predecessors = {new: old for old, new in successions.items()}
    return item | {"supersedes": predecessors.get(item["id"]), "superseded_by": successions.get(item["id"])}


@cli.command("list")
@json_option
def list_(json_out: bool) -> None:
    """List registered generations (with which supersedes which) and how many stored blobs each
    holds."""
    with store() as sealed_store:
        rows = sealed_store.list_generations()
        successions = sealed_store.list_successions()
        blobs = sealed_store.census().by_generation
    items: list[dict[str, Any]] = [
        _with_succession(json.loads(doc) | {"registered_at": at.isoformat()}, successions)
        | {"blobs": blobs.get(gid, 0)}
        for gid, doc, at in rows
    ]
    if json_out:
        emit_json(items)
        return
    listing = table(
        "id",
        "platform",
        "svn",
        "product",
        "debug",
        "tcb",
        "measurement",
        "supersedes",
        "superseded by",
        "blobs",
    )
    for i in items:
        listing.add_row(
            i["id"],
            i["platform"],
            str(i["svn"]),
            str(i["product_id"]),
            str(i["debug"]).lower(),
            i["tcb"],
            i["measurement"][:16] + "…",
            i["supersedes"] or "-",
            i["superseded_by"] or "-",
            str(i["blobs"]),
        )
    out.print(listing if items else "no generations registered")


@cli.command("show")
@click.argument("generation_id", metavar="GEN")
@json_option
def show(generation_id: str, json_out: bool) -> None:
    """Show one registered generation: its manifest and which generations it supersedes and is
    superseded by."""
    with store() as sealed_store:
        manifest = _registered(sealed_store, generation_id)
        supersedes, superseded_by = sealed_store.generation_succession(generation_id)
    item = manifest.model_dump() | {"supersedes": supersedes, "superseded_by": superseded_by}
    if json_out:
        emit_json(item)
        return
    fields = table("field", "value")
    details = item.pop("details", {})
    for name, value in [*item.items(), *((f"details.{k}", v) for k, v in sorted(details.items()))]:
        fields.add_row(
            name, "-" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        )
    out.print(fields)


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
