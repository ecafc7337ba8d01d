"""The sealed-state store: sealed blobs and generation manifests in SQLite or PostgreSQL.

Each sealed blob is one row of ``sealed_blobs``: who owns it (``namespace``, ``name``),
which KMS key wraps its data key (``key_ref``, ``key_version``), which rotation
generation last wrote it, the sealed bytes themselves, and a ``row_version`` counter.
Every update is a compare-and-swap on ``row_version`` (see `sealing.store.blobs`), so a
re-wrap sweep never overwrites a workload's fresh write.

The package is split by concern:

* `errors`: `StoreError` and its subclasses, one-line messages. No SQLAlchemy exception
  leaves a public method, no message contains sealed bytes (statement parameters are also
  hidden from SQLAlchemy's own error text), and the database is named without password.
* `records`: the frozen dataclasses and named tuples the store takes and returns (SQLAlchemy
  Core, not the ORM: records carry no session state).
* `engine`: engine and dialect set-up (SQLite: WAL, busy timeout, ``BEGIN IMMEDIATE`` for
  writes) and the translation of database errors.
* `schema`: the current tables, the versioned migrations (`MIGRATIONS`, `migrate`), and
  `SchemaOwner`: the migrations of packages above the store that keep their own tables here.
* `base`: the opened database, `SealedStateStore.transaction` (the public transaction API for
  those packages) and `SealedStateStore.apply_schema`.
* `blobs`, `failures`, `generations`, `agents`: the blob operations (including the sweep's
  driver-level statements), the re-wrap failures, the generation registry (with which
  generation supersedes which, schema version 9) and the fleet
  registry of enclave agents (schema version 6; who may take a registration over is in
  `sealing.store.agents`), combined into `SealedStateStore` by `store`.

Every blob a re-wrap sweep fails is a row of ``rewrap_failures`` (schema version 5), keyed by
(``key_ref``, ``target_version``, ``blob_id``): a one-line ``reason`` of at most
`MAX_REASON_CHARS` characters (the error's class name and a message without secrets),
``attempts`` (sweep passes that failed it), ``first_seen`` and ``last_seen``.
`SealedStateStore.record_rewrap_failures` upserts them; `rewrap_failures` (paged by blob id)
and `count_rewrap_failures` show only blobs still of that key and below the target version (a
blob re-wrapped or deleted since drops out); `clear_rewrap_failures` forgets one key version's.

`SealedStateStore.census` counts, in one grouped statement, the blobs each KMS key version
still wraps and each generation holds (``tee`` blobs under their generation only): what
``rekey key show`` and ``rekey generation list`` print, and what a census metric reuses.

Timestamps are timezone-aware UTC datetimes with microsecond precision: ``timestamptz`` on
PostgreSQL, naive UTC text on SQLite; both come back as aware UTC.
"""

from sealing.store.agents import MAX_ENDPOINT_CHARS, MAX_REFRESH_SECONDS, check_endpoint
from sealing.store.blobs import MAX_PAGE
from sealing.store.engine import POSTGRES_CONNECT_TIMEOUT_S, SQLITE_BUSY_TIMEOUT_S
from sealing.store.errors import (
    AgentConflict,
    AgentSuperseded,
    DuplicateRecord,
    InvalidStoreURL,
    RecordNotFound,
    SchemaTooNew,
    StaleRecord,
    StoreError,
    StoreMissing,
    StoreUnavailable,
    SuccessionRefused,
)
from sealing.store.failures import MAX_REASON_CHARS
from sealing.store.migrations import MigrationClaim, ReleaseRecord
from sealing.store.records import (
    STALE_AFTER_REFRESHES,
    AgentRecord,
    BlobCensus,
    BlobHandover,
    BlobRecord,
    BlobSummary,
    NewBlob,
    Page,
    RewrapFailure,
    SlotSplice,
    SweepRow,
)
from sealing.store.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    MigrationStep,
    SchemaOwner,
    UTCDateTime,
    agents,
    generation_successions,
    generations,
    metadata,
    migrate,
    rekey_schema,
    rewrap_failures,
    schema_owners,
    sealed_blobs,
)
from sealing.store.store import SealedStateStore

__all__ = [
    "MAX_ENDPOINT_CHARS",
    "MAX_PAGE",
    "MAX_REASON_CHARS",
    "MAX_REFRESH_SECONDS",
    "MIGRATIONS",
    "POSTGRES_CONNECT_TIMEOUT_S",
    "SCHEMA_VERSION",
    "SQLITE_BUSY_TIMEOUT_S",
    "STALE_AFTER_REFRESHES",
    "AgentConflict",
    "AgentRecord",
    "AgentSuperseded",
    "BlobCensus",
    "BlobHandover",
    "BlobRecord",
    "BlobSummary",
    "DuplicateRecord",
    "InvalidStoreURL",
    "MigrationClaim",
    "MigrationStep",
    "NewBlob",
    "Page",
    "RecordNotFound",
    "ReleaseRecord",
    "RewrapFailure",
    "SchemaOwner",
    "SchemaTooNew",
    "SealedStateStore",
    "SlotSplice",
    "StaleRecord",
    "StoreError",
    "StoreMissing",
    "StoreUnavailable",
    "SuccessionRefused",
    "SweepRow",
    "UTCDateTime",
    "agents",
    "check_endpoint",
    "generation_successions",
    "generations",
    "metadata",
    "migrate",
    "rekey_schema",
    "rewrap_failures",
    "schema_owners",
    "sealed_blobs",
]
