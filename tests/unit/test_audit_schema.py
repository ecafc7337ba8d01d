"""The audit package owns its table: the store's per-owner migrations (`SchemaOwner`,
`SealedStateStore.apply_schema`), the store's public transaction API, and databases written by
the previous release (where the store's migration 3 created ``audit_log``). Every database test
runs on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import (
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine

from audit import GENESIS_HASH, AuditLog, canonical_bytes, canonical_json, format_time, key_id_of
from audit.schema import AUDIT_SCHEMA, audit_log
from sealing.store import (
    SCHEMA_VERSION,
    DuplicateRecord,
    SchemaOwner,
    SchemaTooNew,
    SealedStateStore,
    StoreError,
    migrate,
    rekey_schema,
    schema_owners,
)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    """A plain engine on the same database, to look behind the store's back. The store is
    opened first: it creates the SQLite file's directory."""
    SealedStateStore(store_url).close()
    engine = create_engine(store_url)
    yield engine
    engine.dispose()


def trusted(key: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    return {key_id_of(key.public_key()): key.public_key()}


def owner_versions(raw: Engine) -> dict[str, int]:
    with raw.connect() as conn:
        rows = conn.execute(select(schema_owners.c.owner, schema_owners.c.version))
        return {str(owner): int(version) for owner, version in rows}


def store_versions(raw: Engine) -> list[int]:
    with raw.connect() as conn:
        return [int(v) for v in conn.execute(select(rekey_schema.c.version)).scalars()]


def audit_catalog(raw: Engine) -> list[Any]:
    """What identifies the audit table and its index in the catalog: it changes if either is
    dropped and created again (SQLite: root pages and definitions; PostgreSQL: object ids)."""
    with raw.connect() as conn:
        if raw.dialect.name == "sqlite":
            query = "SELECT type, name, rootpage, sql FROM sqlite_master WHERE tbl_name = 'audit_log'"
        else:
            query = (
                "SELECT relkind, relname, oid FROM pg_class"
                " WHERE relname IN ('audit_log', 'ix_audit_log_subject')"
            )
        return sorted(tuple(row) for row in conn.execute(text(query)))


def previous_release_table(metadata: MetaData) -> Table:
    """``audit_log`` exactly as the previous release's store migration 3 created it."""
    return Table(
        "audit_log",
        metadata,
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


def signed_rows(key: Ed25519PrivateKey, count: int) -> list[dict[str, Any]]:
    """Rows as the previous release appended them: a chain of ``count`` signed records."""
    rows: list[dict[str, Any]] = []
    prev_hash = GENESIS_HASH
    for seq in range(1, count + 1):
        recorded_at = format_time(datetime(2025, 1, 2, 3, 4, seq, 500_000, tzinfo=UTC))
        details = {"version": seq + 1, "previous": seq}
        digest = hashlib.sha256(
            canonical_bytes(
                seq=seq,
                recorded_at=recorded_at,
                actor="alice@host1",
                event="key.version.created",
                subject="vault:orders",
                details=details,
                prev_hash=prev_hash,
            )
        ).digest()
        rows.append(
            {
                "seq": seq,
                "recorded_at": recorded_at,
                "actor": "alice@host1",
                "event": "key.version.created",
                "subject": "vault:orders",
                "details": canonical_json(details).decode(),
                "prev_hash": prev_hash,
                "hash": digest.hex(),
                "signature": key.sign(digest).hex(),
                "key_id": key_id_of(key.public_key()),
            }
        )
        prev_hash = digest.hex()
    return rows


def stored_rows(raw: Engine) -> list[dict[str, Any]]:
    with raw.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(select(audit_log).order_by(audit_log.c.seq))]


# ---------------------------------------------------------------------- the audit table


def test_bare_store_keeps_its_historical_audit_table_which_the_audit_log_takes_over(
    store_url: str, raw: Engine, key: Ed25519PrivateKey
) -> None:
    # The store's migration 3 still creates audit_log (a frozen step: a release that knows no
    # owner steps writes to the table of any database at version 3 or later, so a rollback
    # keeps its audit log); the audit package then records it as its own without recreating it.
    assert {ix["name"] for ix in inspect(raw).get_indexes("audit_log")} == {"ix_audit_log_subject"}
    assert store_versions(raw) == [SCHEMA_VERSION]
    assert "rekey_schema_owners" not in inspect(raw).get_table_names()  # no owner has opened yet
    catalog = audit_catalog(raw)

    with AuditLog(store_url, key) as log:
        log.append("rotation.started", "wf-1", {})
    raw.dispose()  # fresh connections see the current catalog
    tables = set(inspect(raw).get_table_names())
    assert {"rekey_schema", "sealed_blobs", "generations", "audit_log"} <= tables
    assert {ix["name"] for ix in inspect(raw).get_indexes("audit_log")} == {"ix_audit_log_subject"}
    assert owner_versions(raw) == {"audit": AUDIT_SCHEMA.version} == {"audit": 1}
    assert store_versions(raw) == [SCHEMA_VERSION]
    assert audit_catalog(raw) == catalog  # taken over, not recreated

    with AuditLog(store_url, None) as again:  # reopening (read-only too) changes nothing
        assert again.verify(trusted(key)).count == 1
    assert audit_catalog(raw) == catalog
    assert owner_versions(raw) == {"audit": 1}


def test_a_release_without_owner_steps_can_write_the_audit_log_of_a_store_opened_by_this_one(
    store_url: str, raw: Engine, key: Ed25519PrivateKey
) -> None:
    # What the previous release's appender does: insert into audit_log, never create it.
    [row] = signed_rows(key, 1)
    with raw.begin() as conn:
        conn.execute(audit_log.insert().values(**row))
    with AuditLog(store_url, None) as log:
        assert log.verify(trusted(key)).count == 1


def test_previous_release_database_opens_verifies_and_appends_without_recreating(
    store_url: str, key: Ed25519PrivateKey
) -> None:
    # The previous release: store schema 4, audit_log created by migration 3 (the same step
    # today, so migrate(target=4) builds exactly that database), records in it, no owner row yet.
    assert migrate(store_url, target=4) == 4
    old = signed_rows(key, 5)
    engine = create_engine(store_url)
    try:
        table = previous_release_table(MetaData())
        assert {c["name"] for c in inspect(engine).get_columns("audit_log")} == set(table.columns.keys())
        with engine.begin() as conn:
            conn.execute(table.insert(), old)
        catalog = audit_catalog(engine)
        assert "rekey_schema_owners" not in inspect(engine).get_table_names()

        with AuditLog(store_url, key, actor="bob@host2") as log:
            report = log.verify(trusted(key))
            assert (report.ok, report.count, report.last_hash) == (True, 5, old[-1]["hash"])
            new = log.append("key.version.disabled", "vault:orders", {"version": 1})
            assert (new.seq, new.prev_hash) == (6, old[-1]["hash"])
            assert log.verify(trusted(key)).count == 6

        engine.dispose()
        assert audit_catalog(engine) == catalog  # neither the table nor its index was recreated
        assert stored_rows(engine)[:5] == old
        assert owner_versions(engine) == {"audit": 1}
        assert store_versions(engine) == [SCHEMA_VERSION]
    finally:
        engine.dispose()


def test_step_1_adds_a_missing_index_to_an_existing_table(store_url: str, raw: Engine) -> None:
    with raw.begin() as conn:
        conn.execute(text("DROP INDEX ix_audit_log_subject"))
    raw.dispose()
    assert inspect(raw).get_indexes("audit_log") == []
    with AuditLog(store_url, None):
        pass
    raw.dispose()
    assert {ix["name"] for ix in inspect(raw).get_indexes("audit_log")} == {"ix_audit_log_subject"}


def test_two_threads_opening_a_fresh_database_at_once(store_url: str, key: Ed25519PrivateKey) -> None:
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def opener(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            with AuditLog(store_url, key) as log:
                log.append("rotation.started", f"wf-{n}", {})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors

    with AuditLog(store_url, None) as log:
        assert sorted(r.subject for r in log.records()) == ["wf-0", "wf-1"]
        assert log.verify(trusted(key)).count == 2
    engine = create_engine(store_url)
    try:
        assert owner_versions(engine) == {"audit": 1}
        assert store_versions(engine) == [SCHEMA_VERSION]
    finally:
        engine.dispose()


def test_newer_audit_schema_is_refused_and_left_untouched(
    store_url: str, raw: Engine, key: Ed25519PrivateKey
) -> None:
    with AuditLog(store_url, key) as log:
        log.append("rotation.started", "wf-1", {})
    with raw.begin() as conn:
        conn.execute(schema_owners.update().where(schema_owners.c.owner == "audit").values(version=2))
    catalog = audit_catalog(raw)

    with pytest.raises(SchemaTooNew) as info:
        AuditLog(store_url, None)
    assert str(info.value) == (
        "database schema version 2 of audit is newer than the newest this rekey knows (1); upgrade rekey"
    )
    assert (info.value.found, info.value.supported, info.value.owner) == (2, 1, "audit")

    raw.dispose()
    assert audit_catalog(raw) == catalog
    assert owner_versions(raw) == {"audit": 2}
    assert len(stored_rows(raw)) == 1
    with SealedStateStore(store_url) as store:  # the store's own schema is not affected
        assert store.schema_version == SCHEMA_VERSION


def test_a_stored_version_that_is_not_a_version_is_refused(store_url: str, raw: Engine) -> None:
    # A row edited by hand or restored from elsewhere must not pick a migration step: -1 ran
    # the last step first (then every step again), text crashed with a bare ValueError.
    calls: list[str] = []
    owner = SchemaOwner("demo", (lambda _conn: calls.append("one"), lambda _conn: calls.append("two")))
    with SealedStateStore(store_url) as store:
        assert store.apply_schema(SchemaOwner("demo", ())) == 0
        bad: list[object] = [-1] if raw.dialect.name == "postgresql" else [-1, "one", 1.5]
        for stored in bad:
            with raw.begin() as conn:
                conn.execute(
                    schema_owners.update().where(schema_owners.c.owner == "demo").values(version=stored)
                )
            with pytest.raises(StoreError, match=r"rekey_schema_owners \(demo\) holds schema version"):
                store.apply_schema(owner)
        assert calls == []
    with raw.begin() as conn:
        conn.execute(rekey_schema.update().values(version=-1))
    with pytest.raises(StoreError, match=r"rekey_schema holds schema version -1"):
        SealedStateStore(store_url)


# ---------------------------------------------------------------------- the mechanism


def test_owner_steps_apply_once_in_order_with_their_own_version(store_url: str, raw: Engine) -> None:
    calls: list[str] = []

    def create_notes(conn: Connection) -> None:
        calls.append("notes")
        conn.execute(text("CREATE TABLE demo_notes (id INTEGER PRIMARY KEY, note VARCHAR NOT NULL)"))

    def add_tags(conn: Connection) -> None:
        calls.append("tags")
        conn.execute(text("CREATE TABLE demo_tags (note_id INTEGER NOT NULL, tag VARCHAR NOT NULL)"))

    with SealedStateStore(store_url) as store:
        assert store.apply_schema(SchemaOwner("demo", (create_notes,))) == 1
        assert store.apply_schema(SchemaOwner("demo", (create_notes, add_tags))) == 2
        assert store.apply_schema(SchemaOwner("demo", (create_notes, add_tags))) == 2
        assert calls == ["notes", "tags"]
        assert store.apply_schema(SchemaOwner("other", ())) == 0
        with pytest.raises(SchemaTooNew, match=r"version 2 of demo .* knows \(1\)"):
            store.apply_schema(SchemaOwner("demo", (create_notes,)))
    assert owner_versions(raw) == {"demo": 2, "other": 0}
    assert store_versions(raw) == [SCHEMA_VERSION]
    assert {"demo_notes", "demo_tags"} <= set(inspect(raw).get_table_names())


def test_failed_owner_step_changes_nothing(store_url: str, raw: Engine) -> None:
    def broken(conn: Connection) -> None:
        conn.execute(text("CREATE TABLE demo_half (id INTEGER)"))
        conn.execute(text("INSERT INTO no_such_table VALUES (1)"))

    with SealedStateStore(store_url) as store:
        with pytest.raises(StoreError, match="schema migration of demo"):
            store.apply_schema(SchemaOwner("demo", (broken,)))
        assert store.apply_schema(SchemaOwner("demo", ())) == 0  # its version row stayed at 0
    raw.dispose()
    assert "demo_half" not in inspect(raw).get_table_names()


def test_schema_owner_is_checked() -> None:
    for name in ("", "Audit", "audit-log", "1audit", "a" * 64, None):
        with pytest.raises(ValueError, match="schema owner name"):
            SchemaOwner(name, ())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tuple of callables"):
        SchemaOwner("demo", [lambda conn: None])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tuple of callables"):
        SchemaOwner("demo", ("CREATE TABLE x (id INTEGER)",))  # type: ignore[arg-type]
    assert SchemaOwner("audit_v2", ()).version == 0


# ---------------------------------------------------------------------- transactions


def test_transaction_commits_rolls_back_and_maps_errors(store_url: str) -> None:
    def create_items(conn: Connection) -> None:
        conn.execute(text("CREATE TABLE demo_items (id INTEGER PRIMARY KEY, secret VARCHAR)"))

    owner = SchemaOwner("demo", (create_items,))
    with SealedStateStore(store_url) as store:
        store.apply_schema(owner)
        with store.transaction("insert of demo item 1", write=True) as conn:
            conn.execute(text("INSERT INTO demo_items VALUES (1, 'first')"))
        with pytest.raises(RuntimeError), store.transaction("insert of demo item 2", write=True) as conn:
            conn.execute(text("INSERT INTO demo_items VALUES (2, 'second')"))
            raise RuntimeError("the caller changed its mind")
        with (
            pytest.raises(DuplicateRecord) as info,
            store.transaction("insert of demo item 1", write=True) as conn,
        ):
            conn.execute(text("INSERT INTO demo_items VALUES (1, :value)"), {"value": "TOP-SECRET-VALUE"})
        assert str(info.value) == "insert of demo item 1 conflicts with an existing record"
        assert "TOP-SECRET" not in str(info.value.__cause__)
        with (
            pytest.raises(StoreError, match="listing of demo items") as bad,
            store.transaction("listing of demo items") as conn,
        ):
            conn.execute(text("SELECT no_such_column FROM demo_items"))
        assert "\n" not in str(bad.value)
        with store.transaction("listing of demo items") as conn:
            assert conn.execute(text("SELECT id, secret FROM demo_items")).all() == [(1, "first")]
    with (
        pytest.raises(StoreError, match=r"listing of demo items: the store for .* is closed"),
        store.transaction("listing of demo items"),
    ):
        pass
    with pytest.raises(StoreError, match="closed"):
        store.apply_schema(owner)


def test_in_memory_store_serialises_transactions() -> None:
    """One shared connection: a second thread's transaction waits for the first to end."""
    with SealedStateStore("sqlite://") as store:
        order: list[str] = []
        inside = threading.Event()

        def second() -> None:
            inside.wait(timeout=10)
            with store.transaction("second read") as conn:
                conn.execute(text("SELECT 1"))
                order.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        with store.transaction("first write", write=True) as conn:
            inside.set()
            thread.join(timeout=0.3)
            conn.execute(text("SELECT 1"))
            order.append("first")
        thread.join(timeout=10)
        assert order == ["first", "second"]
