"""Signed heads of the audit log (issue 12, finding 6), at the library level: heads published
after appends, verify against heads, P-256 signatures, subjects without credentials."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, delete

from audit import HEAD_KIND, AuditLog, Head, head_subject, parse_head, verify_records
from audit.schema import audit_log
from rekey.config import ConfigError, load_settings
from sealing.signing import FileSigner, PublicKey, key_id_of
from sealing.witness import DirectoryWitness


class P256Signer:
    """A local ECDSA P-256 signer with the semantics of AWS KMS Sign(MessageType=DIGEST)."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    @property
    def public_key(self) -> PublicKey:
        return self._key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    def sign(self, digest: bytes) -> bytes:
        return self._key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def cut(store_url: str, first: int) -> None:
    engine = create_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(delete(audit_log).where(audit_log.c.seq >= first))
    finally:
        engine.dispose()


@pytest.fixture
def signer() -> FileSigner:
    return FileSigner(Ed25519PrivateKey.generate())


def test_every_append_publishes_the_head(tmp_path: Path, signer: FileSigner) -> None:
    witness = DirectoryWitness(tmp_path / "witness", signer)
    with AuditLog(url(tmp_path), signer, witness=witness) as log:
        assert log.head_from(witness) is None
        for i in range(3):
            rec = log.append("key.version.created", "vault:orders", {"version": i})
            assert log.head_from(witness) == Head(rec.seq, rec.hash, "witness")
        report = log.verify({signer.key_id: signer.public_key}, [Head(rec.seq, rec.hash)])
    assert report.ok and report.heads_checked == 1 and report.head == f"3:{rec.hash}"
    point = witness.latest(HEAD_KIND, head_subject(url(tmp_path)))
    assert point is not None and point.order == 3 and point.body == {"hash": rec.hash}


