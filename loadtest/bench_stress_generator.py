"""Benchmark: how much open-loop load the stress generator offers, and how precisely, on this machine.

The generator (``rekey.stress.generator.run_load``) runs against the null backend answering at
once (``--delay 0``), with ``--processes`` worker processes, for ``--duration`` s at ``--rate``
ops/s, recording everything as a real run does (Parquet events, seconds.jsonl with HDR
histograms). Reported: offered and achieved ops/s (ops completed ok / elapsed), the schedule lag
(``start - intended``) p50/p99/max from the recorded lag histograms, dropped ops, and the CPU the
generator processes used per op.

The baseline, measured in the same run right after: the same schedule in the same number of
spawned processes as a bare loop: sleep until each op's intended time, note how late it woke,
nothing else (no adapter, no threads, no recording). Its lag is what this machine's sleep and
scheduling give any Python generator at that rate and load; the ratios say what the generator
itself costs on top. The load average (other processes share the cores) is printed before and
after; read the figures with it.

Goal (issue 15): >= 5,000 ops/s offered and achieved with --processes 2 on the 2-core machine,
schedule lag p99 < 5 ms.

    python -m loadtest.bench_stress_generator [--rate 5000] [--duration 20] [--processes 2]
        [--concurrency 8] [--delay 0] [--no-baseline] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rekey.stress.generator import LoadPlan, run_load
from rekey.stress.schedule import Schedule
from rekey.stress.summary import FORMAT, merge_hdrs, read_seconds, summarize
from rekey.stress.workload import WorkloadSpec

GOAL_RATE = 5000.0
GOAL_LAG_P99_MS = 5.0


def measure_generator(
    rate: float, duration: float, processes: int, concurrency: int, delay: float, work_dir: Path
) -> dict[str, Any]:
    run_dir = work_dir / "run"
    plan = LoadPlan(rate=rate, duration=duration, processes=processes, concurrency=concurrency)
    result = run_load(plan, WorkloadSpec("null:bench", "governor", null_delay=delay), run_dir)
    cpu = result.cpu_seconds
    (run_dir / "meta.json").write_text(json.dumps({"format": FORMAT, "mix": dict(plan.mix)}))
    summary = summarize(run_dir, interrupted=result.interrupted)
    seconds = read_seconds(run_dir)
    lag = merge_hdrs(row["lag_hdr"] for row in seconds)
    worst_second = max((row["lag_p99_ms"] for row in seconds), default=0.0)
    return {
        "processes": processes,
        "concurrency": concurrency,
        "delay_s": delay,
        "ops": result.offered,
        "offered_per_s": result.offered / duration,
        "achieved_per_s": summary["ok"] / max(result.elapsed, duration),
        "dropped": result.dropped,
        "lag_p50_ms": lag.get_value_at_percentile(50) / 1000.0,
        "lag_p99_ms": lag.get_value_at_percentile(99) / 1000.0,
        "lag_max_ms": lag.get_max_value() / 1000.0,
        "worst_second_lag_p99_ms": worst_second,
        "latency_p99_ms": summary["latency_ms"]["p99"],
        "processes_alive": result.processes_alive,
        "cpu_s": cpu,
        "cpu_us_per_op": cpu / max(1, result.offered) * 1e6,
        "parquet_files": len(list((run_dir / "events").glob("*.parquet"))),
    }


def _bare(index: int, processes: int, rate: float, duration: float, t0: float, conn: Any) -> None:
    """The baseline: sleep until each op's intended time, and nothing else."""
    schedule = Schedule(rate, duration)
    base = time.perf_counter() + (t0 - time.time())
    lags = np.zeros(schedule.total // processes + 1)
    cpu = time.process_time()
    n = 0
    sleep, now = time.sleep, time.perf_counter
    for _, intended, _op in schedule.ops(index, processes):
        while True:
            delay = intended - (now() - base)
            if delay <= 0:
                break
            sleep(delay)
        lags[n] = now() - base - intended
        n += 1
    conn.send((lags[:n].tolist(), time.process_time() - cpu))


def measure_bare(rate: float, duration: float, processes: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    t0 = time.time() + 1.5  # the processes start meanwhile
    conns, procs = [], []
    for index in range(processes):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_bare, args=(index, processes, rate, duration, t0, child), daemon=True)
        proc.start()
        child.close()
        conns.append(parent)
        procs.append(proc)
    answers = [conn.recv() for conn in conns]
    lags = np.concatenate([np.asarray(lag) for lag, _ in answers]) * 1000.0
    cpu = sum(seconds for _, seconds in answers)
    for proc in procs:
        proc.join(10)
    return {
        "processes": processes,
        "ops": len(lags),
        "offered_per_s": len(lags) / duration,
        "lag_p50_ms": float(np.percentile(lags, 50)),
        "lag_p99_ms": float(np.percentile(lags, 99)),
        "lag_max_ms": float(np.max(lags)),
        "cpu_us_per_op": cpu / max(1, len(lags)) * 1e6,
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _lag(figures: dict[str, Any]) -> str:
    return (
        f"  lag       p50 {figures['lag_p50_ms']:.3f} ms  p99 {figures['lag_p99_ms']:.3f} ms"
        f"  max {figures['lag_max_ms']:.3f} ms"
    )


def _print(report: dict[str, Any], args: argparse.Namespace) -> None:
    g, b = report["generator"], report["baseline_bare_loop"]
    before, after = report["load_average_before"][0], report["load_average_after"][0]
    print(f"stress generator, {args.processes} processes x {args.concurrency} threads, null backend")
    print(f"  load average before {before:.2f} after {after:.2f} on {report['cores']} cores")
    print(f"  offered   {g['offered_per_s']:9.1f} ops/s (asked {args.rate:.0f} for {args.duration:.0f} s)")
    print(f"  achieved  {g['achieved_per_s']:9.1f} ops/s  dropped {g['dropped']}")
    print(_lag(g) + f"  (worst second p99 {g['worst_second_lag_p99_ms']:.3f} ms)")
    print(f"  cpu       {g['cpu_us_per_op']:.1f} µs per op (the processes' CPU while the load ran)")
    if b is not None:
        print("baseline: bare sleep-until loop, same schedule and processes")
        print(f"  offered   {b['offered_per_s']:9.1f} ops/s  cpu {b['cpu_us_per_op']:.1f} µs per op")
        print(_lag(b))
        ratios = report["ratios"]
        print(
            f"ratio generator/baseline: offered {ratios['offered_vs_baseline']:.3f},"
            f" lag p99 {ratios['lag_p99_vs_baseline']:.2f}x"
        )
    verdict = "met" if report["goal"]["met"] else "NOT met"
    print(f"goal (>= {GOAL_RATE:.0f} ops/s, lag p99 < {GOAL_LAG_P99_MS} ms): {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="threads per process (default 8)")
    parser.add_argument("--delay", type=float, default=0.0, help="null backend answer delay, s")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rekey-bench-gen-") as tmp:
        generator = measure_generator(
            args.rate, args.duration, args.processes, args.concurrency, args.delay, Path(tmp)
        )
    baseline = None if args.no_baseline else measure_bare(args.rate, args.duration, args.processes)
    load_after = os.getloadavg()
    report: dict[str, Any] = {
        "rate": args.rate,
        "duration": args.duration,
        "cores": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "generator": generator,
        "baseline_bare_loop": baseline,
        "ratios": None
        if baseline is None
        else {
            "offered_vs_baseline": _ratio(generator["offered_per_s"], baseline["offered_per_s"]),
            "lag_p99_vs_baseline": _ratio(generator["lag_p99_ms"], baseline["lag_p99_ms"]),
        },
        "goal": {
            "rate": GOAL_RATE,
            "lag_p99_ms": GOAL_LAG_P99_MS,
            "met": generator["offered_per_s"] >= GOAL_RATE * 0.999
            and generator["achieved_per_s"] >= GOAL_RATE * 0.99
            and generator["lag_p99_ms"] < GOAL_LAG_P99_MS
            and generator["dropped"] == 0,
        },
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        _print(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
