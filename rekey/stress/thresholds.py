"""``--fail-on``: k6-style pass/fail thresholds over a stress run's summary.

``--fail-on 'p99<500ms,errors<0.1%,incidents=0'`` is a comma-separated list of clauses
``METRIC[{op=OP}] OPERATOR NUMBER[UNIT]``; `parse` turns it into `Threshold` objects (or raises
a one-line `ThresholdError`, exit code 2, before any load is offered) and `evaluate` checks them
against the dict `rekey.stress.summary.summarize` produces, giving the
``[{"expr", "value", "ok", "unit"}]`` that `rekey.stress.summary.with_thresholds` records. A run
that violates any threshold exits with `FAILED_EXIT` (3). At the end of a run, `conclude` does it
all: summarize, evaluate, append a ``threshold`` incident per limit crossed, and return the final
summary (the only function here that touches files).

Metrics (`METRICS`), the unit each limit is written in, and where the value comes from:

- latency ``p50 p90 p95 p99 p999 max mean`` (``latency_ms``: intended start to end) and the
  generator's schedule lag ``lag_p50 lag_p99 lag_max`` (``lag_ms``): units ``us``/``µs``,
  ``ms`` (the default) or ``s``;
- shares ``errors`` (ops that did not end ok, dropped ones included, over ops done),
  ``success`` (ok over done) and ``throttled`` (attempts answered with a throttle over attempts
  sent): ``%`` or a bare fraction in 0..1;
- rates ``rate`` (ops completed per s, any outcome), ``goodput`` (ok ops per s) and
  ``offered`` (ops scheduled per s): bare, ``/s`` or ``ops/s``;
- counts ``incidents`` (incidents recorded), ``dropped`` (ops never sent because a process's
  queue was full; ``dropped<1%`` is their share of the ops offered), ``rotations_failed`` and
  ``rotations_late``: bare integers.

Per operation (``p99{op=wrap}<200ms``): ``p95 p99 mean errors success rate goodput`` for ``op``
one of `rekey.stress.summary.OPS`, from the summary's ``ops`` table.

Operators: ``< <= > >= =`` (``==`` is ``=``). A measured value equal to the limit (to a relative
1e-9, so that ``0.5s`` and ``500ms`` are the same limit) fails ``<`` and ``>`` and passes
``<=``, ``>=`` and ``=``. A metric the summary does not have (no op done, no attempt sent, an
operation that never ran) fails its threshold with the value None: a limit on nothing is not met.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from rekey.stress.incidents import threshold_incidents, write_incident
from rekey.stress.summary import INCIDENTS, OPS, summarize, with_thresholds

FAILED_EXIT: Final = 3
"""Exit code of ``rekey stress run`` when a ``--fail-on`` threshold is violated."""

MAX_TEXT: Final = 1000
"""Longest ``--fail-on`` accepted (characters)."""
MAX_CLAUSES: Final = 50
SHOWN: Final = 80
"""Longest piece of the user's input quoted in an error message."""
EQUAL_REL_TOL: Final = 1e-9

LATENCY: Final = "latency"
SHARE: Final = "share"
RATE: Final = "rate"
COUNT: Final = "count"
"""Kinds of metric: the units their limits take."""

LATENCY_UNITS: Final = {"us": 0.001, "µs": 0.001, "μs": 0.001, "ms": 1.0, "s": 1000.0}
"""Latency units, as the number of milliseconds in one."""
RATE_UNITS: Final = ("", "/s", "ops/s")

