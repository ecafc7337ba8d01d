"""`rekey.stress.run`'s option checks: everything refused before anything starts, one line each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rekey.client import RekeyClientError, RotationBlocked
from rekey.stress.run import DEFAULT_BLOBS, Rotator, RunOptions, StressRunError, check_options, parse_mix


def options(tmp_path: Path, **overrides: object) -> RunOptions:
    values: dict[str, object] = {"rate": 10.0, "duration": 10.0, "out": tmp_path / "run", "backend": "vault"}
    values.update(overrides)
    return RunOptions(**values)  # type: ignore[arg-type]


def test_mix_parses_weights_and_refuses_anything_else() -> None:
    assert parse_mix("wrap=60, unwrap=30,rewrap=10") == {"wrap": 60, "unwrap": 30, "rewrap": 10}
    assert parse_mix("unwrap=1") == {"unwrap": 1}
    for bad, says in (
        ("wrap", "OP=WEIGHT"),
        ("wrap=1,wrap=2", "twice"),
        ("sign=1", "unknown operation"),
        ("wrap=-1", "whole number"),
        ("wrap=1.5", "whole number"),
        ("wrap=0,unwrap=0", "above 0"),
        ("wrap=\u0661", "whole number"),  # an Arabic-Indic digit is not ASCII
    ):
        with pytest.raises(StressRunError, match=says):
            parse_mix(bad)


def test_profile_implies_the_backend_and_rotations_get_default_blobs(tmp_path: Path) -> None:
    checked = check_options(options(tmp_path, backend=None, profile="aws-kms", rotate_every=2.0))
    assert checked.backend == "aws" and checked.blobs == DEFAULT_BLOBS and checked.rotation_grace == 1.0
    assert checked.throttle is not None and checked.throttle["rate"] == 10000.0
    assert check_options(options(tmp_path)).blobs == 0


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"rate": 0.0}, "--rate"),
        ({"rate": float("nan")}, "--rate"),
        ({"duration": 0.0}, "--duration"),
        ({"ramp": 11.0}, "--ramp"),
        ({"rotate_every": 10.0}, "shorter than --duration"),
        ({"blobs": 3}, "needs --rotate-every"),
        ({"rotation_grace": 1.0}, "needs --rotate-every"),
        ({"rotate_every": 2.0, "rotation_grace": 2.0}, "--rotation-grace"),
        ({"rotate_every": 2.0, "rotation_grace": -1.0}, "--rotation-grace"),
        ({"rotate_every": 2.0, "blobs": -1}, "--blobs"),
        ({"strategy": "yolo"}, "--strategy"),
        ({"processes": 0}, "--processes"),
        ({"concurrency": 10**6}, "--concurrency"),
        ({"label": "x" * 81}, "--label"),
        ({"label": "a\u202eb"}, "--label"),
        ({"fail_on": "p99<fast"}, "--fail-on"),
        ({"backend": None}, "--backend"),
        ({"backend": "gcp"}, "--backend"),
        ({"throttle_rate": 5.0}, "needs --profile"),
        ({"profile": "managed-hsm", "throttle_rate": -1.0}, "--profile"),
        ({"key": "a/b"}, "--key"),
        ({"mix": {"wrap": 1, "sign": 1}}, "unknown operation"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, overrides: dict[str, object], says: str) -> None:
    with pytest.raises(StressRunError, match=says) as caught:
        check_options(options(tmp_path, **overrides))
    assert "\n" not in str(caught.value) and caught.value.exit_code == 2
    assert not (tmp_path / "run").exists()


def test_out_must_be_empty_or_forced(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    check_options(options(tmp_path))  # empty: fine
    (out / "x").write_text("x")
    with pytest.raises(StressRunError, match="not empty"):
        check_options(options(tmp_path))
    with pytest.raises(StressRunError, match="holds no stress run"):
        check_options(options(tmp_path, force=True))  # --force replaces a run, nothing else
    with pytest.raises(StressRunError, match="not a directory"):
        check_options(options(tmp_path, out=out / "x"))


def test_force_replaces_a_previous_run_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "events").mkdir(parents=True)
    (out / "events" / "p00-000000.parquet").write_bytes(b"x")
    (out / "meta.json").write_text('{"format": "rekey-stress/1"}')
    (out / "seconds.jsonl").write_text("")
    (out / ".summary.json.abc.tmp").write_text("")  # left by a crash
    check_options(options(tmp_path, force=True))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StressRunError, match=r"notes\.txt.*not part of a run"):
        check_options(options(tmp_path, force=True))
    (out / "notes.txt").unlink()
    victim = tmp_path / "victim"
    victim.mkdir()
    (out / "seconds.jsonl").unlink()
    (out / "seconds.jsonl").symlink_to(victim / "secret.txt")
    with pytest.raises(StressRunError, match="symbolic link"):
        check_options(options(tmp_path, force=True))
    (out / "seconds.jsonl").unlink()
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(StressRunError, match="symbolic link"):
        check_options(options(tmp_path, out=link, force=True))
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(StressRunError, match="symbolic link"):
        check_options(options(tmp_path, out=dangling))


class _NeverDone:
    """A rotation handle whose rotation stays in REWRAPPING until cancelled."""

    started = True
    id = "rotate:null:k"

    async def watch(self, interval: float) -> AsyncIterator[Any]:
        while True:
            yield SimpleNamespace(phase="REWRAPPING", rewrapped=0, total=10)
            await asyncio.sleep(interval)

    async def abort(self) -> None:
        raise AssertionError("a late rotation is not aborted")


class _Client:
    def __init__(self) -> None:
        self.starts = 0

    async def start_rotation(self, key_ref: str, **_: Any) -> _NeverDone:
        self.starts += 1
        return _NeverDone()


def test_a_rotation_late_over_several_intervals_is_one_late_rotation() -> None:
    """The rotation still running when later ones were due is late once, under its own id; the
    ones skipped meanwhile were never started and are not late."""
    rows: list[dict[str, Any]] = []
    client = _Client()
    loop_start = time.monotonic()

    async def main() -> Rotator:
        rotator = Rotator(
            client,
            "null:k",
            every=0.2,
            grace=0.0,
            until=1.15,
            run_id="r",
            record=rows.append,
            clock=lambda: time.monotonic() - loop_start,
        )
        task = asyncio.create_task(rotator.run())
        await asyncio.sleep(1.2)
        rotator.end()
        await task
        return rotator

    rotator = asyncio.run(main())
    assert client.starts == 1
    late = [r for r in rows if r["event"] == "late"]
    assert [r["rotation_id"] for r in late] == ["rot-1"]
    assert {r["rotation_id"] for r in rows} == {"rot-1"}
    assert rotator.counts["late"] == 1 and rotator.counts["skipped"] == 4
    assert rows[-1]["event"] == "unfinished"


class _Blocked:
    """A rotation handle that stops BLOCKED in RETIRING, where the workflow refuses an abort."""

    started = True
    id = "rotate:null:k"

    def __init__(self) -> None:
        self.aborts = 0

    async def watch(self, interval: float) -> AsyncIterator[Any]:
        yield SimpleNamespace(phase="RETIRING", rewrapped=10, total=10)
        progress = SimpleNamespace(blocked_in="RETIRING", blocked_reason="disable refused")
        raise RotationBlocked(self.id, progress)  # type: ignore[arg-type]

    async def abort(self) -> None:
        self.aborts += 1
        raise RekeyClientError("abort is refused once retirement has begun")


def test_a_blocked_rotation_that_cannot_be_aborted_is_one_failure_and_ends_the_rotations() -> None:
    rows: list[dict[str, Any]] = []
    handle = _Blocked()
    starts: list[int] = []

    class Client:
        async def start_rotation(self, key_ref: str, **_: Any) -> _Blocked:
            starts.append(1)
            return handle

    loop_start = time.monotonic()

    async def main() -> Rotator:
        rotator = Rotator(
            Client(),
            "null:k",
            every=0.1,
            grace=0.0,
            until=0.75,
            run_id="r",
            record=rows.append,
            clock=lambda: time.monotonic() - loop_start,
        )
        task = asyncio.create_task(rotator.run())
        await asyncio.sleep(0.85)
        rotator.end()
        await task
        return rotator

    rotator = asyncio.run(main())
    failed = [r for r in rows if r["event"] == "failed"]
    assert len(starts) == 1 and handle.aborts == 1
    assert len(failed) == 1 and "abort was refused" in failed[0]["message"]
    assert "no further rotations" in failed[0]["message"] and failed[0]["phase"] == "RETIRING"
    assert rotator.counts["failed"] == 1 and rotator.counts["skipped"] >= 4
