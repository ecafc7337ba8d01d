"""The stress summary computed from a run directory's raw files agrees with the operations it
recorded (counts, rates, exact percentiles, success ratios), and an unreadable run is refused."""

from __future__ import annotations

import base64
import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from rekey.stress.summary import RunDirError, merge_hdrs, read_seconds, summarize
from tests.fixtures.stress_run import Op, known_ops, write_run

SPEC_KEYS = {
    "format",
    "run_id",
    "label",
    "interrupted",
    "elapsed",
    "offered",
    "offered_rate",
    "done",
    "ok",
    "goodput",
    "success_ratio",
    "latency_ms",
    "lag_ms",
    "ops",
    "outcomes",
    "attempts",
    "throttled_attempts",
    "throttled_share",
    "throttle_wait",
    "rotations",
    "incidents",
    "thresholds",
    "passed",
}


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def test_the_summary_has_the_spec_shape_and_the_known_counts(tmp_path: Path) -> None:
    ops = known_ops(rate=20, duration=10)
    run = write_run(tmp_path / "run", ops, summary=False)
    summary = summarize(run)

    assert set(summary) == SPEC_KEYS
    assert set(summary["latency_ms"]) == {"mean", "p50", "p90", "p95", "p99", "p999", "max"}
    assert set(summary["lag_ms"]) == {"p50", "p99", "max"}
    for figures in summary["ops"].values():
        assert set(figures) == {"count", "rate", "throughput", "mean_ms", "p95_ms", "p99_ms", "success_ratio"}
    assert set(summary["rotations"]) == {"started", "done", "failed", "late"}

    # 200 ops: 120 wrap, 65 unwrap (60 + the 5 that gave up throttled), 15 rewrap; 5 of those
    # rewraps refused with version_disabled.
    assert summary["offered"] == summary["done"] == 200
    assert summary["ok"] == 190
    assert summary["outcomes"] == {"ok": 190, "throttled": 5, "version_disabled": 5}
    assert summary["success_ratio"] == pytest.approx(0.95)
    assert {name: f["count"] for name, f in summary["ops"].items()} == {
        "wrap": 120,
        "unwrap": 65,
        "rewrap": 15,
    }
    assert summary["ops"]["wrap"]["success_ratio"] == 1.0
    assert summary["ops"]["unwrap"]["success_ratio"] == pytest.approx(60 / 65)
    assert summary["ops"]["rewrap"]["success_ratio"] == pytest.approx(10 / 15)

    # elapsed: t0 to the last completion.
    elapsed = max(o.end for o in ops)
    assert summary["elapsed"] == pytest.approx(elapsed)
    assert summary["goodput"] == pytest.approx(190 / elapsed)
    assert summary["offered_rate"] == pytest.approx(200 / elapsed)
    assert summary["ops"]["wrap"]["rate"] == pytest.approx(120 / elapsed)
    assert summary["ops"]["unwrap"]["throughput"] == pytest.approx(60 / elapsed)

    # 10 rewraps retried once after a throttle (2 attempts), the 5 unwraps that gave up tried
    # 3 times (all throttled), the 5 refused rewraps once.
    assert summary["attempts"] == 200 + 10 + 5 * 2
    assert summary["throttled_attempts"] == 10 + 5 * 3
    assert summary["throttled_share"] == pytest.approx(25 / 220)
    assert summary["throttle_wait"] == pytest.approx(10 * 0.05 + 5 * 0.1, rel=1e-6)

    assert summary["rotations"] == {"started": 2, "done": 1, "failed": 1, "late": 0}
    assert summary["incidents"] == 2
    # No summary.json: the run did not finish, and no threshold was evaluated.
    assert summary["interrupted"] is True
    assert summary["thresholds"] == [] and summary["passed"] is True
    assert summary["label"] == "governor/azure"


def test_latency_is_measured_from_the_intended_start_exactly(tmp_path: Path) -> None:
    ops = known_ops(rate=20, duration=10)
    run = write_run(tmp_path / "run", ops, summary=False)
    summary = summarize(run)
    latencies = [o.latency * 1000 for o in ops]
    for q, key in ((50, "p50"), (90, "p90"), (95, "p95"), (99, "p99"), (99.9, "p999")):
        assert summary["latency_ms"][key] == pytest.approx(nearest_rank(latencies, q), abs=1e-3), key
    assert summary["latency_ms"]["mean"] == pytest.approx(sum(latencies) / len(latencies), abs=1e-3)
    assert summary["latency_ms"]["max"] == pytest.approx(max(latencies), abs=1e-3)
    for name in ("wrap", "unwrap", "rewrap"):
        mine = [o.latency * 1000 for o in ops if o.op == name]
        figures = summary["ops"][name]
        assert figures["p95_ms"] == pytest.approx(nearest_rank(mine, 95), abs=1e-3)
        assert figures["p99_ms"] == pytest.approx(nearest_rank(mine, 99), abs=1e-3)
        assert figures["mean_ms"] == pytest.approx(sum(mine) / len(mine), abs=1e-3)
    # The rewraps: 20 ms + i%5 ms (i = 10k + 9, so 4 ms), + a 50 ms throttle wait for the 10
    # that succeeded; the 5 refused at once took 24 ms.
    assert summary["ops"]["rewrap"]["p99_ms"] == pytest.approx(74.0)
    assert summary["ops"]["rewrap"]["mean_ms"] == pytest.approx((10 * 74 + 5 * 24) / 15, abs=1e-3)

    # A stalled second shows up as latency, whatever start says (no coordinated omission).
    stalled = [Op(o.intended, o.intended, o.end + (1.0 if i < 10 else 0.0), o.op) for i, o in enumerate(ops)]
    other = summarize(write_run(tmp_path / "stalled", stalled, summary=False))
    assert other["latency_ms"]["max"] > 1000


