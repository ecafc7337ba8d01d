"""The open-loop generator (rekey.stress.generator) against the in-process null backend, whose
answers take a known fixed delay: every recorded figure can be checked against what it must be.

Each run spawns real worker processes (the generator's only code path), so the runs are short.
No test times anything itself; the bounds are on figures the generator recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from rekey.stress.generator import LoadPlan, LoadResult, run_load
from rekey.stress.schedule import Schedule
from rekey.stress.summary import FORMAT, read_seconds, summarize
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
