"""The generation registry of the sealed-state store: generation manifests (JSON documents)
by generation id, registered idempotently, and which generation supersedes which (schema
version 9).

A succession is recorded with the new generation's registration, in the same transaction: a
refused succession (the old generation unknown, the same generation, one already superseded by
another, a new generation that already supersedes another, or a cycle) raises
`SuccessionRefused` and stores neither. Successions form chains: each generation supersedes at
most one and is superseded at most once."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection

from sealing.store.base import StoreBase
from sealing.store.errors import DuplicateRecord, RecordNotFound, SuccessionRefused
from sealing.store.records import require_str
from sealing.store.schema import generation_successions, generations

__all__ = ["GenerationRegistry"]

_PG_SUCCESSION_LOCK: Final = 0x72656B65795F7375  # "rekey_su": serialises succession checks
_successions = generation_successions.c


def _supersedes(conn: Connection, generation_id: str) -> str | None:
    found = conn.execute(
        select(_successions.old_generation).where(_successions.new_generation == generation_id)
    ).scalar_one_or_none()
    return None if found is None else str(found)


def _superseded_by(conn: Connection, generation_id: str) -> str | None:
    found = conn.execute(
        select(_successions.new_generation).where(_successions.old_generation == generation_id)
    ).scalar_one_or_none()
    return None if found is None else str(found)


def _check_succession(conn: Connection, new: str, old: str) -> bool:
    """`SuccessionRefused` unless ``new`` may supersede ``old``; True if it already does."""
    if new == old:
        raise SuccessionRefused(f"generation {new} cannot supersede itself")
    registered = conn.execute(
        select(generations.c.generation_id).where(generations.c.generation_id == old)
    ).scalar_one_or_none()
    if registered is None:
        raise SuccessionRefused(
            f"generation {old} is not registered (register it before {new} supersedes it)"
        )
    successor = _superseded_by(conn, old)
    if successor == new:
        return True
    if successor is not None:
        raise SuccessionRefused(f"generation {old} is already superseded by {successor}")
    predecessor = _supersedes(conn, new)
    if predecessor is not None:
        raise SuccessionRefused(f"generation {new} already supersedes {predecessor}")
    chain, current = [new, old], old
    while (current := _supersedes(conn, current) or "") and current not in chain[1:]:
        chain.append(current)
        if current == new:
            raise SuccessionRefused(
                f"generation {new} cannot supersede {old}: that would be a cycle ({' -> '.join(chain)})"
            )
    return False


class GenerationRegistry(StoreBase):
    """The registered generation manifests of a store (mixed into `SealedStateStore`)."""

    def put_generation(self, generation_id: str, document: str, *, supersedes: str | None = None) -> bool:
        """Register a generation manifest (a JSON document). Idempotent: True if newly
        stored, False if the id already holds this exact document; `DuplicateRecord` if it
        holds a different one.

        ``supersedes``: also record that this generation supersedes that registered one, in the
        same transaction (idempotent too); `SuccessionRefused` stores nothing."""
        require_str("generation_id", generation_id)
        if supersedes is not None:
            require_str("supersedes", supersedes)
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
                    if supersedes is not None and conn.dialect.name == "postgresql":
                        # Two registrations checking chains at once could each close half a cycle.
                        conn.execute(select(func.pg_advisory_xact_lock(_PG_SUCCESSION_LOCK)))
                    existing = conn.execute(
                        select(generations.c.document).where(generations.c.generation_id == generation_id)
                    ).scalar_one_or_none()
                    if existing is None or existing == document:
                        linked = supersedes is None or _check_succession(conn, generation_id, supersedes)
                        now = datetime.now(UTC)
                        if existing is None:
                            conn.execute(
                                insert(generations).values(
                                    generation_id=generation_id, document=document, registered_at=now
                                )
                            )
                        if not linked:
                            conn.execute(
                                insert(generation_successions).values(
                                    old_generation=supersedes, new_generation=generation_id, recorded_at=now
                                )
                            )
                        return existing is None
            except DuplicateRecord:
                continue  # a concurrent registration won the insert; compare with it
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

    def generation_succession(self, generation_id: str) -> tuple[str | None, str | None]:
        """(the generation it supersedes, the generation superseding it), None where none."""
        with self.transaction(f"read of the succession of generation {generation_id}") as conn:
            return _supersedes(conn, generation_id), _superseded_by(conn, generation_id)

    def list_successions(self) -> dict[str, str]:
        """Every recorded succession: superseded generation id -> the generation superseding it."""
        with self.transaction("listing of generation successions") as conn:
            rows = conn.execute(select(_successions.old_generation, _successions.new_generation)).all()
        return {str(old): str(new) for old, new in rows}
