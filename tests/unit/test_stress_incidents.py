"""Incident detection from synthetic seconds.jsonl rows and rotation events (every kind, merging,
stale-version refusals, a rotation late and then failed), incidents.jsonl appending, and the
report rendering a run directory holding the detector's incidents."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from rekey.stress.incidents import (
    KINDS,
    MAX_SAMPLES,
    NO_USABLE_VERSION,
    ROTATION_FAILED,
    ROTATION_LATE,
    THRESHOLD,
    VERSION_REFUSED,
    IncidentDetector,
    threshold_incidents,
    write_incident,
)
from rekey.stress.report import load_runs, render_html
from rekey.stress.summary import read_incidents, read_jsonl
from rekey.stress.thresholds import evaluate, parse
from tests.fixtures.stress_run import Op, incidents_for, known_ops, rotations_for, seconds_for, write_run


def ops_in(second: int, version: int, n: int, outcome: str = "ok", op: str = "wrap") -> list[Op]:
    """``n`` ops intended and completed within ``second`` on key ``version``."""
    return [
        Op(
            intended=second + (k + 1) / (n + 2),
            start=second + (k + 1) / (n + 2),
            end=second + (k + 1) / (n + 2) + 0.001,
            op=op,
            outcome=outcome,
            key_version=version,
        )
        for k in range(n)
    ]


def rows(*seconds: list[Op], pad_to: int | None = None) -> list[dict[str, Any]]:
    ops = [o for group in seconds for o in group]
    if pad_to is not None:
        ops += ops_in(pad_to, 1, 1)
    return seconds_for(ops, processes=1)


def feed(detector: IncidentDetector, seconds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for row in seconds:
        found += detector.on_second(row)
    return found


def rotation(
    t: float, event: str, rid: str = "rot-1", phase: str = "REWRAPPING", **extra: Any
) -> dict[str, Any]:
    return {"t": t, "rotation_id": rid, "event": event, "phase": phase, "rewrapped": 0, "total": 100, **extra}


def one_line(incident: dict[str, Any]) -> None:
    assert set(incident) == {"t", "end", "kind", "message", "evidence"}
    assert incident["kind"] in KINDS
    assert isinstance(incident["message"], str) and incident["message"].isprintable()
    json.dumps(incident, allow_nan=False)


# -- rotations -------------------------------------------------------------------------------------


def test_a_rotation_running_past_its_interval_is_late_at_its_deadline() -> None:
    detector = IncidentDetector(rotate_every=5)
    assert detector.on_rotation(rotation(1.0, "start", phase="PREPARING")) == []
    detector.on_rotation(rotation(2.0, "progress", rewrapped=40))
    ticks = [{"t": t, "done": 0} for t in range(8)]
    assert feed(detector, ticks[:6]) == []  # the row of second 5 ends at 6: the deadline is 6
    [late] = detector.on_second(ticks[6])
    one_line(late)
    assert late["kind"] == ROTATION_LATE and late["t"] == 6.0 and late["end"] is None
    assert late["evidence"] == {
        "rotation_id": "rot-1",
        "started": 1.0,
        "interval": 5,
        "phase": "REWRAPPING",
        "rewrapped": 40,
        "total": 100,
    }
    assert "rot-1" in late["message"] and "REWRAPPING" in late["message"] and "40/100" in late["message"]
    assert detector.on_second(ticks[7]) == []  # raised once
    assert detector.on_rotation(rotation(8.0, "done", phase="DONE")) == []
    assert detector.finish(9.0) == []
    assert detector.incidents == [late]


def test_a_rotation_done_within_its_interval_is_no_incident() -> None:
    detector = IncidentDetector(rotate_every=5)
    for event in rotations_for()[:6]:  # rot-1: 2.0 .. 4.5
        assert detector.on_rotation(event) == []
    assert feed(detector, [{"t": t, "done": 0} for t in range(20)]) == []
    assert detector.finish(20.0) == []


def test_lateness_is_seen_from_the_rotation_events_alone() -> None:
    detector = IncidentDetector(rotate_every=5)
    detector.on_rotation(rotation(1.0, "start"))
    [late] = detector.on_rotation(rotation(7.5, "done", phase="DONE"))
    assert late["kind"] == ROTATION_LATE and late["t"] == 6.0


def test_a_rotation_late_and_then_failed_is_two_incidents() -> None:
    detector = IncidentDetector(rotate_every=5)
    detector.on_rotation(rotation(0.0, "start", phase="PREPARING"))
    detector.on_rotation(rotation(1.0, "phase", phase="REWRAPPING"))
    [late] = feed(detector, [{"t": t, "done": 0} for t in range(7)])
    [failed] = detector.on_rotation(rotation(8.0, "failed", rewrapped=25, message="KMS unavailable"))
    one_line(failed)
    assert (late["kind"], late["t"]) == (ROTATION_LATE, 5.0)
    assert (failed["kind"], failed["t"], failed["end"]) == (ROTATION_FAILED, 8.0, None)
    assert failed["message"] == "rotation rot-1 failed in REWRAPPING: KMS unavailable"
    assert failed["evidence"]["late"] is True and failed["evidence"]["rewrapped"] == 25
    assert detector.finish(10.0) == []
    assert [i["kind"] for i in detector.incidents] == [ROTATION_LATE, ROTATION_FAILED]


def test_the_fixture_rotations_give_the_fixture_incident() -> None:
    detector = IncidentDetector(rotate_every=5)
    found = [i for event in rotations_for() for i in detector.on_rotation(event)]
    [expected] = [i for i in incidents_for() if i["kind"] == ROTATION_FAILED]
    assert [(i["t"], i["kind"], i["message"]) for i in found] == [
        (expected["t"], expected["kind"], expected["message"])
    ]
    assert found[0]["evidence"]["rotation_id"] == "rot-2"


def test_the_orchestrations_late_event_counts_once() -> None:
    detector = IncidentDetector(rotate_every=None)
    detector.on_rotation(rotation(0.0, "start"))
    assert feed(detector, [{"t": t, "done": 0} for t in range(100)]) == []  # no interval: no clock
    [late] = detector.on_rotation(rotation(60.0, "late"))
    assert (late["kind"], late["t"]) == (ROTATION_LATE, 60.0)
    assert detector.on_rotation(rotation(61.0, "late")) == []
    both = IncidentDetector(rotate_every=5)
    both.on_rotation(rotation(0.0, "start"))
    assert len(feed(both, [{"t": t, "done": 0} for t in range(6)])) == 1
    assert both.on_rotation(rotation(6.0, "late")) == []


def test_finish_raises_the_lateness_of_a_rotation_still_running() -> None:
    running = IncidentDetector(rotate_every=5)
    running.on_rotation(rotation(3.0, "start"))
    [late] = running.finish(9.0)
    assert (late["kind"], late["t"]) == (ROTATION_LATE, 8.0)
    assert running.finish(9.0) == []
    early = IncidentDetector(rotate_every=5)
    early.on_rotation(rotation(3.0, "start"))
    assert early.finish(7.9) == []  # the run ended before the rotation was due


def test_a_failure_message_is_one_bounded_line() -> None:
    detector = IncidentDetector()
    detector.on_rotation(rotation(0.0, "start"))
    [failed] = detector.on_rotation(rotation(1.0, "failed", message="boom\nTraceback\x1b[31m " + "x" * 5000))
    one_line(failed)
    assert len(failed["message"]) < 250
    assert failed["evidence"]["reason"].startswith("boom Traceback")


# -- versions --------------------------------------------------------------------------------------


def test_refusals_with_no_successor_in_use_merge_into_one_incident() -> None:
    seconds = rows(
        ops_in(0, 1, 10),
        ops_in(1, 1, 10),
        ops_in(2, 1, 8) + ops_in(2, 1, 2, "version_disabled", "unwrap"),  # v1 refused, v1 still served
        ops_in(3, 1, 1, "version_disabled"),  # refused, nothing served
        ops_in(4, 1, 5) + ops_in(4, 1, 1, "version_disabled"),
        ops_in(5, 1, 10),
    )
    detector = IncidentDetector()
    found = feed(detector, seconds)
    [incident] = [i for i in found if i["kind"] == VERSION_REFUSED]
    one_line(incident)
    assert (incident["t"], incident["end"]) == (2.0, 5.0)
    [outage] = [i for i in found if i["kind"] != VERSION_REFUSED]  # second 3: no op succeeded
    assert (outage["kind"], outage["t"], outage["end"]) == (NO_USABLE_VERSION, 3.0, 4.0)
    evidence = incident["evidence"]
    assert evidence["seconds"] == 3 and evidence["refused"] == 4
    assert evidence["refused_versions"] == {"1": 4} and evidence["ok_versions"] == {"1": 13}
    assert evidence["errors"] == {"version_disabled": 4} and evidence["stale_refusals"] == {}
    assert [s[1:] for s in evidence["samples"]] == [["unwrap", 1, "version_disabled"]] * 2 + [
        ["wrap", 1, "version_disabled"]
    ] * 2
    assert all(2.0 <= s[0] < 5.0 for s in evidence["samples"])
    assert "key version 1" in incident["message"] and "over 3 s" in incident["message"]
    assert detector.finish(6.0) == []


def test_a_stale_version_refused_while_its_successor_serves_is_no_incident() -> None:
    seconds = rows(
        ops_in(0, 1, 10),
        ops_in(1, 2, 10) + ops_in(1, 1, 3, "version_disabled", "unwrap"),  # v2 serves: stale v1
        ops_in(2, 2, 10) + ops_in(2, 2, 1, "version_disabled"),  # v2 itself refused: incident
        ops_in(3, 2, 10),
    )
    detector = IncidentDetector()
    [incident] = feed(detector, seconds)
    assert (incident["kind"], incident["t"], incident["end"]) == (VERSION_REFUSED, 2.0, 3.0)
    assert incident["evidence"]["refused_versions"] == {"2": 1}
    assert "newest version serving 2" in incident["message"]
    assert detector.stale_refusals == {1: 3}


def test_stale_refusals_inside_an_incident_are_its_evidence() -> None:
    seconds = rows(
        ops_in(0, 3, 4) + ops_in(0, 3, 1, "version_disabled") + ops_in(0, 2, 2, "version_disabled")
    )
    assert IncidentDetector().on_second(seconds[0]) == []  # still open: closed by the next second or finish
    detector = IncidentDetector()
    detector.on_second(seconds[0])
    [incident] = detector.finish(1.0)
    assert incident["evidence"]["refused_versions"] == {"3": 1}
    assert incident["evidence"]["stale_refusals"] == {"2": 2}


def test_no_usable_version_is_a_period_of_zero_ok_and_refusals() -> None:
    seconds = rows(
        ops_in(0, 1, 10),
        ops_in(1, 1, 6, "version_disabled"),
        [],  # nothing completed: neither breaks nor extends the period
        ops_in(3, 1, 3, "version_disabled") + ops_in(3, 1, 2, "unavailable") + ops_in(3, 1, 4, "dropped"),
        ops_in(4, 2, 10),
    )
    assert [row["done"] for row in seconds] == [10, 6, 0, 9, 10]
    detector = IncidentDetector()
    found = feed(detector, seconds)
    by_kind = {i["kind"]: i for i in found}
    assert sorted(by_kind) == [NO_USABLE_VERSION, VERSION_REFUSED]
    outage = by_kind[NO_USABLE_VERSION]
    one_line(outage)
    assert (outage["t"], outage["end"]) == (1.0, 4.0)
    assert outage["evidence"]["seconds"] == 2 and outage["evidence"]["attempted"] == 11
    assert outage["evidence"]["ok"] == 0 and outage["evidence"]["refused"] == 9
    assert outage["evidence"]["errors"] == {"dropped": 4, "unavailable": 2, "version_disabled": 9}
    assert "no usable key version for 2 s" in outage["message"]
    assert (by_kind[VERSION_REFUSED]["t"], by_kind[VERSION_REFUSED]["end"]) == (1.0, 4.0)


def test_an_outage_that_is_not_about_versions_is_not_one() -> None:
    seconds = rows(
        ops_in(0, 1, 3, "version_disabled") + ops_in(0, 1, 4, "unavailable"), ops_in(1, 1, 9, "dropped")
    )
    detector = IncidentDetector()
    found = feed(detector, seconds) + detector.finish(2.0)
    assert [i["kind"] for i in found] == [VERSION_REFUSED]  # 3 of 7 refused: under half


def test_not_found_counts_as_a_refusal() -> None:
    row = {
        "t": 4,
        "done": 5,
        "ok": 0,
        "outcomes": {"not_found": 5},
        "versions": {},
        "refused": [[4.1 + k / 10, "unwrap", 7, "not_found"] for k in range(5)],
    }
    detector = IncidentDetector()
    assert detector.on_second(row) == []
    found = detector.finish(30.0)
    assert {i["kind"] for i in found} == {VERSION_REFUSED, NO_USABLE_VERSION}
    assert all((i["t"], i["end"]) == (4.0, 5.0) for i in found)


def test_samples_are_capped_and_a_long_period_is_one_incident() -> None:
    seconds = rows(*[ops_in(t, 1, 3, "version_disabled") for t in range(30)], ops_in(30, 2, 2))
    detector = IncidentDetector()
    found = feed(detector, seconds)
    assert sorted((i["kind"], i["t"], i["end"]) for i in found) == [
        (NO_USABLE_VERSION, 0.0, 30.0),
        (VERSION_REFUSED, 0.0, 30.0),
    ]
    assert all(len(i["evidence"]["samples"]) == MAX_SAMPLES for i in found)
    assert all(i["evidence"]["refused"] == 90 for i in found)


def test_the_known_run_refusals_are_version_refused_incidents() -> None:
    # known_ops: every 40th op (t = 1.95, 3.95, ...) a rewrap refused on the version the others use
    detector = IncidentDetector(rotate_every=5)
    found = feed(detector, seconds_for(known_ops(), processes=2)) + detector.finish(10.0)
    assert [(i["kind"], i["t"], i["end"]) for i in found] == [
        (VERSION_REFUSED, float(t), float(t + 1)) for t in (1, 3, 5, 7, 9)
    ]


# -- thresholds, writing, the report ---------------------------------------------------------------


def test_threshold_incidents_for_the_limits_crossed() -> None:
    summary = {"done": 100, "ok": 90, "latency_ms": {"p99": 612.5}, "incidents": 0}
    evaluated = evaluate(parse("p99<500ms,errors<20%,incidents=0,lag_p99<5ms"), summary)
    found = threshold_incidents(evaluated, 60.0)
    for incident in found:
        one_line(incident)
    assert [(i["kind"], i["t"], i["end"]) for i in found] == [(THRESHOLD, 60.0, None)] * 2
    assert found[0]["message"] == "threshold p99<500ms crossed: measured 612.5ms"
    assert found[0]["evidence"] == {"expr": "p99<500ms", "value": 612.5, "unit": "ms", "period": [0.0, 60.0]}
    assert found[1]["message"] == "threshold lag_p99<5ms crossed: not measured (no value)"
    assert threshold_incidents(evaluate(parse("errors<20%"), summary), 60.0) == []


def test_write_incident_appends_lines_that_survive(tmp_path: Path) -> None:
    path = tmp_path / "incidents.jsonl"
    detector = IncidentDetector(rotate_every=5, on_incident=lambda i: write_incident(path, i))
    detector.on_rotation(rotation(0.0, "start"))
    detector.on_rotation(rotation(6.0, "failed", message="quota"))
    assert [r["kind"] for r in read_jsonl(path)] == [ROTATION_LATE, ROTATION_FAILED]  # written live
    with path.open("a") as file:
        file.write('{"t": 7, "kind": "rotation-fa')  # a crash mid-line
    write_incident(path, threshold_incidents([{"expr": "p99<1ms", "value": 2.0, "ok": False}], 9.0)[0])
    assert [r["kind"] for r in read_incidents(tmp_path)] == [ROTATION_LATE, ROTATION_FAILED, THRESHOLD]
    assert path.read_text().endswith("}\n") and path.read_text().count("\n") == 3
    with pytest.raises(ValueError, match="not an incident kind"):
        write_incident(path, {"t": 1, "kind": "oops"})


def test_write_incident_from_threads_keeps_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "incidents.jsonl"
    incident = threshold_incidents([{"expr": "p99<1ms", "value": 2.0, "ok": False}], 9.0)[0]

    def write() -> None:
        for _ in range(25):
            write_incident(path, {**incident, "evidence": {"pad": "p" * 5000}})

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(read_jsonl(path)) == 100


def test_the_report_renders_a_run_with_every_kind_of_incident(tmp_path: Path) -> None:
    ops = known_ops(processes=1)
    seconds = seconds_for(ops, processes=1)
    for row in seconds[6:9]:  # seconds 6..8: nothing served, everything refused on version 2
        row.update(ok=0, versions={}, outcomes={"version_disabled": row["done"]})
        row["refused"] = [[row["t"] + 0.5, "wrap", 2, "version_disabled"]]
    detector = IncidentDetector(rotate_every=2)
    for event in rotations_for():
        detector.on_rotation(event)
    feed(detector, seconds)
    detector.finish(10.0)
    evaluated = evaluate(parse("p99<1ms"), {"done": 1, "latency_ms": {"p99": 30.0}})
    incidents = detector.incidents + threshold_incidents(evaluated, 10.0)
    assert {i["kind"] for i in incidents} == set(KINDS)
    run = write_run(tmp_path / "run", ops, incidents=incidents, processes=1)
    path = tmp_path / "copy.jsonl"
    for incident in incidents:
        write_incident(path, incident)
    assert read_jsonl(path) == json.loads(json.dumps(incidents))
    [loaded] = load_runs([run])
    assert len(loaded.incidents) == len(incidents)
    html = render_html([loaded])
    incidents_section = html[html.index('id="incidents"') :]
    for kind in KINDS:
        assert kind in incidents_section
    assert "no usable key version for 3 s" in incidents_section
