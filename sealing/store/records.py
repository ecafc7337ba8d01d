"""What the sealed-state store takes and returns: plain frozen records that carry no session
state, and the checks of their fields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, NamedTuple

from sealing.names import check_host_id

__all__ = [
    "BLOB_KINDS",
    "STALE_AFTER_REFRESHES",
    "AgentRecord",
    "BlobCensus",
    "BlobHandover",
    "BlobRecord",
    "BlobSummary",
    "NewBlob",
    "Page",
    "RewrapFailure",
    "SlotSplice",
    "SweepRow",
    "check_kind",
    "require_bytes",
    "require_int",
    "require_str",
]


class NewBlob(NamedTuple):
    """A blob to store with `SealedStateStore.insert_many` (``blob_id`` None: a fresh uuid4;
    ``kind`` ``tee`` with the ``host`` it is bound to, as for `SealedStateStore.insert`)."""

    namespace: str
    name: str
    key_ref: str
    key_version: int
    generation: str
    blob: bytes
    blob_id: str | None = None
    kind: str = "kms"
    host: str | None = None


class SweepRow(NamedTuple):
    """The first ``head_bytes`` of a record's blob (where its header and key slot are), the
    blob's length and the row version: what a re-wrap sweep (`SealedStateStore.sweep_page`)
    and a put (`SealedStateStore.head_by_name`) read of a record."""

    blob_id: str
    row_version: int
    head: bytes
    length: int

    def __repr__(self) -> str:
        return f"SweepRow({self.blob_id}, row v{self.row_version}, {len(self.head)} of {self.length} bytes)"


class SlotSplice(NamedTuple):
    """One compare-and-swap of `SealedStateStore.splice_key_slots`: if the row is still at
    ``expected_row_version``, its blob becomes ``prefix`` + the stored blob from byte offset
    ``keep_from`` on (0-based), and its key version ``key_version``."""

    blob_id: str
    expected_row_version: int
    prefix: bytes
    keep_from: int
    key_version: int


@dataclass(frozen=True, repr=False)
class BlobRecord:
    """One sealed blob and its bookkeeping. ``repr`` shows the blob's length, never its bytes."""

    blob_id: str
    namespace: str
    name: str
    key_ref: str
    key_version: int
    generation: str
    blob: bytes
    row_version: int
    created_at: datetime
    updated_at: datetime
    kind: str = "kms"
    """``kms`` (a KMS key wraps the data key) or ``tee`` (an enclave's hardware sealing key)."""
    host: str | None = None
    """The host a ``tee`` blob is bound to (None for ``kms``)."""

    def __repr__(self) -> str:
        return (
            f"BlobRecord(blob_id={self.blob_id!r}, namespace={self.namespace!r}, "
            f"name={self.name!r}, key_ref={self.key_ref!r}, key_version={self.key_version}, "
            f"generation={self.generation!r}, blob=<{len(self.blob)} bytes>, "
            f"row_version={self.row_version}, created_at={self.created_at.isoformat()}, "
            f"updated_at={self.updated_at.isoformat()}, kind={self.kind!r}, host={self.host!r})"
        )

    __str__ = __repr__


class BlobHandover:
    """A blob handed to `SealedStateStore.insert` or `compare_and_swap` to write, which takes it
    out of here (`take`) only once the write is sure to apply (no duplicate, the row version
    matched). On SQLite the database then copies it in while this reference is dropped, so a
    caller that keeps no other reference never holds the blob while the database copies it:
    a large write peaks at twice the blob's size instead of three times.

    Until it is taken, `blob` gives it back (a write that lost a race raises and leaves it
    here). Neither the bytes nor a copy are made here; do not change a bytearray handed over."""

    __slots__ = ("_blob", "size")

    def __init__(self, blob: bytes | bytearray) -> None:
        if not isinstance(blob, bytes | bytearray):
            raise TypeError(f"blob must be bytes, got {type(blob).__name__}")
        self._blob: bytes | bytearray | None = blob
        self.size: int = len(blob)
        """The blob's length, also once it is taken."""

    @property
    def taken(self) -> bool:
        return self._blob is None

    @property
    def blob(self) -> bytes | bytearray:
        """The blob, while it has not been taken (ValueError after)."""
        if self._blob is None:
            raise ValueError("the blob was handed over to the store")
        return self._blob

    def take(self) -> bytes | bytearray:
        """The blob, leaving this without it (ValueError if it was taken already)."""
        blob = self.blob
        self._blob = None
        return blob

    def __repr__(self) -> str:
        return f"BlobHandover(<{self.size} bytes{', taken' if self._blob is None else ''}>)"


