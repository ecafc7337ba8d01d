"""What a generation migration keeps in the store: the old copies of the blobs it handed off.

A hand-off swaps a hardware-sealed blob for the one the new generation's agent resealed, by
compare-and-swap on the row version read before the export, and in the same transaction keeps
the blob it replaced in ``migration_copies`` (with its key ref, key version and generation, and
the row version the swap wrote). So:

* a blob the workload rewrote meanwhile is never overwritten: the swap loses and nothing is
  kept; the caller hands the new value off again;
* a rollback puts a copy back only over the very row the swap wrote (compare-and-swap on
  ``swapped_row_version``). A row rewritten since by the old generation needs nothing (it is
  old-generation state already); one rewritten by the new generation is left as it is and
  reported: the copy would lose that write;
* narrowing deletes the copies.

KMS-wrapped blobs are not bound to a host; a migration gives each host a share of them (a
blob id range, `kms_page`), and keeps the copy of a re-bound one under the host whose share it
is, so the same rollback by host puts both kinds back. ``migration_release_policies`` keeps
the release policy each widened key had before (`record_release_policy`) and the migration's
last change to it (`set_release_progress`).

``migration_claims`` holds the generations of each open migration: `claim_generations` takes
both of a migration's generations in one transaction, or none when another migration holds
either; `release_claims` lets them go (the migration ended, or an operator releases the claim
of one that was terminated).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import delete, func, insert, select, update

from sealing.names import check_generation_id, check_host_id
from sealing.store.base import StoreBase
from sealing.store.blobs import MAX_PAGE, _record
from sealing.store.errors import RecordNotFound
from sealing.store.records import BlobRecord, require_bytes, require_int, require_str
from sealing.store.schema import migration_claims, migration_copies, migration_release_policies, sealed_blobs

__all__ = ["MigrationClaim", "MigrationCopies", "ReleaseRecord", "Restored"]


class ReleaseRecord(NamedTuple):
    before: str  # the key's release policy before the migration widened it
    progress: str | None  # the migration's last change to it (JSON), None before the first


class MigrationClaim(NamedTuple):
    generation: str
    migration_id: str
    run_id: str
    claimed_at: datetime


class Restored(NamedTuple):
    restored: int
    already_old: int
    kept_new: list[str]  # blob ids rewritten by the new generation after their swap
    put_back: list[tuple[str, str, str, bytes]] = []  # noqa: RUF012 # NamedTuple default, never mutated
    """(namespace, name, SHA-256 of the new generation's blob replaced, old copy put back) per
    restored blob: what `sealing.migration.roll_back` points the freshness checkpoint back at."""


def _now() -> datetime:
    return datetime.now(UTC)


def _claim(row: object) -> MigrationClaim:
    data = row._mapping  # type: ignore[attr-defined]
    return MigrationClaim(
        str(data["generation"]), str(data["migration_id"]), str(data["run_id"]), data["claimed_at"]
    )


class MigrationCopies(StoreBase):
    """Hand-off swaps with their old copies (mixed into `SealedStateStore`)."""

    def tee_page(self, *, generation: str, host: str, after: str | None, limit: int) -> list[BlobRecord]:
        """Up to ``limit`` hardware-sealed blobs of ``generation`` bound to ``host``, in blob id
        order after ``after``."""
        check_generation_id(generation)
        check_host_id(host)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be an integer in 1..{MAX_PAGE}, got {limit!r}")
        c = sealed_blobs.c
        query = select(sealed_blobs).where(c.generation == generation, c.kind == "tee", c.host == host)
        if after is not None:
            query = query.where(c.blob_id > require_str("after", after))
        with self.transaction(f"listing of {generation} blobs on {host}") as conn:
            rows = conn.execute(query.order_by(c.blob_id).limit(limit)).all()
        return [_record(row) for row in rows]

    def count_tee_by_host(self, generation: str) -> dict[str, int]:
        """How many hardware-sealed blobs of ``generation`` each host holds."""
        c = sealed_blobs.c
        query = (
            select(c.host, func.count())
            .where(c.generation == check_generation_id(generation), c.kind == "tee")
            .group_by(c.host)
        )
        with self.transaction(f"count of {generation} blobs by host") as conn:
            rows = conn.execute(query).all()
        return {str(host): int(n) for host, n in rows}

    def kms_page(
        self, *, generation: str, lo: str | None, hi: str | None, after: str | None, limit: int
    ) -> list[BlobRecord]:
        """Up to ``limit`` KMS-wrapped blobs of ``generation`` with ``lo <= blob_id < hi`` (None:
        unbounded), in blob id order after ``after``."""
        check_generation_id(generation)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be an integer in 1..{MAX_PAGE}, got {limit!r}")
        c = sealed_blobs.c
        query = select(sealed_blobs).where(c.generation == generation, c.kind == "kms")
        if lo is not None:
            query = query.where(c.blob_id >= require_str("lo", lo))
        if hi is not None:
            query = query.where(c.blob_id < require_str("hi", hi))
        if after is not None:
            query = query.where(c.blob_id > require_str("after", after))
        with self.transaction(f"listing of KMS-wrapped {generation} blobs") as conn:
            rows = conn.execute(query.order_by(c.blob_id).limit(limit)).all()
        return [_record(row) for row in rows]

    def count_kms_in_shares(
        self, generation: str, shares: Sequence[tuple[str, str | None, str | None]]
    ) -> dict[str, int]:
        """How many KMS-wrapped blobs of ``generation`` each (host, lo, hi) share holds."""
        check_generation_id(generation)
        c = sealed_blobs.c
        counts: dict[str, int] = {}
        with self.transaction(f"count of KMS-wrapped {generation} blobs") as conn:
            for host, lo, hi in shares:
                query = select(func.count()).where(c.generation == generation, c.kind == "kms")
                if lo is not None:
                    query = query.where(c.blob_id >= lo)
                if hi is not None:
                    query = query.where(c.blob_id < hi)
                counts[host] = counts.get(host, 0) + int(conn.execute(query).scalar_one())
        return counts

    def kms_keys(self, generation: str) -> list[str]:
        """The key refs that wrap KMS-wrapped blobs of ``generation``."""
        c = sealed_blobs.c
        query = (
            select(c.key_ref)
            .where(c.generation == check_generation_id(generation), c.kind == "kms")
            .group_by(c.key_ref)
            .order_by(c.key_ref)
        )
        with self.transaction(f"keys of KMS-wrapped {generation} blobs") as conn:
            return [str(k) for k in conn.execute(query).scalars().all()]

    def record_release_policy(
        self, migration_id: str, key_ref: str, policy: str, progress: str | None = None
    ) -> str:
        """Record ``policy`` as ``key_ref``'s release policy before ``migration_id`` widened it
        (and ``progress``, the widening, in the same transaction), unless one is recorded
        already; the recorded one (so a retried widening keeps the first). A record without
        progress gets ``progress``."""
        require_str("migration_id", migration_id)
        require_str("key_ref", key_ref)
        require_str("policy", policy)
        r = migration_release_policies.c
        where = (r.migration_id == migration_id, r.key_ref == key_ref)
        with self.transaction(f"release policy of {key_ref} for {migration_id}", write=True) as conn:
            found = conn.execute(select(r.policy, r.progress).where(*where)).first()
            if found is not None:
                if found[1] is None and progress is not None:
                    conn.execute(update(migration_release_policies).where(*where).values(progress=progress))
                return str(found[0])
            conn.execute(
                insert(migration_release_policies).values(
                    migration_id=migration_id,
                    key_ref=key_ref,
                    policy=policy,
                    progress=progress,
                    recorded_at=_now(),
                )
            )
        return policy

    def release_record(self, migration_id: str, key_ref: str) -> ReleaseRecord | None:
        """What ``migration_id`` recorded for ``key_ref``'s release policy, if anything."""
        r = migration_release_policies.c
        query = select(r.policy, r.progress).where(r.migration_id == migration_id, r.key_ref == key_ref)
        with self.transaction(f"release policy of {key_ref} for {migration_id}") as conn:
            row = conn.execute(query).first()
        return None if row is None else ReleaseRecord(str(row[0]), None if row[1] is None else str(row[1]))

    def set_release_progress(self, migration_id: str, key_ref: str, progress: str) -> None:
        """Record ``migration_id``'s latest change to ``key_ref``'s policy (recorded already)."""
        require_str("progress", progress)
        r = migration_release_policies.c
        with self.transaction(f"release policy of {key_ref} for {migration_id}", write=True) as conn:
            result = conn.execute(
                update(migration_release_policies)
                .where(r.migration_id == migration_id, r.key_ref == key_ref)
                .values(progress=progress)
            )
        if result.rowcount != 1:
            raise RecordNotFound(f"no release policy of {key_ref} is recorded for {migration_id}")

    def claim_generations(
        self, migration_id: str, run_id: str, generations: Sequence[str]
    ) -> list[MigrationClaim]:
        """Claim ``generations`` for ``migration_id`` (its run ``run_id``), all in one
        transaction: the claims another migration holds on any of them (nothing is claimed
        then), or [] once all are this migration's (a claim of an earlier run of the same
        migration id is taken over: one workflow id runs once at a time)."""
        require_str("migration_id", migration_id)
        require_str("run_id", run_id)
        wanted = sorted({check_generation_id(g) for g in generations})
        m = migration_claims.c
        with self.transaction(f"claim of {', '.join(wanted)} for {migration_id}", write=True) as conn:
            rows = conn.execute(select(migration_claims).where(m.generation.in_(wanted))).all()
            held = [_claim(row) for row in rows]
            others = [c for c in held if c.migration_id != migration_id]
            if others:
                return others
            mine = {c.generation for c in held}
            if mine:
                conn.execute(
                    update(migration_claims).where(m.generation.in_(sorted(mine))).values(run_id=run_id)
                )
            for generation in wanted:
                if generation not in mine:
                    conn.execute(
                        insert(migration_claims).values(
                            generation=generation, migration_id=migration_id, run_id=run_id, claimed_at=_now()
                        )
                    )
        return []

    def release_claims(self, migration_id: str) -> int:
        """Drop every claim ``migration_id`` holds; how many."""
        m = migration_claims.c
        with self.transaction(f"release of the claims of {migration_id}", write=True) as conn:
            result = conn.execute(delete(migration_claims).where(m.migration_id == migration_id))
        return int(result.rowcount)

    def migration_claims(self) -> list[MigrationClaim]:
        """Every claim, by generation."""
        m = migration_claims.c
        with self.transaction("listing of migration claims") as conn:
            rows = conn.execute(select(migration_claims).order_by(m.generation)).all()
        return [_claim(row) for row in rows]

    def recorded_release_policies(self, migration_id: str) -> dict[str, str]:
        """key ref -> the release policy it had before ``migration_id`` widened it."""
        r = migration_release_policies.c
        query = select(r.key_ref, r.policy).where(r.migration_id == migration_id).order_by(r.key_ref)
        with self.transaction(f"release policies recorded for {migration_id}") as conn:
            return {str(k): str(p) for k, p in conn.execute(query).all()}

    def forget_release_policy(self, migration_id: str, key_ref: str) -> None:
        """Drop the record of ``key_ref``'s policy before ``migration_id`` (it was put back)."""
        r = migration_release_policies.c
        with self.transaction(f"release policy of {key_ref} for {migration_id}", write=True) as conn:
            conn.execute(
                delete(migration_release_policies).where(r.migration_id == migration_id, r.key_ref == key_ref)
            )

    def swap_keeping_copy(
        self,
        migration_id: str,
        old: BlobRecord,
        *,
        blob: bytes,
        generation: str,
        key_version: int,
        copy_host: str | None = None,
    ) -> bool:
        """Replace ``old``'s blob by ``blob`` of ``generation`` if its row is still at
        ``old.row_version``, and keep ``old`` as this migration's copy, in one transaction.
        False (nothing changed) if the row was rewritten or deleted since it was read. A copy
        kept by an earlier swap of the same blob (the workload rewrote it through the old
        generation, and it was handed off again) is replaced by this one."""
        require_str("migration_id", migration_id)
        check_generation_id(generation)
        require_bytes(blob)
        require_int("key_version", key_version, 0)
        c = sealed_blobs.c
        written = old.row_version + 1
        with self.transaction(f"hand-off of blob {old.blob_id}", write=True) as conn:
            result = conn.execute(
                update(sealed_blobs)
                .where(c.blob_id == old.blob_id, c.row_version == old.row_version)
                .values(
                    blob=blob,
                    generation=generation,
                    key_version=key_version,
                    row_version=written,
                    updated_at=_now(),
                )
            )
            if result.rowcount != 1:
                return False
            m = migration_copies.c
            conn.execute(
                delete(migration_copies).where(m.migration_id == migration_id, m.blob_id == old.blob_id)
            )
            conn.execute(
                insert(migration_copies).values(
                    migration_id=migration_id,
                    blob_id=old.blob_id,
                    host=old.host if copy_host is None else check_host_id(copy_host),
                    key_ref=old.key_ref,
                    key_version=old.key_version,
                    generation=old.generation,
                    blob=old.blob,
                    swapped_row_version=written,
                    created_at=_now(),
                )
            )
        return True

    def copies(self, migration_id: str, host: str, limit: int, kind: str | None = None) -> list[str]:
        """Blob ids of up to ``limit`` copies this migration keeps for ``host`` (only of blobs
        of ``kind``, ``tee`` or ``kms``, if given)."""
        m = migration_copies.c
        query = select(m.blob_id).where(m.migration_id == migration_id, m.host == host)
        if kind is not None:
            query = query.join(sealed_blobs, sealed_blobs.c.blob_id == m.blob_id).where(
                sealed_blobs.c.kind == kind
            )
        query = query.order_by(m.blob_id).limit(require_int("limit", limit, 0))
        with self.transaction(f"listing of copies of {migration_id}") as conn:
            return [str(b) for b in conn.execute(query).scalars().all()]

    def count_copies(self, migration_id: str) -> int:
        m = migration_copies.c
        with self.transaction(f"count of copies of {migration_id}") as conn:
            found = conn.execute(select(func.count()).where(m.migration_id == migration_id)).scalar_one()
        return int(found)

    def restore_copies(self, migration_id: str, hosts: Sequence[str]) -> Restored:
        """Put this migration's copies of blobs on ``hosts`` back (see the module) and forget
        them; a copy whose row the new generation rewrote is kept, and reported."""
        m, c = migration_copies.c, sealed_blobs.c
        restored = already_old = 0
        kept: list[str] = []
        put_back: list[tuple[str, str, str, bytes]] = []
        for host in hosts:
            check_host_id(host)
            with self.transaction(f"rollback of {migration_id} on {host}", write=True) as conn:
                rows = conn.execute(
                    select(migration_copies).where(m.migration_id == migration_id, m.host == host)
                ).all()
                for row in rows:
                    copy = row._mapping
                    replaced = conn.execute(
                        select(c.namespace, c.name, c.blob).where(
                            c.blob_id == copy["blob_id"], c.row_version == copy["swapped_row_version"]
                        )
                    ).first()
                    result = conn.execute(
                        update(sealed_blobs)
                        .where(c.blob_id == copy["blob_id"], c.row_version == copy["swapped_row_version"])
                        .values(
                            blob=copy["blob"],
                            generation=copy["generation"],
                            key_ref=copy["key_ref"],
                            key_version=copy["key_version"],
                            row_version=c.row_version + 1,
                            updated_at=_now(),
                        )
                    )
                    if result.rowcount == 1 and replaced is not None:
                        restored += 1
                        namespace, name, new_blob = replaced
                        put_back.append(
                            (
                                str(namespace),
                                str(name),
                                hashlib.sha256(new_blob).hexdigest(),
                                bytes(copy["blob"]),
                            )
                        )
                    else:
                        current = conn.execute(
                            select(c.generation).where(c.blob_id == copy["blob_id"])
                        ).scalar_one_or_none()
                        if current is not None and current != copy["generation"]:
                            kept.append(str(copy["blob_id"]))
                            continue
                        already_old += 1  # rewritten by the old generation, or deleted
                    conn.execute(
                        delete(migration_copies).where(
                            m.migration_id == migration_id, m.blob_id == copy["blob_id"]
                        )
                    )
        return Restored(restored, already_old, kept, put_back)

    def delete_copies(self, migration_id: str) -> int:
        """Forget every copy this migration kept (NARROWING); how many."""
        m = migration_copies.c
        with self.transaction(f"deletion of copies of {migration_id}", write=True) as conn:
            result = conn.execute(delete(migration_copies).where(m.migration_id == migration_id))
        return int(result.rowcount)
