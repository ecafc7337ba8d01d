"""The attestation benchmark runs end to end at a small size (it is not part of `make test`
otherwise, and a broken benchmark would go unnoticed until someone needs its figures).

Its timings are not judged here (tests do not time things); what is checked is what the storm
control promises: the cached run verifies each host's chain once, the baseline every evidence's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import bench_attestation


def test_the_benchmark_compares_cached_and_uncached_storms(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    code = bench_attestation.main(
        ["--evidences", "120", "--hosts", "3", "--callers", "16", "--json", "--out", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    cached, uncached = report["results"]
    assert (cached["mode"], uncached["mode"]) == ("cached", "uncached")
    assert cached["verifications"] == uncached["verifications"] == 120
    assert cached["chain_verifications"] == 3 and cached["chain_cache_hits"] == 117
    assert uncached["chain_verifications"] == 120 and uncached["chain_cache_hits"] == 0
    assert report["chain_goal_met"] is True
    for r in (cached, uncached):
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] and r["per_s"] > 0


def test_more_hosts_than_evidences_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_attestation.main(["--evidences", "2", "--hosts", "3"])
    assert exited.value.code == 2
    assert "--hosts must be between 1 and --evidences" in capsys.readouterr().err
