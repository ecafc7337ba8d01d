"""The audit log's table in the store's database, and the migration steps the audit package owns
(`AUDIT_SCHEMA`, applied by `AuditLog` when it opens). The columns are specified in
docs/audit-log-format.md."""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.engine import Connection

from sealing.store import SchemaOwner

__all__ = ["AUDIT_SCHEMA", "audit_log"]

# The current shape of ``audit_log``, used by the queries. The steps below define their own
# snapshots, as the store's migrations do, so an old step never changes meaning.
_metadata = MetaData()
audit_log = Table(
    "audit_log",
    _metadata,
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
)


def _step_1_audit_log(conn: Connection) -> None:
    """Create ``audit_log`` and its index by subject, each only if absent: the store's frozen
    migration 3 creates exactly this (releases without owner steps rely on it), so on a database
    the store made this step takes the table and its records over unchanged.

    ``seq`` is assigned by the appender (1, 2, ...), never by the database. ``recorded_at``
    is the canonical UTC time text that the record's hash covers, stored verbatim."""
    snapshot = MetaData()
    table = Table(
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
    )
    table.create(conn, checkfirst=True)
    for index in table.indexes:
        index.create(conn, checkfirst=True)


AUDIT_SCHEMA: SchemaOwner = SchemaOwner("audit", (_step_1_audit_log,))
"""The audit package's tables (owner ``audit``): append new steps, never edit old ones."""
