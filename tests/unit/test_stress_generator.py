"""The open-loop generator (rekey.stress.generator) against the in-process null backend, whose
answers take a known fixed delay: every recorded figure can be checked against what it must be.

Each run spawns real worker processes (the generator's only code path), so the runs are short.
No test times anything itself; the bounds are on figures the generator recorded."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from rekey.stress.generator import GeneratorError, LoadPlan, LoadResult, run_load
from rekey.stress.schedule import Schedule
from rekey.stress.summary import FORMAT, merge_hdrs, read_seconds, summarize
from rekey.stress.workload import WorkloadSpec

EVENT_SCHEMA = {
    "intended": "double",
    "start": "double",
    "end": "double",
    "op": "dictionary<values=string, indices=int32, ordered=0>",
    "outcome": "dictionary<values=string, indices=int32, ordered=0>",
    "key_version": "int32",
    "attempts": "int16",
    "throttle_wait": "float",
    "process": "int16",
}


def _meta(run_dir: Path, plan: LoadPlan) -> None:
    (run_dir / "meta.json").write_text(
        json.dumps({"format": FORMAT, "mix": dict(plan.mix), "backend": "null", "strategy": "governor"})
    )


def _run(tmp_path: Path, plan: LoadPlan, *, delay: float = 0.0, **kwargs: Any) -> tuple[Path, LoadResult]:
    run_dir = tmp_path / "run"
    result = run_load(plan, WorkloadSpec("null:stress", "governor", null_delay=delay), run_dir, **kwargs)
    _meta(run_dir, plan)
    return run_dir, result


def _events(run_dir: Path) -> dict[str, np.ndarray]:
    tables = [pq.read_table(path) for path in sorted((run_dir / "events").glob("*.parquet"))]
    return {
        name: np.concatenate([np.asarray(t.column(name).to_pylist()) for t in tables])
        for name in EVENT_SCHEMA
    }


def test_a_fixed_delay_backend_records_every_op_with_its_known_latency(tmp_path: Path) -> None:
    plan = LoadPlan(rate=100, duration=3, processes=2, concurrency=8)
    delay = 0.02
    run_dir, result = _run(tmp_path, plan, delay=delay)

    assert (result.offered, result.done, result.dropped) == (300, 300, 0)
    assert result.processes_alive == 2 and not result.interrupted
    for path in (run_dir / "events").glob("*.parquet"):
        assert {f.name: str(f.type) for f in pq.read_schema(path)} == EVENT_SCHEMA
    events = _events(run_dir)
    assert len(events["end"]) == 300
    service = events["end"] - events["start"]
    lag = events["start"] - events["intended"]
    latency = events["end"] - events["intended"]
    assert np.all(lag >= 0)
    assert np.all(service >= delay)  # a sleep never ends early
    assert np.all(service < delay + 0.25)  # generous: a loaded machine
    np.testing.assert_allclose(latency, lag + service, atol=1e-9)
    assert set(events["outcome"]) == {"ok"}
    assert set(events["attempts"]) == {1}
    assert sorted(events["intended"]) == [Schedule(100, 3).intended(i) for i in range(300)]
    summary = summarize(run_dir)
    assert summary["offered"] == summary["done"] == summary["ok"] == 300
    assert summary["latency_ms"]["p50"] >= delay * 1000
    seconds = read_seconds(run_dir)
    assert [row["t"] for row in seconds] == list(range(len(seconds)))
    assert [row["offered"] for row in seconds][:3] == [100, 100, 100]
    done = np.bincount(np.floor(events["end"]).astype(int), minlength=len(seconds))
    assert [row["done"] for row in seconds] == done.tolist()


def _lag_p99_ms(seconds: list[dict[str, Any]]) -> float:
    lag = merge_hdrs(row["lag_hdr"] for row in seconds)
    return float(lag.get_value_at_percentile(99)) / 1000.0


def test_offered_per_second_follows_the_ramp_and_the_plan(tmp_path: Path) -> None:
    # N(t) = 200 t^2 / 4 while ramping (2 s), then 200/s: 50, 150, 200, 200 per second.
    plan = LoadPlan(rate=200, duration=4, ramp=2, processes=2, concurrency=4)
    assert plan.schedule().offered_per_second() == [50, 150, 200, 200]
    run_dir, result = _run(tmp_path, plan)
    seconds = read_seconds(run_dir)
    assert [row["offered"] for row in seconds][:4] == [50, 150, 200, 200]
    assert sum(row["offered"] for row in seconds) == result.offered == 600
    events = _events(run_dir)
    intended = np.sort(events["intended"])
    expected = [math.sqrt(2 * i * 2 / 200) if i <= 200 else 2 + (i - 200) / 200 for i in range(600)]
    np.testing.assert_allclose(intended, expected, atol=1e-9)


def test_the_mix_is_seeded_per_op_whatever_the_number_of_processes(tmp_path: Path) -> None:
    plan = LoadPlan(rate=1000, duration=2, mix={"wrap": 60, "unwrap": 30, "rewrap": 10}, processes=2, seed=7)
    run_dir, _ = _run(tmp_path, plan, delay=0.001)
    events = _events(run_dir)
    expected = {intended: op for _, intended, op in plan.schedule().ops(0, 1)}
    assert len(events["op"]) == 2000
    assert [expected[t] for t in events["intended"]] == list(events["op"])
    counts = {op: int(np.sum(events["op"] == op)) for op in ("wrap", "unwrap", "rewrap")}
    for op, share in (("wrap", 0.6), ("unwrap", 0.3), ("rewrap", 0.1)):
        sigma = math.sqrt(2000 * share * (1 - share))
        assert abs(counts[op] - 2000 * share) < 4 * sigma, counts
    assert counts == Counter(op for _, _, op in plan.schedule().ops(0, 1))
    assert set(events["outcome"]) == {"ok"}
    summary = summarize(run_dir)
    assert {op: summary["ops"][op]["count"] for op in counts} == counts


def test_a_full_queue_drops_ops_without_sending_them(tmp_path: Path) -> None:
    # One thread answering in 0.2 s serves 5 ops/s; 50/s are offered: most are dropped.
    plan = LoadPlan(rate=50, duration=2, processes=1, concurrency=1, queue_cap=1)
    run_dir, result = _run(tmp_path, plan, delay=0.2)
    events = _events(run_dir)
    dropped = events["outcome"] == "dropped"
    assert result.offered == result.done == 100
    assert result.dropped == int(np.sum(dropped)) > 50
    assert np.all(events["start"][dropped] == events["end"][dropped])
    assert np.all(events["attempts"][dropped] == 0)
    assert np.all(events["end"][dropped] >= events["intended"][dropped])
    sent = ~dropped
    assert int(np.sum(sent)) <= 2 + 1 + 2 / 0.2  # in service, waiting, and what one thread serves
    assert np.all(events["end"][sent] - events["start"][sent] >= 0.2)
    seconds = read_seconds(run_dir)
    assert sum(row["outcomes"].get("dropped", 0) for row in seconds) == result.dropped
    summary = summarize(run_dir)
    assert summary["outcomes"]["dropped"] == result.dropped
    # A dropped op was never sent: it has no latency. Every op that was sent took >= 0.2 s, so
    # every latency figure is at least that (counting the drops as ~0 ms would give p50 = 0).
    assert summary["latency_ms"]["p50"] >= 200 and summary["ops"]["wrap"]["p95_ms"] >= 200
    assert all(row["p50_ms"] is None or row["p50_ms"] >= 200 for row in seconds), (
        "the per-second histograms count only what was sent"
    )


def test_a_stop_ends_the_run_early_and_leaves_a_reportable_directory(tmp_path: Path) -> None:
    stop = threading.Event()
    started: list[float] = []

    def on_second(row: dict[str, Any]) -> None:
        if row["t"] == 1:
            stop.set()

    plan = LoadPlan(rate=100, duration=60, processes=2, concurrency=8)
    run_dir, result = _run(
        tmp_path, plan, delay=0.005, stop=stop, on_second=on_second, on_start=started.append
    )
    assert result.interrupted and result.processes_alive == 2
    assert started == [result.t0]
    assert 200 <= result.offered < 1000
    assert result.done == result.offered  # all drained: the backend answers in 5 ms
    seconds = read_seconds(run_dir)
    assert [row["t"] for row in seconds] == list(range(len(seconds)))
    summary = summarize(run_dir, interrupted=True)
    assert summary["interrupted"] and summary["done"] == result.done == len(_events(run_dir)["end"])
    assert summary["offered"] == result.offered


def test_a_dead_process_is_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    killed: list[int] = []

    def on_second(row: dict[str, Any]) -> None:
        if row["t"] == 0 and not killed:
            victim = next(p for p in multiprocessing.active_children() if p.name == "rekey-stress-1")
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

    plan = LoadPlan(rate=100, duration=5, processes=2, concurrency=8)
    run_dir, result = _run(tmp_path, plan, delay=0.002, on_second=on_second)
    assert killed and result.processes_alive == 1 and not result.interrupted
    seconds = read_seconds(run_dir)
    assert seconds[0]["processes_alive"] == 2
    assert seconds[-1]["processes_alive"] == 1 and seconds[-1]["t"] >= 4
    # the survivor offers its half (the even ops) to the end
    assert [row["offered"] for row in seconds][3:5] == [50, 50]
    assert [row["ok"] for row in seconds][3:5] == [50, 50]
    assert summarize(run_dir)["done"] >= 250


def test_versions_rotated_and_disabled_under_load_are_recorded(tmp_path: Path) -> None:
    state = tmp_path / "null-state.json"
    state.write_text(json.dumps({"primary": 1}))

    def on_second(row: dict[str, Any]) -> None:
        if row["t"] == 0:
            state.write_text(json.dumps({"primary": 2}))
        if row["t"] == 2:
            state.write_text(json.dumps({"primary": 2, "disabled": [2]}))

    plan = LoadPlan(rate=100, duration=5, processes=2, concurrency=8)
    workload = WorkloadSpec("null:stress", "naive", settings={"null_state": str(state)}, null_delay=0.002)
    run_dir = tmp_path / "run"
    result = run_load(plan, workload, run_dir, on_second=on_second)
    _meta(run_dir, plan)
    seconds = read_seconds(run_dir)
    versions = Counter[str]()
    for row in seconds:
        versions.update(row["versions"])
    assert versions["1"] > 0 and versions["2"] > 0
    refused = [sample for row in seconds for sample in row["refused"]]
    assert refused and {tuple(s[2:]) for s in refused} == {(2, "version_disabled")}
    assert all(s[1] in ("wrap", "unwrap", "rewrap") for s in refused)
    events = _events(run_dir)
    disabled = events["outcome"] == "version_disabled"
    assert set(events["key_version"][disabled]) == {2}
    assert int(np.sum(disabled)) == sum(row["outcomes"].get("version_disabled", 0) for row in seconds)
    assert result.done == result.offered == 500
    assert summarize(run_dir)["outcomes"]["version_disabled"] == int(np.sum(disabled))


def _lag_run(tmp_path: Path) -> tuple[float, float]:
    """A 5 s run at 1,000 ops/s; the lag p99 (ms) from the recorded histograms and from the
    raw events (start - intended)."""
    plan = LoadPlan(rate=1000, duration=5, processes=1, concurrency=16)
    run_dir, result = _run(tmp_path, plan)
    assert result.done == result.offered == 5000 and result.dropped == 0
    lag = _events(run_dir)
    recorded = lag["start"] - lag["intended"]
    assert float(np.min(recorded)) >= -0.005  # never started well before its time
    return _lag_p99_ms(read_seconds(run_dir)), float(np.percentile(recorded, 99)) * 1000


def test_schedule_lag_histograms_agree_with_the_raw_events_at_1000_ops_per_second(tmp_path: Path) -> None:
    """What the lag figure is made of, whatever the machine's load: every op offered and done,
    none dropped, and the per-second HDR histograms' p99 is the raw events' p99 (HDR keeps 3
    significant digits; the raw figure is an interpolated percentile: 2% or 0.2 ms apart at
    most). The 5 ms goal itself is a timing, so it is checked on a quiet machine by
    `make soak` (below) and measured by `loadtest/bench_stress_generator.py`."""
    from_hdr, from_events = _lag_run(tmp_path)
    assert abs(from_hdr - from_events) <= max(0.2, 0.02 * from_events), (from_hdr, from_events)


@pytest.mark.soak
def test_schedule_lag_at_1000_ops_per_second_stays_under_5_ms_at_p99(tmp_path: Path) -> None:
    """The issue's acceptance figure, from the lag the generator recorded (start - intended).
    A timing: meaningful on a quiet machine only, hence `make soak`, not `make test`."""
    from_hdr, from_events = _lag_run(tmp_path)
    assert from_hdr < 5.0 and from_events < 5.0, (from_hdr, from_events, os.getloadavg())


def test_bad_plans_and_workloads_are_refused_before_anything_starts(tmp_path: Path) -> None:
    workload = WorkloadSpec("null:k", "governor")
    for plan in (
        LoadPlan(rate=0, duration=1),
        LoadPlan(rate=10, duration=-1),
        LoadPlan(rate=10, duration=1, ramp=-1),
        LoadPlan(rate=10, duration=1, mix={"encrypt": 1}),
        LoadPlan(rate=10, duration=1, mix={"wrap": 0}),
        LoadPlan(rate=10, duration=1, processes=0),
        LoadPlan(rate=10, duration=1, queue_cap=0),
    ):
        with pytest.raises(GeneratorError):
            run_load(plan, workload, tmp_path / "x")
    for bad in (WorkloadSpec("null:k", "yolo"), WorkloadSpec("gcp:k", "naive"), WorkloadSpec("k", "naive")):
        with pytest.raises(GeneratorError) as excinfo:
            run_load(LoadPlan(rate=10, duration=1), bad, tmp_path / "y")
        assert "\n" not in str(excinfo.value)


def test_a_process_that_cannot_build_its_adapter_fails_the_start(tmp_path: Path) -> None:
    workload = WorkloadSpec(
        "vault:k", "governor", settings={"home": str(tmp_path / "home"), "vault_addr": "http://127.0.0.1:9"}
    )
    with pytest.raises(GeneratorError, match="could not start: ConfigError: no OpenBao/Vault token"):
        run_load(LoadPlan(rate=10, duration=1), workload, tmp_path / "run")
    assert not list((tmp_path / "run" / "events").glob("*.parquet"))


CTRL_C_SCRIPT = """
import json, sys
from pathlib import Path
from rekey.stress.generator import LoadPlan, run_load
from rekey.stress.workload import WorkloadSpec

if __name__ == "__main__":
    plan = LoadPlan(rate=50, duration=120, processes=2, concurrency=4)
    result = run_load(plan, WorkloadSpec("null:k", "governor"), Path(sys.argv[1]))
    print(json.dumps({"interrupted": result.interrupted, "offered": result.offered, "done": result.done,
                      "alive": result.processes_alive}))
"""


def test_ctrl_c_stops_the_run_and_keeps_what_was_recorded(tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C: the children ignore it, the
    parent stops them, and everything recorded so far is there."""
    run_dir = tmp_path / "run"
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        for _ in range(600):  # wait for two recorded seconds (at most a minute)
            seconds = run_dir / "seconds.jsonl"
            if seconds.exists() and seconds.read_text().count("\n") >= 2:
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["interrupted"] and result["alive"] == 2
    assert 100 <= result["offered"] < 6000 and result["done"] == result["offered"]
    _meta(run_dir, LoadPlan(rate=50, duration=120))
    summary = summarize(run_dir, interrupted=True)
    assert summary["done"] == result["done"] and summary["offered"] == result["offered"]
