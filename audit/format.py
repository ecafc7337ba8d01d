"""The audit record and its canonical encoding: what a record's hash covers, the time text,
the key id, and the checks that keep secrets and non-canonical values out of records. The
byte-exact specification, with a worked example, is docs/audit-log-format.md."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "GENESIS_HASH",
    "MAX_DEPTH",
    "MAX_DETAILS_BYTES",
    "MAX_EVENT",
    "MAX_JSON_INT",
    "MAX_TEXT",
    "AuditRecord",
    "canonical_bytes",
    "canonical_json",
    "check_details",
    "check_event",
    "check_text",
    "default_actor",
    "format_time",
    "key_id_of",
    "parse_time",
]

GENESIS_HASH: Final = "0" * 64
"""``prev_hash`` of record 1."""

MAX_TEXT: Final = 256
"""Longest actor or subject, in characters."""
MAX_EVENT: Final = 64
MAX_DETAILS_BYTES: Final = 64 * 1024
"""Largest canonical encoding of ``details``."""
MAX_DEPTH: Final = 16
MAX_JSON_INT: Final = 2**53 - 1
"""Integers in details stay exact in every JSON implementation (IEEE doubles)."""

_EVENT_RE: Final = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\Z")
_TIME_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")
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


def canonical_json(value: Any) -> bytes:
    """The canonical encoding of a JSON value (see docs/audit-log-format.md)."""
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


def parse_time(text: str) -> datetime:
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
    """A plain-JSON copy of ``details``, or TypeError/ValueError. See docs/audit-log-format.md for
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


def check_text(name: str, value: object, limit: int = MAX_TEXT) -> str:
    """``value`` if it is a non-empty string of at most ``limit`` characters, valid Unicode and
    without control characters (so a record cannot forge a line of a log); else ValueError."""
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


def check_event(event: object) -> str:
    """``event`` if it is a dotted lower-case name (``key.version.created``); else ValueError."""
    text = check_text("event", event, MAX_EVENT)
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
        """The bytes ``hash`` covers (see docs/audit-log-format.md)."""
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
            recorded_at = parse_time(texts.pop("recorded_at"))
        except ValueError as exc:
            raise ValueError(f"audit record {seq}: {exc}") from None
        return cls(seq=seq, recorded_at=recorded_at, details=details, **texts)
