"""The open-loop load generator of ``rekey stress run``: `run_load(plan, workload, out_dir)`.

Processes. `run_load` starts ``plan.processes`` worker processes (multiprocessing "spawn"; one
process is started the same way, so there is a single code path). Each builds its own adapter
from the `WorkloadSpec`, fills its ring with a few wraps, reports ready, and waits for t0 (wall
clock, shared by all; each process converts it to its own ``perf_counter`` base). Once every
process is ready the parent picks t0 (unless given), tells them, and calls ``on_start(t0)``.

Open loop. In each process one scheduler thread walks the schedule (`rekey.stress.schedule`:
process ``p`` takes the ops ``i % P == p``) and hands each op to a pool of ``plan.concurrency``
threads through a queue, whatever the answers: `HANDOFF_LEAD` (4 ms) before its intended time
(it wakes every ~2 ms and hands out what is due in the next 4 ms; when it is behind, everything
due at once). The thread that takes an op sleeps until the op's intended time, reads ``start``
and calls the adapter: an op waits for one wake-up (the thread's), not two in a row. If
``queue_cap`` ops already wait for a thread (those handed out early count), the op is recorded
``dropped`` (start = end = when it was dropped, or its intended time if that is later) and
never sent. The lag is ``start - intended``, latency ``end - intended``. Sleeps use
``time.sleep`` on ``perf_counter`` deadlines (Linux wakes within ~0.1 ms on an idle machine),
and each process lowers the interpreter's GIL switch interval to 0.5 ms so that a busy thread
holds a waking one back less. Worker threads and the Parquet writer are set up before t0.

Recording (`rekey.stress.recorder`). Each process closes its seconds, sends their partial
aggregates to the parent over its own pipe, and writes its own Parquet chunks. The parent merges
the partials of second ``t`` (HDR ``add``) once every live process has reported it, appends the
row to seconds.jsonl (in order, flushed) and calls ``on_second(row)``.

Ending. After the last op is handed out, a process waits up to `DRAIN_SECONDS` for its ops in
flight; on ``stop`` (the event, or Ctrl-C in the parent: the children ignore SIGINT) it stops
scheduling and waits up to `STOP_DRAIN_SECONDS`. Ops still in flight then are abandoned (they
were offered, and have no event). Then it flushes its seconds and chunks and reports done. A
process that dies is counted (``processes_alive`` of later rows and of the result); the run goes
on with the others. A process still running `EXIT_GRACE` seconds after it should have ended is
terminated (and counted as dead). The directory stays reportable in every case: every chunk is
written whole (temporary name, rename) and seconds.jsonl one flushed line at a time.

The generator writes only ``events/`` and ``seconds.jsonl`` under ``out_dir``; meta.json,
rotations, incidents and summary.json are the orchestration's.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import multiprocessing.connection
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Final

from rekey.stress.recorder import Recorder, merge_partials, warm_up
from rekey.stress.schedule import DEFAULT_MIX, Schedule, check_mix
from rekey.stress.summary import EVENTS, SECONDS
from rekey.stress.workload import PRESEED, Workload, WorkloadError, WorkloadSpec

__all__ = [
    "DRAIN_SECONDS",
    "STOP_DRAIN_SECONDS",
    "GeneratorError",
    "LoadPlan",
    "LoadResult",
    "WorkloadSpec",
    "run_load",
]

DRAIN_SECONDS: Final = 30.0
"""How long a process waits for its ops in flight after the schedule's end."""
STOP_DRAIN_SECONDS: Final = 3.0
"""... and after a stop (the stop event, Ctrl-C)."""
START_TIMEOUT: Final = 120.0
"""How long the processes may take to start and build their adapters."""
START_MARGIN: Final = 0.2
"""t0, when not given, is this far after the moment every process is ready."""
EXIT_GRACE: Final = 15.0
"""A process still running this long after its drain should have ended is terminated."""
FLUSH_INTERVAL: Final = 0.05
SWITCH_INTERVAL: Final = 0.0005
_LONG_SLEEP: Final = 0.05
HANDOFF_LEAD: Final = 0.004
"""The scheduler hands each op to the pool up to this long before its intended time, and the
thread that takes it sleeps until that time: the op then waits for one wake-up (the thread's),
not two in a row (the scheduler's, then the thread's), and the scheduler wakes about every
``HANDOFF_LEAD / 2`` instead of once per op."""


