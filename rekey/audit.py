"""The audit log: append-only, hash-chained, Ed25519-signed records in the store's database.

Operators must be able to prove afterwards which key version was created, disabled or
destroyed, by whom and when. Every such step appends one record to the ``audit_log`` table
(created by migration 3 of `sealing.store`) in the same database as the sealed state.

Records
=======

``seq``
    1, 2, 3, ... without gaps, assigned by the appender.
``recorded_at``
    UTC time, millisecond precision, as the text ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (stored verbatim).
``actor``
    Who started it: ``user@host`` by default (`default_actor`), or e.g. a workflow id. This is a
    claim; the signing key (``key_id``) is what proves which installation wrote the record.
``event``
    A short dotted name: ``rotation.started``, ``phase.changed``, ``key.version.created``,
    ``key.version.disabled``, ``key.version.destroyed``, ``rewrap.counts``, ``rotation.done``,
    ``rotation.aborted``, ...
``subject``
    What it is about: a key ref (``vault:orders``) or a workflow id.
``details``
    A JSON object: counts, versions, phase names. **Callers must never pass key material, tokens,
    sealed bytes or other secrets.** As a backstop, `AuditLog.append` refuses bytes values,
    floats, PEM blocks and member names that look like secrets (``private_key``, ``password``,
    ``plaintext``, ``token``, ``data_key``, ...); that check cannot recognise every secret.
``prev_hash``
    ``hash`` of the previous record; 64 zeros (`GENESIS_HASH`) for record 1.
``hash``
    Lower-case hex SHA-256 of the record's canonical encoding (below).
``signature``
    Ed25519 signature over the 32 raw bytes of that digest (not its hex text), lower-case hex.
``key_id``
    First 16 hex digits of the SHA-256 of the signer's raw 32-byte Ed25519 public key.

Canonical encoding (byte exact)
===============================

The hashed bytes are the UTF-8 encoding of one JSON object with exactly the seven members
``actor``, ``details``, ``event``, ``prev_hash``, ``recorded_at``, ``seq``, ``subject``, as
produced by ``json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False).encode("utf-8")``. Spelled out:

* object members sorted by key in code point order, at every nesting level;
* no whitespace between tokens;
* strings in double quotes; ``"`` and ``\\`` escaped with a backslash; U+0008, U+0009, U+000A,
  U+000C, U+000D as ``\\b \\t \\n \\f \\r``; other characters below U+0020 as ``\\u00xx``
  (lower-case hex); everything else, ``/`` and non-ASCII included, as raw UTF-8;
* integers in plain decimal (``-`` sign only when negative, no exponent, no leading zeros);
  ``true``, ``false``, ``null``; no floats (`AuditLog.append` refuses them);
* ``recorded_at`` exactly ``YYYY-MM-DDTHH:MM:SS.mmmZ``; ``prev_hash`` 64 lower-case hex digits.

For example, record 1 written by ``alice@host1`` at 2025-01-02 03:04:05.678 UTC::

    {"actor":"alice@host1","details":{"from":1,"to":2},"event":"key.version.created",
    "prev_hash":"0000000000000000000000000000000000000000000000000000000000000000",
    "recorded_at":"2025-01-02T03:04:05.678Z","seq":1,"subject":"vault:orders"}

(one line, no line breaks) has the hash
``f7a20c2df90d5710fb928cff9aade69b0e76b27c4ea684214d5c798f100da991``; `canonical_bytes`
builds it.

Concurrency
===========

An append is one write transaction that reads the last record and inserts the next:
``BEGIN IMMEDIATE`` on SQLite and a transaction-scoped advisory lock on PostgreSQL serialise
appenders, so two workers can never write the same ``seq`` or fork the chain (``seq`` is also
the primary key, as a second line of defence).

Verification
============

`AuditLog.verify` walks the records in ``seq`` order and names the first bad one: a changed
record (hash mismatch), a removed one (gap in ``seq``, or a ``prev_hash`` that does not match the
previous record), one moved to another place (it hashes correctly under a different ``seq``), a
bad signature, or a signer key id that is not among the trusted public keys. It cannot see
records cut off the *end* of the log: keep the last ``seq`` and ``hash`` it reports (or an
export) somewhere else and compare.

Keys
====

The signing key is PKCS#8 PEM at ``<home>/audit/ed25519.pem`` (mode 0600, created exclusively,
never overwritten); its public key is written beside it as ``ed25519.pub.pem``, so verifying
needs no private key. ``rekey audit verify`` trusts every ``*.pub.pem`` in ``<home>/audit/`` unless
given ``--public-key`` files.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import hashlib
import json
import os
import re
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import click
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text
from sqlalchemy import Column, Integer, MetaData, Row, String, Table, func, insert, select
from sqlalchemy import Text as SAText

from rekey.config import Settings, load_settings
from sealing.store import DuplicateRecord, SealedStateStore, StoreError

__all__ = [
    "GENESIS_HASH",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "VerifyReport",
    "audit_dir",
    "audit_group",
    "canonical_bytes",
    "canonical_json",
    "check_details",
    "default_actor",
    "default_signing_key_path",
    "format_time",
    "key_id_of",
    "load_or_create_signing_key",
    "load_public_key",
    "load_signing_key",
    "make_audit_group",
    "open_audit_log",
    "public_key_path_for",
    "trusted_public_keys",
    "verify_records",
]

GENESIS_HASH: Final = "0" * 64
"""``prev_hash`` of record 1."""

AUDIT_DIR: Final = "audit"
SIGNING_KEY_FILE: Final = "ed25519.pem"
PUBLIC_KEY_SUFFIX: Final = ".pub.pem"

MAX_TEXT: Final = 256
"""Longest actor or subject, in characters."""
MAX_EVENT: Final = 64
MAX_DETAILS_BYTES: Final = 64 * 1024
"""Largest canonical encoding of ``details``."""
MAX_DEPTH: Final = 16
MAX_JSON_INT: Final = 2**53 - 1
"""Integers in details stay exact in every JSON implementation (IEEE doubles)."""

REORDER_SEARCH: Final = 10_000
"""How far (in ``seq``) `verify` looks for the place a moved record was signed for."""

_PG_AUDIT_LOCK_KEY: Final = 0x72656B65795F6175  # "rekey_au": advisory lock serialising appends
_BATCH: Final = 500

_EVENT_RE: Final = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\Z")
_TIME_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")
_HEX64_RE: Final = re.compile(r"[0-9a-f]{64}\Z")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_WORD_RE: Final = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_SECRET_WORDS: Final = frozenset(
    {
        "secret",
        "secrets",
        "password",
        "passwd",
        "passphrase",
        "plaintext",
        "private",
        "material",
        "pem",
        "seed",
        "token",
        "credential",
        "credentials",
    }
)
_SECRET_NAMES: Final = frozenset(
    {"key", "keys", "dek", "kek", "datakey", "data_key", "wrapped_key", "key_bytes", "ciphertext", "blob"}
)


class AuditError(Exception):
    """The audit log or its keys cannot be used (one-line message, never key material)."""

    exit_code = 1


# --------------------------------------------------------------------------- table

# The current shape of ``audit_log``, used by the queries. Migration 3 in sealing/store.py
# creates it (with its own snapshot, as every migration does).
_metadata = MetaData()
audit_log = Table(
    "audit_log",
    _metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("recorded_at", String, nullable=False),
    Column("actor", String, nullable=False),
    Column("event", String, nullable=False),
    Column("subject", String, nullable=False),
    Column("details", SAText, nullable=False),
    Column("prev_hash", String, nullable=False),
    Column("hash", String, nullable=False),
    Column("signature", String, nullable=False),
    Column("key_id", String, nullable=False),
)


# --------------------------------------------------------------------------- encoding


def canonical_json(value: Any) -> bytes:
    """The canonical encoding of a JSON value (see the module docstring)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def format_time(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC, truncated to the millisecond."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("naive datetime; audit times must be timezone-aware")
    t = moment.astimezone(UTC)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f".{t.microsecond // 1000:03d}Z"
    )


