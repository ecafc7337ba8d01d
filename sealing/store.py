"""The sealed-state store: sealed blobs and generation manifests in SQLite or PostgreSQL.

Design
======

Each sealed blob is one row of ``sealed_blobs``: who owns it (``namespace``, ``name``),
which KMS key wraps its data key (``key_ref``, ``key_version``), which rotation
generation last wrote it, the sealed bytes themselves, and a ``row_version`` counter.

**Every update is a compare-and-swap on ``row_version``.** A re-wrap sweep reads a blob,
asks the KMS to re-wrap its data key under the new key version, and writes the result
back. Meanwhile the workload owning the blob may write a new value. If the sweep wrote
unconditionally it would silently overwrite the workload's fresh data with a re-wrapped
copy of the *old* data, a lost update that no later check could detect. So a write is a
single ``UPDATE ... WHERE blob_id = :id AND row_version = :expected`` that also sets
``row_version = expected + 1``: exactly one of two racing writers wins, and the loser gets
`StaleRecord` and must re-read and redo its work. The database performs the check and
the write atomically; no lock is held across the KMS round trip.

Other choices:

* **SQLAlchemy Core**, not the ORM: the store is a handful of explicit statements, and
  records are returned as frozen dataclasses that carry no session state.
* **SQLite and PostgreSQL** behave the same. SQLite runs in WAL mode with a busy timeout;
  write transactions start with ``BEGIN IMMEDIATE`` (the SQLAlchemy event recipe for
  pysqlite), so concurrent writers queue for the write lock instead of failing with
  "database is locked" half-way through a transaction. Reads use a plain ``BEGIN``, and
  WAL lets them run alongside a writer.
* **Timestamps** are timezone-aware UTC datetimes with microsecond precision. PostgreSQL
  stores them as ``timestamptz``; SQLite as naive UTC text. Both come back as aware UTC.
* **Versioned schema.** ``rekey_schema`` holds one row with the schema version, and
  `MIGRATIONS` lists the steps that lead to `SCHEMA_VERSION`. Opening a store applies the
  pending steps, each in its own transaction that also bumps the version, under a lock
  (``BEGIN IMMEDIATE`` on SQLite, ``pg_advisory_xact_lock`` on PostgreSQL) so that two
  processes opening a new database at once do not trip over each other. A database
  written by a newer rekey raises `SchemaTooNew` and is left untouched. Each migration
  defines its tables as they were at that step, so old steps never change meaning.
* **Errors** are `StoreError` subclasses with one-line messages. No SQLAlchemy exception
  leaves a public method, no message contains sealed bytes (statement parameters are also
  hidden from SQLAlchemy's own error text), and the database is named without password.
* **Listing** is keyset pagination on ``blob_id``: a page's cursor is its last blob id,
  so walking all records stays cheap and consistent while writers keep working.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple

import psycopg
from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Row,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Dialect, Engine, make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "BlobRecord",
    "BlobSummary",
    "DuplicateRecord",
    "NewBlob",
    "Page",
    "RecordNotFound",
    "SchemaTooNew",
    "SealedStateStore",
    "SlotSplice",
    "StaleRecord",
    "StoreError",
    "StoreUnavailable",
    "SweepRow",
    "migrate",
]

SQLITE_BUSY_TIMEOUT_S: Final = 30.0
"""How long an SQLite connection waits for another writer's lock before giving up."""

POSTGRES_CONNECT_TIMEOUT_S: Final = 10
"""Connect timeout for PostgreSQL unless the URL sets ``connect_timeout`` itself."""

MAX_PAGE: Final = 10_000
"""Largest ``limit`` that `SealedStateStore.page` accepts."""

_WRITE: Final = "rekey_write"  # execution option: this transaction will write
_PG_LOCK_KEY: Final = 0x72656B65795F7363  # "rekey_sc": advisory lock serialising migrations


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class of every sealed-state store error."""

    exit_code = 1


class RecordNotFound(StoreError):
    """No record with that blob id, name or generation id."""


class DuplicateRecord(StoreError):
    """The blob id or (namespace, name) is taken, or a generation id holds another document."""


class StaleRecord(StoreError):
    """Compare-and-swap lost: the record's row version moved on since it was read."""

    def __init__(self, blob_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"blob {blob_id} was changed concurrently: expected row_version {expected}, "
            f"found {actual}; re-read it and retry"
        )
        self.blob_id = blob_id
        self.expected = expected
        self.actual = actual

    def __reduce__(self) -> tuple[type[StaleRecord], tuple[str, int, int]]:
        return (type(self), (self.blob_id, self.expected, self.actual))


