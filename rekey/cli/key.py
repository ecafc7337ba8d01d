"""``rekey key create | show | list``: KMS keys on the three backends."""

from __future__ import annotations

from typing import Any

import click

from kms_adapters.errors import KmsError
from kms_adapters.keyref import InvalidKeyRef
from rekey.backends import adapter_for, lister_for
from rekey.cli.context import settings, store
from rekey.cli.output import emit_json, json_option, out, table
from rekey.client.release_policies import admitted_generations, release_policy, set_release_policy
from rekey.config import ConfigError
from sealing.store import StoreError, StoreMissing


@click.group("key")
def cli() -> None:
    """KMS keys."""


def _print_key(data: dict[str, Any]) -> None:
    out.print(
        f"{data['key_ref']}  type {data['type']}  rotation {data['rotation_mode']}"
        f"  primary version {data['primary_version']}  release policy {data['release_policy'] or '-'}"
    )
    versions = table("version", "state", "created", "blobs")
    for v in data["versions"]:
        primary = " (primary)" if v["primary"] else ""
        blobs = "-" if v.get("blobs") is None else str(v["blobs"])
        versions.add_row(str(v["version"]), v["state"] + primary, (v["created_at"] or "")[:19], blobs)
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
    """Show a key's versions, their state, the primary and the rotation mode, and how many stored
    blobs each version still wraps (what disabling it would leave unreadable)."""
    data = _with_blobs(adapter_for(settings(), key_ref).describe().to_dict())
    emit_json(data) if json_out else _print_key(data)


def _with_blobs(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``blobs`` per version: the stored blobs it still wraps (0 where none, and
    when there is no store yet: none is created). A store that cannot be read gives None and a
    note; blobs under a version the key does not list get a note too."""
    try:
        with store() as sealed_store:
            counts: dict[int, int] | None = sealed_store.census().of_key(data["key_ref"])
    except StoreMissing:
        counts = {}
    except StoreError as exc:
        counts = None
        data["notes"] = [*data["notes"], f"blob counts unavailable: {exc}"]
    listed = {v["version"] for v in data["versions"]}
    data["versions"] = [
        v | {"blobs": None if counts is None else counts.get(v["version"], 0)} for v in data["versions"]
    ]
    unlisted = {version: n for version, n in (counts or {}).items() if version not in listed}
    if unlisted:
        where = ", ".join(f"{n} under version {version}" for version, n in sorted(unlisted.items()))
        data["notes"] = [*data["notes"], f"stored blobs under versions the key does not list: {where}"]
    return data


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


@cli.group("release-policy")
def release_policy_group() -> None:
    """Which generations' enclaves may obtain a key's DEKs (the attested release gate)."""


def _policy_json(key_ref: str, policy: Any, generations: list[str]) -> dict[str, Any]:
    return {
        "key_ref": key_ref,
        "policy": policy.policy.to_dict(),
        "digest": policy.policy.digest,
        "audience": policy.audience,
        "generations": generations,
    }


def _print_policy(data: dict[str, Any]) -> None:
    out.print(
        f"{data['key_ref']}  release policy {data['policy']['id']}  audience {data['audience']}"
        f"  admits {', '.join(data['generations']) or 'no registered generation'}",
        markup=False,
    )
    rules = table("rule", "platform", "admits")
    for i, rule in enumerate(data["policy"]["rules"], start=1):
        if rule["measurements"] is not None:
            what = "measurements " + ", ".join(m[:16] + "…" for m in rule["measurements"])
        else:
            what = f"signer {rule['signer'][:16]}… product {rule['product_id']} svn >= {rule['min_svn']}"
        rules.add_row(str(i), rule["platform"], what)
    out.print(rules)


@release_policy_group.command("set")
@click.argument("key_ref", metavar="KEYREF")
@click.option(
    "--generation",
    "generations",
    multiple=True,
    required=True,
    metavar="GEN",
    help="A registered generation whose enclaves may obtain the key's DEKs (repeatable).",
)
@json_option
def release_policy_set(key_ref: str, generations: tuple[str, ...], json_out: bool) -> None:
    """Give KEYREF a release policy admitting exactly the given generations (one measurement
    rule each, from the registered manifest), trusting this installation's verifier key
    (<home>/verifier/es256.pem). It replaces the key's policy; a migration widens and narrows
    it from there."""
    current = settings()
    with store() as sealed_store:
        policy = set_release_policy(current, sealed_store, key_ref, list(generations))
        data = _policy_json(key_ref, policy, admitted_generations(sealed_store, policy))
    emit_json(data) if json_out else _print_policy(data)


@release_policy_group.command("show")
@click.argument("key_ref", metavar="KEYREF")
@json_option
def release_policy_show(key_ref: str, json_out: bool) -> None:
    """Show KEYREF's release policy and the registered generations it admits."""
    current = settings()
    policy = release_policy(current, key_ref)
    with store() as sealed_store:
        data = _policy_json(key_ref, policy, admitted_generations(sealed_store, policy))
    emit_json(data) if json_out else _print_policy(data)
