"""What every part of the sealed-state store shares: the opened database, its lock, its
transactions, per-owner schemas and closing. `SealedStateStore` adds the blob operations and
the generation registry on top."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import TracebackType
from typing import Any, Self

from sqlalchemy.engine import Connection

from sealing.store.engine import open_database, translated
from sealing.store.errors import StoreError
from sealing.store.schema import SCHEMA_VERSION, SchemaOwner, apply_migrations, apply_owner_steps

__all__ = ["StoreBase"]


class StoreBase:
    """The database at ``url``, migrated to `SCHEMA_VERSION` on open; see `SealedStateStore`.

    ``create=False`` (for commands that only read): `StoreMissing` instead of creating a store
    that does not exist (an SQLite file, its directory, or rekey's tables in a database)."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self._db = open_database(url, create=create)
        self._lock: AbstractContextManager[Any] = threading.RLock() if self._db.serialize else nullcontext()
        self._closed = False
        try:
            with self._lock:
                self._schema_version = apply_migrations(self._db, SCHEMA_VERSION, create=create)
        except BaseException:
            self._db.engine.dispose()
            raise

    @property
    def schema_version(self) -> int:
        """The database's schema version (always `SCHEMA_VERSION` once opened)."""
        return self._schema_version

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self._db.display

    @property
    def dialect(self) -> str:
        """The database's SQLAlchemy dialect name: ``sqlite`` or ``postgresql``."""
        return self._db.engine.dialect.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._db.display!r})"

    @contextmanager
    def transaction(self, what: str, *, write: bool = False) -> Iterator[Connection]:
        """One transaction on the store's database, as a SQLAlchemy `Connection`; committed when
        the block ends, rolled back if it raises.

        This is the supported way for packages that keep their own tables in the store's
        database (after `apply_schema`) to read and write them with the store's guarantees:
        ``write=True`` starts the transaction with ``BEGIN IMMEDIATE`` on SQLite, so concurrent
        writers queue for the lock instead of failing half-way; database errors raised inside
        become `StoreError` subclasses whose one-line message names ``what`` (e.g. "append of
        audit event rotation.done") and never holds statement parameters; an in-memory database
        is used by one transaction at a time. `StoreError` if the store is closed.
        """
        if self._closed:
            raise StoreError(f"{what}: the store for {self._db.display} is closed")
        engine = self._db.writer if write else self._db.engine
        with self._lock, translated(self._db.display, what), engine.begin() as conn:
            yield conn

    def apply_schema(self, owner: SchemaOwner) -> int:
        """Bring the tables of ``owner`` (a package keeping its own tables in this database) to
        ``owner.version`` and return that version: each pending step runs in its own transaction
        under the lock of the store's own migrations, so concurrent openers apply it once.
        Raises `SchemaTooNew` naming the owner if the database holds a newer version of them."""
        if not isinstance(owner, SchemaOwner):
            raise TypeError(f"owner must be a SchemaOwner, got {type(owner).__name__}")
        if self._closed:
            raise StoreError(f"schema migration of {owner.name}: the store for {self._db.display} is closed")
        with self._lock:
            return apply_owner_steps(self._db, owner)

    def close(self) -> None:
        """Release all connections. Further calls raise `StoreError`."""
        self._closed = True
        self._db.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
