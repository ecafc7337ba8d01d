"""The signed, hash-chained audit log on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import create_engine, delete, select, update
from sqlalchemy.engine import Engine

from audit import (
    GENESIS_HASH,
    AuditError,
    AuditLog,
    AuditRecord,
    canonical_bytes,
    check_details,
    default_signing_key_path,
    format_time,
    key_id_of,
    load_or_create_signing_key,
    public_key_path_for,
    verify_records,
)
from audit.schema import audit_log

EVENTS: list[tuple[str, str, dict[str, Any]]] = [
    ("rotation.started", "wf-1", {"key_ref": "vault:orders", "from_version": 1}),
    ("key.version.created", "vault:orders", {"version": 2}),
    ("phase.changed", "wf-1", {"from": "created", "to": "rewrapping"}),
    ("rewrap.counts", "wf-1", {"rewrapped": 1200, "skipped": 3, "by_version": {"1": 0, "2": 1203}}),
    ("key.version.disabled", "vault:orders", {"version": 1}),
    ("key.version.destroyed", "vault:orders", {"version": 1}),
    ("rotation.done", "wf-1", {"phases": ["created", "rewrapping", "retired"]}),
]


def trusted(*keys: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    return {key_id_of(k.public_key()): k.public_key() for k in keys}


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def log(store_url: str, key: Ed25519PrivateKey) -> Iterator[AuditLog]:
    with AuditLog(store_url, key, actor="alice@host1") as audit:
        yield audit


@pytest.fixture
def raw(store_url: str, log: AuditLog) -> Iterator[Engine]:
    """A plain engine on the same database (after the log created the table), for tampering."""
    engine = create_engine(store_url)
    yield engine
    engine.dispose()


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[str]:
    """URLs of further throw-away SQLite files (an in-memory SQLite store hangs: see report)."""

    def urls() -> Iterator[str]:
        n = 0
        while True:
            n += 1
            yield f"sqlite:///{tmp_path / f'scratch-{n}.db'}"

    return urls()


def fill(log: AuditLog, count: int = len(EVENTS)) -> list[AuditRecord]:
    return [log.append(*EVENTS[i % len(EVENTS)]) for i in range(count)]


def row(raw: Engine, seq: int) -> dict[str, Any]:
    with raw.connect() as conn:
        return dict(conn.execute(select(audit_log).where(audit_log.c.seq == seq)).one()._mapping)


def set_row(raw: Engine, seq: int, /, **values: Any) -> None:
    with raw.begin() as conn:
        assert conn.execute(update(audit_log).where(audit_log.c.seq == seq).values(**values)).rowcount == 1


# ---------------------------------------------------------------------- appending


def test_append_then_read_back_and_verify(log: AuditLog, key: Ed25519PrivateKey, raw: Engine) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    written = fill(log)
    assert [r.seq for r in written] == list(range(1, len(EVENTS) + 1))
    assert list(log.records()) == written

    assert written[0].prev_hash == GENESIS_HASH
    for prev, rec in itertools.pairwise(written):
        assert rec.prev_hash == prev.hash
    pub_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for rec in written:
        assert (rec.actor, rec.key_id) == ("alice@host1", hashlib.sha256(pub_raw).hexdigest()[:16])
        assert rec.recorded_at.tzinfo is UTC and rec.recorded_at.microsecond % 1000 == 0
        assert before <= rec.recorded_at <= datetime.now(UTC)
        assert rec.hash == hashlib.sha256(rec.canonical_bytes()).hexdigest()
        key.public_key().verify(bytes.fromhex(rec.signature), bytes.fromhex(rec.hash))  # raises if bad
    # Stored verbatim: the canonical time text and canonical details JSON.
    stored = row(raw, 4)
    assert stored["recorded_at"] == format_time(written[3].recorded_at)
    assert stored["details"] == '{"by_version":{"1":0,"2":1203},"rewrapped":1200,"skipped":3}'

    report = log.verify(trusted(key))
    assert (report.ok, report.count, report.first_bad_seq, report.reason) == (True, len(EVENTS), None, None)
    assert (report.last_seq, report.last_hash) == (len(EVENTS), written[-1].hash)
    assert log.export() == [r.to_dict() for r in written]

    other = log.append("rotation.aborted", "wf-2", {}, actor="workflow:wf-2")
    assert other.actor == "workflow:wf-2"


def test_empty_log_verifies_with_count_zero(log: AuditLog, key: Ed25519PrivateKey) -> None:
    report = log.verify(trusted(key))
    assert (report.ok, report.count, report.first_bad_seq, report.last_seq) == (True, 0, None, None)
    assert list(log.records()) == []
    assert log.export() == []


def test_canonical_encoding_is_byte_exact_and_matches_the_format_document(
    key: Ed25519PrivateKey, scratch: Iterator[str]
) -> None:
    at = datetime(2025, 1, 2, 4, 4, 5, 678999, tzinfo=timezone(timedelta(hours=1)))  # 03:04:05.678 UTC
    with AuditLog(next(scratch), key, actor="alice@host1", clock=lambda: at) as audit:
        rec = audit.append("key.version.created", "vault:orders", {"to": 2, "from": 1})
    expected = (
        b'{"actor":"alice@host1","details":{"from":1,"to":2},"event":"key.version.created",'
        b'"prev_hash":"0000000000000000000000000000000000000000000000000000000000000000",'
        b'"recorded_at":"2025-01-02T03:04:05.678Z","seq":1,"subject":"vault:orders"}'
    )
    assert rec.canonical_bytes() == expected
    assert rec.hash == "f7a20c2df90d5710fb928cff9aade69b0e76b27c4ea684214d5c798f100da991"
    format_document = Path(__file__).resolve().parents[2] / "docs" / "audit-log-format.md"
    assert rec.hash in format_document.read_text(encoding="utf-8")
    # Escapes and non-ASCII: raw UTF-8, only quote, backslash and control characters escaped.
    doc = canonical_bytes(
        seq=12,
        recorded_at="2025-01-02T03:04:05.000Z",
        actor="jörg@h",
        event="phase.changed",
        subject='a/"b\\',
        details={"z": [True, None, -3], "a": {"y": "\n\x01€"}},
        prev_hash="ab" * 32,
    )
    prev = "ab" * 32
    assert (
        doc
        == (
            '{"actor":"jörg@h","details":{"a":{"y":"\\n\\u0001€"},"z":[true,null,-3]},'
            f'"event":"phase.changed","prev_hash":"{prev}","recorded_at":"2025-01-02T03:04:05.000Z",'
            '"seq":12,"subject":"a/\\"b\\\\"}'
        ).encode()
    )
    with pytest.raises(ValueError, match="naive"):
        format_time(datetime(2025, 1, 1))


def test_details_refuse_key_material_and_non_canonical_values(
    key: Ed25519PrivateKey, scratch: Iterator[str]
) -> None:
    refused: list[tuple[Any, type[Exception], str]] = [
        ({"wrapped": b"\x00\x01"}, TypeError, "bytes"),
        ({"nested": [{"x": bytearray(b"k")}]}, TypeError, "bytes"),
        ({"private_key": "abc"}, ValueError, "looks like a secret"),
        ({"dataKey": "abc"}, ValueError, "looks like a secret"),
        ({"vault_token": "hvs.x"}, ValueError, "looks like a secret"),
        ({"plaintext": "x"}, ValueError, "looks like a secret"),
        ({"note": "-----BEGIN PRIVATE KEY-----\nMC4C"}, ValueError, "PEM"),
        ({"ratio": 0.5}, TypeError, "float"),
        ({"n": 2**60}, ValueError, "2\\*\\*53"),
        ({1: "x"}, TypeError, "non-string member"),
        (["not", "an", "object"], TypeError, "JSON object"),
        ({"x": object()}, TypeError, "JSON values only"),
    ]
    with AuditLog(next(scratch), key) as audit:
        for details, error, message in refused:
            with pytest.raises(error, match=message):
                audit.append("key.version.created", "vault:orders", details)
        for event in ("", "Key.Created", "a b", "x" * 65):
            with pytest.raises(ValueError, match="event"):
                audit.append(event, "vault:orders", {})
        with pytest.raises(ValueError, match="control characters"):
            audit.append("rotation.started", "vault:orders\n[forged] line", {})
        with pytest.raises(ValueError, match="actor"):
            audit.append("rotation.started", "vault:orders", {}, actor="")
        assert list(audit.records()) == []
    assert check_details({"key_version": 2, "key_ref": "vault:orders", "blob_count": 9, "t": (1, 2)}) == {
        "key_version": 2,
        "key_ref": "vault:orders",
        "blob_count": 9,
        "t": [1, 2],
    }
    with AuditLog(next(scratch), None) as read_only, pytest.raises(AuditError, match="without a signing key"):
        read_only.append("rotation.started", "wf-1", {})


def test_concurrent_appends_never_share_a_seq_or_fork_the_chain(
    store_url: str, key: Ed25519PrivateKey, log: AuditLog
) -> None:
    per_thread = 50
    logs = [AuditLog(store_url, key, actor=f"worker-{i}") for i in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(audit: AuditLog, n: int) -> None:
        try:
            barrier.wait(timeout=30)
            for i in range(per_thread):
                audit.append("rewrap.counts", f"wf-{n}", {"batch": i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(audit, n)) for n, audit in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for audit in logs:
        audit.close()
    assert not errors, errors

    records = list(log.records())
    assert [r.seq for r in records] == list(range(1, 2 * per_thread + 1))
    assert sorted(r.actor for r in records) == ["worker-0"] * per_thread + ["worker-1"] * per_thread
    report = log.verify(trusted(key))
    assert (report.ok, report.count) == (True, 2 * per_thread), report


# ---------------------------------------------------------------------- tampering


def test_changed_record_is_named(log: AuditLog, key: Ed25519PrivateKey, raw: Engine) -> None:
    fill(log)
    keys = trusted(key)
    original = row(raw, 3)
    changes: list[tuple[dict[str, Any], str]] = [
        ({"details": '{"from":"created","to":"retired"}'}, "hash mismatch"),
        ({"event": "phase.skipped"}, "hash mismatch"),
        ({"recorded_at": "2020-01-01T00:00:00.000Z"}, "hash mismatch"),
        ({"actor": "mallory@host9"}, "hash mismatch"),
        ({"subject": "vault:payments"}, "hash mismatch"),
        ({"recorded_at": "2020-01-01 00:00:00"}, "recorded_at is not a canonical UTC time"),
        ({"details": "{not json"}, "details are not valid JSON"),
        ({"details": "[1, 2]"}, "details are not a JSON object"),
        ({"details": '{"to": "rewrapping", "from": "created"}'}, "details are not in canonical form"),
    ]
    for values, why in changes:
        set_row(raw, 3, **values)
        report = log.verify(keys)
        assert (report.ok, report.first_bad_seq, report.problem) == (False, 3, "changed"), values
        assert report.reason == f"audit record 3 was changed ({why})"
        assert (report.count, report.last_seq) == (2, 2)
        set_row(raw, 3, **original)
        assert log.verify(keys).ok
    # export still shows a tampered row exactly as stored (forensics), records() refuses it
    set_row(raw, 3, details="{not json")
    assert log.export()[2]["details"] == "{not json"
    with pytest.raises(AuditError, match="audit record 3 is unreadable"):
        list(log.records())


def test_removed_records_are_named(log: AuditLog, key: Ed25519PrivateKey, raw: Engine) -> None:
    written = fill(log)
    keys = trusted(key)
    with raw.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == 4))
    report = log.verify(keys)
    assert (report.ok, report.first_bad_seq, report.problem, report.count) == (False, 4, "removed", 3)
    assert report.reason == "audit record 4 was removed (seq jumps from 3 to 5)"

    # Renumbering the rest to close the gap is caught too: record 5 was signed as record 5.
    with raw.begin() as conn:
        for seq in range(5, len(written) + 1):
            conn.execute(update(audit_log).where(audit_log.c.seq == seq).values(seq=seq - 1))
    report = log.verify(keys)
    assert (report.first_bad_seq, report.problem) == (4, "reordered")
    assert report.reason == "audit record 4 was moved (reordered): it was signed as record 5"

    with raw.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq <= 2))
    report = log.verify(keys)
    assert (report.first_bad_seq, report.count, report.last_seq, report.last_hash) == (1, 0, None, None)
    assert report.reason == "audit records 1-2 were removed (the log starts at record 3)"


def test_removed_last_record_shows_only_in_the_reported_head(
    log: AuditLog, key: Ed25519PrivateKey, raw: Engine
) -> None:
    written = fill(log)
    with raw.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == len(written)))
    report = log.verify(trusted(key))
    # The chain cannot see truncation; the head it reports differs from the one kept elsewhere.
    assert report.ok
    assert (report.last_seq, report.last_hash) == (len(written) - 1, written[-2].hash)


def test_swapped_records_are_named(log: AuditLog, key: Ed25519PrivateKey, raw: Engine) -> None:
    fill(log)
    with raw.begin() as conn:
        for old, new in ((3, -3), (4, 3), (-3, 4)):
            conn.execute(update(audit_log).where(audit_log.c.seq == old).values(seq=new))
    report = log.verify(trusted(key))
    assert (report.ok, report.first_bad_seq, report.problem, report.count) == (False, 3, "reordered", 2)
    assert report.reason == "audit record 3 was moved (reordered): it was signed as record 4"


def test_replaced_record_with_a_valid_signature_breaks_the_chain(
    log: AuditLog, key: Ed25519PrivateKey, raw: Engine, scratch: Iterator[str]
) -> None:
    fill(log)
    # A correctly signed record 3 from another log (same key): only the chain shows it.
    with AuditLog(next(scratch), key) as elsewhere:
        foreign = [elsewhere.append("rotation.started", "wf-x", {"n": i}) for i in range(3)][-1]
    set_row(raw, 3, **{k: v for k, v in foreign.to_dict().items() if k != "details"}, details='{"n":2}')
    report = log.verify(trusted(key))
    assert (report.first_bad_seq, report.problem) == (3, "chain")
    assert report.reason == (
        "audit record 3 does not follow record 2 (prev_hash mismatch: a record was removed or replaced)"
    )


def test_tampered_signature_is_named(log: AuditLog, key: Ed25519PrivateKey, raw: Engine) -> None:
    written = fill(log)
    keys = trusted(key)
    sig = written[1].signature
    for bad in (sig[:10] + ("0" if sig[10] != "0" else "1") + sig[11:], "zz", ""):
        set_row(raw, 2, signature=bad)
        report = log.verify(keys)
        assert (report.first_bad_seq, report.problem, report.count) == (2, "signature", 1)
        assert report.reason == "audit record 2 has a bad signature"
    set_row(raw, 2, signature=sig)
    assert log.verify(keys).ok

    # Changing the details and recomputing the hash does not help without the private key.
    rec = written[1]
    forged = AuditRecord(**{**rec.__dict__, "details": {"version": 7}})
    set_row(raw, 2, details='{"version":7}', hash=forged.computed_hash())
    report = log.verify(keys)
    assert (report.first_bad_seq, report.problem) == (2, "signature")


def test_record_signed_by_an_unknown_key_is_named(
    store_url: str, log: AuditLog, key: Ed25519PrivateKey, raw: Engine
) -> None:
    rogue = Ed25519PrivateKey.generate()
    log.append("rotation.started", "wf-1", {})
    log.append("key.version.created", "vault:orders", {"version": 2})
    with AuditLog(store_url, rogue) as other:
        other.append("key.version.destroyed", "vault:orders", {"version": 2})
    log.append("rotation.done", "wf-1", {})

    report = log.verify(trusted(key))
    assert (report.first_bad_seq, report.problem, report.count) == (3, "unknown_key", 2)
    assert report.reason == f"audit record 3 was signed by unknown key {key_id_of(rogue.public_key())}"
    assert log.verify(trusted(key, rogue)).ok

    # A rewritten record re-signed with the attacker's own key is named as well.
    rec = list(log.records())[1]
    forged = AuditRecord(**{**rec.__dict__, "details": {"version": 9}})
    digest = forged.computed_hash()
    set_row(
        raw,
        2,
        details='{"version":9}',
        hash=digest,
        signature=rogue.sign(bytes.fromhex(digest)).hex(),
        key_id=key_id_of(rogue.public_key()),
    )
    report = log.verify(trusted(key))
    assert (report.first_bad_seq, report.problem) == (2, "unknown_key")


def test_export_verifies_offline(log: AuditLog, key: Ed25519PrivateKey) -> None:
    fill(log)
    exported = json.loads(json.dumps(log.export()))
    records = [AuditRecord.from_dict(item) for item in exported]
    assert verify_records(records, trusted(key)).count == len(EVENTS)
    exported[5]["details"]["version"] = 2
    report = verify_records([AuditRecord.from_dict(item) for item in exported], trusted(key))
    assert report.reason == "audit record 6 was changed (hash mismatch)"
    with pytest.raises(ValueError, match="recorded_at"):
        AuditRecord.from_dict({**exported[0], "recorded_at": "yesterday"})


# ---------------------------------------------------------------------- keys


def test_signing_key_is_created_once_private_and_with_its_public_key(tmp_path: Path) -> None:
    path = default_signing_key_path(tmp_path / "home")
    assert path == tmp_path / "home" / "audit" / "ed25519.pem"
    first = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()  # PKCS#8
    pub_path = public_key_path_for(path)
    assert pub_path.name == "ed25519.pub.pem"
    pub = serialization.load_pem_public_key(pub_path.read_bytes())
    assert isinstance(pub, Ed25519PublicKey)
    assert key_id_of(pub) == key_id_of(first.public_key())
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left

    pub_path.unlink()
    again = load_or_create_signing_key(path)
    assert key_id_of(again.public_key()) == key_id_of(first.public_key())
    assert pub_path.exists()

    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)  # a private file of ours, only its content is wrong
    with pytest.raises(AuditError, match="cannot load the audit signing key"):
        load_or_create_signing_key(garbage)
    assert garbage.read_bytes() == b"not a key"  # never overwritten
    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ec_path.chmod(0o600)
    with pytest.raises(AuditError, match="not an Ed25519 key"):
        load_or_create_signing_key(ec_path)


def test_concurrent_key_creation_yields_one_key(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "ed25519.pem"
    barrier = threading.Barrier(8)
    ids: list[str] = []

    def create() -> None:
        barrier.wait(timeout=30)
        ids.append(key_id_of(load_or_create_signing_key(path).public_key()))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(ids) == 8 and len(set(ids)) == 1
    assert sorted(os.listdir(path.parent)) == ["ed25519.pem", "ed25519.pub.pem"]