class SchemaTooNew(StoreError):
    """The database was written by a newer rekey whose schema this code does not know."""

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            f"database schema version {found} is newer than the newest this rekey knows "
            f"({supported}); upgrade rekey"
        )
        self.found = found
        self.supported = supported

    def __reduce__(self) -> tuple[type[SchemaTooNew], tuple[int, int]]:
        return (type(self), (self.found, self.supported))


class StoreUnavailable(StoreError):
    """The database cannot be reached, or refused the operation (locked, disconnected)."""


# --------------------------------------------------------------------------- records


class NewBlob(NamedTuple):
    """A blob to store with `SealedStateStore.insert_many` (``blob_id`` None: a fresh uuid4)."""

    namespace: str
    name: str
    key_ref: str
    key_version: int
    generation: str
    blob: bytes
    blob_id: str | None = None


class SweepRow(NamedTuple):
    """What a re-wrap sweep reads of a record (`SealedStateStore.sweep_page`): the first
    ``head_bytes`` of the blob (where its header and key slot are) and the blob's length."""

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

    def __repr__(self) -> str:
        return (
            f"BlobRecord(blob_id={self.blob_id!r}, namespace={self.namespace!r}, "
            f"name={self.name!r}, key_ref={self.key_ref!r}, key_version={self.key_version}, "
            f"generation={self.generation!r}, blob=<{len(self.blob)} bytes>, "
            f"row_version={self.row_version}, created_at={self.created_at.isoformat()}, "
            f"updated_at={self.updated_at.isoformat()})"
        )

    __str__ = __repr__


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


@dataclass(frozen=True)
class Page:
    """One page of records in ``blob_id`` order; pass ``next_cursor`` as ``after`` for the
    next page. ``next_cursor`` is None on the last page."""

    records: list[BlobRecord]
    next_cursor: str | None


# --------------------------------------------------------------------------- schema


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every dialect: ``timestamptz`` on PostgreSQL, naive-UTC
    text on SQLite (which would otherwise drop the offset without converting)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime; the store only takes timezone-aware datetimes")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# The current schema, used by the queries. Migrations below define their own snapshots.
metadata = MetaData()

rekey_schema = Table(
    "rekey_schema",
    metadata,
    Column("version", Integer, nullable=False),
)

