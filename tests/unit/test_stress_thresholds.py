"""``--fail-on`` thresholds: parsing (good and bad input, one-line bounded messages) and evaluation
against real summaries of synthetic runs whose figures are known, at the boundary and with
metrics missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rekey.stress.summary import summarize, with_thresholds
from rekey.stress.thresholds import (
    FAILED_EXIT,
    METRICS,
    SHOWN,
    Threshold,
    ThresholdError,
    conclude,
    evaluate,
    exit_code,
    parse,
)
from tests.fixtures.stress_run import known_ops, write_run


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """known_ops(): 200 ops over 10 s; 1 in 40 gave up throttled, 1 in 40 refused: errors 5%;
    per 40 ops 44 attempts of which 5 throttled."""
    run = write_run(tmp_path_factory.mktemp("run") / "run", known_ops(), summary=False)
    return summarize(run, interrupted=False, thresholds=[])


def one(text: str) -> Threshold:
    [threshold] = parse(text)
    return threshold


def check(text: str, summary: dict[str, Any]) -> dict[str, Any]:
    [result] = evaluate(parse(text), summary)
    return result


# -- parsing ---------------------------------------------------------------------------------------


def test_the_issue_example_parses_into_typed_thresholds() -> None:
    p99, errors, incidents = parse("p99<500ms,errors<0.1%,incidents=0")
    assert p99 == Threshold(expr="p99<500ms", metric="p99", operator="<", limit=500.0, unit="ms")
    assert (errors.metric, errors.operator, errors.limit, errors.unit) == ("errors", "<", 0.1, "%")
    assert (incidents.metric, incidents.operator, incidents.limit) == ("incidents", "=", 0.0)


@pytest.mark.parametrize(
    ("text", "expr", "metric", "operator", "limit", "unit", "op"),
    [
        (" p99 <= 0.5 s ", "p99<=0.5s", "p99", "<=", 0.5, "s", None),
        ("P999>=250us", "p999>=250us", "p999", ">=", 250.0, "us", None),
        ("max<2000", "max<2000", "max", "<", 2000.0, "", None),
        ("lag_p99<5ms", "lag_p99<5ms", "lag_p99", "<", 5.0, "ms", None),
        ("errors==0", "errors=0", "errors", "=", 0.0, "", None),
        ("throttled<0.05", "throttled<0.05", "throttled", "<", 0.05, "", None),
        ("goodput>1e3/s", "goodput>1e3/s", "goodput", ">", 1000.0, "/s", None),
        ("rate>=100ops/s", "rate>=100ops/s", "rate", ">=", 100.0, "ops/s", None),
        ("dropped<1%", "dropped<1%", "dropped", "<", 1.0, "%", None),
        ("dropped=0", "dropped=0", "dropped", "=", 0.0, "", None),
        ("p99{op=wrap}<200ms", "p99{op=wrap}<200ms", "p99", "<", 200.0, "ms", "wrap"),
        ("errors{ op = rewrap }<1%", "errors{op=rewrap}<1%", "errors", "<", 1.0, "%", "rewrap"),
    ],
)
def test_good_clauses(
    text: str, expr: str, metric: str, operator: str, limit: float, unit: str, op: str
) -> None:
    threshold = one(text)
    assert (threshold.expr, threshold.metric, threshold.operator) == (expr, metric, operator)
    assert (threshold.limit, threshold.unit, threshold.op) == (limit, unit, op)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "--fail-on is empty"),
        ("  ", "--fail-on is empty"),
        ("p99<5ms,", "empty threshold"),
        ("p99<5ms,,errors<1%", "empty threshold"),
        ("latency<5ms", "threshold 'latency<5ms': unknown metric (p50"),
        ("<5ms", "expected a metric name"),
        ("p99", "expected an operator after p99"),
        ("p99 5ms", "expected an operator"),
        ("p99=<5ms", "expected an operator"),
        ("p99!=5ms", "expected an operator"),
        ("p99<<5ms", "expected an operator"),
        ("p99=>5", "expected an operator"),
        ("p99<", "expected a number after <"),
        ("p99<fast", "expected a number after <"),
        ("p99<nan", "expected a number"),
        ("p99<1e400", "not a finite number"),
        ("p99<-1ms", "cannot be negative"),
        ("p99<5kg", "bad unit 'kg' for p99 (us, ms or s; default ms)"),
        ("p99<5%", "bad unit '%' for p99"),
        ("errors<5", "a share is a % or a fraction from 0 to 1 (did you mean 5%?)"),
        ("errors<101%", "cannot exceed 100%"),
        ("errors<1ms", "bad unit 'ms' for errors"),
        ("goodput>5ms", "bad unit 'ms' for goodput"),
        ("incidents<0.5", "incidents is a count"),
        ("incidents<1/s", "bad unit '/s' for incidents (a count, no unit)"),
        ("p99{op=encrypt}<5ms", "unknown operation 'encrypt'"),
        ("p99{wrap}<5ms", "a selector is written {op=NAME}"),
        ("p99{op=wrap<5ms", "a selector is written"),
        ("p50{op=wrap}<5ms", "p50 has no per-operation figure"),
        ("incidents{op=wrap}=0", "incidents has no per-operation figure"),
        ("p99<5ms errors<1%", "bad unit"),
    ],
)
def test_bad_input_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(ThresholdError) as caught:
        parse(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    "text",
    [
        "x" * 5000,
        "p99<5ms," * 200,
        "p99<5" + "\u202e" * 100 + "ms",
        "p99<5\n\x1b[31mred\x1b[0m\r\x00" + "y" * 500,
        "a" * 999,
        "p99{op=" + "w" * 900 + "}<5ms",
        "p99<5" + "ms" * 400,
    ],
)
def test_hostile_input_is_never_echoed_whole(text: str) -> None:
    with pytest.raises(ThresholdError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.isprintable()
    assert len(message) < 2 * SHOWN + 120
    assert "\x1b" not in message and "\u202e" not in message


def test_every_metric_is_accepted_with_its_natural_unit() -> None:
    unit = {"latency": "ms", "share": "%", "rate": "/s", "count": ""}
    for metric, kind in METRICS.items():
        assert one(f"{metric}<=1{unit[kind]}").metric == metric


# -- evaluation ------------------------------------------------------------------------------------


def test_the_summary_figures_are_what_the_thresholds_measure(summary: dict[str, Any]) -> None:
    assert summary["done"] == 200 and summary["ok"] == 190
    assert check("errors<=5%", summary) == {"expr": "errors<=5%", "value": 5.0, "ok": True, "unit": "%"}
    assert check("success>=0.95", summary)["value"] == 0.95
    assert check("throttled<1", summary)["value"] == pytest.approx(5 / 44, rel=1e-5)
    assert check("rate>0", summary)["value"] == pytest.approx(200 / summary["elapsed"], rel=1e-5)
    assert check("goodput>0", summary)["value"] == pytest.approx(summary["goodput"], rel=1e-5)
    assert check("offered>0", summary)["value"] == pytest.approx(summary["offered_rate"], rel=1e-5)
    assert check("incidents=2", summary) == {"expr": "incidents=2", "value": 2.0, "ok": True, "unit": ""}
    assert check("incidents=0", summary)["ok"] is False
    assert check("dropped=0", summary) == {"expr": "dropped=0", "value": 0.0, "ok": True, "unit": ""}
    assert check("rotations_failed=1", summary)["ok"] is True
    assert check("rotations_late=0", summary)["ok"] is True
    assert check("lag_p99<1ms", summary)["value"] == pytest.approx(summary["lag_ms"]["p99"], rel=1e-5)


@pytest.mark.parametrize("metric", ["p50", "p90", "p95", "p99", "p999", "max", "mean"])
def test_latency_exactly_at_the_limit(summary: dict[str, Any], metric: str) -> None:
    value = summary["latency_ms"][metric]
    assert value > 0
    assert check(f"{metric}<{value}ms", summary)["ok"] is False
    assert check(f"{metric}<={value}ms", summary)["ok"] is True
    assert check(f"{metric}={value}", summary)["ok"] is True
    assert check(f"{metric}>={value}ms", summary)["ok"] is True
    assert check(f"{metric}>{value}ms", summary)["ok"] is False
    # the same limit in seconds and microseconds is the same boundary
    assert check(f"{metric}<{value / 1000!r}s", summary)["ok"] is False
    assert check(f"{metric}<={value / 1000!r}s", summary)["ok"] is True
    assert check(f"{metric}<={value * 1000!r}us", summary)["ok"] is True
    assert check(f"{metric}<{value * 1000!r}us", summary)["ok"] is False
    # and a hair above or below is decided by the value
    assert check(f"{metric}<{value * 1.001}ms", summary)["ok"] is True
    assert check(f"{metric}>{value * 0.999}ms", summary)["ok"] is True
    assert check(f"{metric}<{value * 0.999}ms", summary)["ok"] is False


def test_a_share_exactly_at_the_limit(summary: dict[str, Any]) -> None:
    # 10/200 = 0.05: in percent 5.000000000000001 in floating point, still the limit
    assert check("errors<5%", summary)["ok"] is False
    assert check("errors<=5%", summary)["ok"] is True
    assert check("errors=0.05", summary)["ok"] is True
    assert check("errors<0.05", summary)["ok"] is False
    assert check("errors<5.01%", summary)["ok"] is True


@pytest.mark.parametrize(("ok", "limit"), [(97, "3%"), (93, "7%"), (99, "0.01"), (71, "29%")])
def test_a_share_whose_floating_point_falls_just_under_the_limit_is_still_at_it(ok: int, limit: str) -> None:
    summary = {"done": 100, "ok": ok}  # 0.29 / 0.01 == 28.999999999999996
    assert check(f"errors<{limit}", summary)["ok"] is False
    assert check(f"errors<={limit}", summary)["ok"] is True
    assert check(f"errors={limit}", summary)["ok"] is True
    assert check(f"errors>={limit}", summary)["ok"] is True


def test_per_operation_thresholds(summary: dict[str, Any]) -> None:
    for op in ("wrap", "unwrap", "rewrap"):
        figures = summary["ops"][op]
        assert check(f"p99{{op={op}}}<={figures['p99_ms']}ms", summary)["ok"] is True
        assert check(f"p99{{op={op}}}<{figures['p99_ms']}ms", summary)["ok"] is False
        result = check(f"errors{{op={op}}}<=100%", summary)
        assert result["value"] == pytest.approx((1 - figures["success_ratio"]) * 100, rel=1e-5)
        goodput = check(f"goodput{{op={op}}}>0", summary)["value"]
        assert goodput == pytest.approx(figures["throughput"], rel=1e-5)
    # known_ops: 15 rewraps, 5 of them refused; the ops that gave up throttled are unwraps
    assert check("errors{op=rewrap}<=33.4%", summary)["value"] == pytest.approx(100 * 5 / 15, rel=1e-5)
    assert check("errors{op=wrap}=0", summary)["ok"] is True


def test_a_missing_metric_fails_with_no_value(summary: dict[str, Any]) -> None:
    nothing: dict[str, Any] = {
        **summary,
        "done": 0,
        "ok": 0,
        "attempts": 0,
        "throttled_attempts": 0,
        "offered": 0,
        "latency_ms": {k: None for k in summary["latency_ms"]},
        "lag_ms": {"p50": None, "p99": None, "max": None},
        "ops": {},
    }
    for text in (
        "p99<1s",
        "max<1s",
        "errors<100%",
        "success>=0",
        "throttled<=100%",
        "rate>=0",
        "goodput>=0",
        "offered>=0",
        "lag_p99<1s",
        "p99{op=wrap}<1s",
        "dropped<=100%",
    ):
        assert check(text, nothing) == {**check(text, nothing), "value": None, "ok": False}, text
    assert check("p99{op=wrap}<1s", {**summary, "ops": {"unwrap": summary["ops"]["unwrap"]}})["ok"] is False
    empty: dict[str, Any] = {}
    for threshold in parse("p99<1s,errors<1%,incidents=0,rotations_failed=0,dropped=0"):
        [result] = evaluate([threshold], empty)
        assert result["value"] is None and result["ok"] is False


def test_exit_code_and_the_recorded_summary(summary: dict[str, Any]) -> None:
    passing = evaluate(parse("p99<10s,errors<=5%"), summary)
    failing = evaluate(parse("p99<10s,errors<1%"), summary)
    assert exit_code(passing) == 0
    assert exit_code(failing) == FAILED_EXIT == 3
    assert with_thresholds(summary, passing)["passed"] is True
    recorded = with_thresholds(summary, failing)
    assert recorded["passed"] is False
    assert [t["ok"] for t in recorded["thresholds"]] == [True, False]


def test_evaluated_thresholds_render_in_the_report(tmp_path: Path, summary: dict[str, Any]) -> None:
    import json

    from rekey.stress.report import load_runs, render_html

    run = write_run(tmp_path / "run", known_ops())
    evaluated = evaluate(parse("p99<10s,errors<1%"), summary)
    recorded = summarize(run, interrupted=False, thresholds=evaluated)
    (run / "summary.json").write_text(json.dumps(recorded))
    html = render_html(load_runs([run]))
    assert "errors&lt;1%" in html and "FAIL" in html


def test_conclude_records_the_crossed_limits_as_incidents(tmp_path: Path) -> None:
    import json

    from rekey.stress.report import load_runs
    from rekey.stress.summary import read_incidents

    run = write_run(tmp_path / "run", known_ops(), summary=False)
    before = len(read_incidents(run))
    final = conclude(run, parse("p99<10s,errors<1%,incidents=2"), elapsed=10.0, interrupted=False)
    assert [(t["expr"], t["ok"]) for t in final["thresholds"]] == [
        ("p99<10s", True),
        ("errors<1%", False),
        ("incidents=2", True),  # the run's own incidents, not the threshold one it causes
    ]
    assert final["passed"] is False and exit_code(final["thresholds"]) == FAILED_EXIT
    incidents = read_incidents(run)
    assert len(incidents) == before + 1 == final["incidents"]
    [crossed] = [i for i in incidents if i["kind"] == "threshold"]
    assert (crossed["t"], crossed["evidence"]["expr"], crossed["evidence"]["value"]) == (
        10.0,
        "errors<1%",
        5.0,
    )
    assert final == summarize(run, elapsed=10.0, interrupted=False, thresholds=final["thresholds"])
    (run / "summary.json").write_text(json.dumps(final))
    [loaded] = load_runs([run])
    assert loaded.mismatches == []
