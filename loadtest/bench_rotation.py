"""Benchmark: the rotation workflow's re-wrap sweep against a raw hvac batch-rewrap loop, in one run.

For each size (default 10,000 and 100,000 blobs) on one OpenBao (dev mode, in memory) and one
Temporal dev server:

1. A fresh Transit key and a fresh SQLite store get ``N`` sealed blobs (``--body`` bytes of
   random data each), seeded in bulk: envelopes sealed locally, their DEKs wrapped by Transit's
   batch encrypt, stored in one transaction per chunk.
2. ``raw``: the key is rotated at OpenBao and the wrapped DEKs of all ``N`` blobs (read from the
   store beforehand, held in a list) are re-wrapped by a plain loop of
   ``hvac ... transit.rewrap_data(batch_input=...)`` calls of 490 items each, one after the other:
   the least work a re-wrap of ``N`` ciphertexts can do through hvac. Nothing is stored.
3. ``workflow``: a ``rekey worker`` process (the real CLI, its own process so its memory can be
   read) and ``RotateKeyWorkflow`` with ``--grace`` long: it rotates the key again, counts,
   re-wraps every blob in the store (read, server-side batch rewrap, batched compare-and-swap),
   counts again and unwraps a sample. Timed from the workflow's own phase timestamps:
   ``sweep`` = REWRAPPING -> VERIFYING (the re-wrap proper), ``rotation`` = start -> AWAITING_COMMIT
   (prepare, count, sweep, verify).
4. ``raw`` again, now with the workflow's new version as primary (the old version is still
   enabled until the commit), then ``approve``; the run checks that every blob is on the new
   version and that a sample unseals.

5. Where the time goes: each stage of the sweep alone, in the benchmark's process: the KMS
   stage (the adapter's batch rewrap over every wrapped DEK, in the sweep's chunks, as many at
   once as one batch of the sweep keeps at the KMS) and the store stage (the sweep with a no-op KMS); the CPU
   seconds per blob of OpenBao (raw loop, rotation) and of the worker (rotation), from
   ``/proc``; and the CPU ceiling: cores / (worker + OpenBao CPU per blob), the fastest any
   sweep doing that work could go on this machine (the Temporal server's and PostgreSQL's
   own CPU are not counted, so with ``--store postgresql`` the ceiling is optimistic); and the
   sweep as a share of that ceiling (``sweep_ceiling_share``, the engine's own efficiency; goal
   >= 0.8, and no worse at the largest size than at the smallest:
   ``ceiling_share_largest_to_smallest``).

Ratios are workflow rate / raw rate, raw being the better of the two raw runs (the harder
baseline). The worker's peak memory is its ``VmHWM`` (peak resident set) from ``/proc``, read
when the rotation is done, for a fresh worker per size (with ``--workers N``, N worker
processes share the task queue; the largest peak is reported and CPU is summed); the memory
goal compares the largest size with the smallest.

    python -m loadtest.bench_rotation [--blobs 10000,100000] [--batch-size 10000]
        [--in-flight 2] [--body 64] [--store sqlite|postgresql] [--workers 1] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client

from activities.types import DEFAULT_BATCH, DEFAULT_IN_FLIGHT, TASK_QUEUE
from emulators.servers import OpenBao, openbao_dev, postgres_embedded
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import BATCH_ITEMS, VaultTransitAdapter
from loadtest.rotation_rig import (
    cpu_seconds,
    peak_rss_mib,
    phase_seconds,
    seed_blobs,
    transit_wrap_many,
    wait_for_phase,
    worker_process,
)
from rekey.client import rotation_id
from rekey.codec import data_converter
from rekey.devstack.temporal import start_dev_server
from rekey.worker import tune_gc
from sealing import envelope
from sealing.keywrap import RewrapOutcome, WrappedKey
from sealing.rotation import CHUNK, DEPTH, RangeResult, rewrap_range
from sealing.state import SealedState
from sealing.store import SealedStateStore
from workflows.rotation import (
    AWAITING_COMMIT,
    DONE,
    PREPARING,
    REWRAPPING,
    VERIFYING,
    Progress,
    RotateKeyInput,
    RotateKeyWorkflow,
)


def seed(bao: OpenBao, adapter: VaultTransitAdapter, store: SealedStateStore, count: int, body: int) -> None:
    wrap_many = transit_wrap_many(bao.client().secrets.transit, adapter.name, items=BATCH_ITEMS)
    seed_blobs(store, adapter.key_ref, count, body, wrap_many)


def wrapped_deks(store: SealedStateStore, key_ref: str) -> list[str]:
    out: list[str] = []
    cursor = None
    while True:
        page = store.page(key_ref=key_ref, after=cursor, limit=10_000)
        out += [envelope.key_slot(r.blob).wrapped_dek.decode() for r in page.records]
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def raw_rewrap(bao: OpenBao, name: str, ciphertexts: list[str]) -> float:
    """Seconds for a plain loop of hvac batch rewraps over ``ciphertexts``."""
    transit = bao.client().secrets.transit
    started = time.perf_counter()
    for at in range(0, len(ciphertexts), BATCH_ITEMS):
        batch = [{"ciphertext": c} for c in ciphertexts[at : at + BATCH_ITEMS]]
        results = transit.rewrap_data(name, ciphertext="", batch_input=batch)["data"]["batch_results"]
        if len(results) != len(batch) or not all(r.get("ciphertext") for r in results):
            raise RuntimeError("raw rewrap: OpenBao answered with errors")
    return time.perf_counter() - started


class _LocalRewrap:
    """Stands in for the KMS when the sweep's store work is timed alone: "re-wraps" by giving
    each ciphertext a new version prefix, at no cost. The blobs it leaves no longer unseal;
    it runs last, on a store that is thrown away."""

    def __init__(self, key_ref: str, version: int) -> None:
        self.key_ref = key_ref
        self.version = version
        self._prefix = f"vault:v{version}:".encode()

    def rewrap_batch(self, wrapped: Sequence[bytes]) -> list[RewrapOutcome]:
        return [
            RewrapOutcome(i, wrapped=WrappedKey(self._prefix + w.split(b":", 2)[2], self.version))
            for i, w in enumerate(wrapped)
        ]

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        outcome = self.rewrap_batch([wrapped])[0]
        assert outcome.wrapped is not None  # typing only  # nosec B101
        return outcome.wrapped


def kms_stage(bao: OpenBao, adapter: VaultTransitAdapter, ciphertexts: list[bytes]) -> dict[str, float]:
    """The sweep's KMS stage alone, in this process: the adapter's batch rewrap over every
    ciphertext, in the sweep's chunks, as many at once as one batch of the sweep keeps at the KMS."""
    chunks = [ciphertexts[at : at + CHUNK] for at in range(0, len(ciphertexts), CHUNK)]
    bao_cpu, cpu, started = cpu_seconds(bao.pid), time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(DEPTH) as pool:
        outcomes = [o for chunk in pool.map(adapter.rewrap_batch, chunks) for o in chunk]
    elapsed = time.perf_counter() - started
    if len(outcomes) != len(ciphertexts) or any(o.wrapped is None for o in outcomes):
        raise RuntimeError("KMS stage: the adapter's batch rewrap failed items")
    return {
        "seconds": elapsed,
        "client_cpu_us": (time.process_time() - cpu) / len(ciphertexts) * 1e6,
        "bao_cpu_us": (cpu_seconds(bao.pid) - bao_cpu) / len(ciphertexts) * 1e6,
    }


