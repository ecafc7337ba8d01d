"""The sealed-state store's schema: its current tables, its migration steps, and the per-owner
migrations of packages that keep their own tables in the store's database.

``rekey_schema`` holds one row with the store's schema version, and `MIGRATIONS` lists the
steps that lead to `SCHEMA_VERSION`. Opening a store applies the pending steps, each in its own
transaction that also bumps the version, under a lock (``BEGIN IMMEDIATE`` on SQLite,
``pg_advisory_xact_lock`` on PostgreSQL) so that two processes opening a new database at once
do not trip over each other. A database written by a newer rekey raises `SchemaTooNew` and is
left untouched. Each migration defines its tables as they were at that step, so old steps never
change meaning.

A package above the store (the audit log) that keeps tables in the same database describes
them as a `SchemaOwner`: a name, its own ordered steps and its own version, one row of
``rekey_schema_owners``. `SealedStateStore.apply_schema` applies its pending steps in the same
way and under the same lock, so the store never imports the packages that build on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.types import TypeDecorator

from sealing.store.engine import Database, open_database, translated
from sealing.store.errors import SchemaTooNew, StoreError, StoreMissing

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "MigrationStep",
    "SchemaOwner",
    "UTCDateTime",
    "agents",
    "apply_migrations",
    "apply_owner_steps",
    "generation_successions",
    "generations",
    "metadata",
    "migrate",
    "migration_claims",
    "migration_copies",
    "migration_release_policies",
    "rekey_schema",
    "rewrap_failures",
    "schema_owners",
    "sealed_blobs",
]

MigrationStep = Callable[[Connection], None]
"""One migration step: runs inside the transaction that also bumps the version."""

_PG_LOCK_KEY: Final = 0x72656B65795F7363  # "rekey_sc": advisory lock serialising migrations
_OWNER_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,62}\Z")


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


# --------------------------------------------------------------------------- current tables

# The current schema, used by the queries. Migrations below define their own snapshots.
metadata = MetaData()

rekey_schema = Table(
    "rekey_schema",
    metadata,
    Column("version", Integer, nullable=False),
)

schema_owners = Table(
    "rekey_schema_owners",
    metadata,
    Column("owner", String, primary_key=True),
    Column("version", Integer, nullable=False),
)
"""One row per `SchemaOwner`: the version of that owner's tables (created on first use)."""

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
    # Migration 7: ``kms`` (a KMS key wraps the data key) or ``tee`` (an enclave's hardware
    # sealing key does: the blob opens only on ``host``, the host id of the agent that sealed it).
    Column("kind", String, nullable=False, server_default=text("'kms'")),
    Column("host", String, nullable=True),
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

generation_successions = Table(
    "generation_successions",
    metadata,
    Column("old_generation", String, primary_key=True),
    Column("new_generation", String, nullable=False, unique=True),
    Column("recorded_at", UTCDateTime, nullable=False),
)
"""Which generation supersedes which (migration 9, ``generation register --supersedes``): one row
per superseded generation, so a generation is superseded at most once and supersedes at most one
(a chain, never a tree; `sealing.store.generations` refuses a cycle)."""

