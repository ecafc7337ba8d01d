"""The migration benchmark runs end to end at a small size, for each kind of blob (it is not
part of `make test` otherwise, and a broken benchmark would go unnoticed until someone needs its
numbers).

Its figures are not judged here (tests do not time things); only that the report is whole and
consistent with what was seeded and moved: the benchmark itself refuses to report unless the
baseline moved and the rollback restored every blob, and the migration left every one on v2."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest import bench_migration


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """The benchmark sets the collector up as the worker does; give the test process its own back."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def _report(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    bench_migration.main(["--blobs", "200", "--hosts", "2", "--batch-size", "30", "--out", str(out), *args])
    report: dict[str, Any] = json.loads(out.read_text())
    assert (report["blobs"], report["hosts"], report["batch_size"]) == (200, 2, 30)
    assert report["waves"] == [2] and report["seeded"] == 200
    return report


def _check_kind(report: dict[str, Any], kind: str) -> dict[str, Any]:
    part: dict[str, Any] = report[kind]
    baseline, workflow = part["baseline"], part["workflow"]
    assert baseline["moved"] == [200, 200] and baseline["seconds"] == min(baseline["runs_s"]) > 0
    assert baseline["per_s"] == pytest.approx(200 / baseline["seconds"], rel=0.01)
    assert (workflow["moved"], workflow["on_old"]) == (200, 0)
    assert 0 < workflow["handoff_s"] <= report["workflow"]["handoff_s"] <= report["workflow"]["run_s"]
    assert part["handoff_ratio"] == pytest.approx(workflow["handoff_per_s"] / baseline["per_s"], rel=0.01)
    assert part["cpu_us_per_blob"]["baseline_agents"] > 0 and part["cpu_us_per_blob"]["baseline_loop"] > 0
    return part


@pytest.mark.integration
@pytest.mark.usefixtures("gc_restored")
def test_the_benchmark_moves_every_seeded_blob_both_ways(tmp_path: Path) -> None:
    report = _report(tmp_path)
    assert report["kind"] == "tee" and "kms" not in report
    tee, workflow = _check_kind(report, "tee"), report["workflow"]
    assert workflow["on_new"] == 200
    assert tee["workflow"]["handoff_s"] == workflow["handoff_s"]  # the phase is the hand-off's alone
    assert report["run_ratio"] == pytest.approx(workflow["run_per_s"] / tee["baseline"]["per_s"], rel=0.01)
    # Two attestations per batch and host (at least 4 batches on each of 2 hosts), and the
    # new agents' own attestation at ATTESTING.
    assert workflow["attestations"] >= 2 * 2 * 4 + 2
    assert workflow["timeline"]["migration_handoff"]["activities"] >= 2
    cpu = workflow["cpu_us_per_blob"]
    assert cpu["agents"] > 0 and cpu["worker"] > 0 and cpu["openbao"] == 0  # no OpenBao for tee


@pytest.mark.integration
@pytest.mark.usefixtures("gc_restored")
def test_kms_wrapped_blobs_are_re_bound_by_the_baseline_and_the_workflow(tmp_path: Path) -> None:
    """KMS-wrapped blobs under a Transit key on the benchmark's own OpenBao, re-bound by the v2
    agents: every one of them on v2 after the workflow and after each baseline."""
    report = _report(tmp_path, "--kind", "kms")
    assert report["kind"] == "kms" and "tee" not in report
    kms, workflow = _check_kind(report, "kms"), report["workflow"]
    assert workflow["on_new"] == 200  # every blob in the store is on v2 after the migration
    assert kms["workflow"]["handoff_s"] == workflow["handoff_s"]
    assert kms["cpu_us_per_blob"]["baseline_openbao"] > 0  # the agents released each DEK through it
    # One release token per non-empty batch (the two shares of 200 blobs need at least 7 batches
    # of 30) and the new agents' own attestation at ATTESTING.
    assert workflow["attestations"] >= 7 + 2
    assert workflow["timeline"]["migration_rebind"]["activities"] >= 2  # a call or more a host
    assert all(v > 0 for v in workflow["cpu_us_per_blob"].values())
