"""`rekey rotate` refuses bad input before it connects anywhere: one `error:` line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.cli import run_cli


@pytest.fixture(autouse=True)
def nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REKEY_HOME", str(tmp_path))
    monkeypatch.setenv("REKEY_TEMPORAL_ADDRESS", "127.0.0.1:9")  # nothing listens: a connect would fail


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["approve", "vault:k", "--update-id", "a\nb"], "--update-id must be 1-200 printable characters"),
        (["abort", "vault:k", "--update-id", "x" * 201], "--update-id must be 1-200 printable characters"),
        (["cancel-destroy", "nope:k"], "unknown backend 'nope'"),
        (["list", "--phase", "SOMEWHERE"], "Invalid value for '--phase'"),
        (["list", "--key", "vault:"], "key reference"),
        (["failures", "vault:k", "--limit", "0"], "Invalid value for '--limit'"),
        (["failures", "vault:k", "--version", "0"], "Invalid value for '--version'"),
    ],
)
def test_bad_input_is_refused_before_connecting(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run_cli(capsys, "rotate", *args)
    assert code == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) in (1, 3)  # click usage errors add a usage line
    assert "internal error" not in err and "Traceback" not in err
