"""The `rekey` CLI end to end against a real OpenBao and a real SQLite store.

Every bad input ends in one line on stderr, a non-zero exit, and no stored change.
"""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.cli import MANIFEST, run_cli
from tests.fixtures.openbao import OpenBao
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.integration


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def home(tmp_path: Path, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("REKEY_HOME", str(home))
    monkeypatch.setenv("REKEY_VAULT_ADDR", openbao.addr)
    monkeypatch.setenv("REKEY_VAULT_TOKEN", openbao.token)
    monkeypatch.setenv("COLUMNS", "200")
    return home


@pytest.fixture
def rekey(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    def run(*args: str) -> Result:
        return Result(*run_cli(capsys, *args))

    return run


def write_manifest(path: Path, **changes: object) -> Path:
    path.write_text(yaml.safe_dump(MANIFEST | changes))
    return path


def assert_one_line_error(result: Result, code: int, text: str) -> None:
    assert result.code == code, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert text in lines[0]
    assert "Traceback" not in result.err


def blob_rows(home: Path) -> list[tuple[object, ...]]:
    db = home / "state.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT blob_id, row_version, blob FROM sealed_blobs ORDER BY name").fetchall()


def test_key_create_and_show(home: Path, rekey: Callable[..., Result]) -> None:
    first = rekey("key", "create", "vault:cli-orders", "--json")
    assert first.code == 0 and first.json()["created"] is True
    again = rekey("key", "create", "vault:cli-orders", "--json")
    assert again.json()["created"] is False
    shown = rekey("key", "show", "vault:cli-orders", "--json").json()
    assert shown["primary_version"] == 1 and shown["rotation_mode"] == "native"
    assert [(v["version"], v["state"], v["primary"]) for v in shown["versions"]] == [(1, "enabled", True)]
    assert shown["versions"][0]["created_at"].startswith("20")
    assert_one_line_error(rekey("key", "show", "vault:absent"), 2, "does not exist")
    assert_one_line_error(rekey("key", "create", "orders"), 2, "backend:name")
    assert_one_line_error(rekey("key", "create", "gcp:orders"), 2, "unknown backend 'gcp'")
    listed = rekey("key", "list", "vault", "--json").json()
    assert "vault:cli-orders" in [row["key_ref"] for row in listed]


def test_generation_register_list_diff(home: Path, tmp_path: Path, rekey: Callable[..., Result]) -> None:
    v1 = write_manifest(tmp_path / "v1.yaml")
    v2 = write_manifest(tmp_path / "v2.yaml", id="app-v2", measurement="33" * 32, svn=3)
    v0 = write_manifest(tmp_path / "v0.yaml", id="app-v0", svn=1, debug=True)
    for path in (v1, v2, v0):
        assert rekey("generation", "register", str(path)).code == 0
    assert "already registered" in rekey("generation", "register", str(v1)).out
    clash = write_manifest(tmp_path / "clash.yaml", svn=9)
    assert_one_line_error(rekey("generation", "register", str(clash)), 1, "app-v1")
    listed = rekey("generation", "list", "--json").json()
    assert sorted(g["id"] for g in listed) == ["app-v0", "app-v1", "app-v2"]
    assert next(g for g in listed if g["id"] == "app-v1")["svn"] == 2

    upgrade = rekey("generation", "diff", "app-v1", "app-v2", "--json")
    assert upgrade.code == 0
    data = upgrade.json()
    assert data["measurement_changed"] and not data["svn_lowered"]
    assert {f["field"] for f in data["fields"] if f["changed"]} == {"measurement", "svn"}

    downgrade = rekey("generation", "diff", "app-v1", "app-v0", "--markdown")
    assert downgrade.code == 4
    assert "SVN lowered 2 -> 1" in downgrade.out and "debug switched on" in downgrade.out
    assert_one_line_error(rekey("generation", "diff", "app-v1", "nope"), 2, "'nope' is not registered")


def test_invalid_manifests(home: Path, tmp_path: Path, rekey: Callable[..., Result]) -> None:
    bad = write_manifest(tmp_path / "bad.yaml", svn="high")
    assert_one_line_error(rekey("generation", "register", str(bad)), 2, "field 'svn'")
    assert_one_line_error(rekey("generation", "register", str(tmp_path / "missing.yaml")), 2, "no such file")
    # A refused register created no store, and a read-only command does not create one either.
    assert_one_line_error(rekey("generation", "list", "--json"), 2, "(setting store_url / REKEY_STORE_URL)")
    assert not (home / "state.db").exists()


def test_state_put_get_list_round_trip(home: Path, tmp_path: Path, rekey: Callable[..., Result]) -> None:
    assert rekey("key", "create", "vault:cli-state").code == 0
    assert rekey("generation", "register", str(write_manifest(tmp_path / "v1.yaml"))).code == 0
    payload = bytes(range(256)) * 64
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    put = rekey(
        "state",
        "put",
        "--key",
        "vault:cli-state",
        "--generation",
        "app-v1",
        "--name",
        "db",
        "--in",
        str(source),
        "--json",
    )
    assert put.code == 0, put.err
    assert put.json()["key_version"] == 1
    target = tmp_path / "out.bin"
    got = rekey("state", "get", "--name", "db", "--out", str(target))
    assert got.code == 0, got.err
    assert target.read_bytes() == payload
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    # An update keeps the blob id and bumps the row version.
    second = b"the second value, never stored in clear"  # long enough not to occur by chance
    source.write_bytes(second)
    assert (
        rekey(
            "state",
            "put",
            "--key",
            "vault:cli-state",
            "--generation",
            "app-v1",
            "--name",
            "db",
            "--in",
            str(source),
        ).code
        == 0
    )
    listed = rekey("state", "list", "--json").json()
    (row,) = blob_rows(home)
    assert listed == [
        {
            "namespace": "default",
            "name": "db",
            "kind": "kms",
            "host": None,
            "key_ref": "vault:cli-state",
            "key_version": 1,
            "generation": "app-v1",
            "sealed_size": len(row[2]),
            "updated_at": listed[0]["updated_at"],
        }
    ]
    assert row[1] == 2
    assert payload not in row[2] and second not in row[2]


def test_state_bad_input_changes_nothing(home: Path, tmp_path: Path, rekey: Callable[..., Result]) -> None:
    assert rekey("key", "create", "vault:cli-bad").code == 0
    assert rekey("generation", "register", str(write_manifest(tmp_path / "v1.yaml"))).code == 0
    source = tmp_path / "in.bin"
    source.write_bytes(b"original")
    assert (
        rekey(
            "state",
            "put",
            "--key",
            "vault:cli-bad",
            "--generation",
            "app-v1",
            "--name",
            "item",
            "--in",
            str(source),
        ).code
        == 0
    )
    before = blob_rows(home)

    def put(*args: str) -> Result:
        return rekey("state", "put", "--name", "item", *args)

    source.write_bytes(b"replacement")
    assert_one_line_error(
        put("--key", "vault:cli-bad", "--generation", "ghost", "--in", str(source)),
        2,
        "not registered",
    )
    assert_one_line_error(
        put("--key", "vault:no-such", "--generation", "app-v1", "--in", str(source)),
        2,
        "does not exist",
    )
    assert_one_line_error(
        put("--key", "vault:cli-bad", "--generation", "app-v1", "--in", str(tmp_path / "nope")),
        2,
        "no such file",
    )
    assert_one_line_error(
        rekey("state", "get", "--name", "absent", "--out", str(tmp_path / "x")), 1, "absent"
    )
    assert blob_rows(home) == before

    # Tamper with one byte of the stored blob's body: a typed one-line error, no output file.
    blob_id, _, blob = before[0]
    tampered = bytearray(blob)
    tampered[-1] ^= 0x01
    with sqlite3.connect(home / "state.db") as conn:
        conn.execute("UPDATE sealed_blobs SET blob = ? WHERE blob_id = ?", (bytes(tampered), blob_id))
    target = tmp_path / "tampered.out"
    assert_one_line_error(
        rekey("state", "get", "--name", "item", "--out", str(target)), 1, "failed authentication"
    )
    assert not target.exists()
    # Truncated blob.
    with sqlite3.connect(home / "state.db") as conn:
        conn.execute("UPDATE sealed_blobs SET blob = ? WHERE blob_id = ?", (bytes(blob)[:40], blob_id))
    assert_one_line_error(rekey("state", "get", "--name", "item", "--out", str(target)), 1, "truncated")


def test_state_get_refuses_a_restored_older_row(
    home: Path, tmp_path: Path, rekey: Callable[..., Result]
) -> None:
    """Issue 12 finding 5 through the CLI: put v1, put v2, put the v1 row back with SQL (as a
    backup restore would): `state get` exits non-zero with one error line and writes nothing.
    The same for a deleted item restored."""
    assert rekey("key", "create", "vault:cli-fresh").code == 0
    assert rekey("generation", "register", str(write_manifest(tmp_path / "v1.yaml"))).code == 0
    source = tmp_path / "in.bin"

    def put(data: bytes) -> None:
        source.write_bytes(data)
        args = ("--key", "vault:cli-fresh", "--generation", "app-v1", "--name", "item", "--in", str(source))
        result = rekey("state", "put", *args)
        assert result.code == 0, result.err

    def restore(row: tuple[object, ...]) -> None:
        with sqlite3.connect(home / "state.db") as conn:
            conn.execute("DELETE FROM sealed_blobs")
            conn.execute(f"INSERT INTO sealed_blobs VALUES ({', '.join('?' * len(row))})", row)  # noqa: S608

    def full_row() -> tuple[object, ...]:
        with sqlite3.connect(home / "state.db") as conn:
            (row,) = conn.execute("SELECT * FROM sealed_blobs").fetchall()
        return tuple(row)

    put(b"OLD-SECRET")
    old_row = full_row()
    put(b"NEW-SECRET")
    target = tmp_path / "out.bin"
    restore(old_row)
    result = rekey("state", "get", "--name", "item", "--out", str(target))
    assert_one_line_error(result, 1, "default/item is stale")
    assert "stored version 1, checkpoint version 2" in result.err
    assert not target.exists() and "OLD-SECRET" not in result.out
    # Deleted, then the last row put back.
    put(b"NEWER-SECRET")
    last_row = full_row()
    deleted = rekey("state", "delete", "--name", "item")
    assert deleted.code == 0, deleted.err
    assert blob_rows(home) == []
    restore(last_row)
    assert_one_line_error(rekey("state", "get", "--name", "item", "--out", str(target)), 1, "deleted blob")
    assert not target.exists()
    assert_one_line_error(rekey("state", "delete", "--name", "absent"), 1, "absent")


def test_unreachable_server_is_one_line(
    home: Path, tmp_path: Path, rekey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REKEY_VAULT_ADDR", f"http://127.0.0.1:{free_port()}")
    assert_one_line_error(rekey("key", "create", "vault:x"), 1, "cannot reach OpenBao/Vault")


def test_bad_settings_file_is_one_line(home: Path, rekey: Callable[..., Result]) -> None:
    home.mkdir(parents=True)
    (home / "rekey.toml").write_text("openbao_port = 'eighty'\n")
    assert_one_line_error(rekey("state", "list"), 2, "openbao_port must be an integer")


def test_usage_errors_exit_2(home: Path, rekey: Callable[..., Result]) -> None:
    result = rekey("state", "put", "--name", "x")
    assert result.code == 2 and "Missing option" in result.err


READ_ONLY = [
    ("state", "list"),
    ("state", "list", "--json"),
    ("state", "get", "--name", "item", "--out", "-"),
    ("state", "delete", "--name", "item"),
    ("state", "accept", "--namespace", "default", "--all-in-namespace"),
    ("generation", "list"),
    ("generation", "diff", "a", "b"),
    ("audit", "verify"),
    ("audit", "export", "--json"),
]


def test_read_only_commands_never_create_a_store(
    home: Path, tmp_path: Path, rekey: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store URL pointing at nothing (a typo, a missing mount): every command that only reads
    says so in one line naming the setting (exit 2) and creates neither the file nor its
    directory; a command that stores something creates it."""
    missing_dir = tmp_path / "nonexistent" / "dir"
    monkeypatch.setenv("REKEY_STORE_URL", f"sqlite:///{missing_dir / 'x.db'}")
    for command in READ_ONLY:
        result = rekey(*command)
        assert_one_line_error(result, 2, f"no store at sqlite:///{missing_dir / 'x.db'}")
        assert "(setting store_url / REKEY_STORE_URL)" in result.err
        assert not (tmp_path / "nonexistent").exists(), command
    assert rekey("generation", "register", str(write_manifest(tmp_path / "v1.yaml"))).code == 0
    assert (missing_dir / "x.db").exists()
    assert rekey("generation", "list", "--json").json()[0]["id"] == "app-v1"
    assert rekey("state", "list").out.strip() == "no sealed state stored"


def test_settings_typos_are_one_line_errors(
    home: Path, rekey: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    home.mkdir(mode=0o700)
    (home / "rekey.toml").write_text('vault_adr = "http://vault.internal:8200"\n')
    assert_one_line_error(
        rekey("state", "list"), 2, "unknown setting 'vault_adr'; did you mean 'vault_addr'?"
    )
    (home / "rekey.toml").unlink()
    monkeypatch.setenv("REKEY_STORE_ULR", "sqlite:////tmp/x.db")
    assert_one_line_error(
        rekey("generation", "list"),
        2,
        "unknown setting variable REKEY_STORE_ULR; did you mean 'REKEY_STORE_URL'?",
    )
    assert not (home / "state.db").exists()


HOSTILE_NAMES = ["a\nb", "x" * 1000, "../etc", "..", ".hidden", "a/b", "", "-x", "[red]x"]


def test_hostile_names_are_refused_and_nothing_is_stored(
    home: Path, tmp_path: Path, rekey: Callable[..., Result]
) -> None:
    assert rekey("key", "create", "vault:cli-names").code == 0
    assert rekey("generation", "register", str(write_manifest(tmp_path / "v1.yaml"))).code == 0
    source = tmp_path / "in.bin"
    source.write_bytes(b"value")
    put = ("state", "put", "--key", "vault:cli-names", "--generation", "app-v1", "--in", str(source))
    assert rekey(*put, "--name", "one").code == 0
    assert rekey(*put, "--name", "two", "--namespace", "other").code == 0
    before = blob_rows(home)
    out = tmp_path / "out.bin"
    for bad in HOSTILE_NAMES:
        for command in (
            (*put, f"--name={bad}"),
            (*put, "--name", "three", f"--namespace={bad}"),
            ("state", "get", f"--name={bad}", "--out", str(out)),
            ("state", "get", "--name", "one", f"--namespace={bad}", "--out", str(out)),
            ("state", "delete", f"--name={bad}"),
            ("state", "list", f"--namespace={bad}"),
            ("state", "accept", f"--namespace={bad}", "--all-in-namespace"),
            ("state", "accept", "--namespace", "default", f"--name={bad}"),
        ):
            result = rekey(*command)
            assert_one_line_error(result, 2, "Invalid value for")
            assert "characters of A-Z a-z 0-9" in result.err, command
    assert_one_line_error(rekey(*put[:5], "a\nb", *put[6:], "--name", "three"), 2, "invalid generation id")
    assert blob_rows(home) == before
    assert not out.exists()
    listing = rekey("state", "list").out.strip().splitlines()
    assert len(listing) == 3 and listing[1].split()[:2] == ["default", "one"], listing
    assert listing[2].split()[:2] == ["other", "two"]


def test_a_row_named_before_names_were_checked_stays_one_table_row(
    home: Path, tmp_path: Path, rekey: Callable[..., Result]
) -> None:
    assert rekey("key", "create", "vault:cli-oldname").code == 0
    assert rekey("generation", "register", str(write_manifest(tmp_path / "v1.yaml"))).code == 0
    source = tmp_path / "in.bin"
    source.write_bytes(b"value")
    put = ("state", "put", "--key", "vault:cli-oldname", "--generation", "app-v1", "--in", str(source))
    assert rekey(*put, "--name", "one").code == 0
    with sqlite3.connect(home / "state.db") as conn:
        conn.execute("UPDATE sealed_blobs SET name = ? WHERE name = 'one'", ("[red]old\nname",))
    listing = rekey("state", "list").out.strip().splitlines()
    assert len(listing) == 2 and "[red]old\\nname" in listing[1], listing
    assert rekey("state", "list", "--json").json()[0]["name"] == "[red]old\nname"
    assert_one_line_error(rekey("state", "get", "--name", "[red]old\nname", "--out", "-"), 2, "Invalid value")