sealed_blobs = Table(
    "sealed_blobs",
    metadata,
    Column("blob_id", String, primary_key=True),
    Column("namespace", String, nullable=False),
    Column("name", String, nullable=False),
    Column("key_ref", String, nullable=False),
    Column("key_version", Integer, nullable=False),
    Column("generation", String, nullable=False),
    Column("blob", LargeBinary, nullable=False),
    Column("row_version", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("namespace", "name", name="uq_sealed_blobs_namespace_name"),
    Index("ix_sealed_blobs_key_id", "key_ref", "blob_id", "key_version"),
    Index("ix_sealed_blobs_generation", "generation", "blob_id"),
    sqlite_with_rowid=False,  # clustered by blob_id (migration 4)
)

generations = Table(
    "generations",
    metadata,
    Column("generation_id", String, primary_key=True),
    Column("document", Text, nullable=False),
    Column("registered_at", UTCDateTime, nullable=False),
)


def _migration_1_sealed_blobs(conn: Connection) -> None:
    """Create ``sealed_blobs`` with its unique name and its two sweep indexes."""
    snapshot = MetaData()
    Table(
        "sealed_blobs",
        snapshot,
        Column("blob_id", String, primary_key=True),
        Column("namespace", String, nullable=False),
        Column("name", String, nullable=False),
        Column("key_ref", String, nullable=False),
        Column("key_version", Integer, nullable=False),
        Column("generation", String, nullable=False),
        Column("blob", LargeBinary, nullable=False),
        Column("row_version", Integer, nullable=False),
        Column("created_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        UniqueConstraint("namespace", "name", name="uq_sealed_blobs_namespace_name"),
        Index("ix_sealed_blobs_key", "key_ref", "key_version", "blob_id"),
        Index("ix_sealed_blobs_generation", "generation", "blob_id"),
    ).create(conn)


def _migration_2_generations(conn: Connection) -> None:
    """Create ``generations``: registered generation manifests (JSON documents)."""
    snapshot = MetaData()
    Table(
        "generations",
        snapshot,
        Column("generation_id", String, primary_key=True),
        Column("document", Text, nullable=False),
        Column("registered_at", UTCDateTime, nullable=False),
    ).create(conn)


def _migration_3_audit_log(conn: Connection) -> None:
    """Create ``audit_log``: the append-only, hash-chained, signed audit log (`rekey.audit`).

    ``seq`` is assigned by the appender (1, 2, ...), never by the database. ``recorded_at``
    is the canonical UTC time text that the record's hash covers, stored verbatim."""
    snapshot = MetaData()
    Table(
        "audit_log",
        snapshot,
        Column("seq", Integer, primary_key=True, autoincrement=False),
        Column("recorded_at", String, nullable=False),
        Column("actor", String, nullable=False),
        Column("event", String, nullable=False),
        Column("subject", String, nullable=False),
        Column("details", Text, nullable=False),
        Column("prev_hash", String, nullable=False),
        Column("hash", String, nullable=False),
        Column("signature", String, nullable=False),
        Column("key_id", String, nullable=False),
        Index("ix_audit_log_subject", "subject", "seq"),
    ).create(conn)


def _migration_4_sweep_layout(conn: Connection) -> None:
    """Lay ``sealed_blobs`` out for re-wrap sweeps, which walk one key's blobs in ``blob_id``
    order with ``key_version < N`` and rewrite each one's key slot.

    - The (key_ref, key_version, blob_id) index becomes (key_ref, blob_id, key_version): with
      the old one every page of a sweep collected and sorted all blobs below N (quadratic over
      a sweep) and every re-wrap moved the blob's entry across the index; now a page is an
      ordered range scan and a re-wrap changes its entry in place.
    - SQLite: the table becomes WITHOUT ROWID, clustered by ``blob_id``. With random uuid ids a
      rowid table scatters a ``blob_id`` range over the whole file, so each batch of 2,000
      swaps dirtied ~2,000 pages (~8 MB of WAL per commit); clustered, it dirties ~200."""
    if conn.dialect.name == "sqlite":
        snapshot = MetaData()
        Table(
            "sealed_blobs_v4",
            snapshot,
            Column("blob_id", String, primary_key=True),
            Column("namespace", String, nullable=False),
            Column("name", String, nullable=False),
            Column("key_ref", String, nullable=False),
            Column("key_version", Integer, nullable=False),
            Column("generation", String, nullable=False),
            Column("blob", LargeBinary, nullable=False),
            Column("row_version", Integer, nullable=False),
            Column("created_at", UTCDateTime, nullable=False),
            Column("updated_at", UTCDateTime, nullable=False),
            UniqueConstraint("namespace", "name", name="uq_sealed_blobs_v4_namespace_name"),
            sqlite_with_rowid=False,
        ).create(conn)
        conn.execute(
            text(
                "INSERT INTO sealed_blobs_v4 SELECT blob_id, namespace, name, key_ref, key_version,"
                " generation, blob, row_version, created_at, updated_at FROM sealed_blobs"
            )
        )
        conn.execute(text("DROP TABLE sealed_blobs"))
        conn.execute(text("ALTER TABLE sealed_blobs_v4 RENAME TO sealed_blobs"))
        conn.execute(text("CREATE INDEX ix_sealed_blobs_generation ON sealed_blobs (generation, blob_id)"))
    else:
        conn.execute(text("DROP INDEX IF EXISTS ix_sealed_blobs_key"))
    conn.execute(text("CREATE INDEX ix_sealed_blobs_key_id ON sealed_blobs (key_ref, blob_id, key_version)"))


MIGRATIONS: Final[Sequence[Callable[[Connection], None]]] = (
    _migration_1_sealed_blobs,
    _migration_2_generations,
    _migration_3_audit_log,
    _migration_4_sweep_layout,
)
"""Migration steps in order: step ``i`` (0-based) takes the schema from version ``i`` to
``i + 1``. Append new steps; never edit or reorder old ones."""

SCHEMA_VERSION: Final = len(MIGRATIONS)
"""The schema version this code reads and writes."""


# --------------------------------------------------------------------------- engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control away from the sqlite3 module (it would skip BEGIN for
    # SELECT and DDL); _sqlite_on_begin emits BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        # WAL is persistent, so only the first connection to a new file switches it. That
        # switch needs an exclusive lock and SQLite answers "database is locked" at once,
        # without its busy handler, when another connection is opening the file too.
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
        # An in-memory database stays in journal mode "memory": nothing to switch there.
        while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() not in ("wal", "memory"):
            try:
                cursor.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # A write transaction takes the write lock up front (waiting up to the busy timeout),
    # rather than upgrading a read lock later, which SQLite answers with an immediate
    # "database is locked" when another writer got there first.
    if conn.get_execution_options().get(_WRITE):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


@dataclass(frozen=True)
class _Database:
    engine: Engine
    writer: Engine  # same pool, marks transactions as writes
    display: str  # URL without password, for messages
    serialize: bool  # one shared connection (in-memory SQLite): serialise all access


def _open_database(url: str) -> _Database:
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):
        raise ValueError("invalid database URL (expected e.g. sqlite:///path/state.db)") from None
    if parsed.drivername == "postgresql":
        # psycopg 3 is the driver rekey ships with; plain postgresql:// means psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
    display = _display_url(parsed)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {"hide_parameters": True}
    serialize = False
    if backend == "sqlite":
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
        if in_memory:
            kwargs["poolclass"] = StaticPool
            serialize = True
        elif not database.startswith("file:"):
            try:
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(f"cannot create the directory for {display}: {exc.strerror}") from exc
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
    elif backend == "postgresql":
        if "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        kwargs["pool_pre_ping"] = True
    else:
        raise ValueError(
            f"unsupported database {display}: the store runs on sqlite:// or postgresql+psycopg://"
        )
    try:
        engine = create_engine(parsed, **kwargs)
    except (sa_exc.SQLAlchemyError, ImportError) as exc:
        raise ValueError(f"cannot use database {display}: {type(exc).__name__}") from exc
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    return _Database(
        engine=engine,
        writer=engine.execution_options(**{_WRITE: True}),
        display=display,
        serialize=serialize,
    )


def _display_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)  # password shown as ***