def store_stage(
    store: SealedStateStore, key_ref: str, version: int, count: int, batch: int
) -> dict[str, float]:
    """The sweep's store work alone, in this process: ``rewrap_range`` over every blob, batch
    by batch as the workflow plans them, with `_LocalRewrap` in place of the KMS."""
    local = _LocalRewrap(key_ref, version + 1)
    result, cursor = RangeResult(), None
    cpu, started = time.process_time(), time.perf_counter()
    while bounds := store.boundaries(
        key_ref=key_ref, below_version=version + 1, after=cursor, size=batch, count=1
    ):
        rewrap_range(
            store,
            local,  # type: ignore[arg-type]
            below_version=version + 1,
            start=cursor,
            end=bounds[0],
            limit=batch,
            result=result,
        )
        cursor = bounds[0]
    elapsed = time.perf_counter() - started
    if result.rewrapped != count:
        raise RuntimeError(f"store stage: {result.rewrapped} of {count} blobs swapped")
    return {"seconds": elapsed, "cpu_us": (time.process_time() - cpu) / count * 1e6}


async def run_size(
    bao: OpenBao,
    client: Client,
    temporal_address: str,
    home: Path,
    count: int,
    args: argparse.Namespace,
    new_database: Callable[[], str] | None,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-rotation-{count}-", dir=home))
    store_url = new_database() if new_database is not None else f"sqlite:///{work / 'state.db'}"
    store = SealedStateStore(store_url)
    name = f"bench-{count}-{secrets.token_hex(3)}"
    adapter = VaultTransitAdapter(
        bao.client(), name, release_store=MemoryReleasePolicyStore(), governor=Governor(name)
    )
    adapter.create()
    t0 = time.perf_counter()
    seed(bao, adapter, store, count, args.body)
    seeded = time.perf_counter() - t0
    print(f"  {count:,} blobs seeded in {seeded:.1f}s", file=sys.stderr)

    ciphertexts = wrapped_deks(store, adapter.key_ref)
    adapter.rotate()
    bao_cpu = cpu_seconds(bao.pid)
    raw_before = raw_rewrap(bao, name, ciphertexts)
    raw_bao_cpu = cpu_seconds(bao.pid) - bao_cpu

    env = {
        "REKEY_TEMPORAL_ADDRESS": temporal_address,
        "REKEY_VAULT_ADDR": bao.addr,
        "REKEY_VAULT_TOKEN": bao.token,
        "REKEY_STORE_URL": store_url,
    }
    shutil.copytree(home / "codec", work / "codec", dirs_exist_ok=True)
    with contextlib.ExitStack() as workers_stack:
        workers = [workers_stack.enter_context(worker_process(work, env, n)) for n in range(args.workers)]
        await asyncio.sleep(1.0)  # let the workers connect and poll
        handle = await client.start_workflow(
            RotateKeyWorkflow.run,
            RotateKeyInput(
                adapter.key_ref,
                grace_seconds=3600,
                batch_size=args.batch_size,
                batches_in_flight=args.in_flight,
                requested_at=datetime.now(UTC).isoformat(),
            ),
            id=rotation_id(adapter.key_ref),
            task_queue=TASK_QUEUE,
            execution_timeout=timedelta(minutes=30),
        )
        cpu_before, bao_cpu = sum(cpu_seconds(w.pid) for w in workers), cpu_seconds(bao.pid)
        committed = await wait_for_phase(handle, AWAITING_COMMIT, timeout=1200)
        worker_cpu = sum(cpu_seconds(w.pid) for w in workers) - cpu_before
        workflow_bao_cpu = cpu_seconds(bao.pid) - bao_cpu
        raw_after = raw_rewrap(bao, name, ciphertexts)
        await handle.execute_update(RotateKeyWorkflow.approve)
        final: Progress = await handle.result()
        peak = max(peak_rss_mib(w.pid) for w in workers)
    if final.phase != DONE or store.count_by_key_version(adapter.key_ref) != {final.new_version: count}:
        raise RuntimeError(f"rotation of {count} blobs did not leave every blob on the new version")
    state = SealedState(store, lambda _ref: adapter)
    for i in random.sample(range(count), 20):  # picks rows to spot-check  # nosec B311
        state.get(namespace="bench", name=f"item-{i:07d}")  # unseals: raises if not
    # Each stage of the sweep alone (last: the store stage leaves blobs that do not unseal),
    # with the garbage collector set up as in the worker.
    tune_gc()
    kms = kms_stage(bao, adapter, [c.encode() for c in wrapped_deks(store, adapter.key_ref)])
    local = store_stage(store, adapter.key_ref, final.new_version, count, args.batch_size)
    store.close()
    sweep = phase_seconds(committed, REWRAPPING, VERIFYING)
    rotation = phase_seconds(committed, PREPARING, AWAITING_COMMIT)
    raw = min(raw_before, raw_after)
    # CPU per blob during the rotation (worker + OpenBao; the Temporal server's is left out):
    # on this machine's cores no sweep with that much work per blob can go faster than this.
    cpu_us = (worker_cpu + workflow_bao_cpu) / count * 1e6
    ceiling = (os.cpu_count() or 1) * 1e6 / cpu_us
    result = {
        "blobs": count,
        "raw_rewraps_per_s": round(count / raw, 1),
        "raw_runs_s": [round(raw_before, 3), round(raw_after, 3)],
        "sweep_s": round(sweep, 3),
        "sweep_per_s": round(count / sweep, 1),
        "sweep_ratio": round(raw / sweep, 3),
        "rotation_s": round(rotation, 3),
        "rotation_per_s": round(count / rotation, 1),
        "rotation_ratio": round(raw / rotation, 3),
        "worker_peak_rss_mib": round(peak, 1),
        "worker_cpu_s": round(worker_cpu, 2),
        "cpu_us_per_blob": {
            "raw_openbao": round(raw_bao_cpu / count * 1e6, 1),
            "rotation_worker": round(worker_cpu / count * 1e6, 1),
            "rotation_openbao": round(workflow_bao_cpu / count * 1e6, 1),
        },
        "cpu_ceiling_per_s": round(ceiling, 1),
        "cpu_ceiling_ratio": round(ceiling * raw / count, 3),
        # The engine's own efficiency (issue 15, item 5): the sweep as a share of that ceiling.
        "sweep_ceiling_share": round(count / sweep / ceiling, 3),
        "stages": {
            "kms_per_s": round(count / kms["seconds"], 1),
            "kms_ratio": round(raw / kms["seconds"], 3),
            "kms_client_cpu_us": round(kms["client_cpu_us"], 1),
            "kms_openbao_cpu_us": round(kms["bao_cpu_us"], 1),
            "store_per_s": round(count / local["seconds"], 1),
            "store_ratio": round(raw / local["seconds"], 3),
            "store_cpu_us": round(local["cpu_us"], 1),
        },
        "seed_s": round(seeded, 1),
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="rekey-bench-rotation-"))
    try:
        with contextlib.ExitStack() as stack:
            bao = stack.enter_context(openbao_dev())
            new_database = stack.enter_context(postgres_embedded()) if args.store == "postgresql" else None
            env = await start_dev_server(data_converter=data_converter(home))
            try:
                address = env.client.service_client.config.target_host
                results = []
                for count in args.blobs:
                    print(f"{count:,} blobs ...", file=sys.stderr)
                    results.append(await run_size(bao, env.client, address, home, count, args, new_database))
            finally:
                await env.shutdown()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    small, large = results[0], results[-1]
    return {
        "batch_size": args.batch_size,
        "batches_in_flight": args.in_flight,
        "body_bytes": args.body,
        "store": args.store,
        "workers": args.workers,
        "cores": os.cpu_count(),
        "results": results,
        "memory_ratio_largest_to_smallest": round(
            large["worker_peak_rss_mib"] / small["worker_peak_rss_mib"], 3
        ),
        # "No worse at the largest size than at the smallest": sweep rate and ceiling share.
        "sweep_rate_largest_to_smallest": round(large["sweep_per_s"] / small["sweep_per_s"], 3),
        "ceiling_share_largest_to_smallest": round(
            large["sweep_ceiling_share"] / small["sweep_ceiling_share"], 3
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--blobs",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[10_000, 100_000],
        help="comma-separated sizes (default 10000,100000)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"blobs per rewrap_batch activity ({DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--in-flight", type=int, default=DEFAULT_IN_FLIGHT, help=f"batches in flight ({DEFAULT_IN_FLIGHT})"
    )
    parser.add_argument("--body", type=int, default=64, help="plaintext bytes per blob (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="rekey worker processes (default 1)")
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="the sealed-state store: an SQLite file (default) or embedded PostgreSQL (durable settings)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{args.store} store, batch size {args.batch_size}, {args.in_flight} in flight,"
        f" {args.body}-byte bodies"
    )
    print(
        f"{'blobs':>8} {'raw/s':>9} {'sweep/s':>9} {'ratio':>6}"
        f" {'rotation/s':>11} {'ratio':>6} {'peak MiB':>9}"
    )
    for r in report["results"]:
        print(
            f"{r['blobs']:>8,} {r['raw_rewraps_per_s']:>9,.0f} {r['sweep_per_s']:>9,.0f}"
            f" {r['sweep_ratio']:>6.3f}"
            f" {r['rotation_per_s']:>11,.0f} {r['rotation_ratio']:>6.3f} {r['worker_peak_rss_mib']:>9.1f}"
        )
    print(
        f"worker peak memory, largest / smallest size: {report['memory_ratio_largest_to_smallest']:.3f}"
        " (goal <= 1.2); ratio = workflow rate / raw hvac batch-rewrap rate, same run (goal >= 0.8)"
    )
    print()
    print(f"where the time goes (CPU us per blob; {report['cores']} cores)")
    print(
        f"{'blobs':>8} {'KMS alone':>10} {'ratio':>6} {'store alone':>12} {'ratio':>6}"
        f" {'OpenBao raw':>12} {'OpenBao rot':>12} {'worker rot':>11} {'CPU ceiling':>12} {'ratio':>6}"
        f" {'sweep/ceiling':>13}"
    )
    for r in report["results"]:
        st, cpu = r["stages"], r["cpu_us_per_blob"]
        print(
            f"{r['blobs']:>8,} {st['kms_per_s']:>10,.0f} {st['kms_ratio']:>6.3f}"
            f" {st['store_per_s']:>12,.0f} {st['store_ratio']:>6.3f}"
            f" {cpu['raw_openbao']:>12.1f} {cpu['rotation_openbao']:>12.1f} {cpu['rotation_worker']:>11.1f}"
            f" {r['cpu_ceiling_per_s']:>12,.0f} {r['cpu_ceiling_ratio']:>6.3f}"
            f" {r['sweep_ceiling_share']:>13.3f}"
        )
    print(
        "KMS alone: the adapter's batch rewrap in the sweep's chunks; store alone: the sweep with"
        " a no-op KMS; CPU ceiling: cores / (worker + OpenBao CPU per blob during the rotation);"
        " sweep/ceiling: the sweep's share of that ceiling (goal >= 0.8)"
    )
    print(
        f"largest / smallest size: sweep rate {report['sweep_rate_largest_to_smallest']:.3f},"
        f" sweep/ceiling {report['ceiling_share_largest_to_smallest']:.3f} (goal: no worse, >= 1.0"
        " within the run-to-run spread)"
    )


if __name__ == "__main__":
    main()
