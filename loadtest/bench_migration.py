"""Benchmark: the migration workflow's hand-off against a plain loop of the same hand-offs, in one run.

One Temporal dev server, one SQLite store and ``--hosts`` simulated TEE hosts, each running a
v1 and a v2 agent (``rekey agent serve --register``, real processes, as in production):

1. ``seed``: ``--blobs`` hardware-sealed blobs of v1 (``--body`` random bytes each), spread
   evenly over the hosts, sealed in this process by a v1 sim enclave on each host's own host
   directory (the same root secret the host's v1 agent seals with, so the agent opens them) and
   stored in one `SealedStateStore.insert_many` per chunk. Timed, not counted.
2. ``baseline``: the least the hand-off can do without Temporal, through the same agents:
   `sealing.migration.hand_off_batch` in a loop per host (the old agent is asked who it is, a
   page of ``--batch-size`` of the host's v1 blobs is read, the v2 agent attests over the v1
   agent's nonce and its evidence is checked against the migration policy, the v1 agent
   exports them in one HPKE package after checking that evidence, the v2 agent imports and
   reseals, and the store swaps each blob by compare-and-swap keeping its old copy, with the
   worker's freshness witness); wave by wave as the workflow plans them (``--waves``), the hosts
   of a wave in parallel (one thread each: one batch per host at a time, as the workflow does),
   with the same batch size. The agent clients and the admission check are made once per host
   (the workflow's activity makes them per batch). Then every moved blob is rolled back to its
   old copy (`sealing.migration.roll_back`, not timed), so the workflow moves the same blobs.
3. ``workflow``: ``MigrateGenerationWorkflow`` v1 -> v2 (grace 0, ``--waves``, gate sample
   ``--gate-sample``, ``--batch-size``) on a worker in this process built as ``rekey worker``
   builds it (`rekey.worker.build_worker`: the real activities, store, audit log and witness),
   from start to DONE. ``handoff`` = HANDING_OFF -> VERIFYING from the workflow's own phase
   timestamps (the waves' hand-offs and health gates); ``run`` = start -> DONE (attestation,
   hand-off, verification, narrowing, audit records).
4. ``baseline`` again, on ``--blobs`` freshly seeded v1 blobs in another namespace (the
   migrated ones stay on v2).

Ratios are workflow rate / baseline rate, the baseline being the better of its two runs (the
harder baseline: load from elsewhere on a shared machine during one run does not flatter the
workflow); goal for the hand-off: >= 0.8 at 20,000 blobs. CPU
seconds per blob of the agents (all hosts) and of this process (baseline loop or worker) are
read from ``/proc``. ``--kind kms`` (KMS-wrapped blobs re-bound by the new agents,
``migration_rebind``) and ``both`` are not measured by this benchmark yet: they are refused.

    python -m loadtest.bench_migration [--blobs 20000] [--hosts 4] [--batch-size 50]
        [--waves 100] [--gate-sample 5] [--body 32] [--kind tee|kms|both] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess  # starts the agents for the benchmark  # nosec B404
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment

from activities.migration_types import DEFAULT_HANDOFF_BATCH, MAX_HANDOFF_BATCH
from attestation.sim import SimVerifier
from rekey.agent_peer import AgentPeer, peers_from_state_dirs
from rekey.backends import signer_for, witness_for
from rekey.codec import data_converter
from rekey.config import Settings, load_settings
from rekey.devstack.temporal import search_attribute_flags, temporal_cli
from rekey.worker import build_worker, tune_gc
from sealing import envelope
from sealing.generation import parse_manifest
from sealing.migration import BatchOutcome, hand_off_batch, new_agent_reasons, roll_back
from sealing.store import AgentRecord, NewBlob, SealedStateStore
from sealing.tee.sim import TEE_KEY_REF, EnclaveIdentity, SimHost
from sealing.witness import ResettableWitness
from workflows.migration import MigrateGenerationWorkflow
from workflows.migration_state import (
    DONE,
    HANDING_OFF,
    ROLLED_BACK,
    VERIFYING,
    MigrateInput,
    MigrationProgress,
    migration_id,
    split_waves,
)

V1, V2 = "bench-v1", "bench-v2"
OLD: dict[str, object] = {
    "id": V1,
    "platform": "sim",
    "measurement": "11" * 32,
    "signer": "22" * 32,
    "product_id": 1,
    "svn": 2,
    "debug": False,
    "tcb": "UpToDate",
}
NEW = OLD | {"id": V2, "measurement": "33" * 32, "svn": 3}
NAMESPACE = "bench"
SEED_CHUNK = 5000
BASELINE_ID = "bench-baseline"
KINDS = ("tee", "kms", "both")


class NotAvailable(Exception):
    """What the benchmark was asked to measure does not exist yet."""


@dataclass
class Agent:
    host: str
    generation: str
    process: subprocess.Popen[str]
    state_dir: Path
    log: TextIO
    url: str = ""


@dataclass
class Fleet:
    """The simulated hosts (name -> host id) and their agents' processes."""

    root: Path
    host_ids: dict[str, str] = field(default_factory=dict)
    agents: list[Agent] = field(default_factory=list)

    def host_of(self, host_id: str) -> str:
        return next(h for h, i in self.host_ids.items() if i == host_id)

    def state_dir(self, record: AgentRecord) -> Path:
        return self.root / "agents" / self.host_of(record.host_id) / record.generation

    def verifier(self, host_id: str) -> SimVerifier:
        return SimVerifier(SimHost.load(self.root / "hosts" / self.host_of(host_id)).root_ca_pem())

    def agent_pids(self) -> list[int]:
        return [a.process.pid for a in self.agents]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _agents_cpu(fleet: Fleet) -> float:
    return sum(_cpu_seconds(pid) for pid in fleet.agent_pids())


