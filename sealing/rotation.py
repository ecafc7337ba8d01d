"""The re-wrap sweep of a key rotation, as plain functions over the store and a key service.

A batch covers the records of one key below the new version in a ``blob_id`` range
``(start, end]``. Their wrapped DEKs are re-wrapped in adapter batch calls (server-side where the
KMS has it, so no plaintext DEK is ever held here), and each blob's key slot is swapped by a
compare-and-swap on its row version: a blob the workload rewrote meanwhile is re-read, never
overwritten. Only the head of each blob (header and key slot) is read; the database splices the
new slot in front of the stored body. Nothing here knows about Temporal; the activities wrap it.

Every blob the sweep fails (unreadable, refused for good by the KMS, or lost the write race to the
workload too often) is recorded in the store with its reason when its chunk is finished
(`SealedStateStore.record_rewrap_failures`, keyed by the key and ``below_version``), so all of
them can be listed; `RangeResult` keeps only the count and the first `MAX_FAILED_IDS` ids.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from sealing import envelope
from sealing.errors import KeyWrapError, SealedBlobError
from sealing.keywrap import DEK_BYTES, RewrapOutcome, RewrapService
from sealing.store import RecordNotFound, SealedStateStore, SlotSplice, StaleRecord, SweepRow

MAX_FAILED_IDS = 20
CAS_ATTEMPTS = 3
CHUNK = 1960  # records per KMS round (four 490-item Transit batch requests)
DEPTH = 2  # chunks at the KMS while the previous one is swapped
KEEPALIVE_S = 10.0  # report progress at least this often while a chunk is at a slow KMS


@dataclass
class RangeResult:
    rewrapped: int = 0
    conflicts: int = 0  # the workload wrote the blob meanwhile, already under the new version
    failed: int = 0  # not re-wrappable (unreadable blob or non-retryable KMS error)
    failed_ids: list[str] = field(default_factory=list)
    last_id: str | None = None

    def add_failure(self, blob_id: str) -> None:
        self.failed += 1
        if len(self.failed_ids) < MAX_FAILED_IDS:
            self.failed_ids.append(blob_id)


class SweepStopped(Exception):
    """``rewrap_range`` stopped early because ``should_stop`` said so: ``result`` (with its
    ``last_id``) covers every finished chunk, and the range resumes after it."""

    def __init__(self, result: RangeResult) -> None:
        super().__init__(
            f"re-wrap stopped after {result.rewrapped} re-wrapped blobs; resumes from its progress"
        )
        self.result = result


@dataclass
class _Chunk:
    """Blobs read and sent to the KMS, waiting to be swapped (in order)."""

    last_id: str
    items: list[tuple[SweepRow, envelope.KeySlot]]
    bad: list[tuple[str, str]]  # unreadable blobs and why, counted when the chunk is finished
    recheck: list[str]  # written by the workload between two reads: handled like a lost swap
    rewrap: Future[list[RewrapOutcome]]


@dataclass
class _Tally:
    """What finishing one chunk did: added to the range's `RangeResult` only once the whole chunk
    is done and its failures are recorded, so an attempt that fails half-way through a chunk
    leaves neither its counts nor its progress claiming any of it."""

    rewrapped: int = 0
    conflicts: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (blob_id, reason)


LOST_THE_RACE = f"StaleRecord: lost the write race to the workload {CAS_ATTEMPTS} times"


def _unreadable(exc: SealedBlobError) -> str:
    """The stored reason for a blob that cannot be parsed (the sealing layer's messages hold no
    key material or sealed data)."""
    return f"{type(exc).__name__}: {exc}"


def _refused(exc: KeyWrapError) -> str:
    """The stored reason for a DEK the key service refused for good: the error's class name
    only, never the service's own text (which may echo what it was sent)."""
    return f"{type(exc).__name__}: the key service refused to re-wrap the DEK"


