"""Reading a stress run directory and computing its summary (``summary.json``) from the raw files.

The run directory's format is fixed in the stress spec (meta.json, events/*.parquet,
seconds.jsonl, rotations.jsonl, incidents.jsonl, summary.json). Everything here is a pure
function of those files: the run orchestration calls `summarize` at the end of a run to write
summary.json, and ``rekey stress report`` calls it to recompute the figures of every run (a
crashed run has no summary.json at all).

Where each figure comes from:
- the events (Parquet): counts, outcomes, latency (``end - intended``, never ``end - start``:
  coordinated omission), attempts, time spent waiting on throttling, and ``elapsed`` (the last
  completion, unless the caller says otherwise);
- seconds.jsonl: ``offered`` (an op still in flight when a run crashed has no event but was
  offered), schedule lag (its per-second HDR histograms) and throttled attempts (an event
  counts its attempts, not which of them were throttled);
- rotations.jsonl and incidents.jsonl: the rotation and incident counts.

Latency percentiles of the summary are exact (``inverted_cdf``: the smallest latency at or
below which the share ``q`` of the ops fall, which is what an HDR histogram reports up to its
three significant digits).
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hdrh.histogram import HdrHistogram
from numpy.typing import NDArray

FORMAT: Final = "rekey-stress/1"
OPS: Final = ("wrap", "unwrap", "rewrap")
OUTCOMES: Final = (
    "ok",
    "throttled",
    "unavailable",
    "version_disabled",
    "not_found",
    "denied",
    "invalid",
    "dropped",
    "error",
)
"""The outcome classes, in the order reports show them; "errors" are all but ``ok``."""

MAX_NAMES: Final = 1000
"""Distinct operation or outcome names a run may have (it has 3 and 9)."""
MAX_COUNT: Final = 10**15
MAX_HDR_BYTES: Final = 4 * 1024 * 1024
"""The most an encoded histogram may inflate to (one of 1 µs..1 h at 3 digits is ~ 100 KiB)."""

HDR_LOWEST: Final = 1
HDR_HIGHEST: Final = 3_600_000_000
HDR_DIGITS: Final = 3
"""The HDR histograms of seconds.jsonl: 1 µs .. 1 h, 3 significant digits."""

EVENT_COLUMNS: Final = ("intended", "start", "end", "op", "outcome", "attempts", "throttle_wait")
"""The event columns a summary reads (key_version and process are recorded too)."""

META: Final = "meta.json"
EVENTS: Final = "events"
SECONDS: Final = "seconds.jsonl"
ROTATIONS: Final = "rotations.jsonl"
INCIDENTS: Final = "incidents.jsonl"
SUMMARY: Final = "summary.json"


class RunDirError(Exception):
    """A directory that is not a readable stress run: not a run, a missing or corrupt file, no
    events at all. One line naming the file."""

    exit_code = 2


@dataclass(frozen=True)
class Events:
    """The completed operations of a run, as columns (one element per op), in compact types:
    a run of millions of ops is read whole."""

    intended: NDArray[np.float64]
    end: NDArray[np.float64]
    op: NDArray[np.int16]
    """Index into `op_names`."""
    op_names: tuple[str, ...]
    outcome: NDArray[np.int16]
    """Index into `outcome_names`."""
    outcome_names: tuple[str, ...]
    attempts: NDArray[np.int32]
    throttle_wait: NDArray[np.float32]
    files: int
    """Parquet chunks read."""

    def __len__(self) -> int:
        return len(self.end)

    def latency_ms(self) -> NDArray[np.float64]:
        """``end - intended`` of every op, in milliseconds."""
        return (self.end - self.intended) * 1000.0

    def is_op(self, name: str) -> NDArray[np.bool_]:
        if name not in self.op_names:
            return np.zeros(len(self), dtype=bool)
        return np.asarray(self.op == self.op_names.index(name))

    def is_outcome(self, name: str) -> NDArray[np.bool_]:
        if name not in self.outcome_names:
            return np.zeros(len(self), dtype=bool)
        return np.asarray(self.outcome == self.outcome_names.index(name))


# -- reading ------------------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: cannot read ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None


def read_meta(run_dir: Path) -> dict[str, Any]:
    """meta.json: the run's parameters. Its absence means ``run_dir`` is no run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory")
    path = run_dir / META
    if not path.exists():
        raise RunDirError(f"{run_dir}: not a stress run directory (no {META})")
    meta = _load_json(path)
    if not isinstance(meta, dict):
        raise RunDirError(f"{path}: not a JSON object")
    if meta.get("format") != FORMAT:
        raise RunDirError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def read_jsonl(path: Path, *, required: bool = True) -> list[dict[str, Any]]:
    """One JSON object a line. A last line cut short (a crash while it was being written) is
    left out; any other line that is not a JSON object is an error. A file that is not
    ``required`` and absent reads as no lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise RunDirError(f"{path}: missing") from None
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: cannot read ({type(exc).__name__})") from None
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break  # the line being written when the run stopped
            raise RunDirError(f"{path}: line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise RunDirError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _times(rows: list[dict[str, Any]], path: Path) -> None:
    for number, row in enumerate(rows, start=1):
        t = row.get("t")
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise RunDirError(f"{path}: record {number} has no time t")


def read_seconds(run_dir: Path) -> list[dict[str, Any]]:
    """seconds.jsonl, ordered by second."""
    path = Path(run_dir) / SECONDS
    rows = read_jsonl(path)
    _times(rows, path)
    return sorted(rows, key=lambda row: row["t"])


def read_rotations(run_dir: Path) -> list[dict[str, Any]]:
    """rotations.jsonl in time order (absent: a run without rotations, or one that stopped
    before the first)."""
    path = Path(run_dir) / ROTATIONS
    rows = read_jsonl(path, required=False)
    _times(rows, path)
    return sorted(rows, key=lambda row: row["t"])


def read_incidents(run_dir: Path) -> list[dict[str, Any]]:
    """incidents.jsonl in time order (absent: none recorded)."""
    path = Path(run_dir) / INCIDENTS
    rows = read_jsonl(path, required=False)
    _times(rows, path)
    return sorted(rows, key=lambda row: row["t"])


def read_recorded_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json as the run wrote it, or None when it is missing (a crashed run)."""
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return None
    summary = _load_json(path)
    if not isinstance(summary, dict):
        raise RunDirError(f"{path}: not a JSON object")
    return summary


