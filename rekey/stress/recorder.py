"""Recording one generator process's operations: per-second partial aggregates and Parquet chunks.

Worker threads report each finished op with `Recorder.complete` (the scheduler reports dropped
ops the same way). The op's ``end`` is read under the recorder's lock, and a second ``t`` is
closed under the same lock only once the clock has passed ``t + 1`` and the scheduler has handed
out every op intended before ``t + 1`` (`Recorder.horizon`): so no op can complete into a second
already closed, and no op can be offered into one. A closed second becomes a partial row
(`aggregate`: counts, outcomes, versions, refused samples, HDR histograms encoded) that the
process sends to the parent, which merges the partials of all processes into seconds.jsonl
(`merge_partials`).

Events (the Parquet columns of the stress spec: intended, start, end, op, outcome, key_version,
attempts, throttle_wait, process) are converted to an Arrow batch as their second closes (a
second at a time: no long conversion holding the interpreter) and kept only until their 10 s
chunk (``C = floor(end / 10)``) is complete, then written as ``events/p{P:02d}-{C:06d}.parquet``
(through a temporary name and a rename, so a crash never leaves a half-written file under the
reader's ``*.parquet`` glob); a chunk written twice gets ``-{n}`` after its number. Memory
therefore holds at most one open chunk of events and the open seconds.

Times are seconds since the run's t0 on the process's monotonic clock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq
from hdrh.histogram import HdrHistogram

from rekey.stress.summary import HDR_HIGHEST, new_hdr

CHUNK_SECONDS: Final = 10
REFUSED_SAMPLES: Final = 50
REFUSED_OUTCOMES: Final = frozenset({"version_disabled", "not_found"})

Event = tuple[float, float, float, str, str, int, int, int, float]
"""intended, start, end, op, outcome, key_version, attempts, throttled attempts, throttle_wait."""

SCHEMA: Final = pa.schema(
    [
        ("intended", pa.float64()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("op", pa.dictionary(pa.int32(), pa.string())),
        ("outcome", pa.dictionary(pa.int32(), pa.string())),
        ("key_version", pa.int32()),
        ("attempts", pa.int16()),
        ("throttle_wait", pa.float32()),
        ("process", pa.int16()),
    ]
)


def us(seconds: float) -> int:
    """A duration in whole µs within the histograms' range (1 µs .. 1 h)."""
    return min(HDR_HIGHEST, max(1, round(seconds * 1_000_000)))


def _ms(histogram: HdrHistogram, q: float) -> float:
    return histogram.get_value_at_percentile(q) / 1000.0 if histogram.get_total_count() else 0.0


def _max_ms(histogram: HdrHistogram) -> float:
    return histogram.get_max_value() / 1000.0 if histogram.get_total_count() else 0.0


def aggregate(t: int, offered: int, events: Sequence[Event], in_flight: int) -> dict[str, Any]:
    """One process's partial row of second ``t`` (HDRs encoded; no percentiles: the parent
    computes them from the merged histograms)."""
    latency, lag = new_hdr(), new_hdr()
    per_op: dict[str, list[Any]] = {}  # op -> [histogram, done, ok]
    outcomes: dict[str, int] = {}
    versions: dict[str, int] = {}
    refused: list[list[Any]] = []
    attempts = throttled = 0
    waited = 0.0
    last_end = 0.0
    record = latency.record_value
    record_lag = lag.record_value
    for intended, start, end, op, outcome, version, tries, throttles, wait in events:
        entry = per_op.get(op)
        if entry is None:
            entry = per_op[op] = [new_hdr(), 0, 0]
        if outcome != "dropped":  # never sent: no latency (~0 ms would flatter a saturated run)
            value = us(end - intended)
            record(value)
            record_lag(us(start - intended))
            entry[0].record_value(value)
        entry[1] += 1
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "ok":
            entry[2] += 1
            key = str(version)
            versions[key] = versions.get(key, 0) + 1
        elif outcome in REFUSED_OUTCOMES and len(refused) < REFUSED_SAMPLES:
            refused.append([end, op, version, outcome])
        attempts += tries
        throttled += throttles
        waited += wait
        last_end = max(last_end, end)
    return {
        "t": t,
        "offered": offered,
        "done": len(events),
        "ok": outcomes.get("ok", 0),
        "outcomes": outcomes,
        "ops": {
            op: {"done": done, "ok": ok, "hdr": histogram.encode().decode()}
            for op, (histogram, done, ok) in per_op.items()
        },
        "hdr": latency.encode().decode(),
        "lag_hdr": lag.encode().decode(),
        "attempts": attempts,
        "throttled_attempts": throttled,
        "throttle_wait": waited,
        "versions": versions,
        "refused": refused,
        "in_flight": in_flight,
        "last_end": last_end,
    }