def _parse_time(text: str) -> datetime:
    """Inverse of `format_time`; ValueError unless ``text`` is in exactly that form."""
    if not _TIME_RE.match(text):
        raise ValueError("recorded_at is not a canonical UTC time")
    moment = datetime.fromisoformat(text)  # also rejects month 13 and the like
    if format_time(moment) != text:
        raise ValueError("recorded_at is not a canonical UTC time")
    return moment


def canonical_bytes(
    *,
    seq: int,
    recorded_at: str,
    actor: str,
    event: str,
    subject: str,
    details: Mapping[str, Any],
    prev_hash: str,
) -> bytes:
    """The bytes a record's hash covers. ``recorded_at`` is the canonical time text."""
    return canonical_json(
        {
            "actor": actor,
            "details": details,
            "event": event,
            "prev_hash": prev_hash,
            "recorded_at": recorded_at,
            "seq": seq,
            "subject": subject,
        }
    )


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --------------------------------------------------------------------------- input checks


def _looks_secret(name: str) -> bool:
    lowered = name.lower()
    if lowered in _SECRET_NAMES or lowered.replace("-", "_") in _SECRET_NAMES:
        return True
    words = {w.lower() for w in _WORD_RE.findall(name)}
    return bool(words & _SECRET_WORDS)


