"""Recovery from a legitimate restore of the store, and from a lost signing key, through the CLI as
an operator would do it (issue 12 review): before, a restored database wedged the installation
(verify failed forever, restored blobs were StaleBlob forever). Real OpenBao, real SQLite store.
Every refusal is one ``error:`` line, exit 2, and changes nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from rekey.config import Settings
from rekey.worker import open_audit_log
from tests.fixtures.cli import MANIFEST, run_cli
from tests.fixtures.openbao import OpenBao

pytestmark = pytest.mark.integration

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def home(tmp_path: Path, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("REKEY_HOME", str(home))
    monkeypatch.setenv("REKEY_VAULT_ADDR", openbao.addr)
    monkeypatch.setenv("REKEY_VAULT_TOKEN", openbao.token)
    monkeypatch.setenv("COLUMNS", "200")
    for name in (
        "REKEY_STORE_URL",
        "REKEY_WITNESS_DIR",
        "REKEY_SIGNING_KEY",
        "REKEY_TRUSTED_KEY_FINGERPRINTS",
    ):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def rekey(capsys: pytest.CaptureFixture[str]) -> Run:
    return lambda *args: run_cli(capsys, *args)


def one_error(result: tuple[int, str, str], code: int, text: str) -> None:
    got, _out, err = result
    lines = err.strip().splitlines()
    assert got == code, (got, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], err


def snapshot(home: Path) -> dict[str, bytes]:
    """Everything an operator's refused command must leave as it was: the database and the
    witness's checkpoints."""
    files = [home / "state.db", *sorted((home / "witness").rglob("*.json"))]
    return {str(p): p.read_bytes() for p in files}


def audit(home: Path, events: int) -> None:
    with open_audit_log(Settings(home=home), actor="worker@host") as log:
        for i in range(events):
            log.append("key.version.created", "vault:rec", {"version": i})


def last_head(rekey: Run) -> str:
    _code, out, _err = rekey("audit", "verify", "--json")
    report = json.loads(out)
    return f"{report['last_seq']}:{report['last_hash']}"


def test_restore_from_backup_is_recovered_by_the_operator(home: Path, tmp_path: Path, rekey: Run) -> None:
    assert rekey("key", "create", "vault:rec")[0] == 0
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    assert rekey("generation", "register", str(manifest))[0] == 0
    src = tmp_path / "in.bin"

    def put(name: str, data: bytes) -> None:
        src.write_bytes(data)
        args = ("--key", "vault:rec", "--generation", "app-v1", "--name", name, "--in", str(src))
        assert rekey("state", "put", *args)[0] == 0

    def get(name: str) -> tuple[int, bytes]:
        target = tmp_path / f"{name}.out"
        target.unlink(missing_ok=True)
        code = rekey("state", "get", "--name", name, "--out", str(target))[0]
        return code, target.read_bytes() if code == 0 else b""

    put("a", b"a-v1")
    put("b", b"b-v1")
    audit(home, 3)
    shutil.copy(home / "state.db", tmp_path / "backup.db")  # the nightly backup
    put("a", b"a-v2")
    audit(home, 1)
    shutil.copy(tmp_path / "backup.db", home / "state.db")  # the disk died: restore it

    one_error(rekey("state", "get", "--name", "a", "--out", str(tmp_path / "x")), 1, "stale")
    one_error(rekey("audit", "verify"), 1, "truncated")
    head = last_head(rekey)
    assert head.startswith("3:")

    before = snapshot(home)
    one_error(rekey("state", "accept", "--namespace", "default", "--name", "absent"), 2, "no sealed state")
    one_error(rekey("state", "accept", "--namespace", "default"), 2, "--name NAME or --all-in-namespace")
    one_error(rekey("state", "accept", "--namespace", "nobody", "--all-in-namespace"), 2, "no sealed state")
    one_error(rekey("audit", "reanchor", "--acknowledge", "3:nothex"), 2, "SEQ:HASH")
    first = head.replace("3:", "1:")
    one_error(rekey("audit", "reanchor", "--acknowledge", first), 2, "is not the audit log's last record")
    wrong = head[:-1] + ("1" if head.endswith("0") else "0")  # a hash one digit off, never the same
    one_error(rekey("audit", "reanchor", "--acknowledge", wrong), 2, "last record")
    assert snapshot(home) == before

    # The operator acknowledges the restored log, then accepts the restored state.
    code, out, err = rekey("audit", "reanchor", "--acknowledge", head)
    assert code == 0 and "record 4 (audit.restored)" in out and "truncated" in out, err
    code, out, err = rekey("state", "accept", "--namespace", "default", "--all-in-namespace")
    assert code == 0, err
    assert "accepted default/a at version 1 (checkpoint was version 2, stale)" in out
    assert "default/b: already current" in out
    assert get("a") == (0, b"a-v1") and get("b") == (0, b"b-v1")
    code, out, err = rekey("audit", "verify")
    assert code == 0 and "5 records verified" in out and "restored: record 4" in out, (out, err)
    events = [r["event"] for r in json.loads(rekey("audit", "export", "--json")[1])]
    assert events[3:] == ["audit.restored", "state.accepted"]
    # Life goes on: the next put goes above the lost version 2.
    put("a", b"a-v3")
    assert get("a") == (0, b"a-v3")
    assert rekey("audit", "reanchor", "--acknowledge", last_head(rekey))[0] == 2  # nothing to do now


def test_a_lost_signing_key_keeps_the_old_public_key_for_pinning(
    home: Path, rekey: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit(home, 2)
    code, out, _err = rekey("audit", "key", "--json")
    old = json.loads(out)[0]
    (home / "audit" / "ed25519.pem").unlink()  # lost
    code, out, _err = rekey("audit", "key", "--json")
    new = json.loads(out)[0]
    assert code == 0 and new["key_id"] != old["key_id"]
    assert (home / "audit" / f"{old['key_id']}.pub.pem").read_text() == old["public_key_pem"]
    one_error(rekey("audit", "verify"), 1, "not pinned")
    monkeypatch.setenv("REKEY_TRUSTED_KEY_FINGERPRINTS", old["fingerprint"])
    code, out, err = rekey("audit", "verify")
    assert code == 0 and "2 records verified" in out, err
    audit(home, 1)  # signed by the new key, on top of the old one's records
    code, out, err = rekey("audit", "verify")
    assert code == 0 and "3 records verified" in out, err