def rewrap_range(
    store: SealedStateStore,
    adapter: RewrapService,
    *,
    below_version: int,
    start: str | None,
    end: str | None,
    limit: int,
    progress: Callable[[RangeResult], None] | None = None,
    result: RangeResult | None = None,
    chunk: int = CHUNK,
    depth: int = DEPTH,
    keepalive: float = KEEPALIVE_S,
    should_stop: Callable[[], bool] | None = None,
) -> RangeResult:
    """Re-wrap every record of ``adapter.key_ref`` below ``below_version`` in ``(start, end]``
    (at most ``limit`` records).

    Pipelined: the range is read ``chunk`` records at a time (only each blob's head, where its
    key slot is), each chunk's DEKs go to the KMS in a background thread, and while up to
    ``depth`` chunks are at the KMS this thread reads the next chunk and swaps the key slots
    of the oldest one. Chunks are finished in order, so ``result.last_id`` (and each
    ``progress`` call) only ever covers blobs that are done: an interrupted attempt resumes
    after it. While a chunk waits on a slow (throttled) KMS, ``progress`` is repeated every
    ``keepalive`` seconds with unchanged counts, so a heartbeat timeout means a dead worker,
    not a slow HSM.

    Retryable KMS errors propagate (the caller retries; finished blobs are already on the new
    version and are not selected again). ``result`` continues the counts of an interrupted
    attempt.

    Each finished chunk's failed blobs are recorded in the store with their reasons before the
    chunk counts as done (``progress``, ``result.last_id``); an attempt resumed after
    ``last_id`` does not read finished chunks again, so it records none of them twice.

    ``should_stop`` is asked before each chunk is read; once it says yes, no chunk is read and
    the chunks already at the KMS are finished (so no DEK is re-wrapped twice), then
    `SweepStopped` is raised, after ``progress`` reported the last of them."""
    result = result or RangeResult()
    cursor, remaining = start, limit
    pending: deque[_Chunk] = deque()
    stopped = False
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="rekey-rewrap") as kms:
        try:
            while remaining > 0:
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                rows = store.sweep_page(
                    key_ref=adapter.key_ref,
                    below_version=below_version,
                    after=cursor,
                    upto=end,
                    limit=min(chunk, remaining),
                )
                if not rows:
                    break
                remaining -= len(rows)
                cursor = rows[-1].blob_id
                pending.append(_read(store, adapter, rows, kms))
                while len(pending) > depth:
                    _finish(store, adapter, pending.popleft(), below_version, result, progress, keepalive)
            while pending:
                _finish(store, adapter, pending.popleft(), below_version, result, progress, keepalive)
        finally:
            for waiting in pending:
                waiting.rewrap.cancel()
    if stopped:
        raise SweepStopped(result)
    return result


def _read(
    store: SealedStateStore, adapter: RewrapService, rows: list[SweepRow], kms: ThreadPoolExecutor
) -> _Chunk:
    items: list[tuple[SweepRow, envelope.KeySlot]] = []
    bad: list[tuple[str, str]] = []
    recheck: list[str] = []
    for row in rows:
        try:
            slot = envelope.key_slot_in_head(row.head, row.length)
            if slot is None:  # a header longer than the head read: take the whole blob
                whole = store.get(row.blob_id)
                if whole.row_version != row.row_version:
                    recheck.append(row.blob_id)
                    continue
                row = SweepRow(row.blob_id, whole.row_version, whole.blob, len(whole.blob))
                slot = envelope.key_slot(whole.blob)
        except RecordNotFound:
            continue  # deleted by the workload meanwhile
        except SealedBlobError as exc:
            bad.append((row.blob_id, _unreadable(exc)))
            continue
        items.append((row, slot))
    wrapped = [slot.wrapped_dek for _, slot in items]
    return _Chunk(rows[-1].blob_id, items, bad, recheck, kms.submit(adapter.rewrap_batch, wrapped))