rewrap_failures = Table(
    "rewrap_failures",
    metadata,
    Column("key_ref", String, primary_key=True),
    Column("target_version", Integer, primary_key=True),
    Column("blob_id", String, primary_key=True),
    Column("reason", String, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("first_seen", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=False),
)
"""The blobs a re-wrap sweep could not move to ``target_version`` of ``key_ref`` (migration 5):
why (a short one-line reason), how many sweep attempts failed it, when first and last. Rows of
blobs since re-wrapped or deleted stay until cleared; listings join ``sealed_blobs`` and show
only blobs still below the target version (see `sealing.store.failures`)."""

agents = Table(
    "agents",
    metadata,
    Column("agent_id", String, primary_key=True),
    Column("host_id", String, nullable=False),
    Column("generation", String, nullable=False),
    Column("endpoint", String, nullable=False),
    Column("handoff_key_sha256", String, nullable=False),
    Column("incarnation", String, nullable=False),
    Column("state", String, nullable=False),
    Column("refresh_seconds", Integer, nullable=False),
    Column("registered_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=False),
    Index("ix_agents_generation", "generation", "host_id"),
)
"""The fleet registry (migration 6): one row per enclave agent, keyed by its agent id: the host
it runs on, its generation, endpoint and handoff key fingerprint, the ``incarnation`` (a random
id per start, which refreshes compare against), ``state`` (``live`` or ``stopped``), how often it
refreshes ``last_seen``, when it was first registered and when the running process started
(see `sealing.store.agents`)."""


migration_copies = Table(
    "migration_copies",
    metadata,
    Column("migration_id", String, primary_key=True),
    Column("blob_id", String, primary_key=True),
    Column("host", String, nullable=True),
    Column("key_ref", String, nullable=False),
    Column("key_version", Integer, nullable=False),
    Column("generation", String, nullable=False),
    Column("blob", LargeBinary, nullable=False),
    Column("swapped_row_version", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_migration_copies_host", "migration_id", "host", "blob_id"),
)
"""The old generation's copies of the blobs a generation migration has handed off (migration
8): per (migration id, blob id) the blob as it was before the swap, with its key ref, key version
and generation, and the row version the swap wrote, so a rollback restores the copy only over
that very row (see `sealing.store.migrations`). NARROWING deletes them."""


migration_release_policies = Table(
    "migration_release_policies",
    metadata,
    Column("migration_id", String, primary_key=True),
    Column("key_ref", String, primary_key=True),
    Column("policy", Text, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    Column("progress", Text, nullable=True),
)
"""The release policy each key had before a generation migration widened it (migration 9): per
(migration id, key ref) the policy document as the release-policy store kept it, recorded once
(a retried widening finds it and never records the widened one). ``progress`` (migration 11):
the migration's last change to that key's policy (its step, the policy it read, the one it
wrote, the rules it added), so that each step changes the current policy and only what the
migration itself did (see `sealing.store.migrations`)."""


migration_claims = Table(
    "migration_claims",
    metadata,
    Column("generation", String, primary_key=True),
    Column("migration_id", String, nullable=False),
    Column("run_id", String, nullable=False),
    Column("claimed_at", UTCDateTime, nullable=False),
    Index("ix_migration_claims_migration", "migration_id"),
)
"""The generations an open migration moves state from or to (migration 11): one row per
generation, so that a second migration involving either one is refused at ATTESTING. Claimed
by the migration (its workflow id and run id) before it changes anything, released when it
ends DONE or ROLLED_BACK (see `sealing.store.migrations`)."""


# --------------------------------------------------------------------------- migration steps


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
    """Create ``audit_log`` as it was in schema version 3 (a frozen snapshot, like every step).

    The audit package owns that table now (`audit.schema`): its definition and every later
    change are its own steps, and its step 1 creates the table only where it is absent. This
    step stays as released, because a database at version 3 or 4 is promised an ``audit_log``:
    a release that knows no owner steps writes to it without creating it (a rollback must
    keep working)."""
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


def _migration_5_rewrap_failures(conn: Connection) -> None:
    """Create ``rewrap_failures``: every blob a re-wrap sweep failed, keyed by (key_ref,
    target_version, blob_id), so an operator can list all of them with their reasons (the
    sweep's progress keeps only the first few ids). No foreign key to ``sealed_blobs``: a
    workload deletes its blobs without knowing of this table, and listings join it instead."""
    snapshot = MetaData()
    Table(
        "rewrap_failures",
        snapshot,
        Column("key_ref", String, primary_key=True),
        Column("target_version", Integer, primary_key=True),
        Column("blob_id", String, primary_key=True),
        Column("reason", String, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("first_seen", UTCDateTime, nullable=False),
        Column("last_seen", UTCDateTime, nullable=False),
    ).create(conn)


def _migration_6_agents(conn: Connection) -> None:
    """Create ``agents``: the fleet registry of enclave agents (``rekey agent serve --register``),
    looked up by generation (a migration lists the agents of one)."""
    snapshot = MetaData()
    Table(
        "agents",
        snapshot,
        Column("agent_id", String, primary_key=True),
        Column("host_id", String, nullable=False),
        Column("generation", String, nullable=False),
        Column("endpoint", String, nullable=False),
        Column("handoff_key_sha256", String, nullable=False),
        Column("incarnation", String, nullable=False),
        Column("state", String, nullable=False),
        Column("refresh_seconds", Integer, nullable=False),
        Column("registered_at", UTCDateTime, nullable=False),
        Column("started_at", UTCDateTime, nullable=False),
        Column("last_seen", UTCDateTime, nullable=False),
        Index("ix_agents_generation", "generation", "host_id"),
    ).create(conn)


def _migration_7_blob_kind(conn: Connection) -> None:
    """Give ``sealed_blobs`` a ``kind`` (``kms`` or ``tee``; every existing row is ``kms``) and the
    ``host`` a hardware-sealed blob is bound to (NULL for ``kms``)."""
    conn.execute(text("ALTER TABLE sealed_blobs ADD COLUMN kind VARCHAR NOT NULL DEFAULT 'kms'"))
    conn.execute(text("ALTER TABLE sealed_blobs ADD COLUMN host VARCHAR"))


def _migration_8_migration_copies(conn: Connection) -> None:
    """Create ``migration_copies``: the old copies a generation migration keeps until it
    narrows, looked up by migration and host."""
    snapshot = MetaData()
    Table(
        "migration_copies",
        snapshot,
        Column("migration_id", String, primary_key=True),
        Column("blob_id", String, primary_key=True),
        Column("host", String, nullable=True),
        Column("key_ref", String, nullable=False),
        Column("key_version", Integer, nullable=False),
        Column("generation", String, nullable=False),
        Column("blob", LargeBinary, nullable=False),
        Column("swapped_row_version", Integer, nullable=False),
        Column("created_at", UTCDateTime, nullable=False),
        Index("ix_migration_copies_host", "migration_id", "host", "blob_id"),
    ).create(conn)


def _migration_9_migration_release_policies(conn: Connection) -> None:
    """Create ``migration_release_policies``: the release policy of every key a generation
    migration widened, as it was before."""
    snapshot = MetaData()
    Table(
        "migration_release_policies",
        snapshot,
        Column("migration_id", String, primary_key=True),
        Column("key_ref", String, primary_key=True),
        Column("policy", Text, nullable=False),
        Column("recorded_at", UTCDateTime, nullable=False),
    ).create(conn)


def _migration_10_generation_successions(conn: Connection) -> None:
    """Create ``generation_successions``: which registered generation supersedes which."""
    snapshot = MetaData()
    Table(
        "generation_successions",
        snapshot,
        Column("old_generation", String, primary_key=True),
        Column("new_generation", String, nullable=False, unique=True),
        Column("recorded_at", UTCDateTime, nullable=False),
    ).create(conn)


def _migration_11_migration_claims(conn: Connection) -> None:
    """Give ``migration_release_policies`` a ``progress`` (a migration's last change to the
    key's policy) and create ``migration_claims``: the generations of each open migration."""
    conn.execute(text("ALTER TABLE migration_release_policies ADD COLUMN progress TEXT"))
    snapshot = MetaData()
    Table(
        "migration_claims",
        snapshot,
        Column("generation", String, primary_key=True),
        Column("migration_id", String, nullable=False),
        Column("run_id", String, nullable=False),
        Column("claimed_at", UTCDateTime, nullable=False),
        Index("ix_migration_claims_migration", "migration_id"),
    ).create(conn)


MIGRATIONS: Final[Sequence[MigrationStep]] = (
    _migration_1_sealed_blobs,
    _migration_2_generations,
    _migration_3_audit_log,
    _migration_4_sweep_layout,
    _migration_5_rewrap_failures,
    _migration_6_agents,
    _migration_7_blob_kind,
    _migration_8_migration_copies,
    _migration_9_migration_release_policies,
    _migration_10_generation_successions,
    _migration_11_migration_claims,
)
"""Migration steps in order: step ``i`` (0-based) takes the schema from version ``i`` to
``i + 1``. Append new steps; never edit or reorder old ones."""

SCHEMA_VERSION: Final = len(MIGRATIONS)
"""The schema version this code reads and writes."""


# --------------------------------------------------------------------------- owners


@dataclass(frozen=True)
class SchemaOwner:
    """The tables a package above the store keeps in the store's database, and how they came
    to be: ``steps[i]`` (0-based) takes the owner's tables from version ``i`` to ``i + 1``.

    ``name`` (lower-case letters, digits, ``_``) keys the owner's row of
    ``rekey_schema_owners``. As with `MIGRATIONS`: append new steps, never edit or reorder old
    ones, and let each step define its tables as they were at that step.
    """

    name: str
    steps: tuple[MigrationStep, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _OWNER_NAME_RE.match(self.name):
            raise ValueError(f"schema owner name must be lower-case letters, digits and _, got {self.name!r}")
        if not isinstance(self.steps, tuple) or not all(callable(step) for step in self.steps):
            raise TypeError("schema owner steps must be a tuple of callables taking a Connection")

    @property
    def version(self) -> int:
        """The version of the owner's tables that this code reads and writes."""
        return len(self.steps)


# --------------------------------------------------------------------------- applying steps


def _lock_schema(conn: Connection) -> None:
    """Serialise schema changes across processes for the rest of this transaction (SQLite: the
    caller's BEGIN IMMEDIATE already holds the write lock)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(_PG_LOCK_KEY)))


def _stored_version(value: object, where: str) -> int:
    """A schema version as stored: a non-negative integer. Anything else (a row edited by hand or
    restored from elsewhere) is refused before it can select a migration step."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreError(f"{where} holds schema version {value!r}; expected a non-negative integer")
    return value


def _read_schema_version(conn: Connection) -> int | None:
    versions = conn.execute(select(rekey_schema.c.version)).scalars().all()
    if len(versions) > 1:
        raise StoreError(f"rekey_schema holds {len(versions)} rows; expected exactly one")
    return _stored_version(versions[0], "rekey_schema") if versions else None


def apply_migrations(db: Database, target: int, *, create: bool = True) -> int:
    """Apply the store's pending migrations up to ``target``, one transaction per step, and
    return the version afterwards. `SchemaTooNew` for a database past `SCHEMA_VERSION`;
    `StoreMissing` if ``create`` is false and the database has no rekey tables yet."""
    while True:
        with translated(db.display, "schema migration"), db.writer.begin() as conn:
            _lock_schema(conn)
            if not create and not inspect(conn).has_table("rekey_schema"):
                raise StoreMissing(f"no store at {db.display}: the database has no rekey tables")
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


def apply_owner_steps(db: Database, owner: SchemaOwner) -> int:
    """Apply ``owner``'s pending steps, one transaction per step that also bumps the owner's
    version row, under the lock of the store's migrations; return the owner's version
    afterwards. `SchemaTooNew` (naming the owner) if the database holds a newer version."""
    row = schema_owners.c.owner == owner.name
    while True:
        with translated(db.display, f"schema migration of {owner.name}"), db.writer.begin() as conn:
            _lock_schema(conn)
            conn.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS rekey_schema_owners"
                    " (owner VARCHAR NOT NULL PRIMARY KEY, version INTEGER NOT NULL)"
                )
            )
            found = conn.execute(select(schema_owners.c.version).where(row)).scalar_one_or_none()
            if found is None:
                conn.execute(insert(schema_owners).values(owner=owner.name, version=0))
            current = 0 if found is None else _stored_version(found, f"rekey_schema_owners ({owner.name})")
            if current > owner.version:
                raise SchemaTooNew(current, owner.version, owner=owner.name)
            if current == owner.version:
                return current
            owner.steps[current](conn)
            conn.execute(update(schema_owners).where(row).values(version=current + 1))


def migrate(url: str, target: int = SCHEMA_VERSION) -> int:
    """Bring the database at ``url`` to schema version ``target`` (no further) and return
    its version afterwards. Never downgrades: a database already past ``target`` is left
    alone. Raises `SchemaTooNew` for a database newer than `SCHEMA_VERSION`.

    `SealedStateStore` does this itself on open; this is for tooling and tests that need a
    database at an older version.
    """
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"target schema version must be 0..{SCHEMA_VERSION}, got {target}")
    db = open_database(url)
    try:
        return apply_migrations(db, target)
    finally:
        db.engine.dispose()
