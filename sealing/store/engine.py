"""Engine and dialect set-up of the sealed-state store, and the translation of database errors.

SQLite runs in WAL mode with a busy timeout, and write transactions start with ``BEGIN
IMMEDIATE`` (the SQLAlchemy event recipe for pysqlite), so concurrent writers queue for the
write lock instead of failing with "database is locked" half-way through a transaction. Reads
use a plain ``BEGIN``, and WAL lets them run alongside a writer. Errors become `StoreError`
subclasses whose messages hold neither statement parameters nor the database password.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import psycopg
from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from sealing.store.errors import DuplicateRecord, InvalidStoreURL, StoreError, StoreMissing, StoreUnavailable

__all__ = [
    "POSTGRES_CONNECT_TIMEOUT_S",
    "SQLITE_BUSY_TIMEOUT_S",
    "Database",
    "open_database",
    "translated",
]

SQLITE_BUSY_TIMEOUT_S: Final = 30.0
"""How long an SQLite connection waits for another writer's lock before giving up."""

POSTGRES_CONNECT_TIMEOUT_S: Final = 10
"""Connect timeout for PostgreSQL unless the URL sets ``connect_timeout`` itself."""

_WRITE: Final = "rekey_write"  # execution option: this transaction will write


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control away from the sqlite3 module (it would skip BEGIN for
    # SELECT and DDL); _sqlite_on_begin emits BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        # WAL is persistent, so only the first connection to a new file switches it. That
        # switch needs an exclusive lock and SQLite answers "database is locked" at once,
        # without its busy handler, when another connection is opening the file too.
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
        # An in-memory database stays in journal mode "memory": nothing to switch there.
        while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() not in ("wal", "memory"):
            try:
                cursor.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # A write transaction takes the write lock up front (waiting up to the busy timeout),
    # rather than upgrading a read lock later, which SQLite answers with an immediate
    # "database is locked" when another writer got there first.
    if conn.get_execution_options().get(_WRITE):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


_SQLITE_HEADER: Final = b"SQLite format 3\x00"


def _check_sqlite_file(path: Path, display: str) -> None:
    """For a store opened to read: `StoreMissing` unless ``path`` is an SQLite database, read
    without following a symlink and without changing the file (a read-only command pointed at
    the wrong file by ``store_url`` leaves it as it was)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise StoreMissing(f"no store at {display}: {path} does not exist") from None
    except OSError as exc:
        raise StoreUnavailable(f"cannot read {display}: {exc.strerror}") from exc
    try:
        header = os.read(fd, len(_SQLITE_HEADER))
    except OSError as exc:  # a directory, for one
        raise StoreMissing(f"no store at {display}: {path} is not a file ({exc.strerror})") from None
    finally:
        os.close(fd)
    if not header:  # what sqlite3.connect leaves behind: a database with no tables at all
        raise StoreMissing(f"no store at {display}: {path} is empty (no rekey tables)")
    if header != _SQLITE_HEADER:
        raise StoreMissing(f"no store at {display}: {path} is not an SQLite database")


def _read_only_open(path: Path, display: str) -> Callable[[], sqlite3.Connection]:
    """A connection factory for an existing store: SQLite opens the file with ``mode=rw``, so
    it never creates one that went away after `_check_sqlite_file` found it."""
    uri = f"file:{quote(str(path.resolve()))}?mode=rw"

    def connect() -> sqlite3.Connection:
        try:
            return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=SQLITE_BUSY_TIMEOUT_S)
        except sqlite3.OperationalError:
            if not path.exists():
                raise StoreMissing(f"no store at {display}: {path} does not exist") from None
            raise

    return connect


def _private_database_file(path: Path, display: str, *, create: bool = True) -> None:
    """Create the SQLite file 0600 before SQLite does (it would use the umask, typically 0644),
    and take group and other access away from an existing one and its ``-wal``/``-shm`` files.
    SQLite creates the ``-wal`` and ``-shm`` files with the database file's permissions.
    ``create=False``: only the latter, for a file `_check_sqlite_file` found."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600) if create else None
    except FileExistsError:
        fd = None
    except OSError as exc:
        raise StoreUnavailable(f"cannot create {display}: {exc.strerror}") from exc
    if fd is not None:
        try:
            os.fchmod(fd, 0o600)  # in case a default ACL widened it
        finally:
            os.close(fd)
    for suffix in ("", "-wal", "-shm", "-journal"):
        file = path.with_name(path.name + suffix)
        try:
            info = file.lstat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {display}: {exc.strerror}") from exc
        # Only our own regular files: a symlink's target, or another user's file, is left alone.
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_mode & 0o077:
            try:
                os.chmod(file, 0o600)
            except OSError as exc:
                raise StoreUnavailable(f"cannot make {display} private: {exc.strerror}") from exc


@dataclass(frozen=True)
class Database:
    """An opened database: its engine for reads, the same pool marked for writes, and how to
    name it in messages."""

    engine: Engine
    writer: Engine  # same pool, marks transactions as writes (BEGIN IMMEDIATE on SQLite)
    display: str  # URL without password, for messages
    serialize: bool  # one shared connection (in-memory SQLite): serialise all access


def open_database(url: str, *, create: bool = True) -> Database:
    """An engine on ``url`` (``sqlite://`` or ``postgresql+psycopg://``; plain ``postgresql://``
    means psycopg too). `InvalidStoreURL` (a ValueError) for a URL the store cannot use; connects lazily.

    ``create=False``: `StoreMissing` for an SQLite file that does not exist, and neither the
    file nor its directory is created."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):
        raise InvalidStoreURL("invalid database URL (expected e.g. sqlite:///path/state.db)") from None
    if parsed.drivername == "postgresql":
        # psycopg 3 is the driver rekey ships with; plain postgresql:// means psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
    display = _display_url(parsed)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {"hide_parameters": True}
    serialize = False
    if backend == "sqlite":
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
        if in_memory:
            kwargs["poolclass"] = StaticPool
            serialize = True
        elif not database.startswith("file:"):
            path = Path(database).expanduser()
            if create:
                try:
                    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreUnavailable(
                        f"cannot create the directory for {display}: {exc.strerror}"
                    ) from exc
            else:
                _check_sqlite_file(path, display)
                # mode=rw: SQLite opens the file or fails; it never creates one that went away.
                kwargs["creator"] = _read_only_open(path, display)
            _private_database_file(path, display, create=create)
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S})
    elif backend == "postgresql":
        if "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        kwargs["pool_pre_ping"] = True
    else:
        raise InvalidStoreURL(
            f"unsupported database {display}: the store runs on sqlite:// or postgresql+psycopg://"
        )
    try:
        engine = create_engine(parsed, **kwargs)
    except (sa_exc.SQLAlchemyError, ImportError) as exc:
        raise InvalidStoreURL(f"cannot use database {display}: {type(exc).__name__}") from exc
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    return Database(
        engine=engine,
        writer=engine.execution_options(**{_WRITE: True}),
        display=display,
        serialize=serialize,
    )


def _display_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)  # password shown as ***


def _reason(exc: sa_exc.SQLAlchemyError) -> str:
    """The driver's first line of explanation (never statement parameters)."""
    orig = getattr(exc, "orig", None)
    source: BaseException = orig if isinstance(orig, BaseException) else exc
    lines = str(source).strip().splitlines()
    first = lines[0].strip() if lines else type(source).__name__
    if isinstance(exc, sa_exc.StatementError) and source is exc:
        first = type(exc).__name__  # SQLAlchemy's own text embeds the statement
    return first[:200]


_DRIVER_ERRORS: Final[tuple[type[Exception], ...]] = (sqlite3.Error, psycopg.Error)


@contextmanager
def translated(display: str, what: str) -> Iterator[None]:
    """Map SQLAlchemy exceptions raised inside, and those of statements sent to the driver
    directly, onto `StoreError` subclasses naming ``what`` and the database ``display``."""
    try:
        yield
    except sa_exc.IntegrityError as exc:
        raise DuplicateRecord(f"{what} conflicts with an existing record") from exc
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        raise StoreUnavailable(f"database {display} unavailable ({what}): {_reason(exc)}") from exc
    except sa_exc.DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable(f"database {display} connection lost ({what}): {_reason(exc)}") from exc
        raise StoreError(f"{what} failed in {display}: {_reason(exc)}") from exc
    except sa_exc.SQLAlchemyError as exc:
        raise StoreError(f"{what} failed in {display}: {_reason(exc)}") from exc
    except _DRIVER_ERRORS as exc:  # from the statements a sweep sends to the driver directly
        lines = str(exc).strip().splitlines()
        reason = (lines[0].strip() if lines else type(exc).__name__)[:200]
        if type(exc).__name__ == "IntegrityError":
            raise DuplicateRecord(f"{what} conflicts with an existing record") from exc
        if type(exc).__name__ in ("OperationalError", "InterfaceError"):
            raise StoreUnavailable(f"database {display} unavailable ({what}): {reason}") from exc
        raise StoreError(f"{what} failed in {display}: {reason}") from exc