def _codes(table: pa.Table, name: str, path: Path, vocabulary: dict[str, int]) -> NDArray[np.int16]:
    """A text column as indices into ``vocabulary`` (extended with the values it meets)."""
    column = table.column(name)
    if column.null_count:
        raise RunDirError(f"{path}: column {name} has missing values")
    try:
        if not pa.types.is_dictionary(column.type):
            column = column.cast(pa.string()).dictionary_encode()
        parts = []
        for chunk in column.chunks:
            values = chunk.dictionary.cast(pa.string()).to_pylist()
            if any(value is None for value in values):
                raise RunDirError(f"{path}: column {name} has missing values")
            if len(vocabulary) + len(values) > MAX_NAMES:
                raise RunDirError(f"{path}: column {name} has more than {MAX_NAMES} distinct values")
            mapping = np.array([vocabulary.setdefault(v, len(vocabulary)) for v in values], dtype=np.int16)
            parts.append(mapping[np.asarray(chunk.indices.to_numpy(zero_copy_only=False), dtype=np.int64)])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise RunDirError(f"{path}: column {name} is not text") from None
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def _numbers(table: pa.Table, name: str, path: Path, dtype: type[np.generic]) -> NDArray[Any]:
    column = table.column(name)
    if column.null_count:
        raise RunDirError(f"{path}: column {name} has missing values")
    try:
        values = np.asarray(column.to_numpy(), dtype=dtype)
    except (TypeError, ValueError, pa.ArrowException):
        raise RunDirError(f"{path}: column {name} is not numeric") from None
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise RunDirError(f"{path}: column {name} has values that are not finite numbers")
    return values