class GeneratorError(Exception):
    """The load could not be started (a bad plan or workload, a process that could not build its
    adapter); one line."""

    exit_code = 2


@dataclass(frozen=True)
class LoadPlan:
    """What to offer: the rate (after the ramp), how long, the mix, and how many processes and
    threads offer it."""

    rate: float
    """ops/s after the ramp (> 0)."""
    duration: float
    """s (> 0)."""
    ramp: float = 0.0
    """linear 0 -> rate over ``ramp`` s, then flat."""
    mix: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))
    processes: int = 1
    concurrency: int = 64
    """worker threads per process (max in flight per process)."""
    queue_cap: int = 10_000
    """ops waiting for a thread per process; beyond -> outcome "dropped"."""
    seed: int = 0

    def schedule(self) -> Schedule:
        return Schedule(self.rate, self.duration, ramp=self.ramp, mix=self.mix, seed=self.seed)

    def check(self) -> None:
        """`GeneratorError` for a plan no process can run."""
        try:
            self.schedule()
            check_mix(self.mix)
        except ValueError as exc:
            raise GeneratorError(str(exc)) from None
        for name, low, high in (("processes", 1, 256), ("concurrency", 1, 10_000), ("queue_cap", 1, 10**8)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise GeneratorError(f"{name} must be a whole number from {low} to {high}, not {value!r}")


@dataclass(frozen=True)
class LoadResult:
    elapsed: float
    """s since t0 of the last completion (0 if none)."""
    offered: int
    done: int
    interrupted: bool
    processes_alive: int
    dropped: int
    t0: float = 0.0
    """The wall-clock t0 the run used."""
    cpu_seconds: float = 0.0
    """CPU time the processes that reported done used from t0 to their end."""


# -- the child process ------------------------------------------------------------------------------


def _child_main(
    index: int,
    plan: LoadPlan,
    workload: WorkloadSpec,
    events_dir: str,
    conn: multiprocessing.connection.Connection,
    stop: Any,
) -> None:
    """A generator process (spawned): build, report ready, wait for t0, run, report done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        work = Workload.build(workload, seed=plan.seed * 1009 + index)
        work.preseed(min(PRESEED, workload.ring))
        warm_up(Path(events_dir))
    except Exception as exc:
        conn.send(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    run = _ProcessRun(index, plan, work, Path(events_dir), conn, stop)
    run.start_workers()  # before t0: threads started on a loaded machine can take a while
    conn.send(("ready", index))
    message = conn.recv()
    if message[0] != "go":
        return
    run.run(float(message[1]))


class _ProcessRun:
    def __init__(
        self,
        index: int,
        plan: LoadPlan,
        work: Workload,
        events_dir: Path,
        conn: multiprocessing.connection.Connection,
        stop: Any,
    ) -> None:
        self.index = index
        self.plan = plan
        self.work = work
        self.conn = conn
        self.stop_event = stop
        self.stopping = False
        self.finishing = threading.Event()
        self.base = time.perf_counter()
        self.workers: list[threading.Thread] = []
        self.recorder = Recorder(index, events_dir, self.now)
        self.queue: SimpleQueue[tuple[float, str] | None] = SimpleQueue()
        self.send_lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.base

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            with self.send_lock:
                self.conn.send(message)
        except OSError:  # the parent is gone: stop
            self.stopping = True

    def start_workers(self) -> None:
        self.workers = [
            threading.Thread(target=self._worker, name=f"stress-op-{n}", daemon=True)
            for n in range(self.plan.concurrency)
        ]
        for thread in self.workers:
            thread.start()

    def run(self, t0: float) -> None:
        """Offer this process's share of the schedule from ``t0`` (wall clock) on."""
        self.base = time.perf_counter() + (t0 - time.time())
        cpu = time.process_time()
        workers = self.workers
        flusher = threading.Thread(target=self._flusher, name="stress-flush", daemon=True)
        flusher.start()
        self._schedule()
        drain = STOP_DRAIN_SECONDS if self.stopping else DRAIN_SECONDS
        deadline = time.monotonic() + drain
        while self.recorder.in_flight > 0 and time.monotonic() < deadline:
            if not self.stopping and self.stop_event.is_set():
                self.stopping = True
                deadline = min(deadline, time.monotonic() + STOP_DRAIN_SECONDS)
            time.sleep(0.01)
        for _ in workers:
            self.queue.put(None)
        self.finishing.set()
        flusher.join()
        for row in self.recorder.close_ready(final=True):
            self.send(("second", self.index, row))
        recorder = self.recorder
        self.send(
            (
                "done",
                self.index,
                {
                    "offered": recorder.offered,
                    "done": recorder.completed + recorder.dropped,
                    "dropped": recorder.dropped,
                    "abandoned": recorder.abandoned,
                    "last_end": recorder.last_end,
                    "stopped": self.stopping,
                    "cpu": time.process_time() - cpu,
                },
            )
        )

    def _schedule(self) -> None:
        recorder, queue, cap = self.recorder, self.queue, self.plan.queue_cap
        now, sleep = self.now, time.sleep
        for _i, intended, op in self.plan.schedule().ops(self.index, self.plan.processes):
            recorder.horizon(intended)
            if intended - now() > HANDOFF_LEAD:
                while True:  # until the op is HANDOFF_LEAD / 2 away: then hand out the next LEAD's ops
                    if self.stopping:
                        return
                    delay = intended - HANDOFF_LEAD / 2 - now()
                    if delay <= 0:
                        break
                    sleep(min(delay, _LONG_SLEEP))  # stay responsive to a stop
            if self.stopping:
                return
            if queue.qsize() >= cap:
                recorder.offer(intended, dropped=True, op=op)
            else:
                recorder.offer(intended, dropped=False)
                queue.put((intended, op))
        recorder.horizon(math.inf)

    def _worker(self) -> None:
        queue, recorder, execute, now = self.queue, self.recorder, self.work.execute, self.now
        sleep = time.sleep
        while True:
            item = queue.get()
            if item is None:
                return
            intended, op = item
            delay = intended - now()
            if delay > 0:
                sleep(delay)
            start = now()
            result = execute(op)
            recorder.complete(
                intended,
                start,
                result.op,
                result.outcome,
                result.version,
                result.attempts,
                result.throttled,
                result.waited,
            )

    def _flusher(self) -> None:
        while not self.finishing.wait(FLUSH_INTERVAL):
            if not self.stopping and self.stop_event.is_set():
                self.stopping = True
            for row in self.recorder.close_ready():
                self.send(("second", self.index, row))


# -- the parent ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Children started inside inherit SIGINT ignored (the parent handles Ctrl-C for all)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class _Child:
    index: int
    process: Any
    conn: multiprocessing.connection.Connection
    ready: bool = False
    done: bool = False
    dead: bool = False
    reported: int = -1
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return not (self.done or self.dead)


class _Merger:
    """Partials of each second from every process -> seconds.jsonl rows, in order."""

    def __init__(
        self, path: Path, children: list[_Child], on_second: Callable[[dict[str, Any]], None] | None
    ) -> None:
        self.path = path
        self.children = children
        self.on_second = on_second
        self.pending: dict[int, list[dict[str, Any]]] = {}
        self.next_t = 0
        self.offered = 0
        self.done = 0
        self.dropped = 0
        self.last_end = 0.0
        self.file = path.open("a", encoding="utf-8")

    def add(self, child: _Child, partial: dict[str, Any]) -> None:
        t = int(partial["t"])
        child.reported = max(child.reported, t)
        self.pending.setdefault(t, []).append(partial)

    def flush(self, *, final: bool = False) -> None:
        while True:
            t = self.next_t
            waiting = any(c.active and c.reported < t for c in self.children)
            if waiting and not final:
                return
            partials = self.pending.pop(t, None)
            if partials is None:
                if final and self.pending:
                    self.next_t += 1
                    continue
                return
            alive = sum(1 for c in self.children if not c.dead)
            row = merge_partials(t, partials, processes_alive=alive)
            self.last_end = max([self.last_end, *(float(p.get("last_end", 0.0)) for p in partials)])
            self.offered += row["offered"]
            self.done += row["done"]
            self.dropped += int(row["outcomes"].get("dropped", 0))
            self.file.write(json.dumps(row, separators=(",", ":")) + "\n")
            self.file.flush()
            self.next_t += 1
            if self.on_second is not None:
                self.on_second(row)

    def close(self) -> None:
        self.file.close()


def run_load(
    plan: LoadPlan,
    workload: WorkloadSpec,
    out_dir: Path,
    *,
    t0: float | None = None,
    on_start: Callable[[float], None] | None = None,
    on_second: Callable[[dict[str, Any]], None] | None = None,
    stop: threading.Event | None = None,
) -> LoadResult:
    """Offer ``plan`` through ``workload`` and record it under ``out_dir`` (events/ and
    seconds.jsonl); see the module docstring. Returns when every process has ended.

    Raises `GeneratorError` when the plan or workload is bad or a process cannot build its
    adapter (nothing has been offered then)."""
    plan.check()
    try:
        workload.check()
    except WorkloadError as exc:
        raise GeneratorError(str(exc)) from None
    out_dir = Path(out_dir)
    events_dir = out_dir / EVENTS
    events_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    stop_all = ctx.Event()
    children: list[_Child] = []
    interrupted = False
    try:
        for index in range(plan.processes):
            parent_end, child_end = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=_child_main,
                args=(index, plan, workload, str(events_dir), child_end, stop_all),
                name=f"rekey-stress-{index}",
                daemon=True,
            )
            with _sigint_ignored():
                process.start()
            child_end.close()
            children.append(_Child(index, process, parent_end))
        _await_ready(children)
        start_at = t0 if t0 is not None else time.time() + START_MARGIN
        for child in children:
            child.conn.send(("go", start_at))
        if on_start is not None:
            on_start(start_at)
        merger = _Merger(out_dir / SECONDS, children, on_second)
        try:
            interrupted = _collect(children, merger, plan, start_at, stop, stop_all)
            merger.flush(final=True)
        finally:
            merger.close()
        return LoadResult(
            elapsed=merger.last_end,
            offered=merger.offered,
            done=merger.done,
            interrupted=interrupted,
            processes_alive=sum(1 for c in children if not c.dead),
            dropped=merger.dropped,
            t0=start_at,
            cpu_seconds=sum(float(c.stats.get("cpu", 0.0)) for c in children),
        )
    finally:
        stop_all.set()
        for child in children:
            child.process.join(timeout=5)
            if child.process.is_alive():
                child.process.terminate()
                child.process.join(timeout=5)
            child.conn.close()


