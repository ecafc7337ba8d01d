"""`rekey audit verify | export` end to end, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, update

from audit import default_signing_key_path, load_or_create_signing_key
from audit.schema import audit_log
from rekey.config import Settings
from rekey.worker import open_audit_log
from tests.fixtures.cli import run_cli

EVENTS: list[tuple[str, str, dict[str, Any]]] = [
    ("rotation.started", "wf-1", {"key_ref": "vault:orders", "from_version": 1}),
    ("key.version.created", "vault:orders", {"version": 2}),
    ("phase.changed", "wf-1", {"from": "created", "to": "rewrapping"}),
]


def test_cli_verify_and_export(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(home=tmp_path / "home", store_url=store_url)
    monkeypatch.setenv("REKEY_STORE_URL", store_url)

    def audit(*args: str) -> tuple[int, str, str]:
        return run_cli(capsys, "--home", str(settings.home), "audit", *args)

    # No store yet: the read-only commands say so (exit 2, naming the setting) and create none.
    for command in ("verify", "export"):
        code, out, err = audit(command)
        assert (code, out) == (2, ""), err
        assert err.startswith("error: no store at ") and err.count("\n") == 1, err
        assert "(setting store_url / REKEY_STORE_URL)" in err
    code, out, err = audit("verify")
    assert code == 2 and "no store" in err, err  # still none: the refusals created nothing

    with open_audit_log(settings, actor="alice@host1"):
        pass
    code, out, err = audit("verify")
    assert (code, out) == (0, "0 records verified\n"), err

    with open_audit_log(settings, actor="alice@host1") as log:
        written = [log.append(*event) for event in EVENTS]
        log.append("phase.changed", "[bold]wf-1[/bold]", {"to": "done"})
    private_pem = default_signing_key_path(settings.home).read_text()

    code, out, err = audit("verify")
    assert code == 0, err
    assert out.startswith("4 records verified")
    code, out, _ = audit("verify", "--json")
    assert code == 0
    assert json.loads(out)["ok"] is True and json.loads(out)["count"] == 4

    code, out, _ = audit("export", "--json")
    assert code == 0
    exported = json.loads(out)
    assert exported[:3] == [r.to_dict() for r in written]
    code, out, _ = audit("export")
    assert code == 0
    assert "key.version.created" in out and "alice@host1" in out
    assert "[bold]wf-1[/bold]" in out  # database text is never rich markup
    for output in (out, json.dumps(exported)):
        assert private_pem.strip().splitlines()[1] not in output

    engine = create_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(details='{"version":3}'))
    finally:
        engine.dispose()
    code, out, err = audit("verify")
    assert code == 1
    assert err == "error: audit record 2 was changed (hash mismatch)\n"
    assert out == ""
    code, out, _ = audit("verify", "--json")
    assert code == 1
    assert json.loads(out)["first_bad_seq"] == 2

    # Trusting only another key: the first record is from an unknown signer.
    other = tmp_path / "other"
    load_or_create_signing_key(other / "ed25519.pem")
    code, _, err = audit("verify", "--public-key", str(other / "ed25519.pub.pem"))
    assert code == 1
    assert err.startswith("error: audit record 1 was signed by unknown key ")
    code, out, err = audit("verify", "--public-key", str(tmp_path / "missing.pub.pem"))
    assert code == 1
    assert "cannot read the audit public key" in out + err