NUMERIC_COLUMNS: Final[dict[str, type[np.generic]]] = {
    "intended": np.float64,
    "end": np.float64,
    "attempts": np.int32,
    "throttle_wait": np.float32,
}


def read_events(run_dir: Path) -> Events:
    """Every Parquet chunk of events/ (a run interrupted has only some: they are what there is).

    An unreadable chunk or one without the spec's columns is an error; so is a run with no
    event at all (nothing to report). Chunks are converted one at a time, only the columns a
    summary needs."""
    events_dir = Path(run_dir) / EVENTS
    if not events_dir.is_dir():
        raise RunDirError(f"{run_dir}: no {EVENTS}/ directory (no operation was recorded)")
    files = sorted(events_dir.glob("*.parquet"))
    numbers: dict[str, list[NDArray[Any]]] = {name: [] for name in NUMERIC_COLUMNS}
    codes: dict[str, list[NDArray[np.int16]]] = {"op": [], "outcome": []}
    vocabularies: dict[str, dict[str, int]] = {"op": {}, "outcome": {}}
    for path in files:
        try:
            names = pq.read_schema(path).names
            missing = [name for name in EVENT_COLUMNS if name not in names]
            if missing:
                raise RunDirError(f"{path}: no column {', '.join(missing)}")
            table = pq.read_table(path, columns=[*NUMERIC_COLUMNS, *codes])
        except (OSError, pa.ArrowException) as exc:
            raise RunDirError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
        for name, dtype in NUMERIC_COLUMNS.items():
            numbers[name].append(_numbers(table, name, path, dtype))
        for name, parts in codes.items():
            parts.append(_codes(table, name, path, vocabularies[name]))
        del table
    if not files or sum(len(part) for part in numbers["end"]) == 0:
        raise RunDirError(f"{run_dir}: empty run (no operation in {EVENTS}/)")
    joined = {name: np.concatenate(parts) for name, parts in numbers.items()}
    return Events(
        intended=joined["intended"],
        end=joined["end"],
        op=np.concatenate(codes["op"]),
        op_names=tuple(vocabularies["op"]),
        outcome=np.concatenate(codes["outcome"]),
        outcome_names=tuple(vocabularies["outcome"]),
        attempts=joined["attempts"],
        throttle_wait=joined["throttle_wait"],
        files=len(files),
    )


# -- histograms and percentiles -------------------------------------------------------------------


def new_hdr() -> HdrHistogram:
    return HdrHistogram(HDR_LOWEST, HDR_HIGHEST, HDR_DIGITS)


def decode_hdr(encoded: str, *, where: str = "") -> HdrHistogram:
    """A base64 HDR histogram of seconds.jsonl; a corrupt one is a `RunDirError`. The encoding
    is zlib-compressed: one that would inflate beyond any histogram of our range is refused
    before hdrh inflates it (a crafted run directory must not exhaust memory)."""
    try:
        inflated = zlib.decompressobj().decompress(
            base64.b64decode(encoded, validate=True)[8:], MAX_HDR_BYTES
        )
    except (ValueError, zlib.error):
        raise RunDirError(f"{where or SECONDS}: a histogram that cannot be decoded") from None
    if len(inflated) >= MAX_HDR_BYTES:
        raise RunDirError(f"{where or SECONDS}: a histogram larger than any this format writes")
    try:
        histogram = HdrHistogram.decode(encoded)
    except Exception:  # hdrh raises whatever its decoder meets (zlib, struct, base64, its own)
        raise RunDirError(f"{where or SECONDS}: a histogram that cannot be decoded") from None
    return histogram


def merge_hdrs(encoded: Iterable[str], *, where: str = "") -> HdrHistogram:
    total = new_hdr()
    for item in encoded:
        total.add(decode_hdr(item, where=where))
    return total


def ms(value: float | np.floating[Any]) -> float:
    """A latency in ms to the microsecond (the events' float seconds carry noise below it)."""
    return round(float(value), 3)


