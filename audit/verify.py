"""Verification of the audit log: walk the records in ``seq`` order and name the first bad one
(changed, removed, moved, a broken chain, a bad signature or an unknown signer). What each
finding means is in docs/audit-log-format.md."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.format import GENESIS_HASH, AuditRecord, canonical_bytes, format_time

__all__ = ["REORDER_SEARCH", "UnreadableRecord", "VerifyReport", "verify_records"]

REORDER_SEARCH: Final = 10_000
"""How far (in ``seq``) `verify` looks for the place a moved record was signed for."""
_HEX64_RE: Final = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class UnreadableRecord:
    """A stored row that cannot even be read as a record (tampered with outside rekey): where it
    is, and why, for `verify_records` to report."""

    seq: int
    why: str


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of `AuditLog.verify`.

    ``count``: records verified before the first bad one (all of them when ``ok``).
    ``first_bad_seq``/``reason``: the first bad record and why, as one line naming it.
    ``problem``: ``changed``, ``removed``, ``reordered``, ``chain``, ``signature`` or
    ``unknown_key``. ``last_seq``/``last_hash``: the last good record, to compare with a copy
    kept elsewhere (truncation at the end of the log is invisible to the chain itself).
    """

    ok: bool
    count: int
    first_bad_seq: int | None = None
    reason: str | None = None
    problem: str | None = None
    last_seq: int | None = None
    last_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "count": self.count,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "problem": self.problem,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
        }


def _signed_as(record: AuditRecord) -> int | None:
    """The ``seq`` (other than its own, within `REORDER_SEARCH`) under which the record's content
    hashes to its stored hash: it was moved there from that place. None if there is none."""
    if not _HEX64_RE.match(record.hash):
        return None
    doc = canonical_bytes(
        seq=0,
        recorded_at=format_time(record.recorded_at),
        actor=record.actor,
        event=record.event,
        subject=record.subject,
        details=record.details,
        prev_hash=record.prev_hash,
    )
    # Members are sorted, so the top-level "seq" is the last one before "subject" (whose value,
    # a string, cannot contain an unescaped quote).
    head, sep, tail = doc.rpartition(b',"seq":0,"subject":')
    if not sep:
        return None
    target = bytes.fromhex(record.hash)
    for distance in range(1, REORDER_SEARCH + 1):
        for candidate in (record.seq - distance, record.seq + distance):
            if candidate >= 1:
                data = b'%s,"seq":%d,"subject":%s' % (head, candidate, tail)
                if hashlib.sha256(data).digest() == target:
                    return candidate
    return None


def verify_records(
    records: Iterable[AuditRecord | UnreadableRecord], public_keys: Mapping[str, Ed25519PublicKey]
) -> VerifyReport:
    """Verify records given in ``seq`` order (e.g. an export read back with
    `AuditRecord.from_dict`) against ``public_keys`` (key id -> public key) and report the first
    bad one; `AuditLog.verify` does exactly this over the stored rows. No records: count 0."""
    for key_id, key in public_keys.items():
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(f"public key {key_id} is not an Ed25519 public key")
    count = 0
    expected = 1
    prev_hash = GENESIS_HASH
    last_seq: int | None = None

    def bad(seq: int, problem: str, reason: str) -> VerifyReport:
        return VerifyReport(
            ok=False,
            count=count,
            first_bad_seq=seq,
            reason=reason,
            problem=problem,
            last_seq=last_seq,
            last_hash=None if last_seq is None else prev_hash,
        )

    for item in records:
        seq = item.seq
        if seq > expected:
            span = f"record {expected}" if seq == expected + 1 else f"records {expected}-{seq - 1}"
            verb = "was" if seq == expected + 1 else "were"
            where = (
                f"the log starts at record {seq}"
                if expected == 1
                else f"seq jumps from {expected - 1} to {seq}"
            )
            return bad(expected, "removed", f"audit {span} {verb} removed ({where})")
        if seq < expected:
            return bad(seq, "reordered", f"audit record {seq} is out of order (expected record {expected})")
        if isinstance(item, UnreadableRecord):
            return bad(seq, "changed", f"audit record {seq} was changed ({item.why})")
        if item.computed_hash() != item.hash:
            origin = _signed_as(item)
            if origin is not None:
                return bad(
                    seq,
                    "reordered",
                    f"audit record {seq} was moved (reordered): it was signed as record {origin}",
                )
            return bad(seq, "changed", f"audit record {seq} was changed (hash mismatch)")
        if item.prev_hash != prev_hash:
            after = "the start of the log" if seq == 1 else f"record {seq - 1}"
            return bad(
                seq,
                "chain",
                f"audit record {seq} does not follow {after} (prev_hash mismatch: a record was removed or "
                "replaced)",
            )
        signer = public_keys.get(item.key_id)
        if signer is None:
            return bad(seq, "unknown_key", f"audit record {seq} was signed by unknown key {item.key_id}")
        try:
            signer.verify(bytes.fromhex(item.signature), bytes.fromhex(item.hash))
        except (ValueError, InvalidSignature):
            return bad(seq, "signature", f"audit record {seq} has a bad signature")
        count += 1
        expected = seq + 1
        prev_hash = item.hash
        last_seq = seq
    return VerifyReport(
        ok=True, count=count, last_seq=last_seq, last_hash=None if last_seq is None else prev_hash
    )
