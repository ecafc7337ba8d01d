"""The generator against a backend whose outcome is known: the Azure emulator's Managed-HSM
profile throttling wraps at exactly R/s (a token bucket holding one second of R), offered 2R.

Whatever the client does, the server accepts R wraps a second once its first second's burst is
spent, so the ok count the generator records for each steady second must be R; the rest come
back throttled (sdk-default on Azure: azure-core never resends a POST after a 429, so each
throttle reaches the caller as one attempt; naive: resent at once until its 10 attempts are
spent). And summarize() of the directory must agree with the raw Parquet events."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from emulators.profiles import start_local
from rekey.backends import adapter_for
from rekey.config import Settings
from rekey.stress.generator import LoadPlan, run_load
from rekey.stress.summary import FORMAT, read_seconds, summarize
from rekey.stress.workload import WorkloadSpec

pytestmark = pytest.mark.integration

R = 20


# sdk-default's per-attempt counting against the real stack is also in test_throttle_profiles;
# here it runs in `make soak` (the suite's time budget).
@pytest.mark.parametrize(
    ("strategy", "attempts_when_throttled"),
    [pytest.param("sdk-default", 1, marks=pytest.mark.soak), ("naive", 10)],
)
def test_ok_per_second_is_the_emulators_limit_and_the_summary_agrees_with_the_events(
    tmp_path: Path, strategy: str, attempts_when_throttled: int
) -> None:
    with start_local("managed-hsm", tmp_path / "hsm", rate=R) as local:
        home = str(tmp_path / "home")
        settings = {"home": home, **local.settings}
        key_ref = f"azure:stress-{secrets.token_hex(3)}"
        adapter_for(Settings(**settings), key_ref).create()  # type: ignore[arg-type]
        plan = LoadPlan(rate=2 * R, duration=8, mix={"wrap": 100}, processes=2, concurrency=16)
        run_dir = tmp_path / "run"
        result = run_load(plan, WorkloadSpec(key_ref, strategy, settings=settings), run_dir)
        server = local.stats()
    (run_dir / "meta.json").write_text(json.dumps({"format": FORMAT, "mix": {"wrap": 100}}))

    assert result.offered == 8 * 2 * R and result.processes_alive == 2
    seconds = read_seconds(run_dir)
    assert [row["offered"] for row in seconds][:8] == [2 * R] * 8
    steady = [row["ok"] for row in seconds[2:7]]
    assert all(abs(ok - R) <= 1 for ok in steady), [row["ok"] for row in seconds]
    assert sum(row["outcomes"].get("throttled", 0) for row in seconds) > 0
    assert sum(row["throttled_attempts"] for row in seconds) > 0

    tables = [pq.read_table(path) for path in (run_dir / "events").glob("*.parquet")]
    outcome = np.concatenate([t.column("outcome").to_numpy(zero_copy_only=False) for t in tables])
    attempts = np.concatenate([t.column("attempts").to_numpy() for t in tables])
    end = np.concatenate([t.column("end").to_numpy() for t in tables])
    intended = np.concatenate([t.column("intended").to_numpy() for t in tables])
    ok = outcome == "ok"
    # sdk-default: sent once (the SDK does not resend a POST after a 429); naive: 10 times at once
    assert set(attempts[outcome == "throttled"]) == {attempts_when_throttled}
    summary = summarize(run_dir, interrupted=False)
    assert summary["done"] == len(outcome) == result.done
    assert summary["ok"] == int(np.sum(ok))
    assert summary["outcomes"] == {
        name: int(np.sum(outcome == name))
        for name in sorted(set(outcome), key=list(summary["outcomes"]).index)
    }
    assert summary["attempts"] == int(np.sum(attempts))
    assert summary["throttled_attempts"] == sum(row["throttled_attempts"] for row in seconds)
    latency = (end - intended) * 1000
    assert summary["latency_ms"]["max"] == pytest.approx(float(np.max(latency)), abs=1e-3)
    per_second_ok = np.bincount(np.floor(end[ok]).astype(int), minlength=len(seconds))
    assert [row["ok"] for row in seconds] == per_second_ok.tolist()
    # the server saw at least every wrap the generator recorded as accepted
    assert server["served"] >= summary["ok"]
