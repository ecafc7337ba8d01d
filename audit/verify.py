"""Verification of the audit log: walk the records in ``seq`` order and name the first bad one
(changed, removed, moved, a broken chain, a bad signature or an unknown signer), then check the
log against signed heads (`Head`: the ``seq`` and ``hash`` the log had reached when a head was
published or written down), which is what reveals records removed from the end or a log cut
and re-grown. What each finding means is in docs/audit-log-format.md."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from audit.format import GENESIS_HASH, AuditRecord, canonical_bytes, format_time
from sealing.signing import PublicKey, fingerprint, verify_digest

__all__ = ["REORDER_SEARCH", "Head", "UnreadableRecord", "VerifyReport", "parse_head", "verify_records"]

REORDER_SEARCH: Final = 10_000
"""How far (in ``seq``) `verify` looks for the place a moved record was signed for."""
_HEX64_RE: Final = re.compile(r"[0-9a-f]{64}\Z")


class Head(NamedTuple):
    """The log's head at some moment: record ``seq`` existed with ``hash``. ``source`` says where
    the head comes from (``witness``, ``--head``) for the report."""

    seq: int
    hash: str
    source: str = "head"

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


def parse_head(text: str, source: str = "--head") -> Head:
    """``SEQ:HASH`` (what `rekey audit verify` prints) as a `Head`; ValueError otherwise."""
    seq_text, sep, digest = text.strip().partition(":")
    digest = digest.lower()
    if not sep or not seq_text.isdecimal() or not seq_text.isascii() or not _HEX64_RE.match(digest):
        raise ValueError(f"head {text[:80]!r} is not SEQ:HASH (a record number, ':', 64 hex digits)")
    seq = int(seq_text)
    if seq < 1:
        raise ValueError(f"head {text[:80]!r}: the record number must be 1 or more")
    return Head(seq, digest, source)


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
    ``problem``: ``changed``, ``removed``, ``reordered``, ``chain``, ``signature``,
    ``unknown_key``, or, against a head, ``truncated`` (the head's record is gone) or
    ``rewritten`` (it is there with another hash: the log was cut and re-grown).
    ``last_seq``/``last_hash``: the last good record, to compare with a copy kept elsewhere (the
    chain alone cannot see truncation at the end). ``heads_checked``: how many heads held.
    """

    ok: bool
    count: int
    first_bad_seq: int | None = None
    reason: str | None = None
    problem: str | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    heads_checked: int = 0

    @property
    def head(self) -> str | None:
        """``SEQ:HASH`` of the last good record (for ``--head``), None for an empty log."""
        return None if self.last_seq is None else f"{self.last_seq}:{self.last_hash}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "count": self.count,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "problem": self.problem,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "head": self.head,
            "heads_checked": self.heads_checked,
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
    records: Iterable[AuditRecord | UnreadableRecord],
    public_keys: Mapping[str, PublicKey],
    heads: Iterable[Head] = (),
    *,
    untrusted: Mapping[str, PublicKey] | None = None,
) -> VerifyReport:
    """Verify records given in ``seq`` order (e.g. an export read back with
    `AuditRecord.from_dict`) against ``public_keys`` (key id -> Ed25519 or P-256 public key:
    only keys the caller trusts, see `sealing.signing.pinned_keys`) and report the first bad
    one; then check that every head's record is there with the head's hash. `AuditLog.verify`
    does exactly this over the stored rows. No records: count 0 (and any head fails).
    ``untrusted``: keys that were found but are not pinned, only to name them in the reason."""
    for key_id, key in public_keys.items():
        fingerprint(key)  # SigningError unless Ed25519 or P-256
        if not isinstance(key_id, str):
            raise TypeError("public key ids must be strings")
    wanted = sorted(heads)
    wanted_seqs = {h.seq for h in wanted}
    seen: dict[int, str] = {}
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
            found = (untrusted or {}).get(item.key_id)
            if found is not None:
                return bad(
                    seq,
                    "unknown_key",
                    f"audit record {seq} was signed by unknown key {item.key_id} ({fingerprint(found)} is "
                    "not pinned in trusted_key_fingerprints)",
                )
            return bad(seq, "unknown_key", f"audit record {seq} was signed by unknown key {item.key_id}")
        try:
            signature = bytes.fromhex(item.signature)
        except ValueError:
            signature = b""
        if not signature or not verify_digest(signer, signature, bytes.fromhex(item.hash)):
            return bad(seq, "signature", f"audit record {seq} has a bad signature")
        if seq in wanted_seqs:
            seen[seq] = item.hash
        count += 1
        expected = seq + 1
        prev_hash = item.hash
        last_seq = seq
    last_hash = None if last_seq is None else prev_hash
    for h in wanted:
        short = h.hash[:16]
        if h.seq not in seen:
            end = "the log is empty" if last_seq is None else f"the log ends at record {last_seq}"
            return VerifyReport(
                ok=False,
                count=count,
                first_bad_seq=(last_seq or 0) + 1,
                reason=f"audit log was truncated: {end}, but the {h.source} head says record {h.seq} "
                f"(hash {short}...) exists",
                problem="truncated",
                last_seq=last_seq,
                last_hash=last_hash,
            )
        if seen[h.seq] != h.hash:
            return VerifyReport(
                ok=False,
                count=count,
                first_bad_seq=h.seq,
                reason=f"audit log was rewritten: record {h.seq} is not the one the {h.source} head names "
                f"(hash {short}...): records were removed and the log grew again",
                problem="rewritten",
                last_seq=last_seq,
                last_hash=last_hash,
            )
    return VerifyReport(
        ok=True, count=count, last_seq=last_seq, last_hash=last_hash, heads_checked=len(wanted)
    )