METRICS: Final[dict[str, str]] = {
    "p50": LATENCY,
    "p90": LATENCY,
    "p95": LATENCY,
    "p99": LATENCY,
    "p999": LATENCY,
    "max": LATENCY,
    "mean": LATENCY,
    "lag_p50": LATENCY,
    "lag_p99": LATENCY,
    "lag_max": LATENCY,
    "errors": SHARE,
    "success": SHARE,
    "throttled": SHARE,
    "rate": RATE,
    "goodput": RATE,
    "offered": RATE,
    "incidents": COUNT,
    "dropped": COUNT,
    "rotations_failed": COUNT,
    "rotations_late": COUNT,
}
"""Every metric a threshold may name, and its kind."""
PER_OP_METRICS: Final = ("p95", "p99", "mean", "errors", "success", "rate", "goodput")
"""Metrics with a per-operation form (``METRIC{op=NAME}``)."""
OPERATORS: Final = ("<=", ">=", "==", "<", ">", "=")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SELECTOR = re.compile(r"\{\s*op\s*=\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class ThresholdError(ValueError):
    """A ``--fail-on`` that cannot be parsed; the message is one line meant for the user and
    quotes at most `SHOWN` characters of the input."""

    exit_code = 2


def shown(text: str) -> str:
    """``text`` safe to put in a one-line message: characters that do not print (newlines,
    controls, bidi overrides) as ``?``, at most `SHOWN` characters, quoted."""
    clean = "".join(c if c.isprintable() else "?" for c in text[: SHOWN + 1])
    if len(clean) > SHOWN:
        clean = clean[: SHOWN - 3] + "..."
    return f"'{clean}'"


@dataclass(frozen=True)
class Threshold:
    """One parsed clause: ``metric`` (of ``op`` when given) ``operator`` ``limit`` ``unit``.

    ``limit`` is the number as written, in ``unit`` (``"ms"``, ``"%"``, ``""``...); values are
    compared in that unit."""

    expr: str
    """The clause without its spaces, as `evaluate` reports it."""
    metric: str
    operator: str
    """One of ``< <= > >= =``."""
    limit: float
    unit: str
    op: str | None = None

    @property
    def kind(self) -> str:
        return METRICS[self.metric]

    def holds(self, value: float) -> bool:
        """Whether a measured ``value`` (in this threshold's unit) meets it."""
        equal = math.isclose(value, self.limit, rel_tol=EQUAL_REL_TOL, abs_tol=1e-12)
        if self.operator == "<":
            return value < self.limit and not equal
        if self.operator == "<=":
            return value < self.limit or equal
        if self.operator == ">":
            return value > self.limit and not equal
        if self.operator == ">=":
            return value > self.limit or equal
        return equal

    def measure(self, summary: Mapping[str, Any]) -> float | None:
        """This threshold's metric in ``summary``, in its unit; None if the summary has none."""
        base = _base_value(self.metric, self.op, self.unit, summary)
        if base is None:
            return None
        return base / _scale(self.kind, self.unit)


def _scale(kind: str, unit: str) -> float:
    """How many of the base unit (ms, fraction, ops/s, count) one ``unit`` is."""
    if kind == LATENCY:
        return LATENCY_UNITS[unit or "ms"]
    if unit == "%":
        return 0.01
    return 1.0


def parse(text: str) -> list[Threshold]:
    """The thresholds of a ``--fail-on`` value; `ThresholdError` for anything else."""
    if not isinstance(text, str):
        raise ThresholdError("--fail-on: not text")
    if len(text) > MAX_TEXT:
        raise ThresholdError(f"--fail-on is too long ({len(text)} characters, at most {MAX_TEXT})")
    if not text.strip():
        raise ThresholdError("--fail-on is empty (example: 'p99<500ms,errors<0.1%,incidents=0')")
    clauses = text.split(",")
    if len(clauses) > MAX_CLAUSES:
        raise ThresholdError(f"--fail-on has {len(clauses)} thresholds, at most {MAX_CLAUSES}")
    thresholds = [parse_one(clause) for clause in clauses]
    return thresholds


def parse_one(clause: str) -> Threshold:
    """One clause ``METRIC[{op=OP}] OPERATOR NUMBER[UNIT]``."""
    text = clause.strip()
    where = f"threshold {shown(text)}"
    if not text:
        raise ThresholdError("--fail-on has an empty threshold (two commas, or one at an end)")
    name = _NAME.match(text)
    if name is None:
        raise ThresholdError(f"{where}: expected a metric name first ({_metric_list()})")
    metric = name.group().lower()
    if metric not in METRICS:
        raise ThresholdError(f"{where}: unknown metric ({_metric_list()})")
    rest = text[name.end() :].lstrip()
    op: str | None = None
    if rest.startswith("{"):
        selector = _SELECTOR.match(rest)
        if selector is None:
            raise ThresholdError(f"{where}: a selector is written {{op=NAME}}, NAME one of {', '.join(OPS)}")
        op = selector.group(1).lower()
        if op not in OPS:
            raise ThresholdError(f"{where}: unknown operation {shown(op)} (one of {', '.join(OPS)})")
        if metric not in PER_OP_METRICS:
            raise ThresholdError(
                f"{where}: {metric} has no per-operation figure (per operation: {', '.join(PER_OP_METRICS)})"
            )
        rest = rest[selector.end() :].lstrip()
    operator = next((o for o in OPERATORS if rest.startswith(o)), None)
    if operator is None or rest[len(operator) :].lstrip()[:1] in ("<", ">", "=", "!"):
        raise ThresholdError(f"{where}: expected an operator after {metric} (one of < <= > >= =)")
    rest = rest[len(operator) :].lstrip()
    number = _NUMBER.match(rest)
    if number is None:
        raise ThresholdError(f"{where}: expected a number after {operator}")
    limit = float(number.group())
    if not math.isfinite(limit):
        raise ThresholdError(f"{where}: the limit is not a finite number")
    if limit < 0:
        raise ThresholdError(f"{where}: the limit cannot be negative")
    unit = rest[number.end() :].strip()
    kind = METRICS[metric]
    _check_unit(where, metric, kind, unit, limit)
    if operator == "==":
        operator = "="
    selector_text = f"{{op={op}}}" if op else ""
    return Threshold(
        expr=f"{metric}{selector_text}{operator}{number.group()}{unit}",
        metric=metric,
        operator=operator,
        limit=limit,
        unit=unit,
        op=op,
    )


def _check_unit(where: str, metric: str, kind: str, unit: str, limit: float) -> None:
    if kind == LATENCY:
        if unit not in LATENCY_UNITS and unit != "":
            raise ThresholdError(f"{where}: bad unit {shown(unit)} for {metric} (us, ms or s; default ms)")
    elif kind == SHARE or (metric == "dropped" and unit == "%"):
        if unit == "%":
            if limit > 100:
                raise ThresholdError(f"{where}: a share cannot exceed 100%")
        elif unit == "":
            if limit > 1:
                raise ThresholdError(
                    f"{where}: a share is a % or a fraction from 0 to 1 (did you mean {limit:g}%?)"
                )
        else:
            raise ThresholdError(
                f"{where}: bad unit {shown(unit)} for {metric} (% or a fraction from 0 to 1)"
            )
    elif kind == RATE:
        if unit not in RATE_UNITS:
            raise ThresholdError(
                f"{where}: bad unit {shown(unit)} for {metric} (operations per second: N or N/s)"
            )
    else:
        if unit != "":
            hint = " or %" if metric == "dropped" else ""
            raise ThresholdError(f"{where}: bad unit {shown(unit)} for {metric} (a count, no unit{hint})")
        if limit != int(limit):
            raise ThresholdError(f"{where}: {metric} is a count, the limit a whole number")


def _metric_list() -> str:
    return "p50 p90 p95 p99 p999 max mean errors throttled rate goodput dropped incidents lag_p99 ..."


# -- evaluation ------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _share(numerator: Any, denominator: Any) -> float | None:
    top, bottom = _number(numerator), _number(denominator)
    if top is None or bottom is None or bottom <= 0:
        return None
    return top / bottom


def _base_value(metric: str, op: str | None, unit: str, summary: Mapping[str, Any]) -> float | None:
    """The metric in its base unit (ms, fraction, ops/s or count), None when not measured."""
    if op is not None:
        return _op_value(metric, op, summary)
    done = _number(summary.get("done"))
    some_done = done is not None and done > 0
    if metric.startswith("lag_"):
        lag = summary.get("lag_ms")
        return _number(lag.get(metric[4:])) if isinstance(lag, Mapping) else None
    if METRICS[metric] == LATENCY:
        latency = summary.get("latency_ms")
        return _number(latency.get(metric)) if some_done and isinstance(latency, Mapping) else None
    if metric == "errors":
        ok = _number(summary.get("ok"))
        return _share(done - ok, done) if done is not None and ok is not None else None
    if metric == "success":
        return _share(summary.get("ok"), done)
    if metric == "throttled":
        return _share(summary.get("throttled_attempts"), summary.get("attempts"))
    if metric == "rate":
        return _share(done, summary.get("elapsed")) if some_done else None
    if metric == "goodput":
        return _number(summary.get("goodput")) if some_done else None
    if metric == "offered":
        offered = _number(summary.get("offered"))
        return _number(summary.get("offered_rate")) if offered else None
    if metric == "dropped":
        outcomes = summary.get("outcomes")
        if not isinstance(outcomes, Mapping):
            return None
        dropped = _number(outcomes.get("dropped", 0))
        return _share(dropped, summary.get("offered")) if unit == "%" else dropped
    if metric == "incidents":
        return _number(summary.get("incidents"))
    rotations = summary.get("rotations")  # rotations_failed, rotations_late
    return (
        _number(rotations.get(metric.removeprefix("rotations_"))) if isinstance(rotations, Mapping) else None
    )


def _op_value(metric: str, op: str, summary: Mapping[str, Any]) -> float | None:
    ops = summary.get("ops")
    row = ops.get(op) if isinstance(ops, Mapping) else None
    if not isinstance(row, Mapping) or not _number(row.get("count")):
        return None
    if metric in ("p95", "p99", "mean"):
        return _number(row.get(f"{metric}_ms"))
    success = _number(row.get("success_ratio"))
    if metric == "success":
        return success
    if metric == "errors":
        return None if success is None else 1.0 - success
    return _number(row.get("rate" if metric == "rate" else "throughput"))


def _rounded(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


def evaluate(thresholds: Sequence[Threshold], summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each threshold against ``summary`` (summarize()'s dict): ``{"expr", "value", "ok",
    "unit"}``, ``value`` in the threshold's unit (six significant digits) or None when the
    summary does not have the metric, which is never ``ok``.

    Evaluate before writing the ``threshold`` incidents of a run (they are its consequence):
    ``incidents=0`` counts the incidents the run had, not the thresholds it crossed."""
    results = []
    for threshold in thresholds:
        value = threshold.measure(summary)
        results.append(
            {
                "expr": threshold.expr,
                "value": _rounded(value),
                "ok": value is not None and threshold.holds(value),
                "unit": threshold.unit or ("ms" if threshold.kind == LATENCY else ""),
            }
        )
    return results


def exit_code(evaluated: Sequence[Mapping[str, Any]]) -> int:
    """`FAILED_EXIT` if any evaluated threshold is not ok, else 0."""
    return FAILED_EXIT if any(not r.get("ok") for r in evaluated) else 0


def conclude(
    run_dir: Path, thresholds: Sequence[Threshold], *, elapsed: float, interrupted: bool
) -> dict[str, Any]:
    """The end of a run in ``run_dir``: its summary, ``thresholds`` evaluated against it, one
    ``threshold`` incident appended to incidents.jsonl per threshold violated, and the final
    summary returned (summary.json's content, for the caller to write; `exit_code` of its
    ``thresholds`` is the run's exit code). The thresholds see the incidents the run had before
    these; the final summary counts them all, as a report recomputing it from the files does."""
    run_dir = Path(run_dir)
    summary = summarize(run_dir, elapsed=elapsed, interrupted=interrupted, thresholds=[])
    evaluated = evaluate(thresholds, summary)
    crossed = threshold_incidents(evaluated, elapsed)
    for incident in crossed:
        write_incident(run_dir / INCIDENTS, incident)
    return with_thresholds({**summary, "incidents": summary["incidents"] + len(crossed)}, evaluated)
