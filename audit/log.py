"""`AuditLog`: appends signed, hash-chained records to the ``audit_log`` table in the store's
database and reads them back (records, verify, export). After every append commits, the log's
head (``seq``, ``hash``) is published to the freshness witness (`sealing.witness`), outside the
table, as checkpoint ``audit-head`` of `head_subject` (the store URL without credentials).
Records, encoding, heads and concurrency are specified in docs/audit-log-format.md."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Row, func, insert, select
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError

from audit.errors import AuditError
from audit.format import (
    GENESIS_HASH,
    AuditRecord,
    canonical_bytes,
    canonical_json,
    check_details,
    check_event,
    check_text,
    default_actor,
    format_time,
    parse_time,
)
from audit.schema import AUDIT_SCHEMA, audit_log
from audit.verify import Head, UnreadableRecord, VerifyReport, verify_records
from sealing.signing import FileSigner, PublicKey, Signer, verify_digest
from sealing.store import DuplicateRecord, SealedStateStore
from sealing.witness import ResettableWitness, Witness, WitnessError

__all__ = ["HEAD_KIND", "RESTORED_EVENT", "AuditLog", "ReanchorRefused", "head_subject"]

HEAD_KIND: Final = "audit-head"
"""Witness checkpoint kind of the audit log's head: order = ``seq``, body ``{"hash": ...}``."""
RESTORED_EVENT: Final = "audit.restored"
"""The record `AuditLog.reanchor` appends: the operator acknowledged a restored log."""
_log = logging.getLogger(__name__)


class ReanchorRefused(AuditError):
    """`AuditLog.reanchor` refused (the acknowledged head is not the log's last record, the log
    still holds its signed head, no witness that can be reset); nothing was changed."""

    exit_code = 2


_PG_AUDIT_LOCK_KEY: Final = 0x72656B65795F6175  # "rekey_au": advisory lock serialising appends
_BATCH: Final = 500


_MAX_UNANCHORED = 10_000
"""Records an append checks after the signed head before it moves the head over them."""


