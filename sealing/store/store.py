"""`SealedStateStore`: the blob operations, the re-wrap failures, the generation registry and the
fleet registry over one database."""

from __future__ import annotations

from sealing.store.agents import AgentRegistry
from sealing.store.blobs import BlobOperations
from sealing.store.failures import RewrapFailures
from sealing.store.generations import GenerationRegistry
from sealing.store.migrations import MigrationCopies

__all__ = ["SealedStateStore"]


class SealedStateStore(BlobOperations, RewrapFailures, GenerationRegistry, AgentRegistry, MigrationCopies):
    """Sealed blobs, the blobs re-wrap sweeps failed, generation manifests and the fleet
    registry of enclave agents, and the old copies a generation migration keeps, in a SQLite
    or PostgreSQL database.

    ``url`` is an SQLAlchemy URL: ``sqlite:///<home>/state.db`` (the parent directory is
    created) or ``postgresql+psycopg://user:pass@host/db``. Opening applies pending schema
    migrations. All methods are synchronous and safe to call from several threads; each
    call is its own transaction. Close the store (or use it as a context manager) to
    release its connections.

    Packages that keep their own tables in the same database describe them as a
    `SchemaOwner`, bring them up to date with `apply_schema` and work in `transaction`.
    """
