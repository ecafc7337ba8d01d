"""``rekey generation register --supersedes OLD [--auto-migrate]``, ``list`` and ``show`` in
process against a SQLite store: every refusal is one error line, exit 2, and stores nothing
(neither the succession nor the new generation); a start that fails keeps the registration."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from tests.fixtures.cli import MANIFEST, run_cli
from tests.fixtures.ports import free_port

V2 = MANIFEST | {"id": "app-v2", "measurement": "33" * 32, "svn": 3}
V3 = MANIFEST | {"id": "app-v3", "measurement": "44" * 32, "svn": 4}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("REKEY_HOME", str(home))
    # Nothing listens there: a migration start cannot reach Temporal.
    monkeypatch.setenv("REKEY_TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("COLUMNS", "200")
    for manifest in (MANIFEST, V2, V3):
        (tmp_path / f"{manifest['id']}.yaml").write_text(yaml.safe_dump(manifest))
    return home


def manifest(home: Path, generation_id: str) -> str:
    return str(home.parent / f"{generation_id}.yaml")


def stored(home: Path) -> str:
    """A digest of the generations and successions stored."""
    with sqlite3.connect(home / "state.db") as conn:
        rows = conn.execute("SELECT generation_id, document FROM generations ORDER BY 1").fetchall()
        rows += conn.execute(
            "SELECT old_generation, new_generation FROM generation_successions ORDER BY 1"
        ).fetchall()
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def refused(capsys: pytest.CaptureFixture[str], home: Path, *args: str, code: int = 2) -> str:
    before = stored(home)
    result, _out, err = run_cli(capsys, "generation", "register", *args)
    lines = err.strip().splitlines()
    assert result == code and len(lines) == 1 and lines[0].startswith("error: "), (result, err)
    assert "Traceback" not in err
    assert stored(home) == before
    return lines[0]


def test_register_supersedes_records_the_succession_and_list_and_show_tell_it(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "generation", "register", manifest(home, "app-v1"))[0] == 0
    code, out, _ = run_cli(
        capsys, "generation", "register", manifest(home, "app-v2"), "--supersedes", "app-v1"
    )
    assert code == 0 and "registered generation app-v2 (sim, svn 3), supersedes app-v1" in out
    code, out, _ = run_cli(
        capsys, "generation", "register", manifest(home, "app-v2"), "--supersedes", "app-v1", "--json"
    )
    assert code == 0 and json.loads(out)["created"] is False and json.loads(out)["supersedes"] == "app-v1"
    listed = {g["id"]: g for g in json.loads(run_cli(capsys, "generation", "list", "--json")[1])}
    assert (listed["app-v1"]["supersedes"], listed["app-v1"]["superseded_by"]) == (None, "app-v2")
    assert (listed["app-v2"]["supersedes"], listed["app-v2"]["superseded_by"]) == ("app-v1", None)
    table = run_cli(capsys, "generation", "list")[1]
    assert "superseded by" in table and any(
        line.split()[0] == "app-v2" and "app-v1" in line.split() for line in table.splitlines()[1:]
    )
    shown = json.loads(run_cli(capsys, "generation", "show", "app-v2", "--json")[1])
    assert shown["svn"] == 3 and shown["supersedes"] == "app-v1" and shown["superseded_by"] is None
    code, out, _ = run_cli(capsys, "generation", "show", "app-v1")
    assert code == 0 and "superseded_by" in out and "app-v2" in out
    code, _, err = run_cli(capsys, "generation", "show", "app-v9")
    assert code == 2 and "'app-v9' is not registered" in err


def test_every_bad_succession_is_refused_with_nothing_stored(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "generation", "register", manifest(home, "app-v1"))[0] == 0
    v2, v3 = manifest(home, "app-v2"), manifest(home, "app-v3")
    assert "app-v9 is not registered" in refused(capsys, home, v2, "--supersedes", "app-v9")
    assert "app-v1 cannot supersede itself" in refused(
        capsys, home, manifest(home, "app-v1"), "--supersedes", "app-v1"
    )
    assert "app-v2 cannot supersede itself" in refused(capsys, home, v2, "--supersedes", "app-v2")
    assert run_cli(capsys, "generation", "register", v2, "--supersedes", "app-v1")[0] == 0
    assert "app-v1 is already superseded by app-v2" in refused(capsys, home, v3, "--supersedes", "app-v1")
    assert run_cli(capsys, "generation", "register", v3, "--supersedes", "app-v2")[0] == 0
    cycle = refused(capsys, home, manifest(home, "app-v1"), "--supersedes", "app-v3")
    assert "cycle (app-v1 -> app-v3 -> app-v2 -> app-v1)" in cycle
    # Options that make no sense without --auto-migrate (or --supersedes) are refused too.
    assert "--auto-migrate needs --supersedes" in refused(capsys, home, v3, "--auto-migrate")
    assert "--waves, --grace: only with --auto-migrate" in refused(
        capsys, home, v3, "--supersedes", "app-v2", "--waves", "50,100", "--grace", "0s"
    )


def test_bad_migration_options_are_refused_before_anything_is_stored(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "generation", "register", manifest(home, "app-v1"))[0] == 0
    v2 = ("--supersedes", "app-v1", "--auto-migrate")
    for options, message in (
        (("--waves", "10,50"), "--waves must be increasing"),
        (("--grace", "soon"), "--grace 'soon' is not a duration"),
        (("--jitter", "11m"), "--jitter must be at most 10m"),
        (("--jitter", "-1s"), "--jitter"),
    ):
        assert message in refused(capsys, home, manifest(home, "app-v2"), *v2, *options)
    listed = json.loads(run_cli(capsys, "generation", "list", "--json")[1])
    assert [g["id"] for g in listed] == ["app-v1"]


def test_a_failed_start_keeps_the_registration_and_says_so(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "generation", "register", manifest(home, "app-v1"))[0] == 0
    code, out, err = run_cli(
        capsys, "generation", "register", manifest(home, "app-v2"), "--supersedes", "app-v1", "--auto-migrate"
    )
    assert code == 1, err
    assert "registered generation app-v2" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert (
        "generation app-v2 is registered (superseding app-v1), but migrate:app-v1:app-v2 did not start"
        in lines[0]
    )
    assert "cannot reach Temporal" in lines[0]
    assert "rekey migrate start --from app-v1 --to app-v2" in lines[0]
    shown = json.loads(run_cli(capsys, "generation", "show", "app-v2", "--json")[1])
    assert shown["supersedes"] == "app-v1"
    # --json: the registration with the failed migration on stdout, the error line on stderr.
    code, out, err = run_cli(
        capsys,
        "generation",
        "register",
        manifest(home, "app-v2"),
        "--supersedes",
        "app-v1",
        "--auto-migrate",
        "--json",
    )
    answer = json.loads(out)
    assert code == 1 and answer["created"] is False and answer["supersedes"] == "app-v1"
    assert answer["migration"]["id"] == "migrate:app-v1:app-v2" and answer["migration"]["started"] is False
    assert "cannot reach Temporal" in answer["migration"]["error"] and err.startswith("error: ")