def _finish(
    store: SealedStateStore,
    adapter: RewrapService,
    done: _Chunk,
    below_version: int,
    result: RangeResult,
    progress: Callable[[RangeResult], None] | None,
    keepalive: float,
) -> None:
    while True:
        try:
            outcomes = done.rewrap.result(timeout=keepalive)
            break
        except FutureTimeout:
            if progress is not None:
                progress(result)
    tally = _Tally()
    splices: list[SlotSplice] = []
    for (row, slot), outcome in zip(done.items, outcomes, strict=True):
        if outcome.error is not None:
            if outcome.error.retryable:
                raise outcome.error
            tally.failures.append((row.blob_id, _refused(outcome.error)))
            continue
        assert outcome.wrapped is not None  # typing only: a success always has wrapped  # nosec B101
        prefix = envelope.slot_prefix(row.head, slot, outcome.wrapped)
        splices.append(
            SlotSplice(row.blob_id, row.row_version, prefix, slot.end, outcome.wrapped.key_version)
        )
    # One transaction for the chunk; a blob the workload wrote meanwhile is re-read one by one.
    for splice, applied in zip(splices, store.splice_key_slots(splices), strict=True):
        if applied:
            tally.rewrapped += 1
        else:
            _retry_swap(store, adapter, splice.blob_id, below_version, tally)
    for blob_id in done.recheck:
        _retry_swap(store, adapter, blob_id, below_version, tally)
    tally.failures.extend(done.bad)
    if tally.failures:
        store.record_rewrap_failures(adapter.key_ref, below_version, tally.failures)
    result.rewrapped += tally.rewrapped
    result.conflicts += tally.conflicts
    for blob_id, _reason in tally.failures:
        result.add_failure(blob_id)
    result.last_id = done.last_id
    if progress is not None:
        progress(result)


def _retry_swap(
    store: SealedStateStore, adapter: RewrapService, blob_id: str, below_version: int, tally: _Tally
) -> None:
    """The batched swap lost for ``blob_id``: re-read it; if it is still below the new version,
    re-wrap and swap it alone (a few times), else leave the workload's write alone."""
    for _ in range(CAS_ATTEMPTS):
        try:
            record = store.get(blob_id)
        except RecordNotFound:
            return  # deleted by the workload meanwhile: nothing left to re-wrap
        if record.key_version >= below_version or record.key_ref != adapter.key_ref:
            tally.conflicts += 1  # rewritten under the new version (or moved): leave it
            return
        # As in the batched path: an unreadable blob, or a DEK the key service refuses for good,
        # fails this blob; a retryable refusal, or an answer that does not fit the envelope
        # (`_finish` raises for it too), fails the attempt.
        try:
            slot = envelope.key_slot(record.blob)
            try:
                rewrapped = adapter.rewrap(slot.wrapped_dek)
            except KeyWrapError as exc:
                if exc.retryable:
                    raise
                tally.failures.append((record.blob_id, _refused(exc)))
                return
            blob = envelope.replace_key_slot(record.blob, slot, rewrapped)
        except SealedBlobError as exc:
            tally.failures.append((record.blob_id, _unreadable(exc)))
            return
        try:
            store.compare_and_swap(
                record.blob_id,
                record.row_version,
                blob=blob,
                key_version=rewrapped.key_version,
            )
            tally.rewrapped += 1
            return
        except StaleRecord:
            continue
    tally.failures.append((blob_id, LOST_THE_RACE))  # lost the race CAS_ATTEMPTS times in a row


def verify_sample(store: SealedStateStore, adapter: RewrapService, *, version: int, sample: int) -> int:
    """Unwrap the DEKs of up to ``sample`` records on ``version``; returns how many unwrapped.

    The DEKs stay in this function (they are needed only to prove they unwrap)."""
    page = store.page(
        key_ref=adapter.key_ref, below_version=version + 1, limit=min(10_000, max(sample * 5, 1))
    )
    candidates = [r for r in page.records if r.key_version == version]
    checked = 0
    for record in random.sample(candidates, min(sample, len(candidates))):  # not crypto  # nosec B311
        dek = adapter.unwrap(envelope.parse(record.blob).wrapped_dek)
        if len(dek) != DEK_BYTES:
            raise SealedBlobError(f"blob {record.blob_id}: unwrapped DEK has the wrong length")
        checked += 1
    return checked
