"""Benchmark: rotation at quota. How close does a rotation's re-wrap sweep come to what a
throttled KMS allows, without failures and without being throttled much?

For each backend (a named throttling profile of ``emulators.profiles``) one stack is started: the
throttled backend, a Temporal dev server, a SQLite store. A fresh key gets ``--blobs`` sealed blobs,
seeded with the throttle lifted (``LocalBackend.set_rate(None)``; see ``loadtest.rotation_rig``).
Then the same blobs are rotated once per configuration, each by ``RotateKeyWorkflow`` on a fresh
``rekey worker`` process (a fresh governor):

1. ``baseline``: the backend unthrottled: what the backend and this machine serve at all;
2. each rate R of ``--rates``: the backend throttled at R requests/s.

Reported per rotation: the sweep (REWRAPPING -> VERIFYING, the workflow's own timestamps) in
blobs/s; what the quota allows in blobs/s; ``share`` = sweep / allowed (goal >= 0.9); failed
blobs (goal 0); the server's own count of served and throttled requests over the rotation
(start -> AWAITING_COMMIT) and the throttled share (goal <= 5%); requests per blob as the server
saw them; CPU (cores busy over the rotation) of the worker, the backend's processes (OpenBao,
moto), this process (the in-process throttling proxy or Azure emulator, and the polling) and the
Temporal server; the load average.

What the quota allows, per profile:

``vault-quota``  OpenBao's rate-limit quota counts requests, and one Transit batch rewrap of up to
                 490 ciphertexts is one request: R x 490 blobs/s (245,000/s at R = 500), far
                 beyond what one machine's sweep does, so the quota is not the bottleneck; the
                 report then marks the run ``bound: cpu`` and compares it with the baseline.
``aws-kms``      one ReEncrypt per blob, metered in the shared symmetric quota: R blobs/s.
``managed-hsm``  one unwrapKey + one wrapKey per blob; for an oct-HSM (AES) key both are in the
                 emulator's ``wrap`` class, which has one limit R: R / 2 blobs/s.

``bound`` says what limits a run: ``quota`` when the baseline is above what the quota allows
(the quota is reachable), else ``backend`` (the backend alone, unthrottled, serves less: moto's
one process, the emulator's TLS server in Python) or, for vault, ``cpu``; ``share_of_bound`` is
the sweep over min(allowed, baseline).

    python -m loadtest.bench_rotation_quota [--blobs 20000] [--rates 500,2000]
        [--backends vault-quota,aws-kms,managed-hsm] [--batch-size 10000] [--in-flight 2]
        [--body 64] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from activities.types import DEFAULT_BATCH, DEFAULT_IN_FLIGHT
from emulators.profiles import get_profile
from kms_adapters.vault_transit import BATCH_ITEMS
from loadtest.rotation_rig import (
    NAMESPACE,
    RotationRun,
    Stack,
    WrapMany,
    fresh_key_name,
    quota_stack,
    seed_blobs,
    threaded_wrap_many,
    transit_wrap_many,
)
from rekey.backends import vault_client
from sealing.state import SealedState
from sealing.store import SealedStateStore

BACKENDS = ("vault-quota", "aws-kms", "managed-hsm")
SHARE_GOAL = 0.9
THROTTLED_GOAL = 0.05
SPOT_CHECKS = 20


def allowed_per_s(backend: str, rate: float) -> float:
    """Blobs/s the quota allows: R x 490 (vault), R (aws), R / 2 (azure)."""
    if backend == "vault":
        return rate * BATCH_ITEMS
    if backend == "aws":
        return rate
    return rate / 2


def _row(run: RotationRun, backend: str, rate: float | None) -> dict[str, Any]:
    served, throttled = int(run.server.get("served", 0)), int(run.server.get("throttled", 0))
    wall = max(run.wall_s, 1e-9)
    row: dict[str, Any] = {
        "rate": rate,
        "blobs": run.blobs,
        "sweep_s": round(run.sweep_s, 3),
        "sweep_per_s": round(run.sweep_per_s, 1),
        "rotation_s": round(run.rotation_s, 3),
        "rotation_per_s": round(run.blobs / run.rotation_s, 1) if run.rotation_s > 0 else None,
        "failed": run.failed,
        "served": served,
        "throttled": throttled,
        "throttled_share": round(throttled / (served + throttled), 4) if served + throttled else 0.0,
        "requests_per_blob": round((served + throttled) / run.blobs, 4) if run.blobs else None,
        "throttled_waits": run.throttled_waits,
        "cpu_cores": {role: round(seconds / wall, 2) for role, seconds in run.cpu_s.items()},
        "load_average": [round(x, 2) for x in run.load_average],
        "worker_peak_rss_mib": round(run.worker_peak_rss_mib, 1),
    }
    if rate is not None:
        row["allowed_per_s"] = round(allowed_per_s(backend, rate), 1)
        row["share"] = round(run.sweep_per_s / row["allowed_per_s"], 3)
    return row


def _seeder(stack: Stack, backend: str, name: str, adapter: Any) -> WrapMany:
    if backend == "vault":
        return transit_wrap_many(vault_client(stack.settings).secrets.transit, name)
    return threaded_wrap_many(adapter)


async def run_backend(profile: str, args: argparse.Namespace) -> dict[str, Any]:
    backend = get_profile(profile).backend
    async with quota_stack(profile, rate=args.rates[0]) as stack:
        name = fresh_key_name("quota")
        key_ref = f"{backend}:{name}"
        adapter = stack.adapter(key_ref)
        store = SealedStateStore(stack.store_url)
        try:
            with stack.unthrottled():
                adapter.create()
                started = time.perf_counter()
                seed_blobs(store, key_ref, args.blobs, args.body, _seeder(stack, backend, name, adapter))
                seeded = time.perf_counter() - started
            print(
                f"{profile}: {args.blobs:,} blobs seeded in {seeded:.1f}s (throttle lifted)", file=sys.stderr
            )
            runs: list[dict[str, Any]] = []
            for rate in [None, *args.rates]:
                stack.set_rate(rate)
                run = await stack.rotate(
                    key_ref,
                    args.blobs,
                    batch_size=args.batch_size,
                    in_flight=args.in_flight,
                    workers=args.workers,
                )
                row = _row(run, backend, rate)
                runs.append(row)
                label = "unthrottled" if rate is None else f"R={rate:g}/s"
                sent = row["served"] + row["throttled"]
                print(
                    f"  {label}: sweep {row['sweep_per_s']:,.0f} blobs/s, failed {row['failed']},"
                    f" throttled {row['throttled']}/{sent}",
                    file=sys.stderr,
                )
                if store.count_by_key_version(key_ref) != {run.new_version: args.blobs}:
                    raise RuntimeError(f"{profile}: not every blob is on version {run.new_version}")
            state = SealedState(store, lambda _ref: adapter)
            for i in random.sample(range(args.blobs), min(SPOT_CHECKS, args.blobs)):  # nosec B311
                state.get(namespace=NAMESPACE, name=f"item-{i:07d}")  # unseals: raises if not
        finally:
            store.close()
    baseline = runs[0]["sweep_per_s"]
    for row in runs[1:]:
        allowed = row["allowed_per_s"]
        row["bound"] = "quota" if baseline >= allowed else ("cpu" if backend == "vault" else "backend")
        row["share_of_bound"] = round(row["sweep_per_s"] / min(allowed, baseline), 3)
        row["goals_met"] = (
            row["share"] >= SHARE_GOAL and row["failed"] == 0 and row["throttled_share"] <= THROTTLED_GOAL
        )
    return {
        "profile": profile,
        "backend": backend,
        "seed_s": round(seeded, 1),
        "baseline_per_s": baseline,
        "runs": runs,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for profile in args.backends:
        results.append(await run_backend(profile, args))
    return {
        "blobs": args.blobs,
        "rates": args.rates,
        "batch_size": args.batch_size,
        "batches_in_flight": args.in_flight,
        "workers": args.workers,
        "body_bytes": args.body,
        "cores": os.cpu_count(),
        "goals": {"share": SHARE_GOAL, "failed": 0, "throttled_share": THROTTLED_GOAL},
        "backends": results,
    }


def _rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive numbers of requests/s")
    return rates


def _backends(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(BACKENDS)}")
    return names


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{report['blobs']:,} blobs, batch size {report['batch_size']},"
        f" {report['batches_in_flight']} in flight, {report['cores']} cores"
    )
    print(
        f"{'backend':<12} {'R/s':>6} {'sweep/s':>9} {'allowed/s':>10} {'share':>6} {'bound':>8}"
        f" {'of bound':>8} {'failed':>6} {'throttled':>9} {'req/blob':>8}"
        f" {'worker':>6} {'backend':>7} {'in-proc':>7} {'load':>5}"
    )
    for b in report["backends"]:
        for r in b["runs"]:
            cores = r["cpu_cores"]
            rate = "-" if r["rate"] is None else f"{r['rate']:g}"
            allowed = f"{r['allowed_per_s']:,.0f}" if "allowed_per_s" in r else "unthr."
            share = f"{r['share']:.3f}" if "share" in r else "-"
            print(
                f"{b['profile']:<12} {rate:>6} {r['sweep_per_s']:>9,.0f} {allowed:>10} {share:>6}"
                f" {r.get('bound', '-'):>8} {r.get('share_of_bound', 1.0):>8.3f} {r['failed']:>6}"
                f" {r['throttled_share']:>8.1%} {r['requests_per_blob'] or 0:>8.3f}"
                f" {cores['worker']:>6.2f} {cores['backend']:>7.2f} {cores['this_process']:>7.2f}"
                f" {r['load_average'][0]:>5.2f}"
            )
    print(
        "share = sweep / allowed (goal >= 0.9); throttled = share of the server's metered requests"
        " refused (goal <= 5%); failed blobs (goal 0); R '-' = unthrottled baseline; bound: quota if"
        " the baseline exceeds what the quota allows, else backend (or cpu); of bound = sweep /"
        " min(allowed, baseline); CPU in cores over the rotation (in-proc: this process, which"
        " hosts the throttling proxy / the Azure emulator)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blobs", type=int, default=20_000, help="blobs rotated (default 20000)")
    parser.add_argument("--rates", type=_rates, default=[500.0, 2000.0], help="R, requests/s (500,2000)")
    parser.add_argument("--backends", type=_backends, default=list(BACKENDS), help=",".join(BACKENDS))
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"({DEFAULT_BATCH})")
    parser.add_argument("--in-flight", type=int, default=DEFAULT_IN_FLIGHT, help=f"({DEFAULT_IN_FLIGHT})")
    parser.add_argument("--body", type=int, default=64, help="plaintext bytes per blob (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="rekey worker processes (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.blobs < 1:
        parser.error("--blobs must be >= 1")
    report = asyncio.run(run(args))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
