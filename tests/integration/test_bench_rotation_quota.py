"""The rotation-at-quota benchmark runs end to end at a tiny size on each backend (it is not part
of `make test` otherwise, and a broken benchmark would go unnoticed until someone needs its
figures).

Its rates are not judged here (tests do not time things); only that every field of the report is
there, consistent with what was rotated and with the server's own counters, and that no blob
failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import bench_rotation_quota

pytestmark = pytest.mark.integration

BLOBS = 300
RATE = 400.0
# What the quota allows, in blobs/s: one batch request per 490 blobs (vault), one ReEncrypt
# (aws), one unwrap + one wrap (azure) per blob.
ALLOWED = {"vault-quota": RATE * 490, "aws-kms": RATE, "managed-hsm": RATE / 2}
# Requests per blob the server served: the sweep's, plus a few key reads and the verify sample.
SERVED_PER_BLOB = {"vault-quota": (1 / 490, 0.2), "aws-kms": (1.0, 1.2), "managed-hsm": (2.0, 2.2)}


# One backend in `make test` (the suite's time budget); all three in `make soak`.
@pytest.mark.parametrize(
    "profile",
    [
        p if p == "managed-hsm" else pytest.param(p, marks=pytest.mark.soak)
        for p in bench_rotation_quota.BACKENDS
    ],
)
def test_a_backend_rotates_at_its_quota_with_no_failure(tmp_path: Path, profile: str) -> None:
    out = tmp_path / "report.json"
    options = ["--blobs", str(BLOBS), "--rates", f"{RATE:g}", "--backends", profile, "--batch-size", "200"]
    bench_rotation_quota.main([*options, "--json", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["blobs"] == BLOBS and report["rates"] == [RATE] and report["workers"] == 1
    assert report["goals"] == {"share": 0.9, "failed": 0, "throttled_share": 0.05}
    [b] = report["backends"]
    assert b["profile"] == profile
    baseline, throttled = b["runs"]
    assert baseline["rate"] is None and "share" not in baseline
    assert throttled["rate"] == RATE
    assert b["baseline_per_s"] == baseline["sweep_per_s"] > 0
    low, high = SERVED_PER_BLOB[profile]
    for run in b["runs"]:
        assert run["blobs"] == BLOBS and run["failed"] == 0
        assert run["sweep_per_s"] == pytest.approx(BLOBS / run["sweep_s"], rel=0.01)
        assert low <= run["served"] / BLOBS <= high, run
        assert run["requests_per_blob"] == pytest.approx((run["served"] + run["throttled"]) / BLOBS, abs=1e-3)
        assert 0 <= run["throttled_share"] <= 1
        assert run["cpu_cores"]["worker"] > 0
        assert set(run["cpu_cores"]) == {"worker", "backend", "temporal", "this_process"}
        assert len(run["load_average"]) == 3
    assert baseline["throttled"] == 0  # unthrottled: the server refuses nothing
    assert throttled["allowed_per_s"] == pytest.approx(ALLOWED[profile])
    assert throttled["share"] == pytest.approx(throttled["sweep_per_s"] / ALLOWED[profile], abs=0.001)
    assert (throttled["bound"] == "quota") == (baseline["sweep_per_s"] >= ALLOWED[profile])
    assert isinstance(throttled["goals_met"], bool)
    if profile == "vault-quota":
        assert throttled["bound"] == "cpu"  # 196,000 blobs/s allowed: no sweep here gets there
    if profile == "aws-kms":
        assert baseline["cpu_cores"]["backend"] > 0  # moto's own process is found and measured