def _hex_or_empty(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""


def _from_row(row: Row[Any]) -> AuditRecord | UnreadableRecord:
    m = row._mapping
    seq = int(m["seq"])
    texts: dict[str, str] = {}
    for name in (
        "recorded_at",
        "actor",
        "event",
        "subject",
        "details",
        "prev_hash",
        "hash",
        "signature",
        "key_id",
    ):
        value = m[name]
        if not isinstance(value, str):
            return UnreadableRecord(seq, f"{name} is not text")
        texts[name] = value
    try:
        recorded_at = parse_time(texts.pop("recorded_at"))
    except ValueError as exc:
        return UnreadableRecord(seq, str(exc))
    details_text = texts.pop("details")
    try:
        details = json.loads(details_text)
        canonical = canonical_json(details).decode("utf-8")
    except (ValueError, RecursionError, UnicodeEncodeError):
        return UnreadableRecord(seq, "details are not valid JSON")
    if not isinstance(details, dict):
        return UnreadableRecord(seq, "details are not a JSON object")
    if canonical != details_text:
        return UnreadableRecord(seq, "details are not in canonical form")
    return AuditRecord(seq=seq, recorded_at=recorded_at, details=details, **texts)


def _export_row(row: Row[Any]) -> dict[str, Any]:
    """A stored row as exported, kept readable even when tampered with (for forensics)."""
    data = {key: row._mapping[key] for key in audit_log.columns.keys()}  # noqa: SIM118
    with contextlib.suppress(TypeError, ValueError, RecursionError):  # else keep the stored text
        data["details"] = json.loads(data["details"])
    return data


def head_subject(store_url: str) -> str:
    """The witness subject naming the log in ``store_url``: the URL without user name and
    password (never credentials in a checkpoint), e.g. ``postgresql+psycopg://db:5432/rekey``."""
    try:
        url = make_url(store_url)
    except ArgumentError:
        raise AuditError("the store URL cannot be parsed") from None
    bare = URL.create(url.drivername, host=url.host, port=url.port, database=url.database, query=url.query)
    return bare.render_as_string(hide_password=False)


def _read_head(witness: Witness, subject: str) -> Head | None:
    """The witness's head of ``subject``; `WitnessError` if the checkpoint is tampered with."""
    point = witness.latest(HEAD_KIND, subject)
    if point is None:
        return None
    digest = point.body.get("hash")
    if not isinstance(digest, str):
        raise WitnessError(f"the audit head of {subject} has no hash")
    return Head(point.order, digest, "witness")


class AuditLog:
    """The audit log in the store database at ``store_url``. Opening applies the pending
    migrations of the store and of the audit table (`AUDIT_SCHEMA`). ``signing_key`` (a
    `sealing.signing.Signer`, e.g. a KMS key, or an Ed25519 private key) may be None for a
    read-only log (records, verify, export).

    ``witness``: where each append publishes the new head (see the module docstring); None
    publishes nothing (tests, tools). ``actor`` is the default actor of appends (else
    `default_actor`); ``clock`` returns the current aware time (tests). Safe to use from several
    threads and processes at once. ``create=False`` (read-only commands): `StoreMissing` if
    there is no store at ``store_url`` yet, rather than creating one.
    """

    def __init__(
        self,
        store_url: str,
        signing_key: Signer | Ed25519PrivateKey | None,
        *,
        actor: str | None = None,
        clock: Callable[[], datetime] | None = None,
        witness: Witness | None = None,
        create: bool = True,
    ) -> None:
        if isinstance(signing_key, Ed25519PrivateKey):
            signing_key = FileSigner(signing_key)
        if signing_key is not None and not isinstance(signing_key, Signer):
            raise TypeError("signing_key must be a sealing.signing.Signer or an Ed25519 private key")
        self._actor = None if actor is None else check_text("actor", actor)
        self._key: Signer | None = signing_key
        self._key_id = None if signing_key is None else signing_key.key_id
        self._witness = witness
        self._subject = head_subject(store_url)
        self._clock = clock if clock is not None else (lambda: datetime.now(UTC))
        self._store = SealedStateStore(store_url, create=create)
        try:
            self._store.apply_schema(AUDIT_SCHEMA)
        except BaseException:
            self._store.close()
            raise

    @property
    def key_id(self) -> str | None:
        """Key id of the signing key (None when read-only)."""
        return self._key_id

    @property
    def public_key(self) -> PublicKey | None:
        return None if self._key is None else self._key.public_key

    @property
    def subject(self) -> str:
        """The witness subject of this log's heads (`head_subject` of the store URL)."""
        return self._subject

    def head_from(self, witness: Witness) -> Head | None:
        """The latest head ``witness`` holds for this log (None if none); `WitnessError` if its
        checkpoint is tampered with or signed by a key the witness does not trust."""
        return _read_head(witness, self._subject)

    def _anchored(self, witness: Witness, conn: Connection, seq: int) -> bool:
        """Whether the table, about to get record ``seq``, still holds the witness's head: if
        not, the log was cut (and perhaps re-grown) and the head must stay where it is, so
        that verify keeps failing; appending a record on top must not launder the cut."""
        try:
            head = _read_head(witness, self._subject)
        except (WitnessError, ValueError) as exc:
            _log.warning("audit head not published: %s", exc)
            return False
        if head is None:
            return True
        stored = None
        if head.seq < seq:
            stored = conn.execute(select(audit_log.c.hash).where(audit_log.c.seq == head.seq)).scalar()
        if stored != head.hash:
            _log.warning(
                "audit log %s no longer holds its signed head (record %d): it was truncated or rewritten;"
                " the head is not moved (run rekey audit verify)",
                self._subject,
                head.seq,
            )
            return False
        if head.seq < seq - 1:
            self._check_unanchored(conn, head)
        return True

    def _check_unanchored(self, conn: Connection, head: Head) -> None:
        """Records after the signed head (left by appends whose head could not be published)
        are anchored by this append only if each one follows the last, hashes right and is
        signed by this log's key. A row planted after the head (its ``seq`` and content are not
        authenticated until verify) fails that: the append is refused, loudly, rather than
        building records on it that are never anchored and could be removed without a trace."""
        if self._key is None:  # appends only, which need the key
            raise AuditError("this audit log was opened without a signing key; it can only be read")
        trusted = self._key.public_key
        expected, prev = head.seq + 1, head.hash
        rows = conn.execute(
            select(audit_log)
            .where(audit_log.c.seq > head.seq)
            .order_by(audit_log.c.seq)
            .limit(_MAX_UNANCHORED + 1)
        ).all()
        if len(rows) > _MAX_UNANCHORED:
            raise AuditError(
                f"audit log {self._subject} has more than {_MAX_UNANCHORED} records after its signed head"
                f" (record {head.seq}); nothing appended (run rekey audit verify)"
            )
        for row in rows:
            item = _from_row(row)
            good = isinstance(item, AuditRecord) and (
                item.seq == expected
                and item.prev_hash == prev
                and item.computed_hash() == item.hash
                and item.key_id == self._key_id
                and verify_digest(trusted, _hex_or_empty(item.signature), bytes.fromhex(item.hash))
            )
            if not good or not isinstance(item, AuditRecord):
                raise AuditError(
                    f"audit log {self._subject}: record {int(row.seq)} after the signed head (record"
                    f" {head.seq}) does not authenticate (planted, removed or changed); nothing appended"
                    " (run rekey audit verify)"
                )
            expected, prev = item.seq + 1, item.hash

    def _publish(self, witness: Witness, seq: int, digest: str) -> None:
        try:
            witness.advance(HEAD_KIND, self._subject, seq, {"hash": digest})
        except (WitnessError, ValueError, OSError) as exc:
            # The record is committed: failing now would only make the caller append it again.
            # A head that lags is caught up by the next append; one that cannot be written at
            # all shows at verify (no signed head).
            _log.warning("audit record %d appended but its head was not published: %s", seq, exc)

    def __repr__(self) -> str:
        return f"AuditLog({self._store.url!r}, key_id={self._key_id!r})"

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def append(
        self,
        event: str,
        subject: str,
        details: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> AuditRecord:
        """Append one signed record and return it as stored.

        ``details`` must never hold key material or other secrets (see docs/audit-log-format.md);
        bytes values are refused. Raises ValueError/TypeError for bad input, `AuditError` for a
        read-only log, `sealing.store.StoreError` if the database fails, the signer's error if
        the key cannot sign. After the commit the head is published to the witness, unless the
        table no longer holds the witness's head (cut or rewritten: logged as a warning, the head
        stays so that verify fails); a witness that cannot be written is logged, not raised.
        """
        return self._append(event, subject, details, actor, None)

    def reanchor(self, acknowledged: Head, actor: str | None = None) -> AuditRecord:
        """The operator's recovery after a legitimate restore of the database (or a failover
        that lost commits): ``acknowledged`` must be the log's current last record. Appends a
        signed `RESTORED_EVENT` record naming the witness's old head and the acknowledged one,
        then resets the witness head to the new record (`ResettableWitness.reset`), so that
        verify passes again while the record keeps the restore visible. Refused
        (`ReanchorRefused`, nothing changed) if ``acknowledged`` is not the last record, if the
        log still holds its signed head, or without a signing key or a resettable witness."""
        if not isinstance(self._witness, ResettableWitness):
            raise ReanchorRefused("no freshness witness that can be re-anchored is configured")
        return self._append(RESTORED_EVENT, self._subject, None, actor, acknowledged)

    def _restore_details(
        self, witness: Witness, conn: Connection, last: Head | None, ack: Head
    ) -> dict[str, Any]:
        """The details of a `RESTORED_EVENT` record, or `ReanchorRefused` (see `reanchor`)."""
        if last is None or last != Head(ack.seq, ack.hash, last.source):
            actual = "empty" if last is None else f"at record {last.seq}, hash {last.hash}"
            raise ReanchorRefused(
                f"{ack.seq}:{ack.hash} is not the audit log's last record (the log is {actual});"
                " nothing was changed"
            )
        try:
            head = _read_head(witness, self._subject)
            state = "none" if head is None else "behind"
        except (WitnessError, ValueError):
            head, state = None, "unverifiable"
        if head is not None:
            stored = None
            if head.seq <= last.seq:
                stored = conn.execute(select(audit_log.c.hash).where(audit_log.c.seq == head.seq)).scalar()
            if stored == head.hash:
                raise ReanchorRefused(
                    f"the audit log still holds its signed head (record {head.seq}); there is nothing to"
                    " re-anchor (rekey audit verify says what is wrong)"
                )
            state = "truncated" if head.seq > last.seq else "rewritten"
        old = None if head is None else {"seq": head.seq, "hash": head.hash}
        return {
            "acknowledged": {"seq": ack.seq, "hash": ack.hash},
            "witness_head": old,
            "witness_state": state,
        }

    def restores(self) -> list[AuditRecord]:
        """The `RESTORED_EVENT` records (unverified; `verify` checks them with the rest)."""
        query = select(audit_log).where(audit_log.c.event == RESTORED_EVENT).order_by(audit_log.c.seq)
        with self._store.transaction("read of the audit log") as conn:
            rows = conn.execute(query).all()
        return [item for item in map(_from_row, rows) if isinstance(item, AuditRecord)]

    def _append(
        self,
        event: str,
        subject: str,
        details: Mapping[str, Any] | None,
        actor: str | None,
        acknowledged: Head | None,
    ) -> AuditRecord:
        if self._key is None or self._key_id is None:
            raise AuditError("this audit log was opened without a signing key; it can only be read")
        event = check_event(event)
        subject = check_text("subject", subject)
        who = check_text("actor", actor if actor is not None else (self._actor or default_actor()))
        clean = check_details({} if details is None else details)
        details_text = canonical_json(clean).decode("utf-8")
        for _attempt in range(3):
            publish = False
            try:
                # The store's public transaction: BEGIN IMMEDIATE on SQLite, errors mapped onto
                # StoreError, in-memory databases serialised.
                with self._store.transaction(f"append of audit event {event}", write=True) as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(select(func.pg_advisory_xact_lock(_PG_AUDIT_LOCK_KEY)))
                    last = conn.execute(
                        select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
                    ).first()
                    seq = 1 if last is None else int(last.seq) + 1
                    prev_hash = GENESIS_HASH if last is None else str(last.hash)
                    if acknowledged is not None and self._witness is not None:
                        end = None if last is None else Head(int(last.seq), str(last.hash), "table")
                        clean = check_details(self._restore_details(self._witness, conn, end, acknowledged))
                        details_text = canonical_json(clean).decode("utf-8")
                    recorded_at = format_time(self._clock())
                    digest = hashlib.sha256(
                        canonical_bytes(
                            seq=seq,
                            recorded_at=recorded_at,
                            actor=who,
                            event=event,
                            subject=subject,
                            details=clean,
                            prev_hash=prev_hash,
                        )
                    ).digest()
                    publish = acknowledged is not None or (
                        self._witness is not None and self._anchored(self._witness, conn, seq)
                    )
                    signature = self._key.sign(digest).hex()
                    conn.execute(
                        insert(audit_log).values(
                            seq=seq,
                            recorded_at=recorded_at,
                            actor=who,
                            event=event,
                            subject=subject,
                            details=details_text,
                            prev_hash=prev_hash,
                            hash=digest.hex(),
                            signature=signature,
                            key_id=self._key_id,
                        )
                    )
            except DuplicateRecord:
                continue  # cannot happen while appenders take the lock; retry from the new end
            if acknowledged is not None and isinstance(self._witness, ResettableWitness):
                # The record is committed; the head must move to it (a failure here raises: the
                # operator runs reanchor again, acknowledging the new record).
                self._witness.reset(HEAD_KIND, self._subject, seq, {"hash": digest.hex()})
            elif publish and self._witness is not None:
                self._publish(self._witness, seq, digest.hex())
            return AuditRecord(
                seq=seq,
                recorded_at=parse_time(recorded_at),
                actor=who,
                event=event,
                subject=subject,
                details=clean,
                prev_hash=prev_hash,
                hash=digest.hex(),
                signature=signature,
                key_id=self._key_id,
            )
        raise AuditError(f"append of audit event {event} kept conflicting with concurrent appends")

    def _rows(self) -> Iterator[Row[Any]]:
        after = 0
        while True:
            query = select(audit_log).where(audit_log.c.seq > after).order_by(audit_log.c.seq).limit(_BATCH)
            with self._store.transaction("read of the audit log") as conn:
                rows = conn.execute(query).all()
            yield from rows
            if len(rows) < _BATCH:
                return
            after = int(rows[-1].seq)

    def _items(self) -> Iterator[AuditRecord | UnreadableRecord]:
        for row in self._rows():
            yield _from_row(row)

    def records(self) -> Iterator[AuditRecord]:
        """Every record in ``seq`` order, read in batches. Does not verify anything; raises
        `AuditError` on a row that is not even readable as a record."""
        for item in self._items():
            if isinstance(item, UnreadableRecord):
                raise AuditError(
                    f"audit record {item.seq} is unreadable ({item.why}); run rekey audit verify"
                )
            yield item

    def verify(
        self,
        public_keys: Mapping[str, PublicKey],
        heads: Iterable[Head] = (),
        *,
        untrusted: Mapping[str, PublicKey] | None = None,
    ) -> VerifyReport:
        """Check every record in ``seq`` order against ``public_keys`` (key id -> trusted public
        key), report the first bad one, then check ``heads`` (e.g. `head_from` the witness and
        one kept elsewhere): see `audit.verify.verify_records`. An empty log without heads
        verifies with count 0."""
        return verify_records(self._items(), public_keys, heads, untrusted=untrusted)

    def export(self) -> list[dict[str, Any]]:
        """Every stored record as a JSON-ready dict (the `AuditRecord.to_dict` shape), in ``seq``
        order, exactly as stored: no verification, and tampered rows are exported as they are."""
        return [_export_row(row) for row in self._rows()]
