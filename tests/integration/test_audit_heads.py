"""Issue 12, finding 6: the audit log can no longer be cut, cut and re-grown, or rewritten under a
planted key without `rekey audit verify` noticing. Every test performs the attack through the
store (and the witness directory) the way someone with write access to them would, then runs
the CLI as an operator would (exit 1, one ``error:`` line). On SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, delete, make_url, select

from audit import AuditLog, head_subject, load_or_create_signing_key
from audit.schema import audit_log
from rekey.config import Settings
from rekey.worker import open_audit_log
from sealing.signing import FileSigner, fingerprint
from sealing.witness import DirectoryWitness
from tests.fixtures.cli import run_cli

Cli = pytest.CaptureFixture[str]


@pytest.fixture
def settings(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("REKEY_STORE_URL", store_url)
    for name in ("REKEY_TRUSTED_KEY_FINGERPRINTS", "REKEY_WITNESS_DIR", "REKEY_SIGNING_KEY"):
        monkeypatch.delenv(name, raising=False)
    return Settings(home=tmp_path / "home", store_url=store_url)


def append(settings: Settings, count: int, start: int = 1) -> None:
    with open_audit_log(settings, actor="alice@host1") as log:
        for i in range(start, start + count):
            log.append("key.version.created", "vault:orders", {"version": i})


def remove(settings: Settings, first: int, last: int | None = None) -> None:
    engine = create_engine(settings.store_url)
    try:
        with engine.begin() as conn:
            where = audit_log.c.seq >= first
            if last is not None:
                where = where & (audit_log.c.seq <= last)
            conn.execute(delete(audit_log).where(where))
    finally:
        engine.dispose()


def hashes(settings: Settings) -> dict[int, str]:
    engine = create_engine(settings.store_url)
    try:
        with engine.begin() as conn:
            return {int(r.seq): str(r.hash) for r in conn.execute(select(audit_log.c.seq, audit_log.c.hash))}
    finally:
        engine.dispose()


def verify(capsys: Cli, settings: Settings, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "--home", str(settings.home), "audit", "verify", *args)


def head_file(settings: Settings) -> Path:
    witness = DirectoryWitness(Path(settings.witness_dir), None)
    return witness.path_of("audit-head", head_subject(settings.store_url))


def assert_refused(result: tuple[int, str, str], *needles: str) -> None:
    code, out, err = result
    assert code == 1, (out, err)
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_verify_prints_the_head_and_accepts_it_back(settings: Settings, capsys: Cli) -> None:
    append(settings, 3)
    code, out, err = verify(capsys, settings)
    assert code == 0, err
    head = f"3:{hashes(settings)[3]}"
    assert out.splitlines() == [
        f"3 records verified (last: record 3, hash {hashes(settings)[3]}); 1 signed head holds",
        f"head: {head}",
    ]
    code, out, err = verify(capsys, settings, "--head", head, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True and doc["head"] == head and doc["witness_head"] == head
    assert doc["heads_checked"] == 2
    password = make_url(settings.store_url).password
    assert not password or str(password) not in head_file(settings).read_text()  # no credentials
    own = FileSigner(load_or_create_signing_key(settings.home / "audit" / "ed25519.pem"))
    assert doc["keys"] == [{"key_id": own.key_id, "fingerprint": fingerprint(own.public_key)}]


def test_a_removing_the_last_records_is_detected(settings: Settings, capsys: Cli) -> None:
    append(settings, 5)
    remove(settings, 4)
    assert_refused(verify(capsys, settings), "truncated", "ends at record 3", "record 5")
    code, out, _ = verify(capsys, settings, "--json")
    assert code == 1 and json.loads(out)["problem"] == "truncated"


def test_b_cut_and_regrown_log_is_detected(settings: Settings, capsys: Cli) -> None:
    append(settings, 5)
    remove(settings, 3)
    append(settings, 1, start=100)  # a legitimate append links onto record 2: a gap-free chain of 3
    assert_refused(verify(capsys, settings), "truncated", "record 5")
    append(settings, 2, start=200)  # grows back to 5 records, all validly signed and chained
    assert_refused(verify(capsys, settings), "rewritten", "record 5")
    append(settings, 3, start=300)  # further appends must not move the head over the cut
    assert_refused(verify(capsys, settings), "rewritten", "record 5")
    code, out, _ = verify(capsys, settings, "--json")
    assert code == 1 and json.loads(out)["problem"] == "rewritten"


def test_c_removing_every_record_is_detected(settings: Settings, capsys: Cli) -> None:
    append(settings, 4)
    remove(settings, 1)
    assert_refused(verify(capsys, settings), "truncated", "the log is empty", "record 4")


def test_d_planted_public_key_does_not_verify_a_rewritten_log(settings: Settings, capsys: Cli) -> None:
    append(settings, 3)
    # The attacker writes their own key beside ours and rewrites the whole log under it.
    attacker = load_or_create_signing_key(settings.home / "audit" / "attacker.pem")
    assert (settings.home / "audit" / "attacker.pub.pem").is_file()
    remove(settings, 1)
    with AuditLog(settings.store_url, attacker, actor="alice@host1") as forged:
        for i in range(3):
            forged.append("key.version.created", "vault:orders", {"version": i})
    assert_refused(
        verify(capsys, settings),
        "record 1 was signed by unknown key",
        fingerprint(attacker.public_key()),
        "not pinned",
    )
    # --public-key still loads keys, but an unpinned one is not trusted either.
    pub = str(settings.home / "audit" / "attacker.pub.pem")
    assert_refused(verify(capsys, settings, "--public-key", pub), "unknown key", "not pinned")
    # Pinned (here on the command line), the key verifies the records: the head still catches it.
    trusted = verify(capsys, settings, "--public-key", pub, "--trust", fingerprint(attacker.public_key()))
    assert_refused(trusted, "rewritten", "record 3")


def test_pinned_second_key_verifies(settings: Settings, capsys: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of (d): a key the operator pinned (an older installation key, say) is trusted."""
    append(settings, 2)
    other = load_or_create_signing_key(settings.home / "audit" / "previous.pem")
    witness = DirectoryWitness(Path(settings.witness_dir), FileSigner(other))
    shutil.rmtree(settings.witness_dir)
    remove(settings, 1)
    with AuditLog(settings.store_url, other, witness=witness) as log:
        log.append("key.version.created", "vault:orders", {"version": 1})
    assert_refused(verify(capsys, settings), "not pinned")
    monkeypatch.setenv("REKEY_TRUSTED_KEY_FINGERPRINTS", fingerprint(other.public_key()))
    code, out, err = verify(capsys, settings)
    assert code == 0, err
    assert out.startswith("1 record verified")