def test_concurrent_appenders_leave_the_head_at_the_last_record(tmp_path: Path, signer: FileSigner) -> None:
    witness = DirectoryWitness(tmp_path / "witness", signer)
    logs = [AuditLog(url(tmp_path), signer, witness=witness) for _ in range(4)]

    def work(log: AuditLog) -> None:
        for i in range(10):
            log.append("phase.changed", "wf-1", {"i": i})

    threads = [threading.Thread(target=work, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    head = logs[0].head_from(witness)
    assert head is not None and head.seq == 40
    assert logs[0].verify({signer.key_id: signer.public_key}, [head]).ok
    for log in logs:
        log.close()


def test_appends_on_a_cut_log_do_not_move_the_head(
    tmp_path: Path, signer: FileSigner, caplog: pytest.LogCaptureFixture
) -> None:
    witness = DirectoryWitness(tmp_path / "witness", signer)
    keys = {signer.key_id: signer.public_key}
    with AuditLog(url(tmp_path), signer, witness=witness) as log:
        for i in range(5):
            log.append("phase.changed", "wf-1", {"i": i})
        head = log.head_from(witness)
        cut(url(tmp_path), 3)
        with caplog.at_level(logging.WARNING, logger="audit.log"):
            for i in range(6):  # re-grown past the old head
                log.append("phase.changed", "wf-1", {"i": 100 + i})
        assert "truncated or rewritten" in caplog.text
        assert log.head_from(witness) == head  # never laundered forward
        report = log.verify(keys, [head] if head else [])
    assert not report.ok and report.problem == "rewritten" and report.first_bad_seq == 5


def test_unwritable_witness_does_not_lose_the_record(
    tmp_path: Path, signer: FileSigner, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "witness").write_text("not a directory")
    witness = DirectoryWitness(tmp_path / "witness", signer)
    with AuditLog(url(tmp_path), signer, witness=witness) as log, caplog.at_level(logging.WARNING):
        rec = log.append("phase.changed", "wf-1", {})
        assert [r.seq for r in log.records()] == [rec.seq]
    assert "not published" in caplog.text


def test_tampered_head_is_not_advanced_over(tmp_path: Path, signer: FileSigner) -> None:
    witness = DirectoryWitness(tmp_path / "witness", signer)
    with AuditLog(url(tmp_path), signer, witness=witness) as log:
        log.append("phase.changed", "wf-1", {})
        path = witness.path_of(HEAD_KIND, log.subject)
        path.write_bytes(path.read_bytes().replace(b'"order":1', b'"order":0'))
        log.append("phase.changed", "wf-1", {})  # appended, head left for verify to refuse
        with pytest.raises(Exception, match="bad signature"):
            log.head_from(witness)


def test_verify_records_against_heads(tmp_path: Path) -> None:
    signer = P256Signer()  # ECDSA P-256 records (as an AWS KMS key signs them) verify too
    with AuditLog(url(tmp_path), signer) as log:
        recs = [log.append("phase.changed", "wf-1", {"i": i}) for i in range(3)]
        stored = list(log.records())
    keys: dict[str, PublicKey] = {signer.key_id: signer.public_key}
    assert verify_records(stored, keys).ok
    assert not verify_records(stored, {}).ok
    truncated = verify_records(stored, keys, [Head(4, "a" * 64, "witness")])
    assert (truncated.problem, truncated.first_bad_seq) == ("truncated", 4)
    assert "the witness head says record 4" in str(truncated.reason)
    empty = verify_records([], keys, [Head(1, recs[0].hash)])
    assert empty.problem == "truncated" and "the log is empty" in str(empty.reason)
    rewritten = verify_records(stored, keys, [Head(2, recs[2].hash, "--head")])
    assert (rewritten.problem, rewritten.first_bad_seq) == ("rewritten", 2)
    # Two heads for one record that disagree: one of them is wrong, never both accepted.
    both = verify_records(stored, keys, [Head(2, recs[1].hash), Head(2, "b" * 64)])
    assert both.problem == "rewritten"
    ok = verify_records(stored, keys, [Head(2, recs[1].hash), Head(3, recs[2].hash)])
    assert ok.ok and ok.heads_checked == 2


def test_parse_head() -> None:
    h = "ab" * 32
    assert parse_head(f"7:{h.upper()}") == Head(7, h, "--head")
    assert str(parse_head(f" 7:{h} ")) == f"7:{h}"
    for bad in ("", "7", f"7;{h}", f":{h}", f"0:{h}", f"+7:{h}", f"7:{h}0", f"7:{h[:-1]}z", f"\u0667:{h}"):
        with pytest.raises(ValueError, match="head"):
            parse_head(bad)


def test_head_subject_carries_no_credentials() -> None:
    subject = head_subject("postgresql+psycopg://rekey:s3cret-pw@db.example:5432/rekey")
    assert subject == "postgresql+psycopg://db.example:5432/rekey"
    assert head_subject("sqlite:////var/lib/rekey/state.db") == "sqlite:////var/lib/rekey/state.db"


def test_signing_key_and_pins_settings(tmp_path: Path) -> None:
    fp = "sha256:" + "ab" * 32
    env = {"REKEY_SIGNING_KEY": "vault:rekey-audit", "REKEY_TRUSTED_KEY_FINGERPRINTS": f"{fp.upper()}, "}
    s = load_settings(tmp_path / "home", environ=env)
    assert s.signing_key == "vault:rekey-audit" and s.trusted_key_fingerprints == (fp,)
    assert load_settings(tmp_path / "home", environ={}).signing_key == "file"
    for bad in ("vault:../sys", "file:/etc/key.pem", "azure:k", "aws:a..b"):
        with pytest.raises(ConfigError, match="signing_key"):
            load_settings(tmp_path / "home", environ={"REKEY_SIGNING_KEY": bad})
    (tmp_path / "home" / "rekey.toml").write_text('signing_key = "aws:alias/rekey-audit"\n')
    assert load_settings(tmp_path / "home", environ={}).signing_key == "aws:alias/rekey-audit"
