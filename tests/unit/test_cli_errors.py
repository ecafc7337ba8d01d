"""The one ``error:`` line: what the CLI prints for a bad input, whatever the input holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from rekey.cli.output import printable
from tests.fixtures.cli import run_cli

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REKEY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def rekey(capsys: pytest.CaptureFixture[str], home: Path) -> Run:
    """``rekey(*args)`` -> (exit code, stdout, stderr), in ``home``."""
    return lambda *args: run_cli(capsys, *args)


def test_control_characters_in_a_message_are_escaped() -> None:
    assert printable("plain text") == "plain text"
    assert printable("a\nb\x1b[31m\x1e") == "a\\nb\\x1b[31m\\x1e"


def test_a_hostile_path_stays_on_the_error_line(rekey: Run) -> None:
    code, _, err = rekey("generation", "register", "\x1e\x1b[2J")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "\x1b" not in err and "\x1e" not in err


def test_a_missing_choice_option_is_one_line(rekey: Run, tmp_path: Path) -> None:
    (tmp_path / "evidence").write_bytes(b"x")
    code, _, err = rekey("attest", "verify", str(tmp_path / "evidence"))
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("error: Missing option '--platform'. Choose from:") and "sim" in err


def test_a_store_url_that_is_no_url_names_the_setting(rekey: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    for url in ("garbage", "mysql://127.0.0.1/x"):
        monkeypatch.setenv("REKEY_STORE_URL", url)
        code, _, err = rekey("state", "list")
        assert code == 2, err
        assert err.startswith("error: ") and "(setting store_url / REKEY_STORE_URL)" in err
        assert "internal error" not in err


def test_a_command_that_cannot_reach_temporal_creates_no_codec_keys(
    rekey: Run, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REKEY_TEMPORAL_PORT", "1")
    code, _, err = rekey("rotate", "list")
    assert code == 1 and "cannot reach Temporal" in err
    assert not (home / "codec").exists()


def test_attest_verify_trusts_an_existing_host_and_makes_none(rekey: Run, home: Path, tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    evidence.write_bytes(b"not evidence")
    code, _, err = rekey("attest", "verify", "--platform", "sim", str(evidence))
    assert code == 2 and err.startswith("error: no sim host at ")
    code, _, err = rekey("attest", "verify", "--platform", "sim", "--host-dir", str(evidence), str(evidence))
    assert code == 2 and err.startswith("error: ") and "is not a directory" in err
    assert evidence.read_bytes() == b"not evidence"
    assert not (home / "sim-host").exists()


def test_state_put_refuses_a_bad_key_ref_and_a_missing_store_and_creates_nothing(
    rekey: Run, home: Path, tmp_path: Path
) -> None:
    data = tmp_path / "in"
    data.write_bytes(b"secret")
    put = ("state", "put", "--generation", "g1", "--name", "n", "--in", str(data))
    code, _, err = rekey(*put, "--key", "")
    assert code == 2 and "Invalid value for '--key'" in err
    code, _, err = rekey(*put, "--key", "vault:orders")
    assert code == 2
    assert "generation 'g1' is not registered" in err and "there is no store yet" in err
    assert sorted(p.name for p in home.iterdir()) == []


def test_a_huge_hostile_value_is_not_echoed_whole(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REKEY_HOME", str(tmp_path / "home"))
    huge = "a" * 100_000
    for argv in (
        ("rotate", "status", f"rotate:vault:{huge}"),
        ("rotate", "start", f"vault:{huge}"),
        ("rotate", "pause", "vault:k", "--update-id", huge),
        ("rotate", "start", "vault:k", "--grace", huge),
    ):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, (argv[:2], err[:300])
        assert err.count("\n") == 1 and err.startswith("error: "), err[:300]
        assert len(err) < 2200, (argv[:2], len(err))