def _reason(exc: sa_exc.SQLAlchemyError) -> str:
    """The driver's first line of explanation (never statement parameters)."""
    orig = getattr(exc, "orig", None)
    source: BaseException = orig if isinstance(orig, BaseException) else exc
    lines = str(source).strip().splitlines()
    first = lines[0].strip() if lines else type(source).__name__
    if isinstance(exc, sa_exc.StatementError) and source is exc:
        first = type(exc).__name__  # SQLAlchemy's own text embeds the statement
    return first[:200]


_DRIVER_ERRORS: Final[tuple[type[Exception], ...]] = (sqlite3.Error, psycopg.Error)


@contextmanager
def _translated(display: str, what: str) -> Iterator[None]:
    """Map SQLAlchemy exceptions raised inside onto `StoreError` subclasses."""
    try:
        yield
    except sa_exc.IntegrityError as exc:
        raise DuplicateRecord(f"{what} conflicts with an existing record") from exc
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        raise StoreUnavailable(f"database {display} unavailable ({what}): {_reason(exc)}") from exc
    except sa_exc.DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable(f"database {display} connection lost ({what}): {_reason(exc)}") from exc
        raise StoreError(f"{what} failed in {display}: {_reason(exc)}") from exc
    except sa_exc.SQLAlchemyError as exc:
        raise StoreError(f"{what} failed in {display}: {_reason(exc)}") from exc
    except _DRIVER_ERRORS as exc:  # from the statements a sweep sends to the driver directly
        lines = str(exc).strip().splitlines()
        reason = (lines[0].strip() if lines else type(exc).__name__)[:200]
        if type(exc).__name__ == "IntegrityError":
            raise DuplicateRecord(f"{what} conflicts with an existing record") from exc
        if type(exc).__name__ in ("OperationalError", "InterfaceError"):
            raise StoreUnavailable(f"database {display} unavailable ({what}): {reason}") from exc
        raise StoreError(f"{what} failed in {display}: {reason}") from exc


