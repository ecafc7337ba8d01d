"""The generation registry of the sealed-state store: generation manifests (JSON documents)
by generation id, registered idempotently."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import insert, select

from sealing.store.base import StoreBase
from sealing.store.errors import DuplicateRecord, RecordNotFound
from sealing.store.records import require_str
from sealing.store.schema import generations

__all__ = ["GenerationRegistry"]


class GenerationRegistry(StoreBase):
    """The registered generation manifests of a store (mixed into `SealedStateStore`)."""

    def put_generation(self, generation_id: str, document: str) -> bool:
        """Register a generation manifest (a JSON document). Idempotent: True if newly
        stored, False if the id already holds this exact document; `DuplicateRecord` if it
        holds a different one."""
        require_str("generation_id", generation_id)
        if not isinstance(document, str):
            raise TypeError(f"document must be a JSON string, got {type(document).__name__}")
        try:
            json.loads(document)
        except ValueError:
            raise ValueError(f"document of generation {generation_id} is not valid JSON") from None
        what = f"registration of generation {generation_id}"
        for _attempt in range(2):
            try:
                with self.transaction(what, write=True) as conn:
                    existing = conn.execute(
                        select(generations.c.document).where(generations.c.generation_id == generation_id)
                    ).scalar_one_or_none()
                    if existing is None:
                        conn.execute(
                            insert(generations).values(
                                generation_id=generation_id,
                                document=document,
                                registered_at=datetime.now(UTC),
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
        with self.transaction(f"read of generation {generation_id}") as conn:
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
        with self.transaction("listing of generations") as conn:
            rows = conn.execute(query).all()
        return [(str(gid), str(doc), at) for gid, doc, at in rows]