def percentile(values: NDArray[np.float64], q: float) -> float | None:
    """The exact ``q``-th percentile (0..100) of latencies in ms, as an HDR histogram defines it
    (the nearest rank), to the microsecond; None of nothing."""
    if len(values) == 0:
        return None
    return ms(np.percentile(values, q, method="inverted_cdf"))


def hdr_ms(histogram: HdrHistogram, q: float) -> float | None:
    """The ``q``-th percentile of an HDR histogram of microseconds, in ms (None when empty)."""
    if histogram.get_total_count() == 0:
        return None
    return float(histogram.get_value_at_percentile(q)) / 1000.0


def hdr_max_ms(histogram: HdrHistogram) -> float | None:
    if histogram.get_total_count() == 0:
        return None
    return float(histogram.get_max_value()) / 1000.0


# -- the summary ---------------------------------------------------------------------------------


def label_of(meta: Mapping[str, Any]) -> str:
    """What a report calls a run: its ``label``, else ``strategy/backend``."""
    label = meta.get("label")
    if isinstance(label, str) and label.strip():
        return label.strip()
    return f"{meta.get('strategy') or '?'}/{meta.get('backend') or '?'}"


def _op_names(meta: Mapping[str, Any], events: Events) -> list[str]:
    mix = meta.get("mix")
    named = {name for name, weight in mix.items() if weight} if isinstance(mix, dict) else set()
    present = set(events.op_names) | {str(name) for name in named}
    return [op for op in OPS if op in present] + sorted(present - set(OPS))


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _int(value: Any) -> int:
    """A count from a JSON file: a number within ``MAX_COUNT`` (a crafted huge one is refused)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return 0
    if not math.isfinite(value) or abs(value) > MAX_COUNT:
        raise RunDirError(f"{SECONDS}: a count out of range")
    return int(value)


def elapsed_of(events: Events) -> float:
    """The run's length as its events tell it: from t0 to the last completion."""
    return float(max(np.max(events.end), np.max(events.intended)))