def _await_ready(children: list[_Child]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not all(c.ready for c in children):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GeneratorError(f"the generator processes did not start within {START_TIMEOUT:.0f} s")
        waiting = [c for c in children if not c.ready]
        for conn in multiprocessing.connection.wait([c.conn for c in waiting], timeout=min(remaining, 1.0)):
            child = next(c for c in waiting if c.conn is conn)
            try:
                message = child.conn.recv()
            except (EOFError, OSError):
                code = child.process.exitcode
                raise GeneratorError(
                    f"generator process {child.index} died while starting (exit {code})"
                ) from None
            if message[0] == "error":
                raise GeneratorError(f"generator process {child.index} could not start: {message[2]}")
            if message[0] == "ready":
                child.ready = True


def _collect(
    children: list[_Child],
    merger: _Merger,
    plan: LoadPlan,
    t0: float,
    stop: threading.Event | None,
    stop_all: Any,
) -> bool:
    """Receive partials until every process is done or dead; True if the run was stopped."""
    interrupted = False
    deadline = t0 + plan.duration + DRAIN_SECONDS + EXIT_GRACE
    while any(c.active for c in children):
        try:
            if not interrupted and stop is not None and stop.is_set():
                interrupted = True
                stop_all.set()
                deadline = min(deadline, time.time() + STOP_DRAIN_SECONDS + EXIT_GRACE)
            active = [c for c in children if c.active]
            for conn in multiprocessing.connection.wait([c.conn for c in active], timeout=0.1):
                child = next(c for c in active if c.conn is conn)
                _receive(child, merger)
            for child in active:
                if child.active and not child.process.is_alive() and not child.conn.poll():
                    child.dead = True
            if time.time() > deadline:
                for child in children:
                    if child.active:
                        child.process.terminate()
                        child.dead = True
            merger.flush()
        except KeyboardInterrupt:
            if interrupted:  # a second Ctrl-C: stop waiting
                for child in children:
                    if child.active:
                        child.process.terminate()
                        child.dead = True
                break
            interrupted = True
            stop_all.set()
            deadline = min(deadline, time.time() + STOP_DRAIN_SECONDS + EXIT_GRACE)
    return interrupted


def _receive(child: _Child, merger: _Merger) -> None:
    try:
        message = child.conn.recv()
    except (EOFError, OSError):
        if not child.done:
            child.dead = True
        return
    kind = message[0]
    if kind == "second":
        merger.add(child, message[2])
    elif kind == "done":
        child.stats = dict(message[2])
        child.done = True
