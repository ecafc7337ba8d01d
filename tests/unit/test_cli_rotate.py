"""`rekey rotate` refuses bad input before it connects anywhere: one `error:` line, exit 2."""

from __future__ import annotations

import dataclasses
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


def test_the_progress_bar_ends_on_the_final_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last frame a terminal shows is the rotation's result, not the last phase the memo
    published before it (a stale RETIRING above a finished rotation)."""
    import asyncio
    import io
    import re
    from collections.abc import AsyncIterator

    from rich.console import Console

    import rekey.cli.rotate
    from rekey.client.rotations import empty_progress

    start = empty_progress("vault:k", "")
    frames = [
        dataclasses.replace(start, phase=phase, total=3, rewrapped=done)
        for phase, done in (("REWRAPPING", 1), ("RETIRING", 3), ("DONE", 3))
    ]

    class Rotation:
        async def watch(self, **_kwargs: object) -> AsyncIterator[object]:
            for frame in frames:
                yield frame
                await asyncio.sleep(0.15)  # at least one refresh of the live display each

    terminal = io.StringIO()
    monkeypatch.setattr(rekey.cli.rotate, "err", Console(file=terminal, force_terminal=True, width=100))
    result = asyncio.run(rekey.cli.rotate._follow(Rotation()))  # type: ignore[arg-type]
    assert result.phase == "DONE"
    shown = [
        re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame).strip()
        for frame in re.split(r"\r|\x1b\[2K|\x1b\[1A", terminal.getvalue())
    ]
    shown = [frame for frame in shown if frame]
    assert "RETIRING" in " ".join(shown)  # the display did show the phases as they came
    assert shown[-1].startswith("DONE") and "3/3" in shown[-1], shown[-3:]