def test_e_head_kept_elsewhere_detects_rewind_of_the_witness(settings: Settings, capsys: Cli) -> None:
    append(settings, 3)
    old_witness = head_file(settings).read_bytes()  # the attacker keeps a copy of an old head
    append(settings, 2, start=4)
    code, out, _ = verify(capsys, settings)
    assert code == 0
    kept = out.splitlines()[-1].removeprefix("head: ")  # the operator keeps this elsewhere
    assert kept == f"5:{hashes(settings)[5]}"
    # Cut the log back to 3 and restore the old (validly signed) head: verify alone is fooled ...
    remove(settings, 4)
    head_file(settings).write_bytes(old_witness)
    code, _, err = verify(capsys, settings)
    assert code == 0, err
    # ... the head kept elsewhere is not.
    assert_refused(verify(capsys, settings, "--head", kept), "truncated", "--head head", "record 5")
    # Re-grown to 5 with legitimate appends (the witness follows): still caught.
    append(settings, 2, start=40)
    assert_refused(verify(capsys, settings, "--head", kept), "rewritten", "record 5")
    assert_refused(verify(capsys, settings, "--head", f"2:{hashes(settings)[2]},{kept}"), "rewritten")


def test_f_tampered_or_forged_head_file_is_refused(settings: Settings, capsys: Cli) -> None:
    append(settings, 3)
    path = head_file(settings)
    doc = json.loads(path.read_text())
    doc["statement"]["order"] = 2
    doc["statement"]["body"]["hash"] = hashes(settings)[2]
    path.write_text(json.dumps(doc))
    assert_refused(verify(capsys, settings), "bad signature")
    # A head signed by a key that is not pinned (the attacker's own) is refused too.
    path.unlink()
    forger = DirectoryWitness(Path(settings.witness_dir), FileSigner(Ed25519PrivateKey.generate()))
    forger.advance("audit-head", head_subject(settings.store_url), 2, {"hash": hashes(settings)[2]})
    assert_refused(verify(capsys, settings), "not pinned")