def _add(total: dict[str, int], part: Mapping[str, int]) -> None:
    for key, n in part.items():
        total[key] = total.get(key, 0) + int(n)


def merge_partials(t: int, partials: Iterable[Mapping[str, Any]], *, processes_alive: int) -> dict[str, Any]:
    """The seconds.jsonl row of second ``t`` from the partial rows of the processes."""
    latency, lag = new_hdr(), new_hdr()
    ops: dict[str, dict[str, Any]] = {}
    op_hdrs: dict[str, HdrHistogram] = {}
    outcomes: dict[str, int] = {}
    versions: dict[str, int] = {}
    refused: list[list[Any]] = []
    offered = done = ok = attempts = throttled = in_flight = 0
    waited = 0.0
    for part in partials:
        offered += int(part["offered"])
        done += int(part["done"])
        ok += int(part["ok"])
        attempts += int(part["attempts"])
        throttled += int(part["throttled_attempts"])
        in_flight += int(part["in_flight"])
        waited += float(part["throttle_wait"])
        _add(outcomes, part["outcomes"])
        _add(versions, part["versions"])
        refused.extend(part["refused"])
        if part["done"]:
            latency.decode_and_add(part["hdr"])
            lag.decode_and_add(part["lag_hdr"])
        for op, entry in part["ops"].items():
            total = ops.setdefault(op, {"done": 0, "ok": 0})
            total["done"] += int(entry["done"])
            total["ok"] += int(entry["ok"])
            histogram = op_hdrs.get(op)
            if histogram is None:
                histogram = op_hdrs[op] = new_hdr()
            histogram.decode_and_add(entry["hdr"])
    for op, histogram in op_hdrs.items():
        ops[op]["hdr"] = histogram.encode().decode()
    refused.sort(key=lambda sample: float(sample[0]))
    return {
        "t": t,
        "offered": offered,
        "done": done,
        "ok": ok,
        "outcomes": outcomes,
        "ops": ops,
        "hdr": latency.encode().decode(),
        "lag_hdr": lag.encode().decode(),
        "lag_p99_ms": _ms(lag, 99),
        "lag_max_ms": _max_ms(lag),
        "p50_ms": _ms(latency, 50),
        "p99_ms": _ms(latency, 99),
        "max_ms": _max_ms(latency),
        "attempts": attempts,
        "throttled_attempts": throttled,
        "throttle_wait": waited,
        "versions": versions,
        "refused": refused[:REFUSED_SAMPLES],
        "in_flight": in_flight,
        "processes_alive": processes_alive,
    }


def event_batch(process: int, events: Sequence[Event]) -> pa.RecordBatch:
    """``events`` in the Parquet schema (built one closed second at a time, so that no single
    conversion holds the interpreter long)."""
    columns = list(zip(*events, strict=True)) if events else [()] * 9
    intended, start, end, op, outcome, version, attempts, _throttled, wait = columns
    return pa.RecordBatch.from_arrays(
        [
            pa.array(intended, pa.float64()),
            pa.array(start, pa.float64()),
            pa.array(end, pa.float64()),
            pa.array(op, pa.string()).dictionary_encode(),
            pa.array(outcome, pa.string()).dictionary_encode(),
            pa.array(version, pa.int32()),
            pa.array([min(a, 32767) for a in attempts], pa.int16()),
            pa.array(wait, pa.float32()),
            pa.array([process] * len(events), pa.int16()),
        ],
        schema=SCHEMA,
    )


def write_chunk(events_dir: Path, process: int, chunk: int, batches: Sequence[pa.RecordBatch]) -> Path:
    """``batches`` as ``p{P:02d}-{C:06d}.parquet`` (``-{n}`` appended if that chunk was written
    before), written through a temporary name."""
    stem = f"p{process:02d}-{chunk:06d}"
    path = events_dir / f"{stem}.parquet"
    n = 0
    while path.exists():
        n += 1
        path = events_dir / f"{stem}-{n}.parquet"
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_batches(batches, schema=SCHEMA), tmp)
    os.replace(tmp, path)
    return path


