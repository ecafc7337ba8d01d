"""Sealed state: seal data under a KMS key and keep it in the store, read it back.

This is the one place that joins the envelope, the key wrappers and the store, so that the
CLI and (later) the workload-facing activities share the same checks: the generation must be
registered, a name keeps its blob id across updates, an update is a compare-and-swap, and a
blob is only opened if its authenticated header agrees with the record it came from.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from sealing import envelope
from sealing.errors import SealingError, TamperedBlob
from sealing.keywrap import KeyWrapper
from sealing.store import BlobRecord, DuplicateRecord, RecordNotFound, SealedStateStore, StaleRecord

PUT_ATTEMPTS = 5


class UnknownGeneration(SealingError):
    """State was put for a generation nobody registered."""

    exit_code = 2


class SealedState:
    def __init__(self, store: SealedStateStore, wrapper_for: Callable[[str], KeyWrapper]) -> None:
        self._store = store
        self._wrapper_for = wrapper_for

    def put(self, *, namespace: str, name: str, data: bytes, key_ref: str, generation: str) -> BlobRecord:
        """Seal ``data`` and store it under (namespace, name), replacing any previous value.

        Nothing is written unless sealing succeeded, and a concurrent writer is never
        overwritten: the update is a compare-and-swap on the row version read here.
        """
        try:
            self._store.get_generation(generation)
        except RecordNotFound:
            raise UnknownGeneration(
                f"generation {generation!r} is not registered (rekey generation register MANIFEST)"
            ) from None
        wrapper = self._wrapper_for(key_ref)
        try:
            existing: BlobRecord | None = self._store.get_by_name(namespace, name)
        except RecordNotFound:
            existing = None

        def seal_as(blob_id: str) -> tuple[bytes, int]:
            sealed = envelope.seal(
                data,
                wrapper,
                namespace=namespace,
                name=name,
                generation=generation,
                blob_id=uuid.UUID(blob_id),
            )
            return bytes(sealed), envelope.parse(sealed).key_version

        blob_id = existing.blob_id if existing is not None else str(uuid.uuid4())
        blob, key_version = seal_as(blob_id)
        # A put replaces the value, so losing a race (to a rotation re-wrapping the old value, or
        # to another writer) just means comparing against the newer row version: the new blob
        # does not depend on what it replaces.
        for attempt in range(PUT_ATTEMPTS):
            try:
                if existing is None:
                    return self._store.insert(
                        blob_id=blob_id,
                        namespace=namespace,
                        name=name,
                        key_ref=key_ref,
                        key_version=key_version,
                        generation=generation,
                        blob=blob,
                    )
                return self._store.compare_and_swap(
                    existing.blob_id,
                    existing.row_version,
                    blob=blob,
                    key_version=key_version,
                    key_ref=key_ref,
                    generation=generation,
                )
            except (StaleRecord, DuplicateRecord):
                if attempt == PUT_ATTEMPTS - 1:
                    raise
                existing = self._store.get_by_name(namespace, name)
                if existing.blob_id != blob_id:  # another writer created the name meanwhile
                    blob_id = existing.blob_id
                    blob, key_version = seal_as(blob_id)
        raise AssertionError("unreachable")

    def get(self, *, namespace: str, name: str) -> bytes:
        """Open the blob stored under (namespace, name)."""
        return self.open_record(self._store.get_by_name(namespace, name))

    def open_record(self, record: BlobRecord) -> bytes:
        parsed = envelope.parse(record.blob)
        header = parsed.header
        if (
            str(header.blob_id),
            header.namespace,
            header.name,
            header.key_ref,
            header.generation,
        ) != (
            record.blob_id,
            record.namespace,
            record.name,
            record.key_ref,
            record.generation,
        ) or parsed.key_version != record.key_version:
            raise TamperedBlob(
                f"sealed blob {record.namespace}/{record.name} does not match its store record"
                " (blob moved or record altered)"
            )
        return envelope.open_parsed(parsed, self._wrapper_for(record.key_ref))
