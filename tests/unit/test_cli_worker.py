"""``rekey worker`` as a command: what it leaves behind in the process when it returns."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

import rekey.cli.worker
from tests.fixtures.cli import run_cli


def test_the_worker_command_takes_its_log_handler_away_when_it_returns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_worker(*_args: Any, **_kwargs: Any) -> None:
        logging.getLogger("rekey.worker").info("worker stopped")

    monkeypatch.setattr(rekey.cli.worker, "run_worker", no_worker)
    monkeypatch.setenv("REKEY_HOME", str(tmp_path / "home"))
    worker_log = logging.getLogger("rekey.worker")
    before = (list(worker_log.handlers), worker_log.level)
    for _ in range(2):
        code, _out, err = run_cli(capsys, "worker")
        assert code == 0, err
        assert err.count("worker stopped") == 1  # not once more per earlier run
    assert (list(worker_log.handlers), worker_log.level) == before
