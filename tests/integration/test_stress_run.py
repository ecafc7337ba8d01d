"""``rekey stress run`` end to end, on real servers: a local throttled profile (the Azure emulator
with Managed HSM's limits) with its own Temporal dev server and rekey worker; the configured
path (a Temporal dev server and a worker of the test's own); the run directory it writes read
back by ``rekey stress report``.

What each test shows:
- a profile run with ``--rotate-every``: complete run dir (every meta field, events, seconds,
  rotations, summary), a rotation done, the load's ops succeeding on the new version after it;
  ``--fail-on`` passes (exit 0) and the same summary re-evaluated just above and just below its
  measured p99 passes and fails exactly there;
- a rotation the worker cannot do (its ``allowed_keys`` refuse the key: a real refusal in the
  worker's first activity, so the rotation stops BLOCKED) is a ``rotation-failed`` incident and
  ``--fail-on rotations_failed=0`` exits 3 with a threshold incident;
- SIGINT to the CLI process a few seconds into a run: exit 130, ``interrupted`` recorded, and
  ``rekey stress report`` renders it;
- bad input: exit 2, one ``error:`` line, nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulators.profiles import PROFILES, start_local
from rekey.stress.summary import read_jsonl, read_meta
from rekey.stress.thresholds import evaluate, parse
from tests.fixtures.cli import run_cli
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
META_FIELDS = [
    *("format", "run_id", "label", "backend", "key_ref", "profile", "strategy", "rate", "duration"),
    *("ramp", "mix", "processes", "concurrency", "rotate_every", "blobs", "fail_on", "started_at"),
    *("t0_unix", "throttle", "rekey_version"),
]


def _rows(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, required=False)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REKEY_")}
    return env | extra


def test_profile_run_rotates_under_load_and_is_reportable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        capsys,
        "stress",
        "run",
        "--profile",
        "managed-hsm",
        "--throttle-rate",
        "150",
        "--rate",
        "60",
        "--duration",
        "12s",
        "--rotate-every",
        "4s",
        "--rotation-grace",
        "1s",
        "--blobs",
        "60",
        "--label",
        "rotating",
        "--fail-on",
        "p99<60s,rotations_failed=0",
        "--json",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["passed"] is True and summary["interrupted"] is False
    meta = read_meta(out)
    assert [name for name in META_FIELDS if name not in meta] == []
    assert meta["backend"] == "azure" and meta["profile"] == "managed-hsm" and meta["blobs"] == 60
    assert meta["rotate_every"] == 4.0 and meta["rotation_grace"] == 1.0
    assert meta["key_ref"].startswith("azure:stress-") and isinstance(meta["t0_unix"], float)
    assert "token" not in json.dumps(meta["throttle"]["endpoints"])
    assert list((out / "events").glob("*.parquet"))
    assert json.loads((out / "summary.json").read_text())["done"] == summary["done"] > 0

    rotations = _rows(out / "rotations.jsonl")
    done = [r for r in rotations if r["event"] == "done"]
    assert done, rotations
    assert done[0]["rewrapped"] == done[0]["total"] == 60
    assert not [r for r in rotations if r["event"] == "failed"]
    new_version = int(done[0]["message"].removeprefix("version "))
    assert new_version >= 2
    seconds = _rows(out / "seconds.jsonl")
    before = [r for r in seconds if r["t"] + 1 <= rotations[0]["t"]]
    after = [r for r in seconds if r["t"] >= done[0]["t"] + 1]
    assert before and after
    assert all(set(r["versions"]) <= {"1"} for r in before)
    assert sum(r["versions"].get(str(new_version), 0) for r in after) > 0

    code, stdout, stderr = run_cli(capsys, "stress", "report", str(out), "--out", str(tmp_path / "r.html"))
    assert code == 0, stderr
    assert (tmp_path / "r.html").stat().st_size > 10_000

    # The thresholds hold exactly up to the measured value: just above passes, just below fails.
    p99 = summary["latency_ms"]["p99"]
    assert p99 > 0
    above = evaluate(parse(f"p99<{p99 * 1.001}ms"), summary)
    below = evaluate(parse(f"p99<{p99 * 0.999}ms"), summary)
    assert above[0]["ok"] is True and below[0]["ok"] is False


@pytest.mark.soak  # ~40 s; the late/skip logic is also tested on a fake client in test_stress_run_options
def test_rotation_slower_than_its_interval_is_late_and_the_next_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # R = 10/s: re-wrapping 60 blobs on Managed HSM takes 120 wrap-class requests (unwrap +
    # wrap each), at least 11 s at the emulator's limit however fast the machine: a rotation
    # started at 4 s cannot be done at 8 s, when the next one is due.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        capsys,
        "stress",
        "run",
        "--profile",
        "managed-hsm",
        "--throttle-rate",
        "10",
        "--rate",
        "2",
        "--duration",
        "11s",
        "--rotate-every",
        "4s",
        "--blobs",
        "60",
        "--fail-on",
        "rotations_late<1",
        "--json",
        "--out",
        str(out),
    )
    assert code == 3, stderr
    rotations = _rows(out / "rotations.jsonl")
    assert {r["rotation_id"] for r in rotations} == {"rot-1"}  # rot-2 was skipped, not queued
    events = [r["event"] for r in rotations]
    # It ends after its deadline: done while the load drains its last ops, or unfinished.
    assert events[0] == "start" and "late" in events and events[-1] in ("done", "unfinished")
    late = next(r for r in rotations if r["event"] == "late")
    assert 8 <= late["t"] < 11 and "rotation 2 skipped" in late["message"]
    assert rotations[-1]["t"] > late["t"]
    incidents = _rows(out / "incidents.jsonl")
    assert [i["kind"] for i in incidents].count("rotation-late") == 1
    assert next(i for i in incidents if i["kind"] == "rotation-late")["evidence"]["rotation_id"] == "rot-1"
    summary = json.loads(stdout)
    assert summary["rotations"]["late"] == 1 and summary["rotations"]["started"] == 1


@pytest.fixture
def azure_backend(tmp_path: Path) -> Iterator[dict[str, str]]:
    with start_local("managed-hsm", tmp_path / "azure", rate=500) as local:
        yield local.settings


def test_rotation_the_worker_cannot_do_is_a_failed_rotation_incident(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    temporal_env: Any,
    azure_backend: dict[str, str],
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    settings_env = {f"REKEY_{k.upper()}": v for k, v in azure_backend.items()}
    settings_env["REKEY_TEMPORAL_ADDRESS"] = temporal_env.client.service_client.config.target_host
    # The worker may use only keys named other-*: the run's fresh stress-* key is refused in its
    # first activity (InvalidKeyRef, not retryable), so each rotation stops BLOCKED.
    worker_env = _clean_env(REKEY_HOME=str(home), REKEY_ALLOWED_KEYS="azure:other-*", **settings_env)
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "rekey.cli", "--home", str(home), "worker", "--shutdown-timeout", "2s"],
        env=worker_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        for name, value in settings_env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("REKEY_HOME", str(home))
        out = tmp_path / "run"
        deadline = time.monotonic() + 60
        while True:  # the worker polls once it is up; until then the run refuses to start
            code, stdout, stderr = run_cli(
                capsys,
                "stress",
                "run",
                "--backend",
                "azure",
                "--rate",
                "40",
                "--duration",
                "8s",
                "--rotate-every",
                "3s",
                "--blobs",
                "20",
                "--fail-on",
                "rotations_failed=0",
                "--out",
                str(out),
            )
            if code != 2 or "worker polling" not in stderr or time.monotonic() > deadline:
                break
            assert not out.exists()  # refused before anything was written
            time.sleep(1)
    finally:
        worker.terminate()
        worker.wait(timeout=20)
        log.close()
    assert code == 3, stderr + stdout
    rotations = _rows(out / "rotations.jsonl")
    failed = [r for r in rotations if r["event"] == "failed"]
    assert failed and "blocked" in failed[0]["message"] and "allowed" in failed[0]["message"].lower()
    assert not [r for r in rotations if r["event"] == "done"]
    # The blocked rotation was aborted, so the next interval started a rotation of its own.
    starts = [r for r in rotations if r["event"] == "start"]
    assert len(starts) == 2 and all(r["message"].endswith("(started)") for r in starts), starts
    assert len(failed) == 2
    incidents = _rows(out / "incidents.jsonl")
    kinds = [i["kind"] for i in incidents]
    assert "rotation-failed" in kinds and "threshold" in kinds
    rotation_failed = next(i for i in incidents if i["kind"] == "rotation-failed")
    assert rotation_failed["evidence"]["rotation_id"] == failed[0]["rotation_id"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is False
    assert [t["ok"] for t in summary["thresholds"]] == [False]


def test_a_key_that_does_not_exist_is_refused_before_anything_is_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    azure_backend: dict[str, str],
) -> None:
    for name, value in azure_backend.items():
        monkeypatch.setenv(f"REKEY_{name.upper()}", value)
    monkeypatch.setenv("REKEY_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    args = ["--backend", "azure", "--key", "missing", "--rate", "5", "--duration", "2s"]
    code, _, stderr = run_cli(capsys, "stress", "run", *args, "--out", str(out))
    assert code == 2, stderr
    assert "azure:missing does not exist" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_sigint_stops_the_run_and_it_is_still_reportable(tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rekey.cli",
            "stress",
            "run",
            "--profile",
            "managed-hsm",
            "--throttle-rate",
            "200",
            "--rate",
            "50",
            "--duration",
            "60s",
            "--out",
            str(out),
        ],
        env=_clean_env(REKEY_HOME=str(tmp_path / "home")),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(_rows(out / "seconds.jsonl")) < 3:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the load did not start"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert 0 < summary["elapsed"] < 40
    report = subprocess.run(
        [sys.executable, "-m", "rekey.cli", "stress", "report", str(out), "--out", str(tmp_path / "r.html")],
        env=_clean_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert "interrupted" in report.stdout


OK = ["--profile", "managed-hsm", "--rate", "10", "--duration", "5s"]
BAD = [
    (["--profile", "managed-hsm", "--rate", "10", "--duration", "5x"], "--duration"),
    (["--profile", "managed-hsm", "--rate", "0", "--duration", "5s"], "--rate"),
    (["--profile", "no-such-profile", "--rate", "10", "--duration", "5s"], "unknown throttle profile"),
    ([*OK, "--mix", "wrap=6,frob=1"], "frob"),
    ([*OK, "--label", "a\nb\x1b[31m"], "--label"),
    ([*OK, "--key", "../etc"], "--key"),
    ([*OK, "--key", "k\x07"], "--key"),
    ([*OK, "--rotate-every", "5s"], "--rotate-every"),
    ([*OK, "--fail-on", "p99<<1"], "--fail-on"),
    (
        ["--profile", "managed-hsm", "--backend", "vault", "--rate", "10", "--duration", "5s"],
        "does not match",
    ),
    (["--rate", "10", "--duration", "5s"], "--backend"),
    ([*OK, "--blobs", "5"], "--blobs"),
]


@pytest.mark.parametrize(("args", "says"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    says: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REKEY_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "stress", "run", *args, "--out", str(out))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], stderr
    assert "\x1b" not in stderr and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_rotations_without_a_profile_need_a_reachable_temporal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REKEY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REKEY_TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")  # nothing listens
    out = tmp_path / "run"
    args = ["--backend", "azure", "--rate", "5", "--duration", "5s", "--rotate-every", "2s"]
    code, _, stderr = run_cli(capsys, "stress", "run", *args, "--out", str(out))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "--rotate-every needs Temporal" in lines[0] and "cannot reach" in lines[0]
    assert not out.exists()


def test_non_empty_out_is_refused_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, stderr = run_cli(capsys, "stress", "run", *OK, "--out", str(out))
    assert code == 2 and "not empty" in stderr and "--force" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_profiles_lists_every_profile(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_cli(capsys, "stress", "profiles", "--json")
    assert code == 0
    listed = json.loads(stdout)
    assert [p["profile"] for p in listed] == list(PROFILES)
    assert {p["backend"] for p in listed} == {"vault", "aws", "azure"}
