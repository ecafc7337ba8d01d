"""Blob operations of the sealed-state store: insert, read, compare-and-swap, delete, listings,
counts, and the re-wrap sweep's statements, which go straight to the driver.

**Every update is a compare-and-swap on ``row_version``.** A re-wrap sweep reads a blob,
asks the KMS to re-wrap its data key under the new key version, and writes the result
back. Meanwhile the workload owning the blob may write a new value. If the sweep wrote
unconditionally it would silently overwrite the workload's fresh data with a re-wrapped
copy of the *old* data, a lost update that no later check could detect. So a write is a
single ``UPDATE ... WHERE blob_id = :id AND row_version = :expected`` that also sets
``row_version = expected + 1``: exactly one of two racing writers wins, and the loser gets
`StaleRecord` and must re-read and redo its work. The database performs the check and
the write atomically; no lock is held across the KMS round trip.

**Listing** is keyset pagination on ``blob_id``: a page's cursor is its last blob id, so
walking all records stays cheap and consistent while writers keep working.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Final, overload

from sqlalchemy import (
    Integer,
    LargeBinary,
    Row,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.engine import Connection

from sealing.names import check_generation_id, check_name, check_namespace
from sealing.store.base import StoreBase
from sealing.store.errors import DuplicateRecord, RecordNotFound, StaleRecord, StoreError
from sealing.store.records import (
    BlobCensus,
    BlobHandover,
    BlobRecord,
    BlobSummary,
    NewBlob,
    Page,
    SlotSplice,
    SweepRow,
    check_kind,
    require_bytes,
    require_int,
    require_str,
)
from sealing.store.schema import sealed_blobs

__all__ = ["MAX_PAGE", "BlobOperations"]

MAX_PAGE: Final = 10_000
"""Largest ``limit`` that `SealedStateStore.page` accepts."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _record(row: Row[Any]) -> BlobRecord:
    m = row._mapping
    return BlobRecord(
        blob_id=m["blob_id"],
        namespace=m["namespace"],
        name=m["name"],
        key_ref=m["key_ref"],
        key_version=int(m["key_version"]),
        generation=m["generation"],
        blob=bytes(m["blob"]),
        row_version=int(m["row_version"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        kind=str(m["kind"]),
        host=None if m["host"] is None else str(m["host"]),
    )


# A sweep's batched compare-and-swap goes to the driver directly: through the SQL layer each
# statement cost ~30 us of Python per row and dominated a re-wrap sweep. SQLite runs one
# executemany in the batch's transaction (in-process, ~3.5 us per row; its rowcount is the
# total, and only when some swap lost is it undone and redone row by row to learn which);
# PostgreSQL gets one pipelined executemany with RETURNING, whose result sets say per row
# whether it was applied. The new key slot is spliced in by the database (new prefix + the
# stored tail), so the sweep never holds, copies or sends a blob's body. SQLite's || yields
# text; CAST back to BLOB keeps every byte (NULs and non-UTF-8 included; tested).
_SPLICE_SQL: Final = {
    "sqlite": (
        "UPDATE sealed_blobs SET blob = CAST(? || substr(blob, ?) AS BLOB), key_version = ?,"
        " row_version = row_version + 1, updated_at = ? WHERE blob_id = ? AND row_version = ?"
    ),
    "postgresql": (
        "UPDATE sealed_blobs SET blob = %s || substring(blob from %s), key_version = %s,"
        " row_version = row_version + 1, updated_at = %s WHERE blob_id = %s AND row_version = %s"
        " RETURNING blob_id"
    ),
}


_SWEEP_SELECT: Final = (
    "SELECT blob_id, row_version, substr(blob, 1, ?), length(blob) FROM sealed_blobs"
    " WHERE key_ref = ? AND key_version < ? AND blob_id > ?"
)
_SWEEP_SQL: Final = {
    (dialect, upto): (
        _SWEEP_SELECT + (" AND blob_id <= ?" if upto else "") + " ORDER BY blob_id LIMIT ?"
    ).replace("?", mark)
    for dialect, mark in (("sqlite", "?"), ("postgresql", "%s"))
    for upto in (False, True)
}


def _splice_rows(conn: Connection, rows: Sequence[SlotSplice], now: datetime) -> set[str]:
    dialect = conn.dialect
    to_db = sealed_blobs.c.updated_at.type.dialect_impl(dialect).bind_processor(dialect)
    stamp = to_db(now) if to_db is not None else now
    driver: Any = conn.connection.driver_connection
    # substr/substring count from 1: the tail starting at 0-based offset keep_from.
    params = [
        (r.prefix, r.keep_from + 1, r.key_version, stamp, r.blob_id, r.expected_row_version) for r in rows
    ]
    sql = _SPLICE_SQL[dialect.name]
    applied: set[str] = set()
    if dialect.name == "sqlite":
        cursor = driver.cursor()
        try:
            # Usually every swap applies: one executemany, whose rowcount is the total.
            # Otherwise undo it and go row by row to learn which ones lost.
            cursor.execute("SAVEPOINT rekey_splice")
            cursor.executemany(sql, params)
            if cursor.rowcount == len(params):
                cursor.execute("RELEASE rekey_splice")
                return {values[4] for values in params}
            cursor.execute("ROLLBACK TO rekey_splice")
            cursor.execute("RELEASE rekey_splice")
            for values in params:
                cursor.execute(sql, values)
                if cursor.rowcount == 1:
                    applied.add(values[4])
        finally:
            cursor.close()
        return applied
    with driver.cursor() as cursor:
        cursor.executemany(sql, params, returning=True)
        while True:
            row = cursor.fetchone()
            if row is not None:
                applied.add(row[0])
            if not cursor.nextset():
                break
    return applied


def _checked_splice(u: SlotSplice) -> SlotSplice:
    blob_id, expected, prefix, keep_from, key_version = u
    if (  # the common case, cheaply (a sweep checks thousands per batch)
        type(blob_id) is str
        and blob_id
        and type(expected) is int
        and expected >= 1
        and type(prefix) is bytes
        and type(keep_from) is int
        and keep_from >= 0
        and type(key_version) is int
        and key_version >= 0
    ):
        return u
    return SlotSplice(
        require_str("blob_id", blob_id),
        require_int("expected_row_version", expected, 1),
        require_bytes(prefix),
        require_int("keep_from", keep_from, 0),
        require_int("key_version", key_version, 0),
    )


def _check_filters(
    key_ref: str | None, below_version: int | None, generation: str | None, after: str | None
) -> None:
    if key_ref is not None:
        require_str("key_ref", key_ref)
    if below_version is not None:
        if key_ref is None:
            raise ValueError("below_version needs key_ref: key versions only compare within a key")
        require_int("below_version", below_version, 0)
    if generation is not None:
        require_str("generation", generation)
    if after is not None and not isinstance(after, str):
        raise ValueError("after must be a cursor string from a previous page")


_TAKE_BLOB: Final = "rekey_take_blob"
_TAKE_BLOB_SQL: Final = "UPDATE sealed_blobs SET blob = rekey_take_blob() WHERE blob_id = ?"


def _write_blob(conn: Connection, blob_id: str, handover: BlobHandover) -> None:
    """Give the row ``blob_id``, written in this transaction, the handover's blob, and empty the
    handover: only once every check of the write has passed, so a write that raises
    `DuplicateRecord` or `StaleRecord` leaves the caller its blob.

    PostgreSQL got the blob in the write itself. On SQLite the row was written with an empty blob
    and the blob goes in through a function of the statement: SQLite copies its result, the
    handover's reference goes, and only then does SQLite build the row from its copy. Bound as
    a parameter it would be held three times (by the caller, as the bound value and in the row);
    this way twice at most, if the caller kept no other reference."""
    if conn.dialect.name != "sqlite":
        handover.take()
        return
    driver: Any = conn.connection.driver_connection
    driver.create_function(_TAKE_BLOB, 0, handover.take)
    try:
        result = conn.exec_driver_sql(_TAKE_BLOB_SQL, (blob_id,))
    finally:
        driver.create_function(_TAKE_BLOB, 0, None)
    if result.rowcount != 1 or not handover.taken:  # pragma: no cover - the row was just written
        raise StoreError(f"blob {blob_id} was not written")


class BlobOperations(StoreBase):
    """The sealed blobs of a store (mixed into `SealedStateStore`). Each call is its own
    transaction."""

    @overload
    def insert(
        self,
        *,
        namespace: str,
        name: str,
        key_ref: str,
        key_version: int,
        generation: str,
        blob: bytes,
        blob_id: str | None = None,
        kind: str = "kms",
        host: str | None = None,
    ) -> BlobRecord: ...

    @overload
    def insert(
        self,
        *,
        namespace: str,
        name: str,
        key_ref: str,
        key_version: int,
        generation: str,
        blob: BlobHandover,
        blob_id: str | None = None,
        kind: str = "kms",
        host: str | None = None,
    ) -> BlobSummary: ...

    def insert(
        self,
        *,
        namespace: str,
        name: str,
        key_ref: str,
        key_version: int,
        generation: str,
        blob: bytes | BlobHandover,
        blob_id: str | None = None,
        kind: str = "kms",
        host: str | None = None,
    ) -> BlobRecord | BlobSummary:
        """Store a new blob at row version 1. ``blob_id`` defaults to a fresh uuid4. ``kind``
        ``tee`` (hardware-sealed) needs the ``host`` it is bound to and a ``tee:`` key ref.
        Returns the record as written; for a `BlobHandover`, which the blob is taken from once
        the row is in, its summary.

        Raises `DuplicateRecord` if the blob id or (namespace, name) is taken (a handover then
        still holds its blob).
        """
        if blob_id is None:
            blob_id = str(uuid.uuid4())
        kind, host = check_kind(kind, host, require_str("key_ref", key_ref))
        if isinstance(blob, BlobHandover):
            handover = blob
        else:
            blob = require_bytes(blob)
            handover = BlobHandover(blob)
        now = _utcnow()
        values: dict[str, Any] = {
            "blob_id": require_str("blob_id", blob_id),
            "namespace": check_namespace(namespace),
            "name": check_name(name),
            "key_ref": require_str("key_ref", key_ref),
            "key_version": require_int("key_version", key_version, 0),
            "generation": check_generation_id(generation),
            "blob": b"" if self.dialect == "sqlite" else handover.blob,
            "row_version": 1,
            "created_at": now,
            "updated_at": now,
            "kind": kind,
            "host": host,
        }
        try:
            with self.transaction(f"insert of blob {blob_id}", write=True) as conn:
                conn.execute(insert(sealed_blobs).values(**values))
                _write_blob(conn, blob_id, handover)
        except DuplicateRecord as exc:
            raise self._which_duplicate(blob_id, namespace, name) from exc
        if isinstance(blob, BlobHandover):
            values.pop("blob")
            return BlobSummary(**values, size=handover.size)
        return BlobRecord(**(values | {"blob": blob}))

    def insert_many(self, blobs: Sequence[NewBlob]) -> list[str]:
        """Store many new blobs in ONE transaction (bulk import); returns their blob ids.

        All or nothing: on a duplicate id or name (`DuplicateRecord`) none is stored."""
        now = _utcnow()
        rows = [
            {
                "blob_id": require_str("blob_id", new.blob_id or str(uuid.uuid4())),
                "namespace": check_namespace(new.namespace),
                "name": check_name(new.name),
                "key_ref": require_str("key_ref", new.key_ref),
                "key_version": require_int("key_version", new.key_version, 0),
                "generation": check_generation_id(new.generation),
                "blob": require_bytes(new.blob),
                "row_version": 1,
                "created_at": now,
                "updated_at": now,
            }
            | dict(zip(("kind", "host"), check_kind(new.kind, new.host, new.key_ref), strict=True))
            for new in blobs
        ]
        if rows:
            with self.transaction(f"insert of {len(rows)} blobs", write=True) as conn:
                conn.execute(insert(sealed_blobs), rows)
        return [str(row["blob_id"]) for row in rows]

    def _which_duplicate(self, blob_id: str, namespace: str, name: str) -> DuplicateRecord:
        with self.transaction(f"insert of blob {blob_id}") as conn:
            by_id = conn.execute(
                select(sealed_blobs.c.blob_id).where(sealed_blobs.c.blob_id == blob_id)
            ).first()
            by_name = conn.execute(
                select(sealed_blobs.c.blob_id).where(
                    sealed_blobs.c.namespace == namespace, sealed_blobs.c.name == name
                )
            ).first()
        if by_id is not None:
            return DuplicateRecord(f"blob {blob_id} already exists")
        if by_name is not None:
            return DuplicateRecord(f"{namespace}/{name} already exists as blob {by_name.blob_id}")
        return DuplicateRecord(f"insert of blob {blob_id} conflicts with an existing record")

    def get(self, blob_id: str) -> BlobRecord:
        """The blob with this id, or `RecordNotFound`."""
        with self.transaction(f"read of blob {blob_id}") as conn:
            row = conn.execute(select(sealed_blobs).where(sealed_blobs.c.blob_id == blob_id)).first()
        if row is None:
            raise RecordNotFound(f"no sealed blob with id {blob_id}")
        return _record(row)

    def get_by_name(self, namespace: str, name: str) -> BlobRecord:
        """The blob named ``namespace``/``name``, or `RecordNotFound`."""
        with self.transaction(f"read of {namespace}/{name}") as conn:
            row = conn.execute(
                select(sealed_blobs).where(sealed_blobs.c.namespace == namespace, sealed_blobs.c.name == name)
            ).first()
        if row is None:
            raise RecordNotFound(f"no sealed blob named {namespace}/{name}")
        return _record(row)

    def _current_row_version(self, conn: Connection, blob_id: str) -> int | None:
        version = conn.execute(
            select(sealed_blobs.c.row_version).where(sealed_blobs.c.blob_id == blob_id)
        ).scalar_one_or_none()
        return None if version is None else int(version)

    @overload
    def compare_and_swap(
        self,
        blob_id: str,
        expected_row_version: int,
        *,
        blob: bytes,
        key_version: int,
        key_ref: str | None = None,
        generation: str | None = None,
        kind: str | None = None,
        host: str | None = None,
    ) -> BlobRecord: ...

    @overload
    def compare_and_swap(
        self,
        blob_id: str,
        expected_row_version: int,
        *,
        blob: BlobHandover,
        key_version: int,
        key_ref: str | None = None,
        generation: str | None = None,
        kind: str | None = None,
        host: str | None = None,
    ) -> BlobSummary: ...

    def compare_and_swap(
        self,
        blob_id: str,
        expected_row_version: int,
        *,
        blob: bytes | BlobHandover,
        key_version: int,
        key_ref: str | None = None,
        generation: str | None = None,
        kind: str | None = None,
        host: str | None = None,
    ) -> BlobRecord | BlobSummary:
        """Replace the blob (and key version, optionally key ref and generation) only if
        its row version is still ``expected_row_version``; the new row version is one more.
        ``kind`` (given: with ``host`` for ``tee``, without for ``kms``) sets kind and host
        together; ``key_ref`` must then be given too and agree with it.

        Raises `RecordNotFound` if there is no such blob, `StaleRecord` if someone else
        wrote it since it was read (a handover then still holds its blob). Returns the record
        as written; for a `BlobHandover`, which the blob is taken from once the swap applied,
        its summary.
        """
        expected = require_int("expected_row_version", expected_row_version, 1)
        if isinstance(blob, BlobHandover):
            handover = blob
        else:
            blob = require_bytes(blob)
            handover = BlobHandover(blob)
        values: dict[str, Any] = {
            "key_version": require_int("key_version", key_version, 0),
            "row_version": expected + 1,
            "updated_at": _utcnow(),
        }
        if key_ref is not None:
            values["key_ref"] = require_str("key_ref", key_ref)
        if generation is not None:
            values["generation"] = require_str("generation", generation)
        if kind is not None:
            if key_ref is None:
                raise ValueError("changing a blob's kind needs its key_ref")
            values["kind"], values["host"] = check_kind(kind, host, key_ref)
        elif host is not None:
            raise ValueError("host is set together with kind")
        # SQLite loads the old row of a WITHOUT ROWID table to update it: replacing a large blob
        # in one UPDATE would hold the old blob too. The compare-and-swap first empties it, and
        # _write_blob puts the new one in.
        values["blob"] = b"" if self.dialect == "sqlite" else handover.blob
        with self.transaction(f"update of blob {blob_id}", write=True) as conn:
            result = conn.execute(
                update(sealed_blobs)
                .where(
                    sealed_blobs.c.blob_id == blob_id,
                    sealed_blobs.c.row_version == expected,
                )
                .values(**values)
            )
            if result.rowcount == 0:
                self._raise_cas_failure(conn, blob_id, expected)
            _write_blob(conn, blob_id, handover)
            # Our uncommitted write holds the row (PostgreSQL row lock, SQLite write
            # lock), so this reads back exactly what we wrote: all but the blob, which we have
            # (reading it back would hold a second copy of a large blob).
            row = conn.execute(
                select(*(c for c in sealed_blobs.columns if c.key != "blob")).where(
                    sealed_blobs.c.blob_id == blob_id
                )
            ).one()
        fields = dict(row._mapping)
        fields["key_version"], fields["row_version"] = int(fields["key_version"]), int(fields["row_version"])
        if isinstance(blob, BlobHandover):
            return BlobSummary(**fields, size=handover.size)
        return BlobRecord(**fields, blob=blob)

    def head_by_name(self, namespace: str, name: str, head_bytes: int) -> SweepRow:
        """The id and row version of the blob named ``namespace``/``name``, its length and its
        first ``head_bytes`` (where its header is), not the rest; `RecordNotFound` if none."""
        if not isinstance(head_bytes, int) or not 64 <= head_bytes <= 1 << 20:
            raise ValueError(f"head_bytes must be an integer in 64..{1 << 20}, got {head_bytes!r}")
        c = sealed_blobs.c
        with self.transaction(f"read of {namespace}/{name}") as conn:
            row = conn.execute(
                select(
                    c.blob_id,
                    c.row_version,
                    func.substr(c.blob, 1, head_bytes, type_=LargeBinary),
                    func.length(c.blob, type_=Integer),
                ).where(c.namespace == namespace, c.name == name)
            ).first()
        if row is None:
            raise RecordNotFound(f"no sealed blob named {namespace}/{name}")
        blob_id, row_version, head, length = row
        return SweepRow(blob_id, int(row_version), bytes(head), int(length))

    def splice_key_slots(self, updates: Sequence[SlotSplice]) -> list[bool]:
        """Many compare-and-swaps of key slots in ONE transaction (see `SlotSplice`). Returns,
        per update, whether it was applied; a lost one (the workload wrote the blob meanwhile,
        or deleted it) changes nothing and the caller re-reads it.

        A re-wrap sweep uses this: one commit per batch instead of one per blob, and the body
        stays in the database."""
        checked = [_checked_splice(u) for u in updates]
        if not checked:
            return []
        with self.transaction(f"update of {len(checked)} blobs", write=True) as conn:
            done = _splice_rows(conn, checked, _utcnow())
        return [u.blob_id in done for u in checked]

    def delete(self, blob_id: str, expected_row_version: int) -> None:
        """Delete the blob only if its row version is still ``expected_row_version``.

        Raises `RecordNotFound` if there is no such blob, `StaleRecord` if it changed.
        """
        expected = require_int("expected_row_version", expected_row_version, 1)
        with self.transaction(f"delete of blob {blob_id}", write=True) as conn:
            result = conn.execute(
                delete(sealed_blobs).where(
                    sealed_blobs.c.blob_id == blob_id,
                    sealed_blobs.c.row_version == expected,
                )
            )
            if result.rowcount == 0:
                self._raise_cas_failure(conn, blob_id, expected)

    def _raise_cas_failure(self, conn: Connection, blob_id: str, expected: int) -> None:
        actual = self._current_row_version(conn, blob_id)
        if actual is None:
            raise RecordNotFound(f"no sealed blob with id {blob_id}")
        raise StaleRecord(blob_id, expected, actual)

    # ----------------------------------------------------------------- listings

    def page(
        self,
        *,
        key_ref: str | None = None,
        below_version: int | None = None,
        generation: str | None = None,
        after: str | None = None,
        limit: int = 500,
    ) -> Page:
        """Up to ``limit`` records in ``blob_id`` order, starting after cursor ``after``.

        Filters (all optional, combined with AND): ``key_ref`` equal; ``below_version``:
        key version < N (needs ``key_ref``); ``generation`` equal.
        """
        _check_filters(key_ref, below_version, generation, after)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be an integer in 1..{MAX_PAGE}, got {limit!r}")
        query = select(sealed_blobs)
        if key_ref is not None:
            query = query.where(sealed_blobs.c.key_ref == key_ref)
        if below_version is not None:
            query = query.where(sealed_blobs.c.key_version < below_version)
        if generation is not None:
            query = query.where(sealed_blobs.c.generation == generation)
        if after is not None:
            query = query.where(sealed_blobs.c.blob_id > after)
        query = query.order_by(sealed_blobs.c.blob_id).limit(limit + 1)
        with self.transaction("listing of sealed blobs") as conn:
            rows = conn.execute(query).all()
        records = [_record(row) for row in rows[:limit]]
        next_cursor = records[-1].blob_id if len(rows) > limit else None
        return Page(records=records, next_cursor=next_cursor)

    def boundaries(
        self, *, key_ref: str, below_version: int, after: str | None = None, size: int = 500, count: int = 4
    ) -> list[str]:
        """Upper ``blob_id`` bounds of up to ``count`` consecutive ranges after ``after``, each
        holding at most ``size`` records of ``key_ref`` below ``below_version``. Reads ids only:
        a rotation plans parallel batches with it, each batch covering ``(previous, bound]``."""
        _check_filters(key_ref, below_version, None, after)
        if not 1 <= size <= MAX_PAGE or not 1 <= count <= 1000:
            raise ValueError(f"size must be 1..{MAX_PAGE} and count 1..1000")
        c = sealed_blobs.c
        # One index probe per bound (the database skips ``size`` entries itself) instead of
        # fetching every id in Python.
        nth = (
            select(c.blob_id)
            .where(c.key_ref == key_ref, c.key_version < below_version, c.blob_id > bindparam("after"))
            .order_by(c.blob_id)
            .offset(size - 1)
            .limit(1)
        )
        last = select(func.max(c.blob_id)).where(
            c.key_ref == key_ref, c.key_version < below_version, c.blob_id > bindparam("after")
        )
        bounds: list[str] = []
        cursor = after if after is not None else ""  # every blob id sorts after ""
        with self.transaction("planning of a sweep") as conn:
            while len(bounds) < count:
                bound = conn.execute(nth, {"after": cursor}).scalar_one_or_none()
                if bound is None:
                    tail = conn.execute(last, {"after": cursor}).scalar_one_or_none()
                    if tail is not None:
                        bounds.append(str(tail))
                    break
                bounds.append(str(bound))
                cursor = str(bound)
        return bounds

    def sweep_page(
        self,
        *,
        key_ref: str,
        below_version: int,
        after: str | None,
        upto: str | None,
        limit: int,
        head_bytes: int = 2048,
    ) -> list[SweepRow]:
        """Up to ``limit`` records of ``key_ref`` below ``below_version`` with ``after < blob_id
        <= upto`` (either bound None: open), in ``blob_id`` order: only what a re-wrap needs
        (id, row version, the first ``head_bytes`` of the blob and its length). Memory stays
        bounded whatever the blobs' sizes."""
        _check_filters(key_ref, below_version, None, after)
        if upto is not None and not isinstance(upto, str):
            raise ValueError("upto must be a blob id")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be an integer in 1..{MAX_PAGE}, got {limit!r}")
        if not isinstance(head_bytes, int) or not 64 <= head_bytes <= 1 << 20:
            raise ValueError(f"head_bytes must be an integer in 64..{1 << 20}, got {head_bytes!r}")
        # Straight through the driver (like the splice): the SQL layer's per-row work cost
        # more than the database's for these small rows.
        sql = _SWEEP_SQL[(self.dialect, upto is not None)]
        params: tuple[object, ...] = (head_bytes, key_ref, below_version, after or "")
        params += (upto, limit) if upto is not None else (limit,)
        with self.transaction("listing of blobs to re-wrap") as conn:
            driver: Any = conn.connection.driver_connection
            cursor = driver.cursor()
            try:
                cursor.execute(sql, params)
                rows = cursor.fetchall()
            finally:
                cursor.close()
        return [SweepRow(i, v, bytes(h), n) for i, v, h, n in rows]

    def iter_records(
        self,
        *,
        key_ref: str | None = None,
        below_version: int | None = None,
        generation: str | None = None,
        after: str | None = None,
        batch: int = 500,
    ) -> Iterator[BlobRecord]:
        """Every matching record in ``blob_id`` order, fetched ``batch`` at a time.

        Arguments are checked now, not at the first ``next()``. Each batch is its own
        read, so records written during the walk may or may not be seen.
        """
        _check_filters(key_ref, below_version, generation, after)
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_PAGE:
            raise ValueError(f"batch must be an integer in 1..{MAX_PAGE}, got {batch!r}")

        def walk() -> Iterator[BlobRecord]:
            cursor = after
            while True:
                page = self.page(
                    key_ref=key_ref,
                    below_version=below_version,
                    generation=generation,
                    after=cursor,
                    limit=batch,
                )
                yield from page.records
                if page.next_cursor is None:
                    return
                cursor = page.next_cursor

        return walk()

    def count_by_key_version(self, key_ref: str) -> dict[int, int]:
        """How many blobs of ``key_ref`` are wrapped under each key version."""
        query = (
            select(sealed_blobs.c.key_version, func.count())
            .where(sealed_blobs.c.key_ref == key_ref)
            .group_by(sealed_blobs.c.key_version)
        )
        with self.transaction(f"count of {key_ref} blobs") as conn:
            rows = conn.execute(query).all()
        return {int(version): int(count) for version, count in rows}

    def count_by_generation(self) -> dict[str, int]:
        """How many blobs each generation last wrote."""
        query = select(sealed_blobs.c.generation, func.count()).group_by(sealed_blobs.c.generation)
        with self.transaction("count of blobs by generation") as conn:
            rows = conn.execute(query).all()
        return {str(gen): int(count) for gen, count in rows}

    def census(self) -> BlobCensus:
        """How many blobs each KMS key version still wraps and each generation holds: ONE grouped
        statement (one snapshot on either database), so the two views always count the same
        blobs, and what `summaries` lists. Hardware-sealed (``tee``) blobs are counted under their
        generation only (they have no KMS key version).

        It reads the two sweep indexes, not the rows: the blobs per (key ref, key version) from
        ``ix_sealed_blobs_key_id``, per generation from ``ix_sealed_blobs_generation``; the
        ``tee`` blobs (the kind is in no index) are subtracted from the first, looked up among
        the rows of ``tee:`` key refs only (a ``tee`` blob has one: every write that sets a kind
        checks it against the key ref). Counting every row instead would read every blob on
        SQLite (``kind`` is stored after the blob bytes): ~30 times slower at 32 KiB blobs.
        PostgreSQL may scan the heap instead, where large blobs are out of line anyway."""
        c = sealed_blobs.c
        per_key = select(literal_column("0"), c.key_ref, c.key_version, func.count()).group_by(
            c.key_ref, c.key_version
        )
        per_generation = select(
            literal_column("1"), c.generation, literal_column("0"), func.count()
        ).group_by(c.generation)
        tee_refs = select(c.key_ref).where(c.key_ref.like("tee:%")).group_by(c.key_ref)
        tee = (
            select(literal_column("2"), c.key_ref, c.key_version, func.count())
            .where(c.key_ref.in_(tee_refs.scalar_subquery()), c.kind == "tee")
            .group_by(c.key_ref, c.key_version)
        )
        with self.transaction("census of blobs") as conn:
            rows = conn.execute(union_all(per_key, per_generation, tee)).all()
        by_key: dict[tuple[str, int], int] = {}
        by_generation: dict[str, int] = {}
        for arm, name, version, count in rows:
            if int(arm) == 1:
                by_generation[str(name)] = int(count)
                continue
            slot = (str(name), int(version))
            by_key[slot] = by_key.get(slot, 0) + (int(count) if int(arm) == 0 else -int(count))
        return BlobCensus(
            by_key_version={slot: n for slot, n in by_key.items() if n > 0}, by_generation=by_generation
        )

    def summaries(self, namespace: str | None = None) -> list[BlobSummary]:
        """Every blob (or every blob in ``namespace``) without its bytes, ordered by
        namespace and name."""
        c = sealed_blobs.c
        query = select(
            c.blob_id,
            c.namespace,
            c.name,
            c.key_ref,
            c.key_version,
            c.generation,
            func.length(c.blob, type_=Integer).label("size"),
            c.row_version,
            c.created_at,
            c.updated_at,
            c.kind,
            c.host,
        ).order_by(c.namespace, c.name)
        if namespace is not None:
            query = query.where(c.namespace == namespace)
        with self.transaction("listing of blob summaries") as conn:
            rows = conn.execute(query).all()
        return [
            BlobSummary(
                blob_id=r.blob_id,
                namespace=r.namespace,
                name=r.name,
                key_ref=r.key_ref,
                key_version=int(r.key_version),
                generation=r.generation,
                size=int(r.size),
                row_version=int(r.row_version),
                created_at=r.created_at,
                updated_at=r.updated_at,
                kind=str(r.kind),
                host=None if r.host is None else str(r.host),
            )
            for r in rows
        ]
