"""The re-wrap sweep of a key rotation, as plain functions over the store and a KMS adapter.

A batch covers the records of one key below the new version in a ``blob_id`` range
``(start, end]``. Their wrapped DEKs are re-wrapped in one adapter call (server-side where the
KMS has it, so no plaintext DEK is ever held here), and each blob's key slot is swapped by a
compare-and-swap on its row version: a blob the workload rewrote meanwhile is re-read, never
overwritten. Nothing here knows about Temporal; the activities wrap it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from kms_adapters.contract import KmsAdapter
from kms_adapters.errors import KmsError
from sealing import envelope
from sealing.errors import SealedBlobError
from sealing.keywrap import DEK_BYTES, WrappedKey
from sealing.store import RecordNotFound, SealedStateStore, StaleRecord, SweepRow

MAX_FAILED_IDS = 20
CAS_ATTEMPTS = 3


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


def rewrap_range(
    store: SealedStateStore,
    adapter: KmsAdapter,
    *,
    below_version: int,
    start: str | None,
    end: str | None,
    limit: int,
    progress: Callable[[RangeResult], None] | None = None,
    result: RangeResult | None = None,
) -> RangeResult:
    """Re-wrap every record of ``adapter.key_ref`` below ``below_version`` in ``(start, end]``.

    Retryable KMS errors propagate (the caller retries the whole range; finished blobs are
    already on the new version and are not selected again). ``result`` continues the counts of
    an interrupted attempt."""
    result = result or RangeResult()
    records = store.sweep_page(
        key_ref=adapter.key_ref, below_version=below_version, after=start, upto=end, limit=limit
    )
    parsed: list[tuple[SweepRow, envelope.KeySlot]] = []
    for record in records:
        try:
            parsed.append((record, envelope.key_slot(record.blob)))
        except SealedBlobError:
            result.add_failure(record.blob_id)
    outcomes = adapter.rewrap_batch([slot.wrapped_dek for _, slot in parsed])
    swaps: list[tuple[SweepRow, envelope.KeySlot, WrappedKey]] = []
    for (record, slot), outcome in zip(parsed, outcomes, strict=True):
        if outcome.error is not None:
            if outcome.error.retryable:
                raise outcome.error
            result.add_failure(record.blob_id)
        else:
            assert outcome.wrapped is not None
            swaps.append((record, slot, outcome.wrapped))
    # One transaction for the batch; a blob the workload wrote meanwhile is re-read one by one.
    applied = store.swap_key_slots(
        [
            (r.blob_id, r.row_version, envelope.replace_key_slot(r.blob, s, w), w.key_version)
            for r, s, w in swaps
        ]
    )
    for (record, _blob, _wrapped), ok in zip(swaps, applied, strict=True):
        if ok:
            result.rewrapped += 1
        else:
            _retry_swap(store, adapter, record, below_version, result)
    if records:
        result.last_id = records[-1].blob_id
    if progress is not None:
        progress(result)
    return result


def _retry_swap(
    store: SealedStateStore, adapter: KmsAdapter, row: SweepRow, below_version: int, result: RangeResult
) -> None:
    """The batched swap lost for ``row``: re-read it; if it is still below the new version,
    re-wrap and swap it alone (a few times), else leave the workload's write alone."""
    for _ in range(CAS_ATTEMPTS):
        try:
            record = store.get(row.blob_id)
        except RecordNotFound:
            return  # deleted by the workload meanwhile: nothing left to re-wrap
        if record.key_version >= below_version or record.key_ref != adapter.key_ref:
            result.conflicts += 1  # rewritten under the new version (or moved): leave it
            return
        try:
            slot = envelope.key_slot(record.blob)
            rewrapped = adapter.rewrap(slot.wrapped_dek)
            blob = envelope.replace_key_slot(record.blob, slot, rewrapped)
        except (SealedBlobError, KmsError) as exc:
            if isinstance(exc, KmsError) and exc.retryable:
                raise
            result.add_failure(record.blob_id)
            return
        try:
            store.compare_and_swap(
                record.blob_id,
                record.row_version,
                blob=blob,
                key_version=rewrapped.key_version,
            )
            result.rewrapped += 1
            return
        except StaleRecord:
            continue
    result.add_failure(row.blob_id)  # lost the race CAS_ATTEMPTS times in a row


def verify_sample(store: SealedStateStore, adapter: KmsAdapter, *, version: int, sample: int) -> int:
    """Unwrap the DEKs of up to ``sample`` records on ``version``; returns how many unwrapped.

    The DEKs stay in this function (they are needed only to prove they unwrap)."""
    page = store.page(
        key_ref=adapter.key_ref, below_version=version + 1, limit=min(10_000, max(sample * 5, 1))
    )
    candidates = [r for r in page.records if r.key_version == version]
    checked = 0
    for record in random.sample(candidates, min(sample, len(candidates))):
        dek = adapter.unwrap(envelope.parse(record.blob).wrapped_dek)
        if len(dek) != DEK_BYTES:
            raise SealedBlobError(f"blob {record.blob_id}: unwrapped DEK has the wrong length")
        checked += 1
    return checked
