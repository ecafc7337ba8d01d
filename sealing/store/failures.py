"""The re-wrap failures of a store: every blob a re-wrap sweep could not move to a key's target
version, with why, so an operator can list all of them (a sweep's progress keeps only the first
few ids) and fix them before resuming a blocked rotation.

One row of ``rewrap_failures`` per (key_ref, target_version, blob_id). Recording a blob again
replaces its reason with the newest one, adds one to ``attempts`` and moves ``last_seen``.
Listings and counts join ``sealed_blobs`` and show only blobs that are STILL of that key and
below the target version: a blob re-wrapped since (by a later sweep or by the workload), moved
to another key, or deleted drops out without anyone touching this table. `clear_rewrap_failures`
removes the rows of one key and target version.

A reason is stored as one printable line of at most `MAX_REASON_CHARS` characters, whatever the
caller passes (control characters and line breaks become spaces, runs of whitespace one space,
the rest is cut). The store cannot tell a secret from text: callers pass an error's class name
and a message that never holds a DEK, ciphertext or plaintext (``sealing.rotation`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql import Select

from sealing.store.base import StoreBase
from sealing.store.blobs import MAX_PAGE
from sealing.store.records import RewrapFailure, require_int, require_str
from sealing.store.schema import rewrap_failures, sealed_blobs

__all__ = ["MAX_REASON_CHARS", "RewrapFailures", "one_line_reason"]

MAX_REASON_CHARS: Final = 200
"""Longest reason stored; a longer one is cut and ends in ``...``."""

_NO_REASON: Final = "unspecified"


def one_line_reason(reason: str) -> str:
    """``reason`` as the store keeps it: one printable line of at most `MAX_REASON_CHARS`
    characters (``unspecified`` if nothing printable is left)."""
    head = reason[: MAX_REASON_CHARS * 4]  # bounded work on huge input
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in head).split())
    if not line:
        return _NO_REASON
    if len(line) > MAX_REASON_CHARS or len(reason) > len(head):
        line = line[: MAX_REASON_CHARS - 3].rstrip() + "..."
    return line


def _checked_failures(failures: object) -> dict[str, str]:
    """The failures as blob id -> stored reason (a blob listed twice: the later reason, once)."""
    if isinstance(failures, str | bytes | bytearray) or not isinstance(failures, Sequence):
        raise ValueError("failures must be a sequence of (blob_id, reason) pairs")
    checked: dict[str, str] = {}
    for item in failures:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ValueError("each failure must be a (blob_id, reason) pair")
        blob_id, reason = item
        require_str("blob_id", blob_id)
        if not isinstance(reason, str):
            raise ValueError(f"reason of blob {blob_id} must be a string, got {type(reason).__name__}")
        checked[blob_id] = one_line_reason(reason)
    return checked


def _check_key(key_ref: object, version: object) -> tuple[str, int]:
    return require_str("key_ref", key_ref), require_int("version", version, 1)


class RewrapFailures(StoreBase):
    """The re-wrap failures of a store (mixed into `SealedStateStore`). Each call is its own
    transaction."""

    def record_rewrap_failures(self, key_ref: str, version: int, failures: Sequence[tuple[str, str]]) -> None:
        """Record that a sweep towards ``version`` of ``key_ref`` failed these blobs, given as
        (blob_id, reason) pairs: new blobs get ``attempts`` 1, known ones one more, the newest
        reason and ``last_seen`` now. All in one transaction, all checked first (ValueError
        names what is wrong, and nothing is written); an empty sequence writes nothing."""
        key_ref, version = _check_key(key_ref, version)
        checked = _checked_failures(failures)
        if not checked:
            return
        now = datetime.now(UTC)
        rows = [
            {
                "key_ref": key_ref,
                "target_version": version,
                "blob_id": blob_id,
                "reason": reason,
                "attempts": 1,
                "first_seen": now,
                "last_seen": now,
            }
            for blob_id, reason in checked.items()
        ]
        what = f"recording of {len(rows)} re-wrap failures of {key_ref} v{version}"
        with self.transaction(what, write=True) as conn:
            insert: Any = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
            stmt = insert(rewrap_failures)
            stmt = stmt.on_conflict_do_update(
                index_elements=[
                    rewrap_failures.c.key_ref,
                    rewrap_failures.c.target_version,
                    rewrap_failures.c.blob_id,
                ],
                set_={
                    "reason": stmt.excluded.reason,
                    "attempts": rewrap_failures.c.attempts + 1,
                    "last_seen": stmt.excluded.last_seen,
                },
            )
            conn.execute(stmt, rows)

    def rewrap_failures(
        self, key_ref: str, version: int, *, after: str | None = None, limit: int = 100
    ) -> list[RewrapFailure]:
        """Up to ``limit`` (1..`MAX_PAGE`) recorded failures of ``key_ref`` towards ``version``
        whose blob is still of that key and below ``version``, in ``blob_id`` order after
        ``after`` (pass the last blob id of a page to get the next one)."""
        key_ref, version = _check_key(key_ref, version)
        if after is not None and not isinstance(after, str):
            raise ValueError("after must be the blob id of the last failure of a previous page")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be an integer in 1..{MAX_PAGE}, got {limit!r}")
        f = rewrap_failures.c
        query = _still_failing(
            select(f.blob_id, f.reason, f.attempts, f.first_seen, f.last_seen), key_ref, version
        )
        if after is not None:
            query = query.where(f.blob_id > after)
        query = query.order_by(f.blob_id).limit(limit)
        with self.transaction(f"listing of re-wrap failures of {key_ref} v{version}") as conn:
            rows = conn.execute(query).all()
        return [
            RewrapFailure(
                blob_id=str(r.blob_id),
                reason=str(r.reason),
                attempts=int(r.attempts),
                first_seen=r.first_seen,
                last_seen=r.last_seen,
            )
            for r in rows
        ]

    def count_rewrap_failures(self, key_ref: str, version: int) -> int:
        """How many recorded failures of ``key_ref`` towards ``version`` are of blobs still of
        that key and below ``version`` (what `rewrap_failures` would list)."""
        key_ref, version = _check_key(key_ref, version)
        query = _still_failing(select(func.count()), key_ref, version)
        with self.transaction(f"count of re-wrap failures of {key_ref} v{version}") as conn:
            return int(conn.execute(query).scalar_one())

    def clear_rewrap_failures(self, key_ref: str, version: int) -> int:
        """Forget every recorded failure of ``key_ref`` towards ``version`` (still failing or
        not); returns how many rows were removed."""
        key_ref, version = _check_key(key_ref, version)
        f = rewrap_failures.c
        with self.transaction(f"clearing of re-wrap failures of {key_ref} v{version}", write=True) as conn:
            result = conn.execute(
                delete(rewrap_failures).where(f.key_ref == key_ref, f.target_version == version)
            )
        return int(result.rowcount)


def _still_failing(query: Select[Any], key_ref: str, version: int) -> Select[Any]:
    """``query`` over the failures of ``key_ref`` towards ``version`` whose blob still exists,
    still belongs to that key and is still below ``version``."""
    f, b = rewrap_failures.c, sealed_blobs.c
    return query.select_from(rewrap_failures.join(sealed_blobs, b.blob_id == f.blob_id)).where(
        f.key_ref == key_ref,
        f.target_version == version,
        b.key_ref == key_ref,
        b.key_version < version,
    )
