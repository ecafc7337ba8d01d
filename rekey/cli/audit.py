"""``rekey audit verify | key | export | reanchor``: the signed, hash-chained audit log of key
operations.

``verify`` trusts only pinned keys (``trusted_key_fingerprints``, ``--trust``) and this
installation's own key, and checks the log against the witness's signed head and any
``--head SEQ:HASH`` kept elsewhere (docs/audit-log-format.md). ``reanchor`` is the operator's
recovery after a legitimate restore of the database ("Recovery" there)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from audit import AuditRecord, Head, found_public_keys, parse_head
from rekey.backends import own_public_key, signer_for, witness_for
from rekey.cli.context import audit_log, settings
from rekey.cli.output import EXIT_FAILED, EXIT_USAGE, emit_json, error_line, out, table
from sealing.signing import (
    SigningError,
    check_fingerprint,
    fingerprint,
    key_id_of,
    pinned_keys,
    public_key_pem,
)


@click.group("audit")
def cli() -> None:
    """The signed, hash-chained audit log of key operations."""


def _details_text(details: Any) -> str:
    if isinstance(details, str):
        return details
    return json.dumps(details, sort_keys=True, separators=(", ", ": "), ensure_ascii=False)


def _parse_heads(texts: tuple[str, ...]) -> list[Head]:
    heads = []
    for text in texts:
        for part in text.split(","):
            if part.strip():
                heads.append(parse_head(part))
    return heads


@cli.command("verify")
@click.option(
    "--public-key",
    "public_key_paths",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Verify with this Ed25519 or P-256 public key (PEM; repeatable) instead of this installation's"
    " own key. Each must be pinned in trusted_key_fingerprints or named with --trust.",
)
@click.option(
    "--trust",
    "trust",
    multiple=True,
    metavar="sha256:HEX",
    help="Also trust the key with this fingerprint (repeatable; see `rekey audit key`).",
)
@click.option(
    "--head",
    "head_texts",
    multiple=True,
    metavar="SEQ:HASH",
    help="A head kept elsewhere (as printed by a previous verify; repeatable or comma-separated):"
    " record SEQ must still be there with HASH.",
)
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
def verify(
    public_key_paths: tuple[Path, ...], trust: tuple[str, ...], head_texts: tuple[str, ...], json_out: bool
) -> None:
    """Check the chain, every signature (pinned keys only) and the signed heads; name the first
    bad record (exit 1)."""
    current = settings()
    try:
        given = _parse_heads(head_texts)
        pins = [*current.trusted_key_fingerprints, *(check_fingerprint(t) for t in trust)]
    except (ValueError, SigningError) as exc:
        error_line(str(exc))
        raise click.exceptions.Exit(EXIT_USAGE) from None
    own = own_public_key(current)
    listed = found_public_keys(current.home, public_key_paths) if public_key_paths else {}
    in_dir = found_public_keys(current.home)
    # Never a key merely found in a file: pinned ones, and this installation's own key (derived
    # from its private key or KMS key), unless --public-key names the keys to use instead.
    keys = pinned_keys(listed.values(), pins) if public_key_paths else pinned_keys(in_dir.values(), pins)
    if own is not None and not public_key_paths:
        keys[key_id_of(own)] = own
    witness_keys = {**pinned_keys([*in_dir.values(), *listed.values()], pins)}
    if own is not None:
        witness_keys[key_id_of(own)] = own
    untrusted = {k: v for k, v in {**in_dir, **listed}.items() if k not in keys}
    witness = witness_for(current, writable=False, trusted=witness_keys)
    with audit_log(None) as log:
        witnessed = log.head_from(witness)  # WitnessError (exit 1) if tampered or not pinned
        heads = ([witnessed] if witnessed is not None else []) + given
        report = log.verify(keys, heads, untrusted=untrusted)
        restores = log.restores()
    result = report.to_dict()
    result["restores"] = [_restore_summary(r) for r in restores]
    result["witness_head"] = None if witnessed is None else str(witnessed)
    result["keys"] = [{"key_id": k, "fingerprint": fingerprint(v)} for k, v in sorted(keys.items())]
    if report.ok and report.count and not heads:
        result.update(
            ok=False,
            problem="unanchored",
            reason=f"audit log has {report.count} records but no signed head in the witness"
            f" ({witness.directory}): it was removed, or nothing was appended since heads were"
            " introduced; pass --head SEQ:HASH kept elsewhere",
        )
    if json_out:
        emit_json(result, sort_keys=True)
    if not result["ok"]:
        error_line(str(result["reason"]))
        raise click.exceptions.Exit(EXIT_FAILED)
    if not json_out:
        noun = "record" if report.count == 1 else "records"
        line = f"{report.count} {noun} verified"
        if report.last_seq is not None:
            line += f" (last: record {report.last_seq}, hash {report.last_hash})"
        if heads:
            line += f"; {len(heads)} signed {'head holds' if len(heads) == 1 else 'heads hold'}"
        out.print(line, markup=False)
        if report.head is not None:
            out.print(f"head: {report.head}", markup=False)
        for item in result["restores"]:
            out.print(
                f"restored: record {item['seq']} ({item['recorded_at']}, {item['actor']}) acknowledged a"
                f" log restored to record {item['acknowledged']} (witness head was {item['witness_head']},"
                f" {item['witness_state']})",
                markup=False,
            )


def _restore_summary(record: AuditRecord) -> dict[str, Any]:
    def head(value: Any) -> str | None:
        if isinstance(value, dict):
            return f"{value.get('seq')}:{value.get('hash')}"
        return None

    return {
        "seq": record.seq,
        "recorded_at": record.recorded_at.isoformat(),
        "actor": record.actor,
        "acknowledged": head(record.details.get("acknowledged")),
        "witness_head": head(record.details.get("witness_head")),
        "witness_state": record.details.get("witness_state"),
    }


@cli.command("reanchor")
@click.option(
    "--acknowledge",
    "acknowledge",
    required=True,
    metavar="SEQ:HASH",
    help="The log's current last record (as `rekey audit verify` names it), which you confirm the"
    " legitimate restore left.",
)
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
def reanchor(acknowledge: str, json_out: bool) -> None:
    """After restoring the database from a backup (or a failover that lost commits): acknowledge
    the log's current end, append a signed audit.restored record and move the witness head to
    it. Needs the signing key. Refused (exit 2, nothing changed) unless SEQ:HASH is the last
    record and the log no longer holds its signed head."""
    current = settings()
    try:
        head = parse_head(acknowledge, "--acknowledge")
    except ValueError as exc:
        error_line(str(exc).replace("head ", "--acknowledge ", 1))
        raise click.exceptions.Exit(EXIT_USAGE) from None
    signer = signer_for(current)
    witness = witness_for(current, signer=signer)
    with audit_log(signer, witness=witness) as log:
        record = log.reanchor(head)
    summary = _restore_summary(record) | {"head": f"{record.seq}:{record.hash}"}
    if json_out:
        emit_json(summary, sort_keys=True)
        return
    out.print(
        f"re-anchored: record {record.seq} (audit.restored) acknowledges the log restored to record"
        f" {head.seq}; witness head was {summary['witness_head']} ({summary['witness_state']})",
        markup=False,
    )
    out.print(f"head: {summary['head']}", markup=False)


@cli.command("key")
@click.option(
    "--public-key",
    "public_key_paths",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Show the fingerprint of this public key file instead (repeatable).",
)
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
def key(public_key_paths: tuple[Path, ...], json_out: bool) -> None:
    """This installation's signing key (created if it is a key file that does not exist yet):
    its key id and the fingerprint to pin in trusted_key_fingerprints on other verifiers."""
    current = settings()
    if public_key_paths:
        found = found_public_keys(current.home, public_key_paths)
        rows = [{"source": "file", "key_id": k, "fingerprint": fingerprint(v)} for k, v in found.items()]
    else:
        signer = signer_for(current)
        rows = [
            {
                "source": current.signing_key,
                "key_id": signer.key_id,
                "fingerprint": fingerprint(signer.public_key),
                "public_key_pem": public_key_pem(signer.public_key).decode("ascii"),
            }
        ]
    if json_out:
        emit_json(rows, sort_keys=True)
        return
    for row in rows:
        out.print(f"{row['source']}: key id {row['key_id']}, fingerprint {row['fingerprint']}", markup=False)
    pinned = current.trusted_key_fingerprints
    out.print(
        f"pinned: {', '.join(pinned) if pinned else 'none (only the own key is trusted)'}", markup=False
    )


@cli.command("export")
@click.option("--json", "json_out", is_flag=True, help="Print JSON (an array of records).")
def export(json_out: bool) -> None:
    """Print every record as stored (no verification; see `rekey audit verify`)."""
    with audit_log(None) as log:
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