def summarize_parts(
    meta: Mapping[str, Any],
    events: Events,
    seconds: Sequence[Mapping[str, Any]],
    rotations: Sequence[Mapping[str, Any]],
    incidents: Sequence[Mapping[str, Any]],
    *,
    elapsed: float | None = None,
    interrupted: bool = False,
    thresholds: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The summary (summary.json's shape) of a run already read; see `summarize`."""
    if elapsed is None:
        elapsed = elapsed_of(events)
    # Latency of the ops that were sent: a dropped op (never sent, the in-flight queue was full)
    # has none, and counting it as ~0 ms would make a saturated run look fast.
    all_latency = events.latency_ms()
    sent = ~events.is_outcome("dropped")
    latency = all_latency[sent]
    ok_mask = events.is_outcome("ok")
    done = len(events)
    ok = int(np.count_nonzero(ok_mask))
    offered = max(sum(_int(second.get("offered")) for second in seconds), done)

    ops: dict[str, dict[str, Any]] = {}
    for name in _op_names(meta, events):
        mask = events.is_op(name)
        count = int(np.count_nonzero(mask))
        op_ok = int(np.count_nonzero(mask & ok_mask))
        op_latency = all_latency[mask & sent]
        ops[name] = {
            "count": count,
            "rate": _ratio(count, elapsed) or 0.0,
            "throughput": _ratio(op_ok, elapsed) or 0.0,
            "mean_ms": ms(np.mean(op_latency)) if len(op_latency) else None,
            "p95_ms": percentile(op_latency, 95),
            "p99_ms": percentile(op_latency, 99),
            "success_ratio": _ratio(op_ok, count),
        }

    counts = np.bincount(events.outcome.astype(np.int64), minlength=len(events.outcome_names))
    present = {events.outcome_names[i]: int(n) for i, n in enumerate(counts) if n}
    outcomes: dict[str, int] = {name: present[name] for name in OUTCOMES if name in present}
    outcomes.update({name: present[name] for name in sorted(set(present) - set(OUTCOMES))})

    lag = merge_hdrs((s["lag_hdr"] for s in seconds if isinstance(s.get("lag_hdr"), str)), where=SECONDS)
    attempts = int(np.sum(events.attempts, dtype=np.int64))
    throttled_attempts = sum(_int(second.get("throttled_attempts")) for second in seconds)

    def rotations_with(event: str) -> int:
        return len({str(r.get("rotation_id")) for r in rotations if r.get("event") == event})

    summary: dict[str, Any] = {
        "format": FORMAT,
        "run_id": meta.get("run_id"),
        "label": label_of(meta),
        "interrupted": bool(interrupted),
        "elapsed": elapsed,
        "offered": offered,
        "offered_rate": _ratio(offered, elapsed) or 0.0,
        "done": done,
        "ok": ok,
        "goodput": _ratio(ok, elapsed) or 0.0,
        "success_ratio": _ratio(ok, done),
        "latency_ms": {
            "mean": ms(np.mean(latency)) if len(latency) else None,
            "p50": percentile(latency, 50),
            "p90": percentile(latency, 90),
            "p95": percentile(latency, 95),
            "p99": percentile(latency, 99),
            "p999": percentile(latency, 99.9),
            "max": ms(np.max(latency)) if len(latency) else None,
        },
        "lag_ms": {"p50": hdr_ms(lag, 50), "p99": hdr_ms(lag, 99), "max": hdr_max_ms(lag)},
        "ops": ops,
        "outcomes": outcomes,
        "attempts": attempts,
        "throttled_attempts": throttled_attempts,
        "throttled_share": _ratio(throttled_attempts, attempts) or 0.0,
        "throttle_wait": float(np.sum(events.throttle_wait, dtype=np.float64)),
        # rotations.jsonl's "start" is the summary's "started".
        "rotations": {
            "started": rotations_with("start"),
            "done": rotations_with("done"),
            "failed": rotations_with("failed"),
            "late": rotations_with("late"),
        },
        "incidents": len(incidents),
    }
    return with_thresholds(summary, thresholds)


def with_thresholds(summary: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``summary`` with its evaluated thresholds (``[{"expr", "value", "ok"}]``) and ``passed``
    (every one ``ok``; True without thresholds)."""
    evaluated = [dict(result) for result in results]
    return {**summary, "thresholds": evaluated, "passed": all(bool(r.get("ok")) for r in evaluated)}


def summarize(
    run_dir: Path,
    *,
    elapsed: float | None = None,
    interrupted: bool | None = None,
    thresholds: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The summary of the run in ``run_dir``, in summary.json's shape, from its raw files.

    ``elapsed``: the run's length in seconds (default: t0 to its last completion, from the
    events). ``interrupted`` and ``thresholds`` (the evaluated ``--fail-on`` limits) are what
    the raw files cannot tell; by default they are taken from summary.json if there is one, and
    otherwise the run counts as interrupted (it did not write its summary) with no thresholds
    evaluated. The orchestration, at the end of a run, passes all three.

    Raises `RunDirError` for a directory that is not a readable run."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    events = read_events(run_dir)
    seconds = read_seconds(run_dir)
    rotations = read_rotations(run_dir)
    incidents = read_incidents(run_dir)
    recorded = read_recorded_summary(run_dir) if interrupted is None or thresholds is None else None
    if interrupted is None:
        interrupted = bool(recorded.get("interrupted")) if recorded is not None else True
    if thresholds is None:
        thresholds = recorded_thresholds(recorded)
    return summarize_parts(
        meta,
        events,
        seconds,
        rotations,
        incidents,
        elapsed=elapsed,
        interrupted=interrupted,
        thresholds=thresholds,
    )


def recorded_thresholds(recorded: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The evaluated thresholds of a recorded summary (none if it has none or is missing)."""
    if recorded is None or not isinstance(recorded.get("thresholds"), list):
        return []
    return [dict(t) for t in recorded["thresholds"] if isinstance(t, dict)]