@dataclass(frozen=True)
class BlobSummary:
    """A sealed blob's bookkeeping without the blob: ``size`` is its length in bytes."""

    blob_id: str
    namespace: str
    name: str
    key_ref: str
    key_version: int
    generation: str
    size: int
    row_version: int
    created_at: datetime
    updated_at: datetime
    kind: str = "kms"
    host: str | None = None


@dataclass(frozen=True)
class BlobCensus:
    """How many stored blobs each KMS key version still wraps and each generation holds, as of
    one read (`SealedStateStore.census`).

    ``by_key_version`` maps (key ref, key version) to the number of KMS-wrapped (``kms``) blobs;
    hardware-sealed (``tee``) blobs have no KMS key version and are counted under their
    generation only. ``by_generation`` maps a generation to the number of blobs it holds, of
    either kind. Keys with no blob are absent (read them as 0)."""

    by_key_version: Mapping[tuple[str, int], int]
    by_generation: Mapping[str, int]

    def of_key(self, key_ref: str) -> dict[int, int]:
        """The blobs of ``key_ref`` per key version (versions without blobs absent)."""
        return {version: n for (ref, version), n in self.by_key_version.items() if ref == key_ref}


@dataclass(frozen=True)
class Page:
    """One page of records in ``blob_id`` order; pass ``next_cursor`` as ``after`` for the
    next page. ``next_cursor`` is None on the last page."""

    records: list[BlobRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class RewrapFailure:
    """A blob a re-wrap sweep could not move to a key's target version (and that is still
    below it): ``reason`` is one short line (the error's class name and a message without
    secrets), ``attempts`` how many sweep passes failed it, ``first_seen``/``last_seen`` when
    the first and the latest of them did (aware UTC)."""

    blob_id: str
    reason: str
    attempts: int
    first_seen: datetime
    last_seen: datetime


STALE_AFTER_REFRESHES: Final = 3
"""An agent whose ``last_seen`` is older than this many of its refresh intervals is stale."""


@dataclass(frozen=True)
class AgentRecord:
    """One enclave agent of the fleet registry (`SealedStateStore.register_agent`).

    ``incarnation`` is a random id of the registering process (a restart gets a new one):
    `SealedStateStore.refresh_agent` and `stop_agent` take it, so a process updates only its own
    registration. ``state`` is what the agent last wrote (``live`` or ``stopped``); `status`
    adds ``stale`` for a live row not refreshed in `STALE_AFTER_REFRESHES` intervals (a crashed
    agent, or a row restored from a backup)."""

    agent_id: str
    host_id: str
    generation: str
    endpoint: str
    handoff_key_sha256: str
    incarnation: str
    state: str
    refresh_seconds: int
    registered_at: datetime
    started_at: datetime
    last_seen: datetime

    def status(self, now: datetime) -> str:
        """``live``, ``stale`` or ``stopped`` at ``now`` (aware; the database clock,
        `SealedStateStore.clock`, which the registry writes with). A ``last_seen`` more than one
        refresh interval after ``now`` is stale too: no refresh writes a time ahead of the
        database clock, so such a row was forged or hand-edited."""
        if self.state != "live":
            return "stopped"
        interval = timedelta(seconds=self.refresh_seconds)
        if now - self.last_seen > STALE_AFTER_REFRESHES * interval or self.last_seen - now > interval:
            return "stale"
        return "live"


BLOB_KINDS: Final = ("kms", "tee")


def check_kind(kind: object, host: object, key_ref: str | None = None) -> tuple[str, str | None]:
    """(kind, host) if they go together: ``kms`` without a host, ``tee`` with a valid host id
    (and, given ``key_ref``, a ``tee:`` key ref for ``tee`` only); else ValueError."""
    if kind not in BLOB_KINDS:
        raise ValueError(f"kind must be one of {', '.join(BLOB_KINDS)}, got {kind!r}")
    if kind == "kms":
        if host is not None:
            raise ValueError("a kms blob is bound to no host")
        if key_ref is not None and key_ref.startswith("tee:"):
            raise ValueError(f"key ref {key_ref} is a hardware sealing key, not a KMS key")
        return "kms", None
    if key_ref is not None and not key_ref.startswith("tee:"):
        raise ValueError(f"a tee blob's key ref is tee:<platform>, not {key_ref}")
    return "tee", check_host_id(host)


def require_str(name: str, value: object) -> str:
    """``value`` if it is a non-empty string, else ValueError naming ``name``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def require_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an integer (not a bool) >= ``minimum``, else ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def require_bytes(value: object) -> bytes:
    """``value`` as bytes if it is bytes-like, else TypeError (a blob is never text)."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"blob must be bytes, got {type(value).__name__}")
    return bytes(value)
