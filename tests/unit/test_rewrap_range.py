"""The pipelined re-wrap of one range (sealing.rotation.rewrap_range) against a real SQLite
store and an in-process Transit-like key: every blob moves to the new version with its body
intact, progress only ever covers finished blobs, a writer's concurrent update wins, bad blobs
are counted once, a retryable KMS error resumes without double counting, and every failed blob is
recorded in the store with its reason (on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from sqlalchemy import update

from kms_adapters.errors import InvalidCiphertext, Unavailable
from sealing import envelope
from sealing.errors import InvalidWrappedKey
from sealing.keywrap import LocalKeyWrapper, RewrapOutcome, WrappedKey
from sealing.rotation import LOST_THE_RACE, MAX_FAILED_IDS, RangeResult, SweepStopped, rewrap_range
from sealing.store import BlobRecord, NewBlob, SealedStateStore, StaleRecord, StoreUnavailable, sealed_blobs

BLOBS = 50


class FakeKms:
    """LocalKeyWrapper with the adapter's batch call; ``before_batch`` runs before each one."""

    def __init__(self) -> None:
        self.key = LocalKeyWrapper("vault:k")
        self.batches = 0
        self.before_batch: Callable[[int], None] = lambda _n: None

    @property
    def key_ref(self) -> str:
        return self.key.key_ref

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        return self.key.rewrap(wrapped)

    def rewrap_batch(self, wrapped: Sequence[bytes]) -> list[RewrapOutcome]:
        self.batches += 1
        self.before_batch(self.batches)
        return [RewrapOutcome(i, wrapped=self.key.rewrap(w)) for i, w in enumerate(wrapped)]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[SealedStateStore, FakeKms, dict[str, bytes]]:
    store = SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}")
    kms = FakeKms()
    plain: dict[str, bytes] = {}
    rows = []
    for i in range(BLOBS):
        data = f"secret-{i}".encode() * (i + 1)
        blob = bytes(envelope.seal(data, kms.key, namespace="ns", name=f"n{i:03d}", generation="g"))
        blob_id = str(envelope.parse(blob).header.blob_id)
        plain[blob_id] = data
        rows.append(NewBlob("ns", f"n{i:03d}", kms.key_ref, 1, "g", blob, blob_id))
    store.insert_many(rows)
    kms.key.rotate()
    return store, kms, plain


def _all_readable(store: SealedStateStore, kms: FakeKms, plain: dict[str, bytes]) -> None:
    for blob_id, data in plain.items():
        assert envelope.open_blob(store.get(blob_id).blob, kms.key) == data


def test_every_blob_moves_with_its_body_intact(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    store, kms, plain = setup
    seen: list[tuple[str | None, int]] = []
    result = rewrap_range(
        store,
        kms,  # type: ignore[arg-type]
        below_version=2,
        start=None,
        end=None,
        limit=1000,
        chunk=7,
        depth=2,
        progress=lambda r: seen.append((r.last_id, r.rewrapped)),
    )
    assert (result.rewrapped, result.conflicts, result.failed) == (BLOBS, 0, 0)
    assert store.count_by_key_version(kms.key_ref) == {2: BLOBS}
    assert kms.batches == 8  # ceil(50 / 7)
    ids = sorted(plain)
    # Progress is reported per finished chunk, in order, covering exactly the blobs done.
    assert [last for last, _ in seen] == [ids[min(i + 7, BLOBS) - 1] for i in range(0, BLOBS, 7)]
    assert [n for _, n in seen] == [min(i + 7, BLOBS) for i in range(0, BLOBS, 7)]
    kms.key.disable_below(2)
    _all_readable(store, kms, plain)


def test_range_bounds_and_limit(setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]]) -> None:
    store, kms, _plain = setup
    ids = sorted(_plain)
    result = rewrap_range(store, kms, below_version=2, start=ids[9], end=ids[29], limit=15, chunk=4)  # type: ignore[arg-type]
    assert result.rewrapped == 15 and result.last_id == ids[24]
    moved = {r.blob_id for r in store.page(key_ref=kms.key_ref, limit=100).records if r.key_version == 2}
    assert moved == set(ids[10:25])