def register_generations(store: SealedStateStore, root: Path) -> None:
    for manifest in (OLD, NEW):
        parsed = parse_manifest(manifest, f"{manifest['id']}.yaml")
        store.put_generation(parsed.id, parsed.canonical_json())
        (root / f"{manifest['id']}.yaml").write_text(yaml.safe_dump(manifest))


def _start_agent(root: Path, home: Path, host: str, generation: str) -> Agent:
    state_dir = root / "agents" / host / generation
    log = (root / f"agent-{host}-{generation}.log").open("w")
    process = subprocess.Popen(  # argument list, no shell  # nosec B603
        [
            sys.executable,
            "-m",
            "rekey.cli",
            "--home",
            str(home),
            "agent",
            "serve",
            "--manifest",
            str(root / f"{generation}.yaml"),
            "--platform",
            "sim",
            "--host-dir",
            str(root / "hosts" / host),
            "--port",
            "0",
            "--state-dir",
            str(state_dir),
            "--register",
            "--agent-id",
            f"{generation}-{host}",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    return Agent(host, generation, process, state_dir, log)


@contextlib.contextmanager
def fleet_of(root: Path, home: Path, hosts: int) -> Iterator[Fleet]:
    """``hosts`` sim hosts (created here), a v1 and a v2 agent on each, registered."""
    fleet = Fleet(root)
    try:
        for n in range(hosts):
            host = f"h{n + 1}"
            fleet.host_ids[host] = SimHost.load_or_create(root / "hosts" / host).host_id
            for generation in (V1, V2):
                fleet.agents.append(_start_agent(root, home, host, generation))
        for agent in fleet.agents:
            assert agent.process.stdout is not None  # typing only  # nosec B101
            lines = [agent.process.stdout.readline().strip() for _ in range(3)]
            if "listening on" not in lines[0] or not lines[2].startswith("registered as agent"):
                raise RuntimeError(f"agent {agent.generation} on {agent.host} did not start: {lines}")
            agent.url = lines[0].rsplit(" ", 1)[-1]
        yield fleet
    finally:
        for agent in fleet.agents:
            agent.process.terminate()
        for agent in fleet.agents:
            try:
                agent.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.process.kill()
                agent.process.wait()
            agent.log.close()


def seed(store: SealedStateStore, fleet: Fleet, count: int, body: int, namespace: str = NAMESPACE) -> None:
    """``count`` v1 hardware-sealed blobs in ``namespace``, spread evenly over the hosts (see the module)."""
    identity = EnclaveIdentity.from_manifest(parse_manifest(OLD, "v1"))
    enclaves = [
        (host_id, SimHost.load(fleet.root / "hosts" / host).enclave(identity))
        for host, host_id in fleet.host_ids.items()
    ]
    rows: list[NewBlob] = []
    for i in range(count):
        host_id, enclave = enclaves[i % len(enclaves)]
        name, blob_id = f"item-{i:07d}", uuid.uuid4()
        blob = enclave.seal(
            os.urandom(body),
            "mrenclave",
            namespace=namespace,
            name=name,
            generation=V1,
            blob_id=blob_id,
        )
        key_version = envelope.parse(blob).key_version
        rows.append(
            NewBlob(namespace, name, TEE_KEY_REF, key_version, V1, blob, str(blob_id), "tee", host_id)
        )
        if len(rows) == SEED_CHUNK:
            store.insert_many(rows)
            rows = []
    store.insert_many(rows)


def plan_waves(store: SealedStateStore, waves: list[int]) -> list[list[str]]:
    """The host ids of each wave, as the workflow plans them (sorted host ids, `split_waves`)."""
    return split_waves(sorted(store.count_tee_by_host(V1)), waves)


def _hand_off_host(
    store: SealedStateStore,
    fleet: Fleet,
    witness: ResettableWitness,
    host_id: str,
    batch_size: int,
    totals: dict[str, BatchOutcome],
    migration: str,
) -> None:
    peer_for = peers_from_state_dirs(fleet.state_dir)
    old_record = next(a for a in store.list_agents(generation=V1) if a.host_id == host_id)
    new_record = next(a for a in store.list_agents(generation=V2) if a.host_id == host_id)
    old_port: AgentPeer = peer_for(old_record)
    new_port: AgentPeer = peer_for(new_record)
    admit = partial(
        new_agent_reasons,
        verifier=fleet.verifier(host_id),
        old=parse_manifest(OLD, "v1"),
        new=parse_manifest(NEW, "v2"),
        allow_same_svn=False,
        expected_key_sha256=new_record.handoff_key_sha256,
    )
    total, cursor = BatchOutcome(), None
    while True:
        outcome = hand_off_batch(
            store,
            old_port,
            new_port,
            migration_id=migration,
            old_generation=V1,
            new_generation=V2,
            host=host_id,
            after=cursor,
            size=batch_size,
            admit=admit,
            witness=witness,
        )
        total.moved += outcome.moved
        total.conflicts += outcome.conflicts
        total.attestations += outcome.attestations
        cursor = outcome.cursor
        if outcome.done:
            break
    totals[host_id] = total


def baseline(
    store: SealedStateStore,
    fleet: Fleet,
    witness: ResettableWitness,
    waves: list[list[str]],
    batch_size: int,
    migration: str = BASELINE_ID,
) -> tuple[float, int]:
    """Seconds and blobs moved by the plain hand-off loop (see the module), wave by wave."""
    totals: dict[str, BatchOutcome] = {}
    errors: list[BaseException] = []

    def run(host_id: str) -> None:
        try:
            _hand_off_host(store, fleet, witness, host_id, batch_size, totals, migration)
        except BaseException as exc:  # reported once all threads of the wave are done
            errors.append(exc)

    started = time.perf_counter()
    for wave in waves:
        threads = [threading.Thread(target=run, args=(h,), name=f"baseline-{h}") for h in wave]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError(f"baseline hand-off failed: {errors[0]}") from errors[0]
    return time.perf_counter() - started, sum(t.moved for t in totals.values())


@dataclass
class BaselineRun:
    seconds: float
    moved: int
    agents_cpu: float
    own_cpu: float


def timed_baseline(
    store: SealedStateStore,
    fleet: Fleet,
    witness: ResettableWitness,
    waves: list[list[str]],
    batch_size: int,
    migration: str,
) -> BaselineRun:
    """`baseline` with the CPU seconds of the agents and of this process; every v1 blob moved."""
    expected = sum(store.count_tee_by_host(V1).values())
    agents_cpu, cpu = _agents_cpu(fleet), time.process_time()
    seconds, moved = baseline(store, fleet, witness, waves, batch_size, migration)
    done = BaselineRun(seconds, moved, _agents_cpu(fleet) - agents_cpu, time.process_time() - cpu)
    if moved != expected or store.count_tee_by_host(V1):
        raise RuntimeError(f"the baseline moved {moved} of {expected} blobs")
    print(f"baseline: {moved:,} blobs in {seconds:.1f}s", file=sys.stderr)
    return done


def _seconds(progress: MigrationProgress, since: str, until: str) -> float:
    stamps = progress.phase_started
    return (datetime.fromisoformat(stamps[until]) - datetime.fromisoformat(stamps[since])).total_seconds()


async def workflow_run(
    env: WorkflowEnvironment,
    settings: Settings,
    store: SealedStateStore,
    fleet: Fleet,
    witness: ResettableWitness,
    args: argparse.Namespace,
) -> tuple[MigrationProgress, float, dict[str, float]]:
    """The migration from start to DONE on an in-process worker: its progress, the worker's
    CPU seconds and `handoff_timeline`."""
    task_queue = f"bench-migration-{uuid.uuid4()}"
    worker = build_worker(
        env.client,
        settings,
        task_queue=task_queue,
        store=store,
        peers=peers_from_state_dirs(fleet.state_dir),
        verifiers=fleet.verifier,
        witness=witness,
    )
    async with worker:
        cpu = time.process_time()
        handle = await env.client.start_workflow(
            MigrateGenerationWorkflow.run,
            MigrateInput(
                V1,
                V2,
                waves=args.waves,
                grace_seconds=0,
                gate_sample=args.gate_sample,
                requested_at=datetime.now(UTC).isoformat(),
                batch_size=args.batch_size,
            ),
            id=migration_id(V1, V2),
            task_queue=task_queue,
            execution_timeout=timedelta(hours=2),
        )
        deadline = time.monotonic() + 3600
        while True:
            progress: MigrationProgress = await handle.query(MigrateGenerationWorkflow.progress)
            if progress.held or progress.paused or progress.phase == ROLLED_BACK:
                raise RuntimeError(
                    f"the migration stopped in {progress.phase}: {progress.held or progress.reasons}"
                )
            if progress.phase == DONE:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the migration did not finish within an hour (in {progress.phase})")
            await asyncio.sleep(0.5)
        progress = await handle.result()
        worker_cpu = time.process_time() - cpu
        timeline = handoff_timeline(await handle.fetch_history())
        return progress, worker_cpu, timeline


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def handoff_timeline(history: WorkflowHistory) -> dict[str, float]:
    """Where a hand-off round's time goes, from the workflow's history: the mean seconds a
    ``migration_handoff`` activity waited to start after it was scheduled, ran, and the mean
    gap from a round's last completion to the next round's scheduling (the workflow task)."""
    scheduled: dict[int, datetime] = {}
    started: dict[int, datetime] = {}
    waits: list[float] = []
    runs: list[float] = []
    completions: list[datetime] = []
    schedules: list[datetime] = []
    for event in history.events:
        at = event.event_time.ToDatetime()
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            if event.activity_task_scheduled_event_attributes.activity_type.name == "migration_handoff":
                scheduled[event.event_id] = at
                schedules.append(at)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            sid = event.activity_task_started_event_attributes.scheduled_event_id
            if sid in scheduled:
                started[sid] = at
                waits.append((at - scheduled[sid]).total_seconds())
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            sid = event.activity_task_completed_event_attributes.scheduled_event_id
            if sid in started:
                runs.append((at - started[sid]).total_seconds())
                completions.append(at)
    gaps = []
    for done_at in completions:
        later = [s for s in schedules if s >= done_at]
        if later:
            gaps.append((min(later) - done_at).total_seconds())
    return {
        "activities": len(runs),
        "schedule_to_start_s": _mean(waits),
        "run_s": _mean(runs),
        "completion_to_next_schedule_s": _mean(gaps),
    }


def check_kind(kind: str) -> None:
    if kind in ("kms", "both"):
        raise NotAvailable(
            f"--kind {kind} is not available yet: this benchmark measures the hand-off of"
            " hardware-sealed blobs only (the re-binding of KMS-wrapped blobs is not benchmarked"
            " yet); use --kind tee"
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    check_kind(args.kind)
    tune_gc()  # as `rekey worker` does once started; the baseline runs in the same process
    root = Path(tempfile.mkdtemp(prefix="rekey-bench-migration-"))
    home = root / "home"
    try:
        settings = load_settings(home, environ={})
        store = SealedStateStore(settings.store_url)
        register_generations(store, root)
        with fleet_of(root, home, args.hosts) as fleet:
            witness = witness_for(settings, signer=signer_for(settings))
            t0 = time.perf_counter()
            seed(store, fleet, args.blobs, args.body)
            seeded = time.perf_counter() - t0
            stored = store.count_by_generation().get(V1, 0)
            print(f"{args.blobs:,} blobs seeded over {args.hosts} hosts in {seeded:.1f}s", file=sys.stderr)
            waves = plan_waves(store, args.waves)

            first = timed_baseline(store, fleet, witness, waves, args.batch_size, f"{BASELINE_ID}-1")
            if store.count_by_generation() != {V2: args.blobs}:
                raise RuntimeError("the baseline left blobs on v1")
            restored = roll_back(store, witness, f"{BASELINE_ID}-1", sorted(fleet.host_ids.values()))
            if restored.restored != args.blobs or store.count_by_generation() != {V1: args.blobs}:
                raise RuntimeError(f"rollback after the baseline restored {restored.restored} blobs")

            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=temporal_cli(),
                data_converter=data_converter(home),
                dev_server_extra_args=search_attribute_flags(),
            )
            try:
                agents_cpu = _agents_cpu(fleet)
                progress, worker_cpu, timeline = await workflow_run(
                    env, settings, store, fleet, witness, args
                )
                flow_agents_cpu = _agents_cpu(fleet) - agents_cpu
            finally:
                await env.shutdown()
            after = store.count_by_generation()
            on_old = store.count_tee_by_host(V1)
            # The baseline once more, on as many fresh v1 blobs (the migrated ones stay on v2):
            # the better of the two runs is the baseline, so load on a shared machine during
            # one of them does not flatter the workflow.
            seed(store, fleet, args.blobs, args.body, namespace=f"{NAMESPACE}-again")
            second = timed_baseline(store, fleet, witness, waves, args.batch_size, f"{BASELINE_ID}-2")
            if store.count_by_generation() != {V2: 2 * args.blobs}:
                raise RuntimeError("the second baseline left blobs on v1")
            store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if progress.phase != DONE or progress.moved != args.blobs or after != {V2: args.blobs} or on_old:
        raise RuntimeError(
            f"the migration ended {progress.phase} with {progress.moved} of {args.blobs} moved;"
            f" store: {after}"
        )
    base_s = min(first.seconds, second.seconds)
    handoff_s = _seconds(progress, HANDING_OFF, VERIFYING)
    run_s = (
        datetime.fromisoformat(progress.phase_started[DONE]) - datetime.fromisoformat(progress.started_at)
    ).total_seconds()
    n = args.blobs
    return {
        "kind": "tee",
        "blobs": n,
        "hosts": args.hosts,
        "batch_size": args.batch_size,
        "waves": [len(w) for w in waves],
        "gate_sample": args.gate_sample,
        "body_bytes": args.body,
        "cores": os.cpu_count(),
        "seeded": stored,
        "seed_s": round(seeded, 2),
        "baseline": {
            "seconds": round(base_s, 3),
            "runs_s": [round(first.seconds, 3), round(second.seconds, 3)],
            "moved": [first.moved, second.moved],
            "per_s": round(n / base_s, 1),
        },
        "workflow": {
            "moved": progress.moved,
            "on_new": after.get(V2, 0),
            "on_old": sum(on_old.values()),
            "handoff_s": round(handoff_s, 3),
            "handoff_per_s": round(n / handoff_s, 1),
            "run_s": round(run_s, 3),
            "run_per_s": round(n / run_s, 1),
            "attestations": progress.attestations,
            "timeline": timeline,
        },
        "handoff_ratio": round(base_s / handoff_s, 3),
        "run_ratio": round(base_s / run_s, 3),
        "cpu_us_per_blob": {
            "baseline_agents": round((first.agents_cpu + second.agents_cpu) / (2 * n) * 1e6, 1),
            "baseline_loop": round((first.own_cpu + second.own_cpu) / (2 * n) * 1e6, 1),
            "workflow_agents": round(flow_agents_cpu / n * 1e6, 1),
            "workflow_worker": round(worker_cpu / n * 1e6, 1),
        },
    }


def _waves(value: str) -> list[int]:
    waves = [int(x) for x in value.split(",")]
    if not waves or waves != sorted(set(waves)) or waves[0] < 1 or waves[-1] != 100:
        raise argparse.ArgumentTypeError("waves must be increasing percentages ending at 100")
    return waves


def _batch(value: str) -> int:
    size = int(value)
    if not 1 <= size <= MAX_HANDOFF_BATCH:
        raise argparse.ArgumentTypeError(f"batch size must be 1..{MAX_HANDOFF_BATCH}")
    return size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blobs", type=int, default=20_000, help="hardware-sealed blobs (default 20000)")
    parser.add_argument(
        "--hosts", type=int, default=4, help="sim hosts, a v1 and a v2 agent each (default 4)"
    )
    parser.add_argument(
        "--batch-size",
        type=_batch,
        default=DEFAULT_HANDOFF_BATCH,
        help=f"blobs per hand-off batch (default {DEFAULT_HANDOFF_BATCH}, at most {MAX_HANDOFF_BATCH})",
    )
    parser.add_argument(
        "--waves", type=_waves, default=[100], help="cumulative host percentages per wave (default 100)"
    )
    parser.add_argument("--gate-sample", type=int, default=5, help="blobs the health gate opens per host (5)")
    parser.add_argument("--body", type=int, default=32, help="secret bytes per blob (default 32)")
    parser.add_argument("--kind", choices=KINDS, default="tee", help="what to migrate (default tee)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.blobs < 1 or not 1 <= args.hosts <= args.blobs:
        parser.error("--blobs must be at least 1 and --hosts 1..blobs")
    try:
        report = asyncio.run(run(args))
    except NotAvailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    b, w, cpu = report["baseline"], report["workflow"], report["cpu_us_per_blob"]
    print(
        f"{report['blobs']:,} hardware-sealed blobs, {report['hosts']} hosts, batch size"
        f" {report['batch_size']}, waves of {report['waves']} hosts ({report['cores']} cores;"
        f" seeded in {report['seed_s']:.1f}s, not counted)"
    )
    print(f"{'':>10} {'seconds':>9} {'blobs/s':>9} {'ratio':>6} {'agents CPU us/blob':>19} {'own CPU':>8}")
    print(
        f"{'baseline':>10} {b['seconds']:>9.1f} {b['per_s']:>9,.0f} {'':>6} {cpu['baseline_agents']:>19,.0f}"
        f" {cpu['baseline_loop']:>8,.0f}"
    )
    print(
        f"{'hand-off':>10} {w['handoff_s']:>9.1f} {w['handoff_per_s']:>9,.0f} {report['handoff_ratio']:>6.3f}"
        f" {cpu['workflow_agents']:>19,.0f} {cpu['workflow_worker']:>8,.0f}"
    )
    print(f"{'whole run':>10} {w['run_s']:>9.1f} {w['run_per_s']:>9,.0f} {report['run_ratio']:>6.3f}")
    print(
        "baseline: hand_off_batch in a loop per host, no Temporal; hand-off: HANDING_OFF -> VERIFYING;"
        " whole run: start -> DONE; ratio = workflow rate / baseline rate (goal for the hand-off >= 0.8)"
    )


if __name__ == "__main__":
    main()