def test_missing_head_fails_closed(settings: Settings, capsys: Cli) -> None:
    append(settings, 0)  # an empty log: verify no longer creates the store it reads
    code, out, _ = verify(capsys, settings)
    assert (code, out) == (0, "0 records verified\n")  # nothing recorded, nothing to anchor
    append(settings, 2)
    head_file(settings).unlink()
    assert_refused(verify(capsys, settings), "no signed head", "--head")
    code, _, err = verify(capsys, settings, "--head", f"2:{hashes(settings)[2]}")
    assert code == 0, err


@pytest.mark.parametrize(
    "bad",
    [
        "5",
        "x:" + "a" * 64,
        "0:" + "a" * 64,
        "-1:" + "a" * 64,
        "3:" + "a" * 63,
        "3:" + "g" * 64,
        "\uff13:" + "a" * 64,  # a full-width digit is not a record number
    ],
)
def test_bad_head_text_is_a_usage_error(settings: Settings, capsys: Cli, bad: str) -> None:
    code, out, err = verify(capsys, settings, "--head", bad)
    assert (code, out) == (2, "")
    assert err.startswith("error: head ") and err.count("\n") == 1, err


def test_bad_trust_text_is_a_usage_error(settings: Settings, capsys: Cli) -> None:
    code, out, err = verify(capsys, settings, "--trust", "sha256:abc")
    assert (code, out) == (2, "")
    assert err.startswith("error: key fingerprint ") and err.count("\n") == 1, err


def test_audit_key_shows_the_fingerprint_to_pin(settings: Settings, capsys: Cli) -> None:
    code, out, err = run_cli(capsys, "--home", str(settings.home), "audit", "key", "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    own = load_or_create_signing_key(settings.home / "audit" / "ed25519.pem").public_key()
    assert row["fingerprint"] == fingerprint(own) and row["source"] == "file"
    assert "PRIVATE" not in out
    code, out, _ = run_cli(capsys, "--home", str(settings.home), "audit", "key")
    assert code == 0 and fingerprint(own) in out
    pub = str(settings.home / "audit" / "ed25519.pub.pem")
    code, out, _ = run_cli(capsys, "--home", str(settings.home), "audit", "key", "--public-key", pub)
    assert code == 0 and fingerprint(own) in out


def test_head_moves_on_after_a_key_rotation(
    settings: Settings, capsys: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    append(settings, 2)
    old = settings.home / "audit" / "ed25519.pem"
    old_fp = fingerprint(load_or_create_signing_key(old).public_key())
    old.rename(settings.home / "audit" / "previous.pem")  # rotate: a new key file on next use
    (settings.home / "audit" / "ed25519.pub.pem").rename(settings.home / "audit" / "previous.pub.pem")
    monkeypatch.setenv("REKEY_TRUSTED_KEY_FINGERPRINTS", old_fp)
    rotated = Settings(home=settings.home, store_url=settings.store_url, trusted_key_fingerprints=(old_fp,))
    append(rotated, 2, start=3)  # the old head (old key, pinned) is read and moved forward
    code, out, err = verify(capsys, settings)
    assert code == 0, err
    assert out.startswith("4 records verified") and f"head: 4:{hashes(settings)[4]}" in out
    code, out, _ = verify(capsys, settings, "--json")
    assert code == 0 and json.loads(out)["witness_head"] == f"4:{hashes(settings)[4]}"