# --------------------------------------------------------------------------- migrations


def _read_schema_version(conn: Connection) -> int | None:
    versions = conn.execute(select(rekey_schema.c.version)).scalars().all()
    if len(versions) > 1:
        raise StoreError(f"rekey_schema holds {len(versions)} rows; expected exactly one")
    return int(versions[0]) if versions else None


def _migrate(db: _Database, target: int) -> int:
    """Apply pending migrations up to ``target``, one transaction per step."""
    while True:
        with _translated(db.display, "schema migration"), db.writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
            conn.execute(text("CREATE TABLE IF NOT EXISTS rekey_schema (version INTEGER NOT NULL)"))
            current = _read_schema_version(conn)
            if current is None:
                conn.execute(insert(rekey_schema).values(version=0))
                current = 0
            if current > SCHEMA_VERSION:
                raise SchemaTooNew(current, SCHEMA_VERSION)
            if current >= target:
                return current
            MIGRATIONS[current](conn)
            conn.execute(update(rekey_schema).values(version=current + 1))


def migrate(url: str, target: int = SCHEMA_VERSION) -> int:
    """Bring the database at ``url`` to schema version ``target`` (no further) and return
    its version afterwards. Never downgrades: a database already past ``target`` is left
    alone. Raises `SchemaTooNew` for a database newer than `SCHEMA_VERSION`.

    `SealedStateStore` does this itself on open; this is for tooling and tests that need a
    database at an older version.
    """
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"target schema version must be 0..{SCHEMA_VERSION}, got {target}")
    db = _open_database(url)
    try:
        return _migrate(db, target)
    finally:
        db.engine.dispose()


# --------------------------------------------------------------------------- the store


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


def _require_str(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _require_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


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
        _require_str("blob_id", blob_id),
        _require_int("expected_row_version", expected, 1),
        _require_bytes(prefix),
        _require_int("keep_from", keep_from, 0),
        _require_int("key_version", key_version, 0),
    )


def _require_bytes(value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"blob must be bytes, got {type(value).__name__}")
    return bytes(value)


