"""The sealed-state store on SQLite and on a real PostgreSQL (every test runs on both)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, insert, inspect, select, text, update
from sqlalchemy.engine import Engine

import sealing.store.blobs
from sealing.store import (
    MAX_PAGE,
    SCHEMA_VERSION,
    BlobHandover,
    BlobRecord,
    BlobSummary,
    DuplicateRecord,
    NewBlob,
    RecordNotFound,
    SchemaTooNew,
    SealedStateStore,
    SlotSplice,
    StaleRecord,
    StoreError,
    StoreMissing,
    StoreUnavailable,
    SweepRow,
    migrate,
    rekey_schema,
    sealed_blobs,
)

SECRET = b"\x00TOP-SECRET-SEALED-BYTES\xff"


@pytest.fixture
def store(store_url: str) -> Iterator[SealedStateStore]:
    with SealedStateStore(store_url) as s:
        yield s


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    """A plain SQLAlchemy engine on the same database, to look behind the store's back."""
    engine = create_engine(store_url)
    yield engine
    engine.dispose()


def add(store: SealedStateStore, name: str, **overrides: object) -> BlobRecord:
    fields: dict[str, object] = {
        "namespace": "orders",
        "name": name,
        "key_ref": "vault:orders",
        "key_version": 1,
        "generation": "g1",
        "blob": SECRET,
    }
    fields.update(overrides)
    return store.insert(**fields)  # type: ignore[arg-type]


def schema_rows(raw: Engine) -> list[int]:
    with raw.connect() as conn:
        return [int(v) for v in conn.execute(select(rekey_schema.c.version)).scalars()]


# ---------------------------------------------------------------------- basics


def test_insert_then_get_and_get_by_name_round_trip_exactly(store: SealedStateStore) -> None:
    before = datetime.now(UTC)
    rec = add(store, "invoice-1")
    after = datetime.now(UTC)

    assert str(uuid.UUID(rec.blob_id)) == rec.blob_id
    assert uuid.UUID(rec.blob_id).version == 4
    assert rec.row_version == 1
    assert rec.blob == SECRET
    assert rec.created_at == rec.updated_at
    assert before <= rec.created_at <= after
    assert rec.created_at.tzinfo is UTC

    got = store.get(rec.blob_id)
    assert got == rec  # timestamps round-trip to the microsecond, as aware UTC
    assert got.created_at.utcoffset() == timedelta(0)
    assert store.get_by_name("orders", "invoice-1") == rec


def test_insert_with_explicit_blob_id(store: SealedStateStore) -> None:
    blob_id = str(uuid.uuid4())
    rec = add(store, "x", blob_id=blob_id)
    assert rec.blob_id == blob_id
    assert store.get(blob_id).name == "x"


def test_missing_records_raise_record_not_found(store: SealedStateStore) -> None:
    with pytest.raises(RecordNotFound, match="no sealed blob with id nope"):
        store.get("nope")
    with pytest.raises(RecordNotFound, match="orders/none"):
        store.get_by_name("orders", "none")


def test_duplicate_insert_raises_and_changes_nothing(store: SealedStateStore) -> None:
    first = add(store, "a")
    add(store, "b")
    snapshot = store.summaries()

    with pytest.raises(DuplicateRecord, match=f"blob {first.blob_id} already exists") as by_id:
        add(store, "c", blob_id=first.blob_id, blob=b"other")
    with pytest.raises(DuplicateRecord, match=f"orders/a already exists as blob {first.blob_id}"):
        add(store, "a", blob=b"other")

    assert store.summaries() == snapshot
    assert store.get(first.blob_id) == first
    # Neither the message nor the chained SQLAlchemy/driver errors carry sealed bytes.
    chain: list[BaseException] = []
    exc: BaseException | None = by_id.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert len(chain) >= 2
    for e in chain:
        assert "TOP-SECRET" not in str(e)
        assert "other" not in str(e)


def test_insert_validates_arguments(store: SealedStateStore) -> None:
    with pytest.raises(ValueError, match="namespace"):
        add(store, "x", namespace="")
    with pytest.raises(ValueError, match="key_version"):
        add(store, "x", key_version=-1)
    with pytest.raises(TypeError, match="blob must be bytes"):
        add(store, "x", blob="text")
    assert store.summaries() == []


# ---------------------------------------------------------------------- compare-and-swap


