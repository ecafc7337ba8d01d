"""Recovering the audit log after a legitimate restore of the database (or a failover that lost
commits), or a lost signing key (issue 12 review): `AuditLog.reanchor` and the old public keys
kept by `load_or_create_signing_key`. On SQLite and a real PostgreSQL (``store_url``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, delete, func, select

from audit import HEAD_KIND, AuditError, AuditLog, Head, head_subject, load_or_create_signing_key
from audit.log import RESTORED_EVENT, ReanchorRefused
from audit.schema import audit_log
from sealing.signing import FileSigner, key_id_of
from sealing.witness import DirectoryWitness


@pytest.fixture
def signer() -> FileSigner:
    return FileSigner(Ed25519PrivateKey.generate())


@pytest.fixture
def witness(tmp_path: Path, signer: FileSigner) -> DirectoryWitness:
    return DirectoryWitness(tmp_path / "witness", signer)


def restore_to(store_url: str, last: int) -> None:
    """The database comes back from a backup taken when record ``last`` was the newest."""
    engine = create_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(delete(audit_log).where(audit_log.c.seq > last))
    finally:
        engine.dispose()


def count(store_url: str) -> int:
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(audit_log)).scalar_one())
    finally:
        engine.dispose()


def fill(log: AuditLog, n: int) -> list[str]:
    return [log.append("key.version.created", "vault:orders", {"version": i}).hash for i in range(n)]


def head_of(log: AuditLog, witness: DirectoryWitness) -> Head | None:
    return log.head_from(witness)


@pytest.mark.parametrize("regrown", [False, True], ids=["truncated", "rewritten"])
def test_reanchor_after_a_restore(
    store_url: str, witness: DirectoryWitness, signer: FileSigner, regrown: bool
) -> None:
    keys = {signer.key_id: signer.public_key}
    with AuditLog(store_url, signer, witness=witness) as log:
        hashes = fill(log, 4)
        restore_to(store_url, 2)
        last = Head(2, hashes[1], "test")
        if regrown:  # life went on after the restore: records 3 and 4 exist again, differently
            hashes[2:] = fill(log, 2)
            last = Head(4, hashes[3], "test")
        old = head_of(log, witness)
        assert old is not None and old.seq == 4
        bad = log.verify(keys, [old])
        assert not bad.ok and ("truncated" if not regrown else "rewritten") in (bad.reason or "")
        record = log.reanchor(last)
        assert record.event == RESTORED_EVENT and record.seq == last.seq + 1
        assert record.details == {
            "acknowledged": {"seq": last.seq, "hash": last.hash},
            "witness_head": {"seq": 4, "hash": old.hash},
            "witness_state": "rewritten" if regrown else "truncated",
        }
        head = head_of(log, witness)
        assert head is not None and (head.seq, head.hash) == (record.seq, record.hash)
        assert log.verify(keys, [head]).ok
        assert [r.seq for r in log.restores()] == [record.seq]
        fill(log, 1)  # appends publish heads again
        head = head_of(log, witness)
        assert head is not None and head.seq == record.seq + 1 and log.verify(keys, [head]).ok


def test_reanchor_refuses_and_changes_nothing(
    store_url: str, witness: DirectoryWitness, signer: FileSigner, tmp_path: Path
) -> None:
    with AuditLog(store_url, signer, witness=witness) as log:
        hashes = fill(log, 3)
        path = witness.path_of(HEAD_KIND, head_subject(store_url))
        intact = path.read_bytes()
        # The log still holds its head: nothing to re-anchor.
        with pytest.raises(ReanchorRefused, match="still holds its signed head") as caught:
            log.reanchor(Head(3, hashes[2], "test"))
        assert caught.value.exit_code == 2
        restore_to(store_url, 2)
        # Not the last record: an older one, a wrong hash, one that is gone.
        for ack in (Head(1, hashes[0], "t"), Head(2, "0" * 64, "t"), Head(3, hashes[2], "t")):
            with pytest.raises(ReanchorRefused, match="is not the audit log's last record"):
                log.reanchor(ack)
        assert path.read_bytes() == intact and count(store_url) == 2
    with (
        AuditLog(store_url, signer) as no_witness,
        pytest.raises(ReanchorRefused, match="no freshness witness"),
    ):
        no_witness.reanchor(Head(2, hashes[1], "t"))
    read_only = DirectoryWitness(witness.directory, None, {signer.key_id: signer.public_key})
    with AuditLog(store_url, None, witness=read_only) as log, pytest.raises(Exception, match="signing key"):
        log.reanchor(Head(2, hashes[1], "t"))
    assert path.read_bytes() == intact and count(store_url) == 2


def test_reanchor_after_a_lost_signing_key(
    store_url: str, witness: DirectoryWitness, signer: FileSigner
) -> None:
    with AuditLog(store_url, signer, witness=witness) as log:
        hashes = fill(log, 2)
    new = FileSigner(Ed25519PrivateKey.generate())
    new_witness = DirectoryWitness(witness.directory, new)  # the old key is not pinned
    with AuditLog(store_url, new, witness=new_witness) as log:
        with pytest.raises(Exception, match="not pinned"):
            head_of(log, new_witness)
        record = log.reanchor(Head(2, hashes[1], "t"))
        assert record.details["witness_state"] == "unverifiable" and record.details["witness_head"] is None
        head = head_of(log, new_witness)
        assert head is not None and head.seq == 3
        # Old records verify once the old key is pinned (kept by load_or_create_signing_key).
        both = {signer.key_id: signer.public_key, new.key_id: new.public_key}
        assert log.verify(both, [head]).ok
        assert not log.verify({new.key_id: new.public_key}, [head]).ok


def test_a_new_signing_key_keeps_the_old_public_key(tmp_path: Path) -> None:
    audit = tmp_path / "home" / "audit"
    first = load_or_create_signing_key(audit / "ed25519.pem")
    old_id = key_id_of(first.public_key())
    old_pem = (audit / "ed25519.pub.pem").read_bytes()
    (audit / "ed25519.pem").unlink()  # lost (disk, or "rotated" by deleting it)
    second = load_or_create_signing_key(audit / "ed25519.pem")
    assert key_id_of(second.public_key()) != old_id
    assert (audit / f"{old_id}.pub.pem").read_bytes() == old_pem
    assert (audit / "ed25519.pub.pem").read_bytes() != old_pem
    # A kept copy is never overwritten, and loading the same key again keeps nothing new.
    (audit / f"{old_id}.pub.pem").write_bytes(b"operator's note")
    load_or_create_signing_key(audit / "ed25519.pem")
    assert sorted(p.name for p in audit.iterdir()) == sorted(
        ["ed25519.pem", "ed25519.pub.pem", f"{old_id}.pub.pem"]
    )
    assert (audit / f"{old_id}.pub.pem").read_bytes() == b"operator's note"
    # A public key file that is no key is not kept (there is nothing to verify with).
    (audit / "ed25519.pem").unlink()
    (audit / "ed25519.pub.pem").write_bytes(b"garbage")
    load_or_create_signing_key(audit / "ed25519.pem")
    assert len(list(audit.glob("*.pub.pem"))) == 2


def test_a_row_planted_far_ahead_does_not_carry_the_head(
    store_url: str, witness: DirectoryWitness, signer: FileSigner
) -> None:
    keys = {signer.key_id: signer.public_key}
    with AuditLog(store_url, signer, witness=witness) as log:
        fill(log, 3)
        engine = create_engine(store_url)
        try:
            with engine.begin() as conn:
                row = dict(conn.execute(select(audit_log).where(audit_log.c.seq == 3)).one()._mapping)
                conn.execute(audit_log.insert().values(**(row | {"seq": 1 << 30})))
        finally:
            engine.dispose()
        # Appending on top of the planted row is refused, loudly, and nothing is appended: records
        # built on it would never be anchored, so removing them later would leave no trace.
        with pytest.raises(AuditError, match="does not authenticate"):
            fill(log, 1)
        head = head_of(log, witness)
        assert head is not None and head.seq == 3
        assert [r.seq for r in log.records()] == [1, 2, 3, 1 << 30]
        assert not log.verify(keys, [head]).ok
        # Once the planted row is removed, the log is whole again and appends go on.
        restore_to(store_url, 3)
        fill(log, 1)
        head = head_of(log, witness)
        assert head is not None and head.seq == 4 and log.verify(keys, [head]).ok


def test_records_left_unanchored_are_anchored_only_if_they_authenticate(
    store_url: str, witness: DirectoryWitness, signer: FileSigner
) -> None:
    keys = {signer.key_id: signer.public_key}
    with AuditLog(store_url, signer, witness=witness) as log:
        fill(log, 2)
        with AuditLog(store_url, signer) as unanchored:  # an append whose head was never published
            unanchored.append("rotation.started", "vault:orders", {})
        fill(log, 1)  # record 3 authenticates: the head moves over it to 4
        head = head_of(log, witness)
        assert head is not None and head.seq == 4 and log.verify(keys, [head]).ok
        other = FileSigner(Ed25519PrivateKey.generate())
        with AuditLog(store_url, other) as foreign:  # a well-formed record, but not this log's key
            foreign.append("rotation.started", "vault:orders", {})
        with pytest.raises(AuditError, match="record 5 after the signed head"):
            fill(log, 1)
        assert count(store_url) == 5