class SealedStateStore:
    """Sealed blobs and generation manifests in a SQLite or PostgreSQL database.

    ``url`` is an SQLAlchemy URL: ``sqlite:///<home>/state.db`` (the parent directory is
    created) or ``postgresql+psycopg://user:pass@host/db``. Opening applies pending schema
    migrations. All methods are synchronous and safe to call from several threads; each
    call is its own transaction. Close the store (or use it as a context manager) to
    release its connections.
    """

    def __init__(self, url: str) -> None:
        self._db = _open_database(url)
        self._lock: AbstractContextManager[Any] = threading.RLock() if self._db.serialize else nullcontext()
        self._closed = False
        try:
            with self._lock:
                self._schema_version = _migrate(self._db, SCHEMA_VERSION)
        except BaseException:
            self._db.engine.dispose()
            raise

    # ----------------------------------------------------------------- plumbing

    @property
    def schema_version(self) -> int:
        """The database's schema version (always `SCHEMA_VERSION` once opened)."""
        return self._schema_version

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self._db.display

    def __repr__(self) -> str:
        return f"SealedStateStore({self._db.display!r})"

    @contextmanager
    def _tx(self, what: str, *, write: bool = False) -> Iterator[Connection]:
        if self._closed:
            raise StoreError(f"{what}: the store for {self._db.display} is closed")
        engine = self._db.writer if write else self._db.engine
        with self._lock, _translated(self._db.display, what), engine.begin() as conn:
            yield conn

    def close(self) -> None:
        """Release all connections. Further calls raise `StoreError`."""
        self._closed = True
        self._db.engine.dispose()

    def __enter__(self) -> SealedStateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- blobs

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
    ) -> BlobRecord:
        """Store a new blob at row version 1. ``blob_id`` defaults to a fresh uuid4.

        Raises `DuplicateRecord` if the blob id or (namespace, name) is taken.
        """
        if blob_id is None:
            blob_id = str(uuid.uuid4())
        now = _utcnow()
        record = BlobRecord(
            blob_id=_require_str("blob_id", blob_id),
            namespace=_require_str("namespace", namespace),
            name=_require_str("name", name),
            key_ref=_require_str("key_ref", key_ref),
            key_version=_require_int("key_version", key_version, 0),
            generation=_require_str("generation", generation),
            blob=_require_bytes(blob),
            row_version=1,
            created_at=now,
            updated_at=now,
        )
        values = {col.key: getattr(record, col.key) for col in sealed_blobs.columns}
        try:
            with self._tx(f"insert of blob {blob_id}", write=True) as conn:
                conn.execute(insert(sealed_blobs).values(**values))
        except DuplicateRecord as exc:
            raise self._which_duplicate(blob_id, namespace, name) from exc
        return record

    def insert_many(self, blobs: Sequence[NewBlob]) -> list[str]:
        """Store many new blobs in ONE transaction (bulk import); returns their blob ids.

        All or nothing: on a duplicate id or name (`DuplicateRecord`) none is stored."""
        now = _utcnow()
        rows = [
            {
                "blob_id": _require_str("blob_id", new.blob_id or str(uuid.uuid4())),
                "namespace": _require_str("namespace", new.namespace),
                "name": _require_str("name", new.name),
                "key_ref": _require_str("key_ref", new.key_ref),
                "key_version": _require_int("key_version", new.key_version, 0),
                "generation": _require_str("generation", new.generation),
                "blob": _require_bytes(new.blob),
                "row_version": 1,
                "created_at": now,
                "updated_at": now,
            }
            for new in blobs
        ]
        if rows:
            with self._tx(f"insert of {len(rows)} blobs", write=True) as conn:
                conn.execute(insert(sealed_blobs), rows)
        return [str(row["blob_id"]) for row in rows]

    def _which_duplicate(self, blob_id: str, namespace: str, name: str) -> DuplicateRecord:
        with self._tx(f"insert of blob {blob_id}") as conn:
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
        with self._tx(f"read of blob {blob_id}") as conn:
            row = conn.execute(select(sealed_blobs).where(sealed_blobs.c.blob_id == blob_id)).first()
        if row is None:
            raise RecordNotFound(f"no sealed blob with id {blob_id}")
        return _record(row)

    def get_by_name(self, namespace: str, name: str) -> BlobRecord:
        """The blob named ``namespace``/``name``, or `RecordNotFound`."""
        with self._tx(f"read of {namespace}/{name}") as conn:
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

    def compare_and_swap(
        self,
        blob_id: str,
        expected_row_version: int,
        *,
        blob: bytes,
        key_version: int,
        key_ref: str | None = None,
        generation: str | None = None,
    ) -> BlobRecord:
        """Replace the blob (and key version, optionally key ref and generation) only if
        its row version is still ``expected_row_version``; the new row version is one more.

        Raises `RecordNotFound` if there is no such blob, `StaleRecord` if someone else
        wrote it since it was read. Returns the record as written.
        """
        expected = _require_int("expected_row_version", expected_row_version, 1)
        values: dict[str, Any] = {
            "blob": _require_bytes(blob),
            "key_version": _require_int("key_version", key_version, 0),
            "row_version": expected + 1,
            "updated_at": _utcnow(),
        }
        if key_ref is not None:
            values["key_ref"] = _require_str("key_ref", key_ref)
        if generation is not None:
            values["generation"] = _require_str("generation", generation)
        with self._tx(f"update of blob {blob_id}", write=True) as conn:
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
            # Our uncommitted write holds the row (PostgreSQL row lock, SQLite write
            # lock), so this reads back exactly what we wrote.
            row = conn.execute(select(sealed_blobs).where(sealed_blobs.c.blob_id == blob_id)).one()
        return _record(row)

    def splice_key_slots(self, updates: Sequence[SlotSplice]) -> list[bool]:
        """Many compare-and-swaps of key slots in ONE transaction (see `SlotSplice`). Returns,
        per update, whether it was applied; a lost one (the workload wrote the blob meanwhile,
        or deleted it) changes nothing and the caller re-reads it.

        A re-wrap sweep uses this: one commit per batch instead of one per blob, and the body
        stays in the database."""
        checked = [_checked_splice(u) for u in updates]
        if not checked:
            return []
        with self._tx(f"update of {len(checked)} blobs", write=True) as conn:
            done = _splice_rows(conn, checked, _utcnow())
        return [u.blob_id in done for u in checked]

    def delete(self, blob_id: str, expected_row_version: int) -> None:
        """Delete the blob only if its row version is still ``expected_row_version``.

        Raises `RecordNotFound` if there is no such blob, `StaleRecord` if it changed.
        """
        expected = _require_int("expected_row_version", expected_row_version, 1)
        with self._tx(f"delete of blob {blob_id}", write=True) as conn:
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
        with self._tx("listing of sealed blobs") as conn:
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
        with self._tx("planning of a sweep") as conn:
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
        sql = _SWEEP_SQL[(self._db.engine.dialect.name, upto is not None)]
        params: tuple[object, ...] = (head_bytes, key_ref, below_version, after or "")
        params += (upto, limit) if upto is not None else (limit,)
        with self._tx("listing of blobs to re-wrap") as conn:
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
        with self._tx(f"count of {key_ref} blobs") as conn:
            rows = conn.execute(query).all()
        return {int(version): int(count) for version, count in rows}

    def count_by_generation(self) -> dict[str, int]:
        """How many blobs each generation last wrote."""
        query = select(sealed_blobs.c.generation, func.count()).group_by(sealed_blobs.c.generation)
        with self._tx("count of blobs by generation") as conn:
            rows = conn.execute(query).all()
        return {str(gen): int(count) for gen, count in rows}

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
        ).order_by(c.namespace, c.name)
        if namespace is not None:
            query = query.where(c.namespace == namespace)
        with self._tx("listing of blob summaries") as conn:
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
            )
            for r in rows
        ]

    # ----------------------------------------------------------------- generations

    def put_generation(self, generation_id: str, document: str) -> bool:
        """Register a generation manifest (a JSON document). Idempotent: True if newly
        stored, False if the id already holds this exact document; `DuplicateRecord` if it
        holds a different one."""
        _require_str("generation_id", generation_id)
        if not isinstance(document, str):
            raise TypeError(f"document must be a JSON string, got {type(document).__name__}")
        try:
            json.loads(document)
        except ValueError:
            raise ValueError(f"document of generation {generation_id} is not valid JSON") from None
        what = f"registration of generation {generation_id}"
        for _attempt in range(2):
            try:
                with self._tx(what, write=True) as conn:
                    existing = conn.execute(
                        select(generations.c.document).where(generations.c.generation_id == generation_id)
                    ).scalar_one_or_none()
                    if existing is None:
                        conn.execute(
                            insert(generations).values(
                                generation_id=generation_id,
                                document=document,
                                registered_at=_utcnow(),
                            )
                        )
                        return True
            except DuplicateRecord:
                continue  # a concurrent registration won the insert; compare with it
            if existing == document:
                return False
            raise DuplicateRecord(
                f"generation {generation_id} is already registered with a different document"
            )
        raise DuplicateRecord(f"{what} kept conflicting with concurrent registrations")

    def get_generation(self, generation_id: str) -> str:
        """The manifest document of a generation, or `RecordNotFound`."""
        with self._tx(f"read of generation {generation_id}") as conn:
            document = conn.execute(
                select(generations.c.document).where(generations.c.generation_id == generation_id)
            ).scalar_one_or_none()
        if document is None:
            raise RecordNotFound(f"no generation {generation_id}")
        return str(document)

    def list_generations(self) -> list[tuple[str, str, datetime]]:
        """All generations as (generation_id, document, registered_at), oldest first."""
        query = select(
            generations.c.generation_id, generations.c.document, generations.c.registered_at
        ).order_by(generations.c.registered_at, generations.c.generation_id)
        with self._tx("listing of generations") as conn:
            rows = conn.execute(query).all()
        return [(str(gid), str(doc), at) for gid, doc, at in rows]


def _check_filters(
    key_ref: str | None, below_version: int | None, generation: str | None, after: str | None
) -> None:
    if key_ref is not None:
        _require_str("key_ref", key_ref)
    if below_version is not None:
        if key_ref is None:
            raise ValueError("below_version needs key_ref: key versions only compare within a key")
        _require_int("below_version", below_version, 0)
    if generation is not None:
        _require_str("generation", generation)
    if after is not None and not isinstance(after, str):
        raise ValueError("after must be a cursor string from a previous page")