def test_cas_success_bumps_row_version_and_updated_at(store: SealedStateStore) -> None:
    rec = add(store, "a")
    new = store.compare_and_swap(rec.blob_id, 1, blob=b"rewrapped", key_version=2, generation="g2")
    assert new.row_version == 2
    assert new.blob == b"rewrapped"
    assert new.key_version == 2
    assert new.generation == "g2"
    assert new.key_ref == rec.key_ref  # not given: unchanged
    assert new.created_at == rec.created_at
    assert new.updated_at > rec.updated_at
    assert store.get(rec.blob_id) == new

    newer = store.compare_and_swap(rec.blob_id, 2, blob=b"moved", key_version=1, key_ref="kms:x")
    assert (newer.row_version, newer.key_ref, newer.generation) == (3, "kms:x", "g2")


def test_cas_with_stale_version_raises_and_leaves_row(store: SealedStateStore) -> None:
    rec = add(store, "a")
    current = store.compare_and_swap(rec.blob_id, 1, blob=b"v2", key_version=1)

    with pytest.raises(StaleRecord) as info:
        store.compare_and_swap(rec.blob_id, 1, blob=b"lost-update", key_version=9)
    err = info.value
    assert (err.blob_id, err.expected, err.actual) == (rec.blob_id, 1, 2)
    assert str(err) == (
        f"blob {rec.blob_id} was changed concurrently: expected row_version 1, found 2; re-read it and retry"
    )
    assert store.get(rec.blob_id) == current


def test_cas_and_delete_on_missing_id_raise_record_not_found(store: SealedStateStore) -> None:
    with pytest.raises(RecordNotFound, match="missing-id"):
        store.compare_and_swap("missing-id", 1, blob=b"x", key_version=1)
    with pytest.raises(RecordNotFound, match="missing-id"):
        store.delete("missing-id", 1)


def test_delete_is_compare_and_swap(store: SealedStateStore) -> None:
    rec = add(store, "a")
    store.compare_and_swap(rec.blob_id, 1, blob=b"v2", key_version=1)
    with pytest.raises(StaleRecord, match="expected row_version 1, found 2"):
        store.delete(rec.blob_id, 1)
    assert store.get(rec.blob_id).row_version == 2
    store.delete(rec.blob_id, 2)
    with pytest.raises(RecordNotFound):
        store.get(rec.blob_id)


# ---------------------------------------------------------------------- handed-over blobs


def _summary(store: SealedStateStore, name: str) -> BlobSummary:
    return next(s for s in store.summaries() if s.name == name)


def test_a_handed_over_blob_is_taken_only_by_a_write_that_applies(store: SealedStateStore) -> None:
    first = add(store, "a")
    given = BlobHandover(bytearray(SECRET))
    # A write that loses (a duplicate, a stale or missing row) leaves the blob in its handover.
    with pytest.raises(DuplicateRecord):
        add(store, "a", blob=given)
    with pytest.raises(StaleRecord):
        store.compare_and_swap(first.blob_id, 2, blob=given, key_version=2)
    with pytest.raises(RecordNotFound):
        store.compare_and_swap("missing-id", 1, blob=given, key_version=2)
    assert not given.taken and given.blob == SECRET
    assert store.get(first.blob_id) == first
    # One that applies takes it, and returns the row's summary (a record would hold the blob).
    written = add(store, "b", blob=given)
    assert given.taken and given.size == len(SECRET)
    assert written == _summary(store, "b") and written.size == len(SECRET)
    assert store.get(written.blob_id).blob == SECRET
    replaced = BlobHandover(b"replaced")
    swapped = store.compare_and_swap(first.blob_id, 1, blob=replaced, key_version=2, generation="g2")
    assert replaced.taken
    assert swapped == _summary(store, "a")
    assert (swapped.row_version, swapped.key_version, swapped.generation) == (2, 2, "g2")
    assert store.get(first.blob_id).blob == b"replaced"
    with pytest.raises(ValueError, match="handed over"):
        replaced.take()
    for text_form in (repr(BlobHandover(SECRET)), str(BlobHandover(SECRET)), repr(given)):
        assert "TOP-SECRET" not in text_form
    with pytest.raises(TypeError, match="blob must be bytes"):
        BlobHandover("text")  # type: ignore[arg-type]


class Boom(Exception):
    """A failure in the middle of a write."""


class FailingHandover(BlobHandover):
    def take(self) -> bytes | bytearray:
        raise Boom("the blob could not be written")