def _clean(value: Any, where: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"{where} nests deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            raise ValueError(f"{where} is outside +-(2**53 - 1); pass large numbers as strings")
        return int(value)
    if isinstance(value, str):
        if "-----BEGIN" in value or "PRIVATE KEY" in value:
            raise ValueError(f"{where} looks like a PEM key; audit details must never carry key material")
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{where} is bytes; audit details must never carry key material or sealed bytes")
    if isinstance(value, float):
        raise TypeError(f"{where} is a float; use an integer or a string (floats have no canonical form)")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string member name {key!r}")
            if _looks_secret(key):
                raise ValueError(
                    f"{where}[{key!r}]: member name looks like a secret; audit details must never "
                    "carry key material"
                )
            out[key] = _clean(item, f"{where}[{key!r}]", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_clean(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise TypeError(f"{where} is a {type(value).__name__}; audit details take JSON values only")


def check_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-JSON copy of ``details``, or TypeError/ValueError. See the module docstring for
    what is refused; callers must not pass secrets whether or not this check catches them."""
    if not isinstance(details, Mapping):
        raise TypeError(f"details must be a JSON object (a mapping), got {type(details).__name__}")
    clean: dict[str, Any] = _clean(details, "details", 0)
    try:
        size = len(canonical_json(clean))
    except UnicodeEncodeError:
        raise ValueError("details hold a string that is not valid Unicode (lone surrogate)") from None
    if size > MAX_DETAILS_BYTES:
        raise ValueError(f"details encode to {size} bytes; the limit is {MAX_DETAILS_BYTES}")
    return clean


def _check_text(name: str, value: object, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    if _CONTROL_RE.search(value):
        raise ValueError(f"{name} contains control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode (lone surrogate)") from None
    return value


def _check_event(event: object) -> str:
    text = _check_text("event", event, MAX_EVENT)
    if not _EVENT_RE.match(text):
        raise ValueError(f"event {text!r} must be dotted lower-case words, e.g. key.version.created")
    return text


def default_actor() -> str:
    """``user@host`` of this process (the user name as the OS or ``$USER`` reports it)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError, ImportError):
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname() or 'localhost'}"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class AuditRecord:
    """One audit record. ``recorded_at`` is aware UTC with millisecond precision."""

    seq: int
    recorded_at: datetime
    actor: str
    event: str
    subject: str
    details: dict[str, Any]
    prev_hash: str
    hash: str
    signature: str
    key_id: str

    def canonical_bytes(self) -> bytes:
        """The bytes ``hash`` covers (see the module docstring)."""
        return canonical_bytes(
            seq=self.seq,
            recorded_at=format_time(self.recorded_at),
            actor=self.actor,
            event=self.event,
            subject=self.subject,
            details=self.details,
            prev_hash=self.prev_hash,
        )

    def computed_hash(self) -> str:
        """SHA-256 of `canonical_bytes`, hex: equals ``hash`` unless the record was changed."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The record as exported: JSON types only, ``recorded_at`` as its canonical text."""
        return {
            "seq": self.seq,
            "recorded_at": format_time(self.recorded_at),
            "actor": self.actor,
            "event": self.event,
            "subject": self.subject,
            "details": json.loads(canonical_json(self.details)),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "signature": self.signature,
            "key_id": self.key_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        """Read an exported record back (e.g. to `verify_records` an export offline);
        ValueError if a member is missing or of the wrong type."""
        seq = data.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ValueError("audit record without an integer seq")
        texts: dict[str, str] = {}
        for name in ("recorded_at", "actor", "event", "subject", "prev_hash", "hash", "signature", "key_id"):
            value = data.get(name)
            if not isinstance(value, str):
                raise ValueError(f"audit record {seq}: {name} is not a string")
            texts[name] = value
        details = data.get("details")
        if not isinstance(details, dict):
            raise ValueError(f"audit record {seq}: details are not a JSON object")
        try:
            recorded_at = _parse_time(texts.pop("recorded_at"))
        except ValueError as exc:
            raise ValueError(f"audit record {seq}: {exc}") from None
        return cls(seq=seq, recorded_at=recorded_at, details=details, **texts)


@dataclass(frozen=True)
class _Malformed:
    """A stored row that cannot even be read as a record (tampered with outside rekey)."""

    seq: int
    why: str


def _from_row(row: Row[Any]) -> AuditRecord | _Malformed:
    m = row._mapping
    seq = int(m["seq"])
    texts: dict[str, str] = {}
    for name in (
        "recorded_at",
        "actor",
        "event",
        "subject",
        "details",
        "prev_hash",
        "hash",
        "signature",
        "key_id",
    ):
        value = m[name]
        if not isinstance(value, str):
            return _Malformed(seq, f"{name} is not text")
        texts[name] = value
    try:
        recorded_at = _parse_time(texts.pop("recorded_at"))
    except ValueError as exc:
        return _Malformed(seq, str(exc))
    details_text = texts.pop("details")
    try:
        details = json.loads(details_text)
        canonical = canonical_json(details).decode("utf-8")
    except (ValueError, RecursionError, UnicodeEncodeError):
        return _Malformed(seq, "details are not valid JSON")
    if not isinstance(details, dict):
        return _Malformed(seq, "details are not a JSON object")
    if canonical != details_text:
        return _Malformed(seq, "details are not in canonical form")
    return AuditRecord(seq=seq, recorded_at=recorded_at, details=details, **texts)


def _export_row(row: Row[Any]) -> dict[str, Any]:
    """A stored row as exported, kept readable even when tampered with (for forensics)."""
    data = {key: row._mapping[key] for key in audit_log.columns.keys()}  # noqa: SIM118
    with contextlib.suppress(TypeError, ValueError, RecursionError):  # else keep the stored text
        data["details"] = json.loads(data["details"])
    return data


# --------------------------------------------------------------------------- verification


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


def _verify(
    items: Iterable[AuditRecord | _Malformed], public_keys: Mapping[str, Ed25519PublicKey]
) -> VerifyReport:
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

    for item in items:
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
        if isinstance(item, _Malformed):
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


def verify_records(
    records: Iterable[AuditRecord], public_keys: Mapping[str, Ed25519PublicKey]
) -> VerifyReport:
    """Verify records given in ``seq`` order (e.g. an export read back with
    `AuditRecord.from_dict`), exactly as `AuditLog.verify` does."""
    return _verify(records, public_keys)


# --------------------------------------------------------------------------- the log


class AuditLog:
    """The audit log in the store database at ``store_url`` (opening applies pending
    migrations). ``signing_key`` may be None for a read-only log (records, verify, export).

    ``actor`` is the default actor of appends (else `default_actor`); ``clock`` returns the
    current aware time (tests). Safe to use from several threads and processes at once.
    """

    def __init__(
        self,
        store_url: str,
        signing_key: Ed25519PrivateKey | None,
        *,
        actor: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if signing_key is not None and not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError("signing_key must be an Ed25519 private key")
        self._actor = None if actor is None else _check_text("actor", actor)
        self._key = signing_key
        self._key_id = None if signing_key is None else key_id_of(signing_key.public_key())
        self._clock = clock if clock is not None else (lambda: datetime.now(UTC))
        self._store = SealedStateStore(store_url)

    @property
    def key_id(self) -> str | None:
        """Key id of the signing key (None when read-only)."""
        return self._key_id

    @property
    def public_key(self) -> Ed25519PublicKey | None:
        return None if self._key is None else self._key.public_key()

    def __repr__(self) -> str:
        return f"AuditLog({self._store.url!r}, key_id={self._key_id!r})"

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def append(
        self,
        event: str,
        subject: str,
        details: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> AuditRecord:
        """Append one signed record and return it as stored.

        ``details`` must never hold key material or other secrets (see the module docstring);
        bytes values are refused. Raises ValueError/TypeError for bad input, `AuditError` for a
        read-only log, `sealing.store.StoreError` if the database fails.
        """
        if self._key is None or self._key_id is None:
            raise AuditError("this audit log was opened without a signing key; it can only be read")
        event = _check_event(event)
        subject = _check_text("subject", subject)
        who = _check_text("actor", actor if actor is not None else (self._actor or default_actor()))
        clean = check_details({} if details is None else details)
        details_text = canonical_json(clean).decode("utf-8")
        for _attempt in range(3):
            try:
                # The store's transaction helper: BEGIN IMMEDIATE on SQLite, errors mapped onto
                # StoreError, in-memory databases serialised.
                with self._store.transaction(f"append of audit event {event}", write=True) as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(select(func.pg_advisory_xact_lock(_PG_AUDIT_LOCK_KEY)))
                    last = conn.execute(
                        select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
                    ).first()
                    seq = 1 if last is None else int(last.seq) + 1
                    prev_hash = GENESIS_HASH if last is None else str(last.hash)
                    recorded_at = format_time(self._clock())
                    digest = hashlib.sha256(
                        canonical_bytes(
                            seq=seq,
                            recorded_at=recorded_at,
                            actor=who,
                            event=event,
                            subject=subject,
                            details=clean,
                            prev_hash=prev_hash,
                        )
                    ).digest()
                    signature = self._key.sign(digest).hex()
                    conn.execute(
                        insert(audit_log).values(
                            seq=seq,
                            recorded_at=recorded_at,
                            actor=who,
                            event=event,
                            subject=subject,
                            details=details_text,
                            prev_hash=prev_hash,
                            hash=digest.hex(),
                            signature=signature,
                            key_id=self._key_id,
                        )
                    )
            except DuplicateRecord:
                continue  # cannot happen while appenders take the lock; retry from the new end
            return AuditRecord(
                seq=seq,
                recorded_at=_parse_time(recorded_at),
                actor=who,
                event=event,
                subject=subject,
                details=clean,
                prev_hash=prev_hash,
                hash=digest.hex(),
                signature=signature,
                key_id=self._key_id,
            )
        raise AuditError(f"append of audit event {event} kept conflicting with concurrent appends")

    def _rows(self) -> Iterator[Row[Any]]:
        after = 0
        while True:
            query = select(audit_log).where(audit_log.c.seq > after).order_by(audit_log.c.seq).limit(_BATCH)
            with self._store.transaction("read of the audit log") as conn:
                rows = conn.execute(query).all()
            yield from rows
            if len(rows) < _BATCH:
                return
            after = int(rows[-1].seq)

    def _items(self) -> Iterator[AuditRecord | _Malformed]:
        for row in self._rows():
            yield _from_row(row)

    def records(self) -> Iterator[AuditRecord]:
        """Every record in ``seq`` order, read in batches. Does not verify anything; raises
        `AuditError` on a row that is not even readable as a record."""
        for item in self._items():
            if isinstance(item, _Malformed):
                raise AuditError(
                    f"audit record {item.seq} is unreadable ({item.why}); run rekey audit verify"
                )
            yield item

    def verify(self, public_keys: Mapping[str, Ed25519PublicKey]) -> VerifyReport:
        """Check every record in ``seq`` order against ``public_keys`` (key id -> public key)
        and report the first bad one. An empty log verifies with count 0."""
        return _verify(self._items(), public_keys)

    def export(self) -> list[dict[str, Any]]:
        """Every stored record as a JSON-ready dict (the `AuditRecord.to_dict` shape), in ``seq``
        order, exactly as stored: no verification, and tampered rows are exported as they are."""
        return [_export_row(row) for row in self._rows()]


# --------------------------------------------------------------------------- keys


def audit_dir(home: Path) -> Path:
    return Path(home) / AUDIT_DIR


def default_signing_key_path(home: Path) -> Path:
    """``<home>/audit/ed25519.pem``."""
    return audit_dir(home) / SIGNING_KEY_FILE


def public_key_path_for(private_key_path: Path) -> Path:
    """``ed25519.pem`` -> ``ed25519.pub.pem`` beside it."""
    path = Path(private_key_path)
    return path.with_name(path.name.removesuffix(".pem") + PUBLIC_KEY_SUFFIX)


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


_EXCL_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)


def _create_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` holding ``data`` with ``mode``; False if it exists already. Never
    overwrites or follows a symlink planted there. The file appears complete or not at all:
    written to a temporary file (O_EXCL) and hard-linked into place, which fails if the name
    is taken. Falls back to O_EXCL on the name itself where hard links are not supported."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, _EXCL_FLAGS, mode)
    try:
        try:
            os.fchmod(fd, mode)  # in case the umask or a default ACL changed it
            _write_fd(fd, data)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        else:
            return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    try:
        fd = os.open(path, _EXCL_FLAGS, mode)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, mode)
        _write_fd(fd, data)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)
    return True


def _write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    """Write (or correct) the public key file, atomically (temporary file + rename)."""
    data = _public_pem(key)
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, _EXCL_FLAGS, 0o644)
    try:
        try:
            _write_fd(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PKCS#8 PEM file at ``path``. FileNotFoundError if
    there is none; `AuditError` if it cannot be read or is not an Ed25519 key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AuditError(f"cannot read the audit signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # cryptography's messages name the problem, never the key material
        raise AuditError(f"cannot load the audit signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"the audit signing key {path} is not an Ed25519 key")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the signing key at ``path``, or generate one there (PKCS#8 PEM, mode 0600, created
    exclusively; parent directories mode 0700). If another process creates it first, its key
    is loaded. The public key is (re)written beside it as ``<name>.pub.pem``."""
    path = Path(path)
    try:
        key = load_signing_key(path)
    except FileNotFoundError:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            if not _create_exclusive(path, pem, 0o600):
                key = load_signing_key(path)  # another process won the race
        except OSError as exc:
            raise AuditError(f"cannot create the audit signing key {path}: {exc.strerror}") from None
    try:
        _write_public_key(public_key_path_for(path), key.public_key())
    except OSError as exc:
        raise AuditError(f"cannot write the audit public key beside {path}: {exc.strerror}") from None
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise AuditError(f"cannot read the audit public key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise AuditError(f"cannot load the audit public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"the audit public key {path} is not an Ed25519 key")
    return key


def trusted_public_keys(home: Path, paths: Iterable[Path] = ()) -> dict[str, Ed25519PublicKey]:
    """Key id -> public key for ``paths``, or, if none are given, for every ``*.pub.pem`` in
    ``<home>/audit/`` (this installation's key and any others copied there)."""
    chosen = list(paths)
    if not chosen:
        directory = audit_dir(home)
        chosen = sorted(directory.glob(f"*{PUBLIC_KEY_SUFFIX}")) if directory.is_dir() else []
    keys: dict[str, Ed25519PublicKey] = {}
    for path in chosen:
        key = load_public_key(path)
        keys[key_id_of(key)] = key
    return keys


def open_audit_log(settings: Settings, *, actor: str | None = None) -> AuditLog:
    """The audit log of ``settings.store_url``, signing with ``<home>/audit/ed25519.pem``
    (created on first use)."""
    key = load_or_create_signing_key(default_signing_key_path(settings.home))
    return AuditLog(settings.store_url, key, actor=actor)


# --------------------------------------------------------------------------- command line


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