def test_a_concurrent_write_wins_and_counts_as_a_conflict(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    store, kms, plain = setup
    ids = sorted(plain)
    victim = ids[12]  # in the second chunk of 10

    def workload_writes(batch: int) -> None:
        if batch == 2:  # after the blob was read, before its slot is swapped
            record = store.get(victim)
            fresh = bytes(
                envelope.seal(b"rewritten", kms.key, namespace="ns", name=record.name, generation="g")
            )
            store.compare_and_swap(victim, record.row_version, blob=fresh, key_version=2)
            plain[victim] = b"rewritten"

    kms.before_batch = workload_writes
    result = rewrap_range(store, kms, below_version=2, start=None, end=None, limit=1000, chunk=10)  # type: ignore[arg-type]
    assert (result.rewrapped, result.conflicts) == (BLOBS - 1, 1)
    assert store.count_by_key_version(kms.key_ref) == {2: BLOBS}
    _all_readable(store, kms, plain)


def test_unreadable_blobs_are_counted_once_and_the_rest_moves(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    store, kms, plain = setup
    store.insert(
        namespace="ns", name="junk", key_ref=kms.key_ref, key_version=1, generation="g", blob=b"RKSB junk"
    )
    result = rewrap_range(store, kms, below_version=2, start=None, end=None, limit=1000, chunk=8)  # type: ignore[arg-type]
    assert (result.rewrapped, result.failed) == (BLOBS, 1)
    assert len(result.failed_ids) == 1
    _all_readable(store, kms, plain)


def test_a_retryable_error_resumes_after_the_finished_chunks(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    store, kms, plain = setup
    ids = sorted(plain)

    def outage(batch: int) -> None:
        if batch == 4:
            raise Unavailable("OpenBao is down")

    kms.before_batch = outage
    saved = RangeResult()

    def heartbeat(r: RangeResult) -> None:
        saved.rewrapped, saved.last_id = r.rewrapped, r.last_id

    with pytest.raises(Unavailable):
        rewrap_range(
            store, kms, below_version=2, start=None, end=None, limit=1000, chunk=6, progress=heartbeat
        )  # type: ignore[arg-type]
    # Chunks 1-3 were finished (and reported); chunk 4 failed at the KMS; nothing after it stored.
    assert (saved.rewrapped, saved.last_id) == (18, ids[17])
    assert store.count_by_key_version(kms.key_ref) == {1: BLOBS - 18, 2: 18}
    kms.before_batch = lambda _n: None
    done = rewrap_range(
        store, kms, below_version=2, start=saved.last_id, end=None, limit=1000, chunk=6, result=saved
    )  # type: ignore[arg-type]
    assert done.rewrapped == BLOBS and store.count_by_key_version(kms.key_ref) == {2: BLOBS}
    _all_readable(store, kms, plain)


def test_a_header_longer_than_the_head_read_takes_the_whole_blob(tmp_path: Path) -> None:
    store = SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}")
    kms = FakeKms()
    long_name = "n" * 1024
    blob = bytes(
        envelope.seal(b"long header", kms.key, namespace="x" * 1024, name=long_name, generation="g" * 1024)
    )
    assert envelope.key_slot_in_head(blob[:2048], len(blob)) is None
    # Names this long are refused since names are checked (sealing.names); a row stored before
    # that keeps them and must still be re-wrapped: plant one as such a row.
    record = store.insert(
        namespace="x", name="n", key_ref=kms.key_ref, key_version=1, generation="g", blob=blob
    )
    with store.transaction("plant a row named before names were checked", write=True) as conn:
        conn.execute(
            update(sealed_blobs)
            .where(sealed_blobs.c.blob_id == record.blob_id)
            .values(namespace="x" * 1024, name=long_name)
        )
    kms.key.rotate()
    result = rewrap_range(store, kms, below_version=2, start=None, end=None, limit=10)  # type: ignore[arg-type]
    assert result.rewrapped == 1
    kms.key.disable_below(2)
    assert envelope.open_blob(store.get(record.blob_id).blob, kms.key) == b"long header"


def test_a_slow_kms_keeps_the_heartbeat_going(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    """A throttled HSM can hold a chunk for longer than the heartbeat timeout: progress is
    repeated meanwhile (same counts, same resume point), so the attempt is not declared dead."""
    import time

    store, kms, _plain = setup
    kms.before_batch = lambda _n: time.sleep(0.3)
    seen: list[tuple[str | None, int]] = []
    result = rewrap_range(
        store,
        kms,  # type: ignore[arg-type]
        below_version=2,
        start=None,
        end=None,
        limit=1000,
        chunk=25,
        depth=1,
        keepalive=0.05,
        progress=lambda r: seen.append((r.last_id, r.rewrapped)),
    )
    assert result.rewrapped == BLOBS
    assert len(seen) > 4  # two chunks finished, many keepalives while each one waited
    assert seen[0] == (None, 0)  # a keepalive before anything finished claims nothing
    assert [n for _, n in seen] == sorted(n for _, n in seen)  # never runs ahead or back
    assert seen[-1] == (max(_plain), BLOBS)


def test_a_long_header_blob_rewritten_between_reads_is_left_to_the_workload(tmp_path: Path) -> None:
    """The whole-blob read of a long-header blob finds a newer row version (the workload sealed
    it again under the new key): it is a conflict, not re-wrapped over the workload's write."""
    kms = FakeKms()
    names = {"namespace": "x" * 1024, "name": "n" * 1024, "generation": "g" * 1024}

    class RacingStore(SealedStateStore):
        raced = False

        def get(self, blob_id: str) -> BlobRecord:
            if not self.raced:
                self.raced = True
                record = super().get(blob_id)
                fresh = bytes(envelope.seal(b"rewritten", kms.key, **names))
                self.compare_and_swap(blob_id, record.row_version, blob=fresh, key_version=2)
            return super().get(blob_id)

    store = RacingStore(f"sqlite:///{tmp_path / 'state.db'}")
    blob = bytes(envelope.seal(b"original", kms.key, **names))
    record = store.insert(
        namespace="x", name="n", generation="g", key_ref=kms.key_ref, key_version=1, blob=blob
    )
    with store.transaction("plant a row named before names were checked", write=True) as conn:
        conn.execute(update(sealed_blobs).where(sealed_blobs.c.blob_id == record.blob_id).values(**names))
    kms.key.rotate()
    result = rewrap_range(store, kms, below_version=2, start=None, end=None, limit=10)  # type: ignore[arg-type]
    assert (result.rewrapped, result.conflicts, result.failed) == (0, 1, 0)
    assert envelope.open_blob(store.get(record.blob_id).blob, kms.key) == b"rewritten"


def _rewritten_under_the_old_version(
    store: SealedStateStore, kms: FakeKms, victim: str
) -> Callable[[int], None]:
    """A workload write between the sweep's read and its swap that stays on the old version, so
    the lost swap is redone alone through ``rewrap``."""

    def workload_writes(batch: int) -> None:
        if batch == 2:
            record = store.get(victim)
            store.compare_and_swap(victim, record.row_version, blob=record.blob, key_version=1)

    return workload_writes


def test_a_malformed_answer_on_the_lost_swap_path_fails_the_attempt(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    # As on the batched path: a KMS answer that does not fit the envelope is not one blob's
    # problem, it fails the attempt (and nothing of the blob changes).
    store, kms, plain = setup
    victim = sorted(plain)[12]
    kms.before_batch = _rewritten_under_the_old_version(store, kms, victim)
    kms.rewrap = lambda _wrapped: WrappedKey(b"", 2)  # type: ignore[method-assign]
    before = store.get(victim)
    with pytest.raises(InvalidWrappedKey):
        rewrap_range(store, kms, below_version=2, start=None, end=None, limit=1000, chunk=10)  # type: ignore[arg-type]
    assert store.get(victim).blob == before.blob


def test_a_dek_the_kms_refuses_on_the_lost_swap_path_fails_that_blob(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    store, kms, plain = setup
    victim = sorted(plain)[12]
    kms.before_batch = _rewritten_under_the_old_version(store, kms, victim)

    def refuse(_wrapped: bytes) -> WrappedKey:
        raise InvalidCiphertext("not a ciphertext of this key")

    kms.rewrap = refuse  # type: ignore[method-assign]
    result = rewrap_range(store, kms, below_version=2, start=None, end=None, limit=1000, chunk=10)  # type: ignore[arg-type]
    assert (result.rewrapped, result.failed, result.failed_ids) == (BLOBS - 1, 1, [victim])
    assert [(f.blob_id, f.reason, f.attempts) for f in store.rewrap_failures(kms.key_ref, 2)] == [
        (victim, "InvalidCiphertext: the key service refused to re-wrap the DEK", 1)
    ]


# ------------------------------------------------------------------ failures recorded in the store


def _junk(store: SealedStateStore, key_ref: str, n: int) -> list[str]:
    """``n`` blobs of ``key_ref`` at version 1 that are not sealed blobs at all."""
    return store.insert_many(
        [
            NewBlob("junk", f"j{i:03d}", key_ref, 1, "g", b"junk, not a sealed blob " + bytes([i]))
            for i in range(n)
        ]
    )


def test_every_failed_blob_is_recorded_with_its_reason_beyond_the_first_twenty(store_url: str) -> None:
    """More failures than `MAX_FAILED_IDS` across many chunks: the result keeps the count and the
    first 20 ids, the store every one of them, with the error's class and message."""
    with SealedStateStore(store_url) as store:
        kms = FakeKms()
        good = [
            NewBlob(
                "ns",
                f"n{i:03d}",
                kms.key_ref,
                1,
                "g",
                bytes(envelope.seal(b"x", kms.key, namespace="ns", name=f"n{i:03d}", generation="g")),
            )
            for i in range(10)
        ]
        store.insert_many(good)
        junk = _junk(store, kms.key_ref, MAX_FAILED_IDS + 13)
        kms.key.rotate()
        result = rewrap_range(store, kms, below_version=2, start=None, end=None, limit=1000, chunk=8)  # type: ignore[arg-type]
        assert (result.rewrapped, result.failed) == (10, len(junk))
        assert len(result.failed_ids) == MAX_FAILED_IDS and set(result.failed_ids) <= set(junk)
        failures = store.rewrap_failures(kms.key_ref, 2, limit=1000)
        assert [f.blob_id for f in failures] == sorted(junk)
        assert {f.reason for f in failures} == {"UnsupportedFormat: not a rekey sealed blob (bad magic)"}
        assert {f.attempts for f in failures} == {1}
        assert store.count_rewrap_failures(kms.key_ref, 2) == len(junk)

        # A second sweep over the range (a new attempt at the blocked rotation) fails them again.
        again = rewrap_range(store, kms, below_version=2, start=None, end=None, limit=1000, chunk=8)  # type: ignore[arg-type]
        assert (again.rewrapped, again.failed) == (0, len(junk))
        assert {f.attempts for f in store.rewrap_failures(kms.key_ref, 2, limit=1000)} == {2}

        # The operator reseals one of them under the new version: it drops out of the list.
        fixed = store.get(junk[0])
        resealed = bytes(envelope.seal(b"fixed", kms.key, namespace="junk", name=fixed.name, generation="g"))
        store.compare_and_swap(fixed.blob_id, fixed.row_version, blob=resealed, key_version=2)
        assert store.count_rewrap_failures(kms.key_ref, 2) == len(junk) - 1
        assert junk[0] not in {f.blob_id for f in store.rewrap_failures(kms.key_ref, 2, limit=1000)}


class RefusingKms(FakeKms):
    """Refuses (not retryably) the DEKs at the given batch positions, with a message that echoes
    what it was sent, as a KMS may."""

    def __init__(self, refuse: set[int]) -> None:
        super().__init__()
        self.refuse = refuse

    def rewrap_batch(self, wrapped: Sequence[bytes]) -> list[RewrapOutcome]:
        outcomes = super().rewrap_batch(wrapped)
        return [
            RewrapOutcome(i, error=InvalidCiphertext(f"cannot decrypt {w.hex()}")) if i in self.refuse else o
            for i, (o, w) in enumerate(zip(outcomes, wrapped, strict=True))
        ]


def test_a_dek_the_kms_refuses_is_recorded_by_error_class_without_the_kms_text(tmp_path: Path) -> None:
    kms = RefusingKms({0, 3})
    store = SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}")
    blobs = [
        bytes(envelope.seal(b"data", kms.key, namespace="ns", name=f"n{i}", generation="g")) for i in range(6)
    ]
    ids = store.insert_many([NewBlob("ns", f"n{i}", kms.key_ref, 1, "g", b) for i, b in enumerate(blobs)])
    kms.key.rotate()
    result = rewrap_range(store, kms, below_version=2, start=None, end=None, limit=100, chunk=5)  # type: ignore[arg-type]
    ordered = sorted(ids)
    refused = [ordered[0], ordered[3], ordered[5]]  # positions 0 and 3 of chunk one, 0 of chunk two
    assert (result.rewrapped, result.failed, sorted(result.failed_ids)) == (3, 3, refused)
    failures = store.rewrap_failures(kms.key_ref, 2)
    assert [f.blob_id for f in failures] == refused
    assert {f.reason for f in failures} == {"InvalidCiphertext: the key service refused to re-wrap the DEK"}
    for f in failures:  # neither the wrapped DEK nor the sealed bytes reach the store
        record = store.get(f.blob_id)
        slot = envelope.key_slot(record.blob)
        assert slot.wrapped_dek.hex() not in f.reason and "cannot decrypt" not in f.reason


def test_a_blob_that_loses_the_write_race_every_time_is_recorded_as_such(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    store, kms, plain = setup
    victim = sorted(plain)[12]
    workload_writes = _rewritten_under_the_old_version(store, kms, victim)
    real_cas = store.compare_and_swap

    def write_then_keep_writing(batch: int) -> None:
        workload_writes(batch)  # the batched swap of the victim loses
        if batch == 2:
            store.compare_and_swap = always_lose  # type: ignore[method-assign]

    def always_lose(blob_id: str, expected: int, **kwargs: object) -> BlobRecord:
        if blob_id == victim:  # the workload writes it again before every swap
            raise StaleRecord(blob_id, expected, expected + 1)
        return real_cas(blob_id, expected, **kwargs)  # type: ignore[arg-type]

    kms.before_batch = write_then_keep_writing
    result = rewrap_range(store, kms, below_version=2, start=None, end=None, limit=1000, chunk=10)  # type: ignore[arg-type]
    assert (result.rewrapped, result.failed, result.failed_ids) == (BLOBS - 1, 1, [victim])
    [failure] = store.rewrap_failures(kms.key_ref, 2)
    assert failure.blob_id == victim
    assert failure.reason == LOST_THE_RACE and "lost the write race" in failure.reason


def test_a_resumed_attempt_records_the_finished_chunks_failures_once(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    """An attempt fails at the KMS in chunk 4, after chunks 1-3 recorded their failures; the retry
    resumes after chunk 3 (from the heartbeat) and records only the later chunks' failures."""
    store, kms, _plain = setup
    junk = sorted(_junk(store, kms.key_ref, 30))

    def outage(batch: int) -> None:
        if batch == 4:
            raise Unavailable("OpenBao is down")

    kms.before_batch = outage
    beats: list[RangeResult] = []

    def heartbeat(r: RangeResult) -> None:  # what the activity heartbeats, as it would resume
        beats.append(RangeResult(r.rewrapped, r.conflicts, r.failed, list(r.failed_ids), r.last_id))

    with pytest.raises(Unavailable):
        rewrap_range(
            store, kms, below_version=2, start=None, end=None, limit=1000, chunk=10, progress=heartbeat
        )  # type: ignore[arg-type]
    saved = beats[-1]
    recorded = store.rewrap_failures(kms.key_ref, 2, limit=1000)
    assert saved.failed == len(recorded) > 0
    assert all(f.blob_id <= str(saved.last_id) for f in recorded)

    kms.before_batch = lambda _n: None
    done = rewrap_range(
        store, kms, below_version=2, start=saved.last_id, end=None, limit=1000, chunk=10, result=saved
    )  # type: ignore[arg-type]
    assert (done.rewrapped, done.failed) == (BLOBS, len(junk))
    failures = store.rewrap_failures(kms.key_ref, 2, limit=1000)
    assert [f.blob_id for f in failures] == junk
    assert {f.attempts for f in failures} == {1}


def test_a_store_that_fails_to_record_fails_the_attempt_before_the_chunk_counts_as_done(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    store, kms, _plain = setup
    junk = sorted(_junk(store, kms.key_ref, 5))
    real_record = store.record_rewrap_failures
    calls: list[int] = []

    def flaky(key_ref: str, version: int, failures: Sequence[tuple[str, str]]) -> None:
        calls.append(len(failures))
        if len(calls) == 1:
            raise StoreUnavailable("database unavailable (recording of re-wrap failures)")
        real_record(key_ref, version, failures)

    store.record_rewrap_failures = flaky  # type: ignore[method-assign]
    seen: list[RangeResult] = []
    with pytest.raises(StoreUnavailable):
        rewrap_range(
            store,
            kms,
            below_version=2,
            start=None,
            end=None,
            limit=1000,
            chunk=1000,
            progress=lambda r: seen.append(
                RangeResult(r.rewrapped, r.conflicts, r.failed, list(r.failed_ids), r.last_id)
            ),
        )  # type: ignore[arg-type]
    assert seen == []  # the chunk never counted as done
    assert store.rewrap_failures(kms.key_ref, 2) == []
    done = rewrap_range(store, kms, below_version=2, start=None, end=None, limit=1000, chunk=1000)  # type: ignore[arg-type]
    # The retry re-reads the chunk: the blobs swapped before the failure are not selected again.
    assert (done.rewrapped, done.failed) == (0, len(junk))
    assert [(f.blob_id, f.attempts) for f in store.rewrap_failures(kms.key_ref, 2)] == [(j, 1) for j in junk]


@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_a_stop_request_ends_at_a_chunk_boundary_and_the_rest_resumes(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]], stop_after: int
) -> None:
    """A worker shutting down: no chunk is read after the stop request, the chunks already at
    the KMS are finished (their DEKs are not re-wrapped again by the retry), the last progress
    names the last finished chunk, and the resumed range re-wraps exactly the rest."""
    store, kms, plain = setup
    ids = sorted(plain)
    saved = RangeResult()
    reports: list[int] = []

    def heartbeat(r: RangeResult) -> None:
        saved.rewrapped, saved.last_id = r.rewrapped, r.last_id
        reports.append(r.rewrapped)

    with pytest.raises(SweepStopped) as stopped:
        rewrap_range(
            store,
            kms,  # type: ignore[arg-type]
            below_version=2,
            start=None,
            end=None,
            limit=1000,
            chunk=6,
            depth=2,
            progress=heartbeat,
            should_stop=lambda: len(reports) >= stop_after,
        )
    # Reads happen ahead of the swaps: the stop lands with `depth` chunks at the KMS (fewer at
    # the start), and each of them is finished and reported before SweepStopped.
    finished = 0 if stop_after == 0 else stop_after + 2
    assert kms.batches == finished
    assert stopped.value.result.rewrapped == saved.rewrapped == 6 * finished
    assert saved.last_id == (ids[6 * finished - 1] if finished else None)
    assert store.count_by_key_version(kms.key_ref) == (
        {1: BLOBS - 6 * finished, 2: 6 * finished} if finished else {1: BLOBS}
    )
    batches_before = kms.batches
    done = rewrap_range(
        store, kms, below_version=2, start=saved.last_id, end=None, limit=1000, chunk=6, result=saved
    )  # type: ignore[arg-type]
    assert done.rewrapped == BLOBS and done.conflicts == 0
    assert kms.batches - batches_before == -(-(BLOBS - 6 * finished) // 6)  # each DEK once
    assert store.count_by_key_version(kms.key_ref) == {2: BLOBS}
    _all_readable(store, kms, plain)


def test_a_stop_request_after_the_last_chunk_is_no_stop(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],
) -> None:
    store, kms, _plain = setup
    asked: list[bool] = []

    def should_stop() -> bool:
        asked.append(True)
        return False

    result = rewrap_range(
        store, kms, below_version=2, start=None, end=None, limit=BLOBS, chunk=10, should_stop=should_stop
    )  # type: ignore[arg-type]
    assert result.rewrapped == BLOBS
    assert len(asked) == BLOBS // 10  # once before each chunk is read; the range ended on its limit
