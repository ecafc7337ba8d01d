"""The migration benchmark runs end to end at a small size (it is not part of `make test`
otherwise, and a broken benchmark would go unnoticed until someone needs its numbers).

Its figures are not judged here (tests do not time things); only that the report is whole and
consistent with what was seeded and moved: the benchmark itself refuses to report unless the
baseline moved and the rollback restored every blob, and the migration left every one on v2."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import bench_migration


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """The benchmark sets the collector up as the worker does; give the test process its own back."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.integration
@pytest.mark.usefixtures("gc_restored")
def test_the_benchmark_moves_every_seeded_blob_both_ways(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    bench_migration.main(["--blobs", "200", "--hosts", "2", "--batch-size", "30", "--out", str(out)])
    report = json.loads(out.read_text())
    assert (report["kind"], report["blobs"], report["hosts"], report["batch_size"]) == ("tee", 200, 2, 30)
    assert report["waves"] == [2] and report["seeded"] == 200
    baseline, workflow = report["baseline"], report["workflow"]
    assert baseline["moved"] == [200, 200] and baseline["seconds"] == min(baseline["runs_s"]) > 0
    assert baseline["per_s"] == pytest.approx(200 / baseline["seconds"], rel=0.01)
    assert (workflow["moved"], workflow["on_new"], workflow["on_old"]) == (200, 200, 0)
    assert 0 < workflow["handoff_s"] <= workflow["run_s"]
    assert report["handoff_ratio"] == pytest.approx(workflow["handoff_per_s"] / baseline["per_s"], rel=0.01)
    assert report["run_ratio"] == pytest.approx(workflow["run_per_s"] / baseline["per_s"], rel=0.01)
    # Two attestations per batch and host (at least 4 batches on each of 2 hosts), and the
    # new agents' own attestation at ATTESTING.
    assert workflow["attestations"] >= 2 * 2 * 4 + 2
    assert all(v > 0 for v in report["cpu_us_per_blob"].values())


def test_kms_blobs_are_refused_until_the_migration_moves_them(capsys: pytest.CaptureFixture[str]) -> None:
    for kind in ("kms", "both"):
        with pytest.raises(SystemExit) as exited:
            bench_migration.main(["--blobs", "10", "--hosts", "1", "--kind", kind])
        assert exited.value.code == 2
        assert "not available yet" in capsys.readouterr().err