@pytest.mark.parametrize("where", ["before the blob", "while writing it", "after the blob"])
def test_a_write_failing_midway_leaves_nothing_stored(
    store: SealedStateStore, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """On SQLite the row goes in with an empty blob first and the blob after it: a failure at any
    point of that rolls the whole write back (the insert and the compare-and-swap alike)."""
    kept = add(store, "kept")
    before = store.summaries()
    real = sealing.store.blobs._write_blob

    def failing(*args: object) -> None:
        if where == "after the blob":
            real(*args)  # type: ignore[arg-type]
        raise Boom(where)

    if where != "while writing it":
        monkeypatch.setattr(sealing.store.blobs, "_write_blob", failing)

    def given() -> BlobHandover:
        return FailingHandover(b"new") if where == "while writing it" else BlobHandover(b"new")

    with pytest.raises((Boom, StoreError)):
        add(store, "new", blob=given())
    with pytest.raises((Boom, StoreError)):
        store.compare_and_swap(kept.blob_id, 1, blob=given(), key_version=2)
    assert store.summaries() == before
    assert store.get(kept.blob_id) == kept
    with pytest.raises(RecordNotFound):
        store.get_by_name("orders", "new")
    # The store (and its connection) keep working.
    monkeypatch.undo()
    assert add(store, "new", blob=BlobHandover(b"new")).row_version == 1
    assert store.compare_and_swap(kept.blob_id, 1, blob=b"v2", key_version=2).blob == b"v2"
    assert store.get_by_name("orders", "new").blob == b"new"


def test_head_by_name_reads_only_the_head_of_the_blob(store: SealedStateStore) -> None:
    blob = SECRET + bytes(range(256)) * 4
    rec = add(store, "big", blob=blob)
    store.compare_and_swap(rec.blob_id, 1, blob=blob, key_version=2)
    assert store.head_by_name("orders", "big", 64) == SweepRow(rec.blob_id, 2, blob[:64], len(blob))
    assert store.head_by_name("orders", "big", 1 << 20) == SweepRow(rec.blob_id, 2, blob, len(blob))
    with pytest.raises(RecordNotFound, match="orders/none"):
        store.head_by_name("orders", "none", 64)
    for bad in (63, (1 << 20) + 1, "64"):
        with pytest.raises(ValueError, match="head_bytes"):
            store.head_by_name("orders", "big", bad)  # type: ignore[arg-type]


def test_stale_read_by_one_store_loses_to_write_by_another(store_url: str) -> None:
    """Deterministic version of the race: A reads, B writes, A's write must fail."""
    with SealedStateStore(store_url) as a, SealedStateStore(store_url) as b:
        rec = add(a, "shared", blob=b"0")
        seen_by_a = a.get(rec.blob_id)
        b.compare_and_swap(rec.blob_id, seen_by_a.row_version, blob=b"from-b", key_version=1)
        with pytest.raises(StaleRecord):
            a.compare_and_swap(rec.blob_id, seen_by_a.row_version, blob=b"from-a", key_version=2)
        assert a.get(rec.blob_id).blob == b"from-b"


def test_two_writers_lose_no_update(store_url: str) -> None:
    """Two stores (as two processes would have) increment one counter 200 times each."""
    per_thread = 200
    with SealedStateStore(store_url) as setup:
        rec = add(setup, "counter", blob=b"0")

    barrier = threading.Barrier(2)
    stale = [0, 0]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            with SealedStateStore(store_url) as s:
                barrier.wait(timeout=30)
                done = 0
                while done < per_thread:
                    current = s.get(rec.blob_id)
                    time.sleep(0.0002)  # widen the read-to-write window so writers collide
                    try:
                        s.compare_and_swap(
                            rec.blob_id,
                            current.row_version,
                            blob=str(int(current.blob) + 1).encode(),
                            key_version=current.key_version,
                        )
                    except StaleRecord:
                        stale[index] += 1
                        continue
                    done += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    with SealedStateStore(store_url) as check:
        final = check.get(rec.blob_id)
    assert int(final.blob) == 2 * per_thread
    assert final.row_version == 2 * per_thread + 1
    assert sum(stale) >= 1, "no StaleRecord: the writers never actually contended"


def test_one_store_shared_by_threads(store: SealedStateStore) -> None:
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for i in range(25):
                add(store, f"t{index}-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(store.summaries()) == 100


# ---------------------------------------------------------------------- listings


def test_pages_and_iteration_return_each_match_exactly_once(store: SealedStateStore) -> None:
    expected_old_orders: set[str] = set()
    expected_g2: set[str] = set()
    all_ids: set[str] = set()
    for i in range(1234):
        key_ref = "vault:orders" if i % 3 else "vault:users"
        key_version = 1 + i % 4
        generation = "g2" if i % 5 == 0 else "g1"
        rec = add(
            store,
            f"r{i}",
            key_ref=key_ref,
            key_version=key_version,
            generation=generation,
            blob=i.to_bytes(2, "big"),
        )
        all_ids.add(rec.blob_id)
        if key_ref == "vault:orders" and key_version < 3:
            expected_old_orders.add(rec.blob_id)
        if generation == "g2":
            expected_g2.add(rec.blob_id)

    # key_ref + below_version, walked page by page through the cursor
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = store.page(key_ref="vault:orders", below_version=3, after=cursor, limit=100)
        pages += 1
        assert len(page.records) <= 100
        for r in page.records:
            assert r.key_ref == "vault:orders"
            assert r.key_version < 3
        seen.extend(r.blob_id for r in page.records)
        if page.next_cursor is None:
            break
        assert page.next_cursor == page.records[-1].blob_id
        cursor = page.next_cursor
    assert len(seen) == len(set(seen))
    assert set(seen) == expected_old_orders
    assert seen == sorted(seen)
    assert pages == -(-len(expected_old_orders) // 100)

    # generation filter through iter_records, with an odd batch size
    g2 = [r.blob_id for r in store.iter_records(generation="g2", batch=77)]
    assert len(g2) == len(set(g2))
    assert set(g2) == expected_g2

    # no filter: everything, once
    everything = [r.blob_id for r in store.iter_records(batch=500)]
    assert len(everything) == 1234
    assert set(everything) == all_ids

    # exact fit: a page that ends on the last record has no next cursor
    exact = store.page(generation="g2", limit=len(expected_g2))
    assert len(exact.records) == len(expected_g2)
    assert exact.next_cursor is None
    assert store.page(key_ref="nobody").records == []


def test_page_argument_validation(store: SealedStateStore) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.page(limit=0)
    with pytest.raises(ValueError, match="limit"):
        store.page(limit=10_001)
    with pytest.raises(ValueError, match="below_version needs key_ref"):
        store.page(below_version=3)
    with pytest.raises(ValueError, match="below_version needs key_ref"):
        store.iter_records(below_version=3)  # checked eagerly, not on first next()
    with pytest.raises(ValueError, match="batch"):
        store.iter_records(batch=0)
    assert store.page(limit=10_000).records == []


def test_counts(store: SealedStateStore) -> None:
    for i in range(7):
        add(store, f"o{i}", key_version=1 + i % 3, generation="g1" if i < 4 else "g2")
    add(store, "u", key_ref="vault:users", key_version=5, generation="g3")
    assert store.count_by_key_version("vault:orders") == {1: 3, 2: 2, 3: 2}
    assert store.count_by_key_version("vault:users") == {5: 1}
    assert store.count_by_key_version("vault:none") == {}
    assert store.count_by_generation() == {"g1": 4, "g2": 3, "g3": 1}


def test_summaries_report_sizes_in_name_order(store: SealedStateStore) -> None:
    add(store, "zeta", blob=b"")
    add(store, "alpha", blob=b"\x00" * 1000)
    b = add(store, "beta", namespace="billing", blob=bytes(range(256)) * 3)

    summaries = store.summaries()
    assert [(s.namespace, s.name, s.size) for s in summaries] == [
        ("billing", "beta", 768),
        ("orders", "alpha", 1000),
        ("orders", "zeta", 0),
    ]
    assert summaries[0].blob_id == b.blob_id
    assert summaries[0].created_at == b.created_at
    assert [s.name for s in store.summaries("orders")] == ["alpha", "zeta"]
    assert store.summaries("nobody") == []


# ---------------------------------------------------------------------- generations


def test_generations_are_idempotent_and_conflict_on_change(store: SealedStateStore) -> None:
    doc = json.dumps({"generation": "g1", "keys": {"vault:orders": 2}}, sort_keys=True)
    assert store.put_generation("g1", doc) is True
    assert store.put_generation("g1", doc) is False
    with pytest.raises(DuplicateRecord, match="generation g1 is already registered"):
        store.put_generation("g1", json.dumps({"generation": "g1", "keys": {}}))
    assert store.get_generation("g1") == doc

    assert store.put_generation("g2", "{}") is True
    listed = store.list_generations()
    assert [(gid, d) for gid, d, _ in listed] == [("g1", doc), ("g2", "{}")]
    assert all(at.tzinfo is UTC for _, _, at in listed)

    with pytest.raises(RecordNotFound, match="no generation g9"):
        store.get_generation("g9")
    with pytest.raises(ValueError, match="not valid JSON"):
        store.put_generation("g3", "{not json")


# ---------------------------------------------------------------------- schema


def test_fresh_database_is_at_current_version_and_reopen_is_noop(store_url: str, raw: Engine) -> None:
    with SealedStateStore(store_url) as s:
        assert s.schema_version == SCHEMA_VERSION == 11
        rec = add(s, "keep")
    tables = set(inspect(raw).get_table_names())
    assert {"rekey_schema", "sealed_blobs", "generations", "audit_log", "agents"} <= tables
    indexes = {ix["name"] for ix in inspect(raw).get_indexes("sealed_blobs")}
    assert {"ix_sealed_blobs_key_id", "ix_sealed_blobs_generation"} <= indexes
    assert "ix_sealed_blobs_key" not in indexes  # replaced by migration 4
    assert schema_rows(raw) == [SCHEMA_VERSION]

    with SealedStateStore(store_url) as again:
        assert again.schema_version == SCHEMA_VERSION
        assert again.get(rec.blob_id) == rec
    assert schema_rows(raw) == [SCHEMA_VERSION]
    assert migrate(store_url) == SCHEMA_VERSION


def test_newer_schema_is_refused_and_left_untouched(store_url: str, raw: Engine) -> None:
    with SealedStateStore(store_url) as s:
        add(s, "keep")
    with raw.begin() as conn:
        conn.execute(update(rekey_schema).values(version=SCHEMA_VERSION + 1))
    tables = sorted(inspect(raw).get_table_names())

    with pytest.raises(SchemaTooNew) as info:
        SealedStateStore(store_url)
    message = str(info.value)
    assert "\n" not in message
    assert f"version {SCHEMA_VERSION + 1}" in message
    assert f"({SCHEMA_VERSION})" in message
    with pytest.raises(SchemaTooNew):
        migrate(store_url)

    raw.dispose()  # fresh connections see the current catalog
    assert sorted(inspect(raw).get_table_names()) == tables
    assert schema_rows(raw) == [SCHEMA_VERSION + 1]
    with raw.connect() as conn:
        assert conn.execute(select(func.count()).select_from(sealed_blobs)).scalar_one() == 1


def test_version_1_database_upgrades_keeping_data(store_url: str, raw: Engine) -> None:
    assert migrate(store_url, target=1) == 1
    assert schema_rows(raw) == [1]
    assert "generations" not in inspect(raw).get_table_names()
    now = datetime.now(UTC)
    with raw.begin() as conn:
        conn.execute(
            insert(sealed_blobs).values(
                blob_id="old-1",
                namespace="orders",
                name="legacy",
                key_ref="vault:orders",
                key_version=1,
                generation="g0",
                blob=b"legacy-bytes",
                row_version=4,
                created_at=now,
                updated_at=now,
            )
        )
    raw.dispose()

    with SealedStateStore(store_url) as s:
        assert s.schema_version == SCHEMA_VERSION
        old = s.get("old-1")
        assert (old.blob, old.row_version, old.created_at) == (b"legacy-bytes", 4, now)
        assert s.put_generation("g1", "{}") is True
    assert schema_rows(raw) == [SCHEMA_VERSION]


def test_concurrent_first_open_does_not_fail(store_url: str, raw: Engine) -> None:
    barrier = threading.Barrier(4)
    versions: list[int] = []
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            barrier.wait(timeout=30)
            with SealedStateStore(store_url) as s:
                versions.append(s.schema_version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert versions == [SCHEMA_VERSION] * 4
    assert schema_rows(raw) == [SCHEMA_VERSION]


# ---------------------------------------------------------------------- hygiene


def test_repr_never_shows_blob_bytes(store: SealedStateStore) -> None:
    rec = add(store, "secret", blob=SECRET)
    for text_form in (repr(rec), str(rec), f"{rec}", repr([rec])):
        assert "TOP-SECRET" not in text_form
        assert repr(SECRET) not in text_form
        assert f"blob=<{len(SECRET)} bytes>" in text_form
    assert "TOP-SECRET" not in repr(store.page().records)


def test_closed_store_refuses_work(store_url: str) -> None:
    s = SealedStateStore(store_url)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get("x")


def test_unreachable_postgres_is_store_unavailable() -> None:
    url = "postgresql+psycopg://rekey:hunter2@127.0.0.1:1/rekey?connect_timeout=2"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        SealedStateStore(url)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "127.0.0.1:1/rekey" in message
    assert "hunter2" not in message
    assert "\n" not in message


def test_unusable_sqlite_path_is_store_unavailable(tmp_path: Path) -> None:
    blocker = f"{tmp_path}/a-file"
    with open(blocker, "w") as f:
        f.write("not a directory")
    with pytest.raises(StoreUnavailable):
        SealedStateStore(f"sqlite:///{blocker}/state.db")


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/deep/er/state.db"
    with SealedStateStore(url):
        engine = create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        engine.dispose()


def test_unsupported_url_is_value_error() -> None:
    with pytest.raises(ValueError, match="unsupported database"):
        SealedStateStore("mysql://u:pw@host/db")
    with pytest.raises(ValueError, match="invalid database URL"):
        SealedStateStore("not a url")


def test_in_memory_sqlite_opens() -> None:
    """An in-memory database cannot switch to WAL; opening it must not wait for that."""
    with SealedStateStore("sqlite://") as store:
        record = store.insert(
            namespace="ns", name="n", key_ref="vault:k", key_version=1, generation="g", blob=b"x"
        )
        assert store.get(record.blob_id).blob == b"x"


def test_splice_key_slots_applies_only_unchanged_rows(store_url: str) -> None:
    """The batched compare-and-swap of a re-wrap sweep: the new prefix replaces the bytes before
    ``keep_from``, the stored tail stays; a row written meanwhile is left alone."""
    with SealedStateStore(store_url) as store:
        a = add(store, "a", blob=b"HEAD-a|tail-a")
        b = add(store, "b", blob=b"HEAD-b|tail-b")
        store.compare_and_swap(b.blob_id, 1, blob=b"b-by-workload", key_version=2)  # the workload wins b
        applied = store.splice_key_slots(
            [
                SlotSplice(a.blob_id, 1, b"new-head-a", 6, 2),
                SlotSplice(b.blob_id, 1, b"new-head-b", 6, 2),
                SlotSplice("missing", 1, b"x", 0, 2),
            ]
        )
        assert applied == [True, False, False]
        after = store.get(a.blob_id)
        assert (after.blob, after.key_version, after.row_version) == (b"new-head-a|tail-a", 2, 2)
        assert store.get(b.blob_id).blob == b"b-by-workload"
        assert store.splice_key_slots([]) == []
        with pytest.raises(ValueError):
            store.splice_key_slots([SlotSplice(a.blob_id, 2, b"x", -1, 3)])
        assert store.get(a.blob_id) == after  # a refused batch changes nothing


@pytest.mark.parametrize(
    ("splice", "error"),
    [
        (SlotSplice("", 1, b"x", 0, 2), ValueError),
        (SlotSplice("id", True, b"x", 0, 2), ValueError),  # type: ignore[arg-type]
        (SlotSplice("id", 0, b"x", 0, 2), ValueError),
        (SlotSplice("id", 1, "text", 0, 2), TypeError),  # type: ignore[arg-type]
        (SlotSplice("id", 1, b"x", 1.5, 2), ValueError),  # type: ignore[arg-type]
        (SlotSplice("id", 1, b"x", 0, -1), ValueError),
    ],
)
def test_splice_key_slots_refuses_bad_updates_whole(store_url: str, splice: SlotSplice, error: type) -> None:
    """One bad update refuses the whole batch before anything is written."""
    with SealedStateStore(store_url) as store:
        a = add(store, "a", blob=b"HEAD-a|tail-a")
        with pytest.raises(error):
            store.splice_key_slots([SlotSplice(a.blob_id, 1, b"new-head-a", 6, 2), splice])
        assert store.get(a.blob_id) == a
        # a bytes-like prefix is taken as bytes
        assert store.splice_key_slots([SlotSplice(a.blob_id, 1, bytearray(b"NEW"), 6, 2)]) == [True]  # type: ignore[arg-type]
        assert store.get(a.blob_id).blob == b"NEW|tail-a"


def test_splice_keeps_every_byte_of_binary_tails(store_url: str) -> None:
    """SQLite concatenates as text: NULs, invalid UTF-8 and every byte value survive the CAST."""
    tail = bytes(range(256)) * 40 + b"\x00\xff\xfe\x00" + b"\xc3\x28" * 100
    with SealedStateStore(store_url) as store:
        record = add(store, "bin", blob=b"\x00old-head\x80" + tail)
        assert store.splice_key_slots([SlotSplice(record.blob_id, 1, b"\x00\x01new\xff", 10, 5)]) == [True]
        assert store.get(record.blob_id).blob == b"\x00\x01new\xff" + tail
        rows = store.sweep_page(
            key_ref="vault:orders", below_version=6, after=None, upto=None, limit=5, head_bytes=64
        )
        assert [(r.blob_id, r.row_version, r.head, r.length) for r in rows] == [
            (record.blob_id, 2, (b"\x00\x01new\xff" + tail)[:64], 6 + len(tail))
        ]


def test_splice_key_slots_of_thousands_reports_each_row(store_url: str) -> None:
    """A sweep-sized batch with lost rows spread through it: each row is reported on its own."""
    count = 2507
    with SealedStateStore(store_url) as store:
        ids = store.insert_many(
            [NewBlob("ns", f"n{i}", "vault:k", 1, "g", b"old|" + i.to_bytes(4, "big")) for i in range(count)]
        )
        lost = {ids[3], ids[1001], ids[-1]}
        for blob_id in lost:
            store.compare_and_swap(blob_id, 1, blob=b"workload", key_version=2)
        before = store.get(ids[0]).updated_at
        applied = store.splice_key_slots([SlotSplice(blob_id, 1, b"NEW", 3, 2) for blob_id in ids])
        assert applied == [blob_id not in lost for blob_id in ids]
        for i, blob_id in enumerate(ids):
            now = store.get(blob_id)
            if blob_id in lost:
                assert (now.blob, now.row_version) == (b"workload", 2)
            else:
                assert (now.blob, now.key_version, now.row_version) == (b"NEW|" + i.to_bytes(4, "big"), 2, 2)
        assert store.get(ids[0]).updated_at >= before
        assert store.count_by_key_version("vault:k") == {2: count}


def test_insert_many_is_all_or_nothing(store_url: str) -> None:
    with SealedStateStore(store_url) as store:
        ids = store.insert_many(
            [NewBlob("ns", f"n{i}", "vault:k", 1, "g", i.to_bytes(2, "big")) for i in range(300)]
            + [NewBlob("ns", "fixed", "vault:k", 1, "g", b"f", blob_id="fixed-id")]
        )
        assert len(ids) == 301 and ids[-1] == "fixed-id"
        assert store.get(ids[5]).blob == (5).to_bytes(2, "big") and store.get(ids[5]).row_version == 1
        with pytest.raises(DuplicateRecord):
            store.insert_many(
                [
                    NewBlob("ns", "fresh", "vault:k", 1, "g", b"x"),
                    NewBlob("ns", "n7", "vault:k", 1, "g", b"y"),
                ]
            )
        with pytest.raises(RecordNotFound):
            store.get_by_name("ns", "fresh")  # the whole batch was rolled back
        with pytest.raises(ValueError):
            store.insert_many([NewBlob("ns", "", "vault:k", 1, "g", b"x")])
        assert store.count_by_key_version("vault:k") == {1: 301}
        assert store.insert_many([]) == []


def test_insert_many_stores_hardware_sealed_blobs_bound_to_their_host(store_url: str) -> None:
    host = "sim-" + "ab" * 16
    with SealedStateStore(store_url) as store:
        ids = store.insert_many(
            [NewBlob("ns", f"t{i}", "tee:sim", 1, "g", b"sealed", kind="tee", host=host) for i in range(3)]
            + [NewBlob("ns", "k", "vault:k", 1, "g", b"wrapped")]
        )
        assert [(store.get(i).kind, store.get(i).host) for i in ids] == [("tee", host)] * 3 + [("kms", None)]
        assert store.count_tee_by_host("g") == {host: 3}
        assert [r.blob_id for r in store.tee_page(generation="g", host=host, after=None, limit=10)] == sorted(
            ids[:3]
        )
        for bad in (
            NewBlob("ns", "x", "tee:sim", 1, "g", b"s", kind="tee"),  # no host
            NewBlob("ns", "x", "vault:k", 1, "g", b"s", kind="tee", host=host),  # a KMS key ref
            NewBlob("ns", "x", "vault:k", 1, "g", b"s", host=host),  # a kms blob bound to a host
            NewBlob("ns", "x", "tee:sim", 1, "g", b"s", kind="both", host=host),
        ):
            with pytest.raises(ValueError):
                store.insert_many([NewBlob("ns", "fine", "vault:k", 1, "g", b"f"), bad])
        with pytest.raises(RecordNotFound):
            store.get_by_name("ns", "fine")  # refused whole


def test_boundaries_split_a_key_into_ranges_of_at_most_size(store_url: str) -> None:
    with SealedStateStore(store_url) as store:
        ids = sorted(store.insert_many([NewBlob("ns", f"n{i}", "vault:k", 1, "g", b"x") for i in range(23)]))
        store.insert_many([NewBlob("ns", f"o{i}", "vault:other", 1, "g", b"x") for i in range(5)])
        moved = ids[7]
        store.compare_and_swap(moved, 1, blob=b"y", key_version=2)  # already on the new version
        below = [i for i in ids if i != moved]  # 22 blobs to plan
        assert store.boundaries(key_ref="vault:k", below_version=2, size=5, count=10) == [
            below[4],
            below[9],
            below[14],
            below[19],
            below[21],
        ]
        assert store.boundaries(key_ref="vault:k", below_version=2, size=5, count=2) == [below[4], below[9]]
        assert store.boundaries(key_ref="vault:k", below_version=2, after=below[19], size=5) == [below[21]]
        assert store.boundaries(key_ref="vault:k", below_version=2, after=below[21], size=5) == []
        assert store.boundaries(key_ref="vault:k", below_version=3, size=100) == [ids[-1]]
        assert store.boundaries(key_ref="vault:none", below_version=2) == []
        with pytest.raises(ValueError):
            store.boundaries(key_ref="vault:k", below_version=2, size=MAX_PAGE + 1)


def test_driver_level_errors_become_store_errors(tmp_path: Path) -> None:
    """The sweep's statements go to the driver directly; its exceptions still surface as typed
    store errors naming the operation, never as raw driver exceptions or with blob bytes."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    with SealedStateStore(url) as store:
        record = add(store, "x", blob=b"SECRET-HEAD|tail")
        # The database itself fails the splice's UPDATE: a trigger whose body names a missing table.
        raw = create_engine(url)
        try:
            with raw.begin() as conn:
                conn.execute(
                    text(
                        "CREATE TRIGGER fail_updates BEFORE UPDATE ON sealed_blobs"
                        " BEGIN INSERT INTO no_such_table VALUES (1); END"
                    )
                )
        finally:
            raw.dispose()
        with pytest.raises(StoreError, match=r"update of 1 blobs") as failure:
            store.splice_key_slots([SlotSplice(record.blob_id, 1, b"SECRET-NEW", 11, 2)])
        assert "SECRET" not in str(failure.value)
        assert store.get(record.blob_id).blob == b"SECRET-HEAD|tail"


def test_opening_to_read_never_creates_a_store(tmp_path: Path) -> None:
    """``create=False``: a missing SQLite file (or one without rekey's tables) is `StoreMissing`
    (exit 2) and neither the file nor its directory appears; the default still creates."""
    from sealing.store import StoreMissing

    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'state.db'}"
    with pytest.raises(StoreMissing, match="no store at") as caught:
        SealedStateStore(url, create=False)
    assert caught.value.exit_code == 2
    assert not (tmp_path / "no").exists()
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(StoreMissing, match="no rekey tables"):
        SealedStateStore(f"sqlite:///{empty}", create=False)
    SealedStateStore(url).close()
    with SealedStateStore(url, create=False) as opened:
        assert opened.summaries() == []


@pytest.mark.parametrize("content", [b"", b"not a database\n"])
def test_opening_a_file_that_is_no_store_to_read_leaves_it_as_it_was(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not-a-store"
    path.write_bytes(content)
    path.chmod(0o644)
    with pytest.raises(StoreError):
        SealedStateStore(f"sqlite:///{path}", create=False)
    assert (path.read_bytes(), path.stat().st_mode & 0o777) == (content, 0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-store"]


def test_a_store_removed_while_it_is_opened_to_read_is_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sealing.store.engine as engine

    path = tmp_path / "state.db"
    SealedStateStore(f"sqlite:///{path}").close()
    real = engine._private_database_file

    def removed_first(file: Path, display: str, **options: bool) -> None:
        for leftover in tmp_path.iterdir():
            leftover.unlink()
        real(file, display, **options)

    monkeypatch.setattr(engine, "_private_database_file", removed_first)
    with pytest.raises(StoreMissing):
        SealedStateStore(f"sqlite:///{path}", create=False)
    assert not path.exists()