def warm_up(events_dir: Path) -> None:
    """Write and delete a one-row file, so that the Parquet writer's first-use set-up (about
    0.1 s) happens before the run rather than at its first chunk."""
    tmp = events_dir / f".warm-up-{os.getpid()}.tmp"
    pq.write_table(
        pa.Table.from_batches([event_batch(0, [(0.0, 0.0, 0.0, "wrap", "ok", 1, 1, 0, 0.0)])]), tmp
    )
    tmp.unlink(missing_ok=True)


class Recorder:
    """One process's open seconds and open chunk (see the module docstring). Thread-safe."""

    def __init__(self, process: int, events_dir: Path, now: Callable[[], float]) -> None:
        self.process = process
        self._events_dir = events_dir
        self._now = now
        self._lock = threading.Lock()
        self._seconds: dict[int, list[Event]] = {}
        self._offered: dict[int, int] = {}
        self._next_close = 0
        self._horizon = 0.0
        self._closed = False
        self._chunks: dict[int, list[pa.RecordBatch]] = {}
        self.submitted = 0
        self.completed = 0
        self.dropped = 0
        self.offered = 0
        self.abandoned = 0
        self.last_end = 0.0
        self.files: list[Path] = []

    # -- the scheduler's side
    def horizon(self, t: float) -> None:
        """Every op intended before ``t`` has been offered (``math.inf``: the schedule is over)."""
        self._horizon = t

    def offer(self, intended: float, *, dropped: bool, op: str = "") -> None:
        """An op intended at ``intended`` was handed to the pool, or ``dropped`` (queue full):
        a dropped op is recorded at once, no attempt, start = end = when it was dropped (its
        intended time if the scheduler dropped it while handing it out early)."""
        with self._lock:
            t = int(intended)
            self._offered[t] = self._offered.get(t, 0) + 1
            self.offered += 1
            if not dropped:
                self.submitted += 1
                return
            end = max(self._now(), intended)
            self._add((intended, end, end, op, "dropped", 0, 0, 0, 0.0))
            self.dropped += 1

    # -- the workers' side
    def complete(
        self,
        intended: float,
        start: float,
        op: str,
        outcome: str,
        version: int,
        attempts: int,
        throttled: int,
        waited: float,
    ) -> None:
        with self._lock:
            if self._closed:
                return  # counted in ``abandoned`` when the recorder closed
            end = self._now()
            self._add((intended, start, end, op, outcome, version, attempts, throttled, waited))
            self.completed += 1

    def _add(self, event: Event) -> None:
        end = event[2]
        t = max(self._next_close, int(end) if end > 0 else 0)  # never a closed second (see above)
        bucket = self._seconds.get(t)
        if bucket is None:
            bucket = self._seconds[t] = []
        bucket.append(event)
        if end > self.last_end:
            self.last_end = end

    @property
    def in_flight(self) -> int:
        return self.submitted - self.completed

    # -- the flusher's side
    def close_ready(self, *, final: bool = False) -> list[dict[str, Any]]:
        """Close every second that can be closed (``final``: all that hold anything, and no
        op is accepted after), write every complete chunk, and return the partial rows."""
        closing: list[tuple[int, int, list[Event]]] = []
        with self._lock:
            if final:
                self._closed = True
                self.abandoned += self.in_flight
                last = max([*self._seconds, *self._offered, self._next_close - 1])
                limit = float(last + 1)
            else:
                limit = min(self._now(), self._horizon)
            while self._next_close + 1 <= limit:
                t = self._next_close
                closing.append((t, self._offered.pop(t, 0), self._seconds.pop(t, [])))
                self._next_close += 1
            in_flight = self.in_flight
        rows = []
        for t, offered, events in closing:
            rows.append(aggregate(t, offered, events, in_flight))
            chunk = t // CHUNK_SECONDS
            if events:
                self._chunks.setdefault(chunk, []).append(event_batch(self.process, events))
        complete = [c for c in self._chunks if final or (c + 1) * CHUNK_SECONDS <= self._next_close]
        for chunk in sorted(complete):
            batches = self._chunks.pop(chunk)
            if batches:
                self.files.append(write_chunk(self._events_dir, self.process, chunk, batches))
        return rows
