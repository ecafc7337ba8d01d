"""Errors of the sealed-state store: every failure leaves a public method as one of these, with a
one-line message that never contains sealed bytes, statement parameters or a password."""

from __future__ import annotations

__all__ = [
    "AgentConflict",
    "AgentSuperseded",
    "DuplicateRecord",
    "InvalidStoreURL",
    "RecordNotFound",
    "SchemaTooNew",
    "StaleRecord",
    "StoreError",
    "StoreMissing",
    "StoreUnavailable",
    "SuccessionRefused",
]


class StoreError(Exception):
    """Base class of every sealed-state store error."""

    exit_code = 1


class RecordNotFound(StoreError):
    """No record with that blob id, name or generation id."""


class DuplicateRecord(StoreError):
    """The blob id or (namespace, name) is taken, or a generation id holds another document."""


class StaleRecord(StoreError):
    """Compare-and-swap lost: the record's row version moved on since it was read."""

    def __init__(self, blob_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"blob {blob_id} was changed concurrently: expected row_version {expected}, "
            f"found {actual}; re-read it and retry"
        )
        self.blob_id = blob_id
        self.expected = expected
        self.actual = actual

    def __reduce__(self) -> tuple[type[StaleRecord], tuple[str, int, int]]:
        return (type(self), (self.blob_id, self.expected, self.actual))


class SchemaTooNew(StoreError):
    """The database was written by a newer rekey whose schema this code does not know: the
    store's own schema, or (``owner`` set) the tables of a package that keeps its own."""

    def __init__(self, found: int, supported: int, owner: str | None = None) -> None:
        of = "" if owner is None else f" of {owner}"
        super().__init__(
            f"database schema version {found}{of} is newer than the newest this rekey knows "
            f"({supported}); upgrade rekey"
        )
        self.found = found
        self.supported = supported
        self.owner = owner

    def __reduce__(self) -> tuple[type[SchemaTooNew], tuple[int, int, str | None]]:
        return (type(self), (self.found, self.supported, self.owner))


class StoreUnavailable(StoreError):
    """The database cannot be reached, or refused the operation (locked, disconnected)."""


class StoreMissing(StoreError):
    """The store was opened to read (``create=False``) but there is none at that URL: no SQLite
    file, or a database without rekey's tables. Nothing was created."""

    exit_code = 2


class InvalidStoreURL(StoreError, ValueError):
    """The store URL is not one the store can use (not a URL, or not SQLite or PostgreSQL).
    Nothing was opened or created."""

    exit_code = 2


class AgentConflict(StoreError):
    """An agent id is registered for another host or generation than the one claiming it: the
    registration is left as it is (remove it first, once that agent is gone)."""

    exit_code = 2


class AgentSuperseded(StoreError):
    """A newer start of the same agent (same id, same host) registered since this process did:
    this process's registration is no longer the agent's; nothing was changed."""


class SuccessionRefused(StoreError):
    """A generation cannot supersede the one named: that one is not registered, is the same
    generation, is already superseded by another, or the succession would make a cycle. Nothing
    was stored."""

    exit_code = 2
