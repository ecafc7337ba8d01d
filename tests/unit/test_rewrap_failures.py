"""The store's record of re-wrap failures (``rewrap_failures``, schema version 5) on SQLite and on
a real PostgreSQL (every test runs on both): upserts count attempts, listings show only blobs
still below the target version, reasons are bounded one-liners, inputs are checked, paging, the
upgrade of a version 4 database that holds data."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, func, insert, inspect, select
from sqlalchemy.engine import Engine

from sealing.store import (
    MAX_PAGE,
    MAX_REASON_CHARS,
    SCHEMA_VERSION,
    BlobRecord,
    RewrapFailure,
    SealedStateStore,
    migrate,
    rekey_schema,
    rewrap_failures,
    sealed_blobs,
)

KEY = "vault:orders"


@pytest.fixture
def store(store_url: str) -> Iterator[SealedStateStore]:
    with SealedStateStore(store_url) as s:
        yield s


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    engine = create_engine(store_url)
    yield engine
    engine.dispose()


def add(store: SealedStateStore, name: str, *, key_ref: str = KEY, key_version: int = 1) -> BlobRecord:
    return store.insert(
        namespace="orders",
        name=name,
        key_ref=key_ref,
        key_version=key_version,
        generation="g1",
        blob=b"\x00sealed\xff",
    )


def stored_rows(raw: Engine) -> int:
    with raw.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(rewrap_failures)).scalar_one())


def test_recording_again_counts_attempts_and_keeps_the_newest_reason(store: SealedStateStore) -> None:
    a, b = add(store, "a"), add(store, "b")
    store.record_rewrap_failures(KEY, 2, [(a.blob_id, "TamperedBlob: sealed blob key slot is empty")])
    [first] = store.rewrap_failures(KEY, 2)
    assert first == RewrapFailure(
        a.blob_id, "TamperedBlob: sealed blob key slot is empty", 1, first.first_seen, first.first_seen
    )
    assert first.first_seen.tzinfo is UTC

    store.record_rewrap_failures(KEY, 2, [(a.blob_id, "InvalidCiphertext: refused"), (b.blob_id, "x")])
    again = {f.blob_id: f for f in store.rewrap_failures(KEY, 2)}
    assert again[a.blob_id].attempts == 2
    assert again[a.blob_id].reason == "InvalidCiphertext: refused"
    assert again[a.blob_id].first_seen == first.first_seen
    assert again[a.blob_id].last_seen >= first.last_seen
    assert (again[b.blob_id].attempts, again[b.blob_id].reason) == (1, "x")
    assert store.count_rewrap_failures(KEY, 2) == 2


def test_a_blob_listed_twice_in_one_call_is_one_attempt_with_the_later_reason(
    store: SealedStateStore,
) -> None:
    a = add(store, "a")
    store.record_rewrap_failures(KEY, 2, [(a.blob_id, "first"), (a.blob_id, "second")])
    [failure] = store.rewrap_failures(KEY, 2)
    assert (failure.attempts, failure.reason) == (1, "second")


def test_only_blobs_still_below_the_target_version_are_listed(store: SealedStateStore, raw: Engine) -> None:
    fixed, deleted, moved, still, other_key = (
        add(store, n) for n in ("fixed", "deleted", "moved", "still", "o")
    )
    store.record_rewrap_failures(
        KEY, 2, [(r.blob_id, "UnsupportedFormat: bad magic") for r in (fixed, deleted, moved, still)]
    )
    # Recorded under a key the blob is not of: never listed for either key.
    store.record_rewrap_failures("vault:other", 2, [(other_key.blob_id, "x")])
    assert store.count_rewrap_failures(KEY, 2) == 4

    store.compare_and_swap(fixed.blob_id, fixed.row_version, blob=b"resealed", key_version=2)
    store.delete(deleted.blob_id, deleted.row_version)
    store.compare_and_swap(
        moved.blob_id, moved.row_version, blob=b"moved", key_version=1, key_ref="aws:orders"
    )

    assert [f.blob_id for f in store.rewrap_failures(KEY, 2)] == [still.blob_id]
    assert store.count_rewrap_failures(KEY, 2) == 1
    assert (
        store.rewrap_failures("vault:other", 2) == [] and store.count_rewrap_failures("vault:other", 2) == 0
    )
    # Keyed by target version: the same blobs have recorded nothing towards version 3.
    assert store.rewrap_failures(KEY, 3) == [] and store.count_rewrap_failures(KEY, 3) == 0
    # A blob re-wrapped to 2 is still below 3: recorded towards 3, it is listed there.
    store.record_rewrap_failures(KEY, 3, [(fixed.blob_id, "x")])
    assert [f.blob_id for f in store.rewrap_failures(KEY, 3)] == [fixed.blob_id]

    # Clearing forgets every row of that key and version, listed or dropped out.
    assert store.clear_rewrap_failures(KEY, 2) == 4
    assert store.count_rewrap_failures(KEY, 2) == 0
    assert stored_rows(raw) == 2  # vault:other v2 and KEY v3 untouched
    assert store.clear_rewrap_failures(KEY, 2) == 0


def test_hostile_and_huge_reasons_are_stored_as_one_bounded_printable_line(store: SealedStateStore) -> None:
    blobs = [add(store, f"b{i}") for i in range(6)]
    hostile = [
        "TamperedBlob: line one\nline two\r\n\tthree",
        "NUL\x00inside and an \x1b[31mANSI escape\x1b[0m",
        "lone surrogate \ud800 here",
        "x" * 5_000_000,
        " \n\t\x00 ",
        "",
    ]
    store.record_rewrap_failures(KEY, 2, list(zip((b.blob_id for b in blobs), hostile, strict=True)))
    reasons = {f.blob_id: f.reason for f in store.rewrap_failures(KEY, 2)}
    for reason in reasons.values():
        assert 1 <= len(reason) <= MAX_REASON_CHARS
        assert reason.isprintable() and reason == reason.strip()
    ids = [b.blob_id for b in blobs]
    assert reasons[ids[0]] == "TamperedBlob: line one line two three"
    assert reasons[ids[1]] == "NUL inside and an [31mANSI escape [0m"
    assert reasons[ids[2]] == "lone surrogate here"
    assert reasons[ids[3]] == "x" * (MAX_REASON_CHARS - 3) + "..."
    assert reasons[ids[4]] == reasons[ids[5]] == "unspecified"


@pytest.mark.parametrize(
    ("key_ref", "version", "failures", "message"),
    [
        ("", 2, [("id", "r")], "key_ref must be a non-empty string"),
        (None, 2, [("id", "r")], "key_ref must be a non-empty string"),
        (KEY, 0, [("id", "r")], "version must be an integer >= 1"),
        (KEY, True, [("id", "r")], "version must be an integer >= 1"),
        (KEY, "2", [("id", "r")], "version must be an integer >= 1"),
        (KEY, 2, "id", "failures must be a sequence"),
        (KEY, 2, {"id": "r"}, "failures must be a sequence"),
        (KEY, 2, None, "failures must be a sequence"),
        (KEY, 2, [("id", "r", "extra")], r"each failure must be a \(blob_id, reason\) pair"),
        (KEY, 2, ["id"], r"each failure must be a \(blob_id, reason\) pair"),
        (KEY, 2, [("", "r")], "blob_id must be a non-empty string"),
        (KEY, 2, [(7, "r")], "blob_id must be a non-empty string"),
        (KEY, 2, [("id", b"DEK bytes")], "reason of blob id must be a string, got bytes"),
        (KEY, 2, [("id", None)], "reason of blob id must be a string, got NoneType"),
    ],
)
def test_recording_refuses_bad_input_and_writes_nothing(
    store: SealedStateStore, raw: Engine, key_ref: object, version: object, failures: object, message: str
) -> None:
    good = add(store, "good")
    batch = [(good.blob_id, "fine")] + (list(failures) if isinstance(failures, list) else [])
    with pytest.raises(ValueError, match=message) as info:
        store.record_rewrap_failures(key_ref, version, batch if isinstance(failures, list) else failures)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert "DEK bytes" not in str(info.value)
    assert stored_rows(raw) == 0  # the valid pair before the bad one was not written either


def test_listing_and_counting_refuse_bad_input(store: SealedStateStore) -> None:
    for bad_key, bad_version in (("", 2), (KEY, 0), (KEY, None), (KEY, False)):
        with pytest.raises(ValueError):
            store.rewrap_failures(bad_key, bad_version)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            store.count_rewrap_failures(bad_key, bad_version)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            store.clear_rewrap_failures(bad_key, bad_version)  # type: ignore[arg-type]
    for limit in (0, -1, MAX_PAGE + 1, True, 2.5, "10"):
        with pytest.raises(ValueError, match="limit must be an integer"):
            store.rewrap_failures(KEY, 2, limit=limit)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="after must be"):
        store.rewrap_failures(KEY, 2, after=5)  # type: ignore[arg-type]


def test_recording_nothing_writes_nothing(store: SealedStateStore, raw: Engine) -> None:
    store.record_rewrap_failures(KEY, 2, [])
    store.record_rewrap_failures(KEY, 2, ())
    assert stored_rows(raw) == 0


def test_pages_with_after_and_limit_return_each_failure_once_in_blob_id_order(
    store: SealedStateStore,
) -> None:
    blobs = [add(store, f"b{i:02d}") for i in range(25)]
    store.record_rewrap_failures(KEY, 2, [(b.blob_id, f"reason {b.name}") for b in blobs])
    fixed = sorted(b.blob_id for b in blobs)[12]  # re-wrapped between two pages
    pages: list[list[RewrapFailure]] = []
    after: str | None = None
    while True:
        page = store.rewrap_failures(KEY, 2, after=after, limit=10)
        pages.append(page)
        if len(pages) == 1:
            record = store.get(fixed)
            store.compare_and_swap(fixed, record.row_version, blob=b"resealed", key_version=2)
        if len(page) < 10:
            break
        after = page[-1].blob_id
    seen = [f.blob_id for page in pages for f in page]
    assert [len(p) for p in pages] == [10, 10, 4]
    assert seen == sorted(b.blob_id for b in blobs if b.blob_id != fixed)
    assert {f.reason for page in pages for f in page} == {
        f"reason {b.name}" for b in blobs if b.blob_id != fixed
    }
    assert store.rewrap_failures(KEY, 2, after=seen[-1]) == []
    assert len(store.rewrap_failures(KEY, 2, limit=MAX_PAGE)) == 24
    assert store.rewrap_failures(KEY, 2, limit=1) == pages[0][:1]


def test_concurrent_recorders_lose_no_attempt(store_url: str) -> None:
    with SealedStateStore(store_url) as setup:
        blob = add(setup, "contested")
    threads_n, rounds = 4, 5
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def recorder() -> None:
        try:
            with SealedStateStore(store_url) as s:
                barrier.wait(timeout=30)
                for _ in range(rounds):
                    s.record_rewrap_failures(KEY, 2, [(blob.blob_id, "lost the write race")])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=recorder) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with SealedStateStore(store_url) as s:
        [failure] = s.rewrap_failures(KEY, 2)
    assert failure.attempts == threads_n * rounds


def test_a_version_4_database_with_data_upgrades_to_5(store_url: str, raw: Engine) -> None:
    assert SCHEMA_VERSION >= 5
    assert migrate(store_url, target=4) == 4
    assert "rewrap_failures" not in inspect(raw).get_table_names()
    now = datetime.now(UTC)
    with raw.begin() as conn:
        conn.execute(
            insert(sealed_blobs),
            [
                {
                    "blob_id": f"old-{i}",
                    "namespace": "orders",
                    "name": f"legacy-{i}",
                    "key_ref": KEY,
                    "key_version": 1,
                    "generation": "g0",
                    "blob": b"legacy-bytes",
                    "row_version": 3,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(3)
            ],
        )
    raw.dispose()

    with SealedStateStore(store_url) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert s.get("old-1").blob == b"legacy-bytes"
        assert s.count_by_key_version(KEY) == {1: 3}
        s.record_rewrap_failures(
            KEY, 2, [("old-0", "UnsupportedFormat: not a rekey sealed blob (bad magic)")]
        )
        assert [f.blob_id for f in s.rewrap_failures(KEY, 2)] == ["old-0"]
    raw.dispose()
    assert "rewrap_failures" in inspect(raw).get_table_names()
    columns = {c["name"] for c in inspect(raw).get_columns("rewrap_failures")}
    assert columns == {
        "key_ref",
        "target_version",
        "blob_id",
        "reason",
        "attempts",
        "first_seen",
        "last_seen",
    }
    assert inspect(raw).get_pk_constraint("rewrap_failures")["constrained_columns"] == [
        "key_ref",
        "target_version",
        "blob_id",
    ]
    with raw.connect() as conn:
        assert [int(v) for v in conn.execute(select(rekey_schema.c.version)).scalars()] == [SCHEMA_VERSION]
    # Reopening is a no-op and keeps what was recorded.
    with SealedStateStore(store_url) as again:
        assert again.count_rewrap_failures(KEY, 2) == 1
