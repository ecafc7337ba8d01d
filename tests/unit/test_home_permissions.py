"""Issue 12 finding 10: the home is created 0700, the SQLite state 0600 (with its -wal and -shm
files), and rekey refuses a home that other users can write."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from rekey.config import ConfigError, InsecureHome, load_settings, secure_home
from sealing.store import SealedStateStore
from tests.fixtures.cli import run_cli


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The common default umask (022), under which files and directories are world-readable."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("loose_umask")
def test_a_new_home_is_created_0700(tmp_path: Path) -> None:
    home = tmp_path / "deep" / "home"
    settings = load_settings(home, environ={})
    assert settings.home == home and home.is_dir()
    assert mode(home) == 0o700


@pytest.mark.usefixtures("loose_umask")
def test_the_state_database_and_its_wal_files_are_0600(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = load_settings(home, environ={})
    with SealedStateStore(settings.store_url) as store:
        store.insert(
            namespace="orders",
            name="db-key",
            key_ref="vault:orders",
            key_version=1,
            generation="g1",
            blob=b"x",
        )
        database = home / "state.db"
        sidecars = [home / "state.db-wal", home / "state.db-shm"]
        assert all(path.exists() for path in sidecars)  # WAL mode, a connection is open
        for path in (database, *sidecars):
            assert mode(path) == 0o600, path
    assert mode(home) == 0o700


@pytest.mark.usefixtures("loose_umask")
def test_a_world_readable_database_is_made_private(tmp_path: Path) -> None:
    database = tmp_path / "old" / "state.db"
    database.parent.mkdir()
    with SealedStateStore(f"sqlite:///{database}") as store:
        store.insert(namespace="n", name="k", key_ref="vault:n", key_version=1, generation="g1", blob=b"x")
    for path in database.parent.iterdir():
        path.chmod(0o644)  # as an older rekey left it
    with SealedStateStore(f"sqlite:///{database}") as store:
        assert store.get_by_name("n", "k").name == "k"
        for path in database.parent.iterdir():
            assert mode(path) == 0o600, path


@pytest.mark.parametrize("loose", [0o777, 0o770, 0o722, 0o1777, 0o720])
def test_a_home_others_can_write_is_refused(tmp_path: Path, loose: int) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(loose)
    with pytest.raises(InsecureHome, match="lets other users write it") as refused:
        load_settings(home, environ={})
    assert isinstance(refused.value, ConfigError) and refused.value.exit_code == 2
    assert "\n" not in str(refused.value) and "chmod 700" in str(refused.value)
    assert not (home / "state.db").exists()


@pytest.mark.parametrize("fine", [0o700, 0o750, 0o755, 0o500])
def test_a_home_only_its_owner_can_write_is_accepted(tmp_path: Path, fine: int) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(fine)
    try:
        assert secure_home(home) == home
        assert mode(home) == fine  # an existing home is checked, not changed
    finally:
        home.chmod(0o700)


def test_a_home_that_is_a_file_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        load_settings(home, environ={})


def test_the_cli_refuses_a_world_writable_home_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o777)
    code, _out, err = run_cli(capsys, "--home", str(home), "state", "list")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing the home"), err
    assert not (home / "state.db").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_a_home_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chown(home, 65534, 65534)  # nobody: it could swap the files inside
    with pytest.raises(InsecureHome, match="owned by uid 65534"):
        load_settings(home, environ={})