def test_lag_comes_from_the_per_second_histograms_and_agrees_with_the_events(tmp_path: Path) -> None:
    ops = known_ops(rate=20, duration=10)
    run = write_run(tmp_path / "run", ops, summary=False)
    summary = summarize(run)
    # Every op started 0.2 ms after its intended time.
    for key in ("p50", "p99", "max"):
        assert summary["lag_ms"][key] == pytest.approx(0.2, rel=1e-3)
    # The exact p99 of the events and the one of the merged HDR histograms agree within its
    # three significant digits.
    merged = merge_hdrs(second["hdr"] for second in read_seconds(run))
    assert merged.get_total_count() == summary["done"]
    assert merged.get_value_at_percentile(99) / 1000 == pytest.approx(summary["latency_ms"]["p99"], rel=1e-3)


def test_the_recorded_verdicts_are_kept_and_the_caller_can_say_them(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    recorded = json.loads((run / "summary.json").read_text())
    again = summarize(run)
    assert again == recorded
    assert again["interrupted"] is False and again["thresholds"][0]["expr"] == "p99<500ms"

    mine = summarize(
        run, elapsed=20.0, interrupted=True, thresholds=[{"expr": "errors<1%", "value": 5.0, "ok": False}]
    )
    assert mine["elapsed"] == 20.0 and mine["goodput"] == pytest.approx(190 / 20)
    assert mine["interrupted"] is True and mine["passed"] is False


def test_an_interrupted_run_reports_what_it_recorded(tmp_path: Path) -> None:
    ops = known_ops(rate=20, duration=20)
    run = write_run(tmp_path / "run", ops, summary=False)
    # The crash lost process 1's second chunk and cut seconds.jsonl mid-line.
    (run / "events" / "p01-000001.parquet").unlink()
    with (run / "seconds.jsonl").open("a") as f:
        f.write('{"t": 11, "offered": 3')
    summary = summarize(run)
    kept = [o for o in ops if not (o.process == 1 and o.end >= 10)]
    assert summary["done"] == len(kept) < 400
    assert summary["offered"] == 400  # the seconds saw every op intended
    assert summary["interrupted"] is True


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: (run / "meta.json").unlink(), "not a stress run directory"),
        (lambda run: (run / "meta.json").write_text("{not json"), "meta.json: not JSON"),
        (lambda run: (run / "meta.json").write_text('{"format": "other/9"}'), "is not 'rekey-stress/1'"),
        (lambda run: (run / "seconds.jsonl").unlink(), "seconds.jsonl: missing"),
        (
            lambda run: (run / "seconds.jsonl").write_text('{"t": 0}\nnot json\n{"t": 2}\n'),
            "line 2 is not JSON",
        ),
        (
            lambda run: (run / "seconds.jsonl").write_text('{"t": 0, "lag_hdr": "garbage"}\n'),
            "cannot be decoded",
        ),
        (
            lambda run: (run / "events" / "p00-000000.parquet").write_bytes(b"PAR1 broken"),
            "not a readable Parquet",
        ),
        (lambda run: [p.unlink() for p in (run / "events").iterdir()], "empty run"),
        (lambda run: (run / "rotations.jsonl").write_text('{"event": "start"}\n'), "has no time t"),
        (
            lambda run: (run / "seconds.jsonl").write_text(
                '{"t": 0, "offered": 1e400}\n{"t": 1, "offered": 9e99}\n'
            ),
            "out of range",
        ),
        (
            lambda run: (run / "seconds.jsonl").write_text(json.dumps({"t": 0, "lag_hdr": _bomb()})),
            "larger than",
        ),
    ],
)
def test_a_run_that_cannot_be_read_is_refused_in_one_line(
    tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    run = write_run(tmp_path / "run", summary=False)
    damage(run)
    with pytest.raises(RunDirError, match=message) as caught:
        summarize(run)
    assert "\n" not in str(caught.value)


def _bomb() -> str:
    """An HDR encoding (cookie, length, zlib) that inflates to 64 MiB."""
    body = zlib.compress(bytes(64 * 1024 * 1024), 9)
    return base64.b64encode(b"\x1c\x84\x93\x14" + len(body).to_bytes(4, "big") + body).decode()


def test_a_file_is_no_run(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        summarize(tmp_path / "file")


def test_a_run_without_rotations_or_incidents_needs_neither_file(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", summary=False)
    (run / "rotations.jsonl").unlink()
    (run / "incidents.jsonl").unlink()
    summary = summarize(run)
    assert summary["rotations"] == {"started": 0, "done": 0, "failed": 0, "late": 0}
    assert summary["incidents"] == 0 and summary["done"] == 200
