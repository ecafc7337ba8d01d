"""Benchmark: the migration workflow's hand-off against a plain loop of the same hand-offs, in one run.

One Temporal dev server, one SQLite store and ``--hosts`` simulated TEE hosts, each running a
v1 and a v2 agent (``rekey agent serve --register``, real processes, as in production), and for
``--kind kms|both`` an OpenBao dev server with a Transit key the agents reach with the home's KMS
settings (``rekey.toml``: ``vault_addr``, ``vault_token``). ``--blobs`` is per kind.

1. ``seed``, timed, not counted. ``tee``: ``--blobs`` hardware-sealed blobs of v1 (``--body``
   random bytes each), spread evenly over the hosts, sealed in this process by a v1 sim enclave
   on each host's own host directory (the same root secret the host's v1 agent seals with, so
   the agent opens them). ``kms``: ``--blobs`` KMS-wrapped blobs of v1 under the Transit key,
   sealed in this process with their DEKs wrapped by Transit in batches (``batch_input``); the
   key's release policy admits v1 (`rekey.client.release_policies.set_release_policy`, as
   ``rekey key release-policy set KEYREF --generation bench-v1`` does). Both stored in one
   `SealedStateStore.insert_many` per chunk.
2. ``baseline``: the least each kind of move can do without Temporal, through the same agents,
   wave by wave as the workflow plans them (``--waves``), the hosts of a wave in parallel (one
   thread each: one batch per host at a time, as the workflow does), with the same batch size.
   The agent clients (and for ``tee`` the admission check) are made once per host (the
   workflow's activities make them per call). Then every moved blob is rolled back to its old
   copy (`sealing.migration.roll_back`, not timed), so the workflow moves the same blobs.

   * ``tee``: `sealing.migration.hand_off_batch` in a loop per host (the old agent is asked who
     it is, a page of ``--batch-size`` of the host's v1 blobs is read, the v2 agent attests over
     the v1 agent's nonce and its evidence is checked against the migration policy, the v1 agent
     exports them in one HPKE package after checking that evidence, the v2 agent imports and
     reseals, and the store swaps each blob by compare-and-swap keeping its old copy, with the
     worker's freshness witness).
   * ``kms``: `sealing.kms_migration.rebind_batch` in a loop over each host's share
     (`kms_shares`, the blob-id ranges the workflow gives the hosts): a page of ``--batch-size``
     of the share's v1 blobs is read, the v2 agent attests over a fresh nonce and gets one
     release token for the batch (`attested_token`, signed with the worker's release-token key),
     re-binds the batch (``/v1/rebind``: each DEK released through the key's release gate and
     Transit with the agent's own KMS settings, the body encrypted again under a v2 header), and
     the store swaps each blob keeping its old copy. The key's release policy admits v1 and v2
     meanwhile (as the workflow's WIDENING makes it), then v1 only again.
3. ``workflow``: one ``MigrateGenerationWorkflow`` v1 -> v2 over every seeded blob (grace 0,
   ``--waves``, gate sample ``--gate-sample``, ``--batch-size``) on a worker in this process
   built as ``rekey worker`` builds it (`rekey.worker.build_worker`: the real activities, store,
   audit log, witness, release-policy store and token signer), from start to DONE. ``handoff``
   = HANDING_OFF -> VERIFYING from the workflow's own phase timestamps (the waves' moves and
   health gates); a ``both`` run splits it by kind (`split_handoff`: each host moves its
   hardware-sealed blobs first, then its KMS share; each stretch between two schedulings of
   move activities goes to the kind just scheduled, the health gate to the kind moved last).
   A single-kind run gives that kind the whole phase (in a ``kms`` run each host's one empty
   hand-off call is in it). ``run`` = start -> DONE (attestation, widening, moves,
   verification, narrowing, audit records).
4. ``baseline`` again, on ``--blobs`` freshly seeded v1 blobs of each kind in other namespaces
   (the migrated ones stay on v2; the release policy admits v2 only after NARROWING, which is
   all a re-binding needs).

Ratios are workflow rate / baseline rate, per kind, the baseline being the better of its two
runs (the harder baseline: load from elsewhere on a shared machine during one run does not
flatter the workflow); goal for the hand-off: >= 0.8 at 20,000 blobs. The whole run's ratio
compares it with the baselines of every kind one after the other. CPU seconds per blob of the
agents (all hosts), of OpenBao and of this process (baseline loop or worker) are read from
``/proc``; the workflow's are over every blob it moved.

    python -m loadtest.bench_migration [--blobs 20000] [--hosts 4] [--batch-size 50]
        [--waves 100] [--gate-sample 5] [--body 32] [--kind tee|kms|both] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
from collections.abc import Callable, Iterator
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
from attestation.ratls import RatlsVerifier
from attestation.sim import SimVerifier
from attestation.token import ResultSigner
from emulators.servers import OpenBao, openbao_dev
from kms_adapters.vault_transit import BATCH_ITEMS
from loadtest.rotation_rig import CollectingWrapper
from rekey.agent_peer import AgentPeer, peers_from_state_dirs
from rekey.backends import adapter_for, release_token_signer, signer_for, witness_for
from rekey.client.release_policies import set_release_policy
from rekey.codec import data_converter
from rekey.config import Settings, load_settings
from rekey.devstack.temporal import start_dev_server
from rekey.ratls_transport import server_expectation
from rekey.worker import build_worker, tune_gc
from sealing import envelope
from sealing.generation import parse_manifest
from sealing.keywrap import WrappedKey
from sealing.kms_migration import attested_token, kms_shares, rebind_batch
from sealing.migration import BatchOutcome, Share, hand_off_batch, new_agent_reasons, roll_back
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
KMS_NAMESPACE = "bench-kms"
KMS_KEY = "vault:bench-migration"
SEED_CHUNK = 5000
BASELINE_ID = "bench-baseline"
KINDS = ("tee", "kms", "both")
STEP_KINDS = {"migration_handoff": "tee", "migration_rebind": "kms"}
"""The workflow's move activities and the kind of blob each moves."""


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

    def expect(self, record: AgentRecord) -> RatlsVerifier:
        """What a registered agent's RA-TLS certificate must show: its generation on its host."""
        manifest = next(m for m in (OLD, NEW) if m["id"] == record.generation)
        root = SimHost.load(self.root / "hosts" / self.host_of(record.host_id)).root_ca_pem()
        return server_expectation(parse_manifest(manifest, record.generation), [root])

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


def seed_kms(
    bao: OpenBao, settings: Settings, store: SealedStateStore, count: int, body: int, namespace: str
) -> None:
    """``count`` v1 KMS-wrapped blobs under `KMS_KEY` in ``namespace`` (see the module)."""
    adapter = adapter_for(settings, KMS_KEY)
    transit = bao.client().secrets.transit
    for start in range(0, count, SEED_CHUNK):
        wrapper = CollectingWrapper(KMS_KEY)
        names = [f"kms-{i:07d}" for i in range(start, min(count, start + SEED_CHUNK))]
        ids = [uuid.uuid4() for _ in names]
        blobs = [
            bytes(
                envelope.seal(
                    os.urandom(body),
                    wrapper,  # type: ignore[arg-type]
                    namespace=namespace,
                    name=name,
                    generation=V1,
                    blob_id=blob_id,
                )
            )
            for name, blob_id in zip(names, ids, strict=True)
        ]
        wrapped: list[bytes] = []
        key_name = KMS_KEY.split(":", 1)[1]
        for at in range(0, len(wrapper.deks), BATCH_ITEMS):
            batch = [{"plaintext": base64.b64encode(d).decode()} for d in wrapper.deks[at : at + BATCH_ITEMS]]
            answer = transit.encrypt_data(key_name, plaintext="", batch_input=batch)
            wrapped += [item["ciphertext"].encode() for item in answer["data"]["batch_results"]]
        wrapper.deks.clear()
        rows = []
        for name, blob_id, blob, ciphertext in zip(names, ids, blobs, wrapped, strict=True):
            version = adapter.version_of(ciphertext)
            sealed = envelope.replace_key_slot(blob, envelope.key_slot(blob), WrappedKey(ciphertext, version))
            rows.append(NewBlob(namespace, name, KMS_KEY, version, V1, sealed, str(blob_id)))
        store.insert_many(rows)


def plan_waves(fleet: Fleet, waves: list[int]) -> list[list[str]]:
    """The host ids of each wave, as the workflow plans them (every host has agents of both
    generations: sorted host ids, `split_waves`)."""
    return split_waves(sorted(fleet.host_ids.values()), waves)


def shares_of(fleet: Fleet) -> dict[str, Share]:
    """Each host's share of the KMS-wrapped blobs, as the workflow's plan gives them."""
    return {share[0]: share for share in kms_shares(list(fleet.host_ids.values()))}


def _new_agent(store: SealedStateStore, fleet: Fleet, host_id: str) -> tuple[AgentRecord, AgentPeer]:
    record = next(a for a in store.list_agents(generation=V2) if a.host_id == host_id)
    return record, peers_from_state_dirs(fleet.state_dir, fleet.expect)(record)


def _loop(batch: Callable[[str | None], BatchOutcome]) -> BatchOutcome:
    """``batch`` from the start until it says done: the totals."""
    total, cursor = BatchOutcome(), None
    while True:
        outcome = batch(cursor)
        total.moved += outcome.moved
        total.conflicts += outcome.conflicts
        total.attestations += outcome.attestations
        cursor = outcome.cursor
        if outcome.done:
            return total


def hand_off_host(
    store: SealedStateStore,
    fleet: Fleet,
    witness: ResettableWitness,
    host_id: str,
    batch_size: int,
    migration: str,
) -> BatchOutcome:
    """Every v1 hardware-sealed blob of ``host_id`` handed off to its v2 agent (see the module)."""
    old_record = next(a for a in store.list_agents(generation=V1) if a.host_id == host_id)
    new_record, new_port = _new_agent(store, fleet, host_id)
    old_port: AgentPeer = peers_from_state_dirs(fleet.state_dir, fleet.expect)(old_record)
    admit = partial(
        new_agent_reasons,
        verifier=fleet.verifier(host_id),
        old=parse_manifest(OLD, "v1"),
        new=parse_manifest(NEW, "v2"),
        allow_same_svn=False,
        expected_key_sha256=new_record.handoff_key_sha256,
    )
    return _loop(
        lambda cursor: hand_off_batch(
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
    )


def rebind_host(
    store: SealedStateStore,
    fleet: Fleet,
    signer: ResultSigner,
    share: Share,
    batch_size: int,
    migration: str,
) -> BatchOutcome:
    """Every v1 KMS-wrapped blob of a host's share re-bound by its v2 agent (see the module)."""
    host_id = share[0]
    new_record, new_port = _new_agent(store, fleet, host_id)
    token_for = partial(
        attested_token,
        new_port.attest,
        fleet.verifier(host_id),
        signer,
        parse_manifest(NEW, "v2"),
        expected_key_sha256=new_record.handoff_key_sha256,
    )
    return _loop(
        lambda cursor: rebind_batch(
            store,
            new_port,
            token_for,
            migration_id=migration,
            old_generation=V1,
            new_generation=V2,
            share=share,
            after=cursor,
            size=batch_size,
        )
    )


def baseline(move: Callable[[str], BatchOutcome], waves: list[list[str]]) -> tuple[float, int]:
    """Seconds and blobs moved by ``move`` (one host's plain loop), wave by wave, the hosts of a
    wave in parallel."""
    totals: dict[str, BatchOutcome] = {}
    errors: list[BaseException] = []

    def run(host_id: str) -> None:
        try:
            totals[host_id] = move(host_id)
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
            raise RuntimeError(f"baseline failed: {errors[0]}") from errors[0]
    return time.perf_counter() - started, sum(t.moved for t in totals.values())


@dataclass
class BaselineRun:
    seconds: float
    moved: int
    agents_cpu: float
    own_cpu: float
    openbao_cpu: float = 0.0


@dataclass
class Stack:
    """What the runs share: the store, the fleet, the witness, and for KMS-wrapped blobs
    OpenBao, the home's settings and the worker's release-token signer."""

    settings: Settings
    store: SealedStateStore
    fleet: Fleet
    witness: ResettableWitness
    waves: list[list[str]]
    batch_size: int
    bao: OpenBao | None = None
    signer: ResultSigner | None = None

    def openbao_cpu(self) -> float:
        return _cpu_seconds(self.bao.pid) if self.bao is not None and self.bao.pid else 0.0

    def v1_left(self, kind: str) -> int:
        if kind == "tee":
            return sum(self.store.count_tee_by_host(V1).values())
        return sum(self.store.count_kms_in_shares(V1, list(shares_of(self.fleet).values())).values())

    def mover(self, kind: str, migration: str) -> Callable[[str], BatchOutcome]:
        if kind == "tee":
            return partial(
                hand_off_host,
                self.store,
                self.fleet,
                self.witness,
                batch_size=self.batch_size,
                migration=migration,
            )
        if self.signer is None:
            raise RuntimeError("KMS-wrapped blobs need the release-token signer")
        shares, signer = shares_of(self.fleet), self.signer
        return lambda host_id: rebind_host(
            self.store, self.fleet, signer, shares[host_id], self.batch_size, migration
        )


def timed_baseline(stack: Stack, kind: str, migration: str) -> BaselineRun:
    """`baseline` of ``kind`` with the CPU seconds of the agents, OpenBao and this process;
    every v1 blob of that kind moved."""
    expected = stack.v1_left(kind)
    agents_cpu, bao_cpu, cpu = _agents_cpu(stack.fleet), stack.openbao_cpu(), time.process_time()
    seconds, moved = baseline(stack.mover(kind, migration), stack.waves)
    done = BaselineRun(
        seconds,
        moved,
        _agents_cpu(stack.fleet) - agents_cpu,
        time.process_time() - cpu,
        stack.openbao_cpu() - bao_cpu,
    )
    if moved != expected or stack.v1_left(kind):
        raise RuntimeError(f"the {kind} baseline moved {moved} of {expected} blobs")
    print(f"{kind} baseline: {moved:,} blobs in {seconds:.1f}s", file=sys.stderr)
    return done


def _stamp(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _seconds(progress: MigrationProgress, since: str, until: str) -> float:
    stamps = progress.phase_started
    return (_stamp(stamps[until]) - _stamp(stamps[since])).total_seconds()


def split_handoff(history: WorkflowHistory, start: datetime, end: datetime) -> dict[str, float]:
    """HANDING_OFF (``start`` to ``end``) in seconds per kind of blob: each stretch between two
    schedulings of move activities goes to the kind just scheduled (the first stretch to the
    first kind scheduled), so a wave's health gate goes to the kind it moved last."""
    seconds = {"tee": 0.0, "kms": 0.0}
    at, kind = start, ""
    for event in history.events:
        if event.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            continue
        step = STEP_KINDS.get(event.activity_task_scheduled_event_attributes.activity_type.name)
        when = event.event_time.ToDatetime(tzinfo=UTC)
        if step is None or not start <= when <= end:
            continue
        if kind:
            seconds[kind] += (when - at).total_seconds()
        else:
            seconds[step] += (when - at).total_seconds()
        at, kind = when, step
    if kind:
        seconds[kind] += (end - at).total_seconds()
    return seconds


async def workflow_run(
    env: WorkflowEnvironment, stack: Stack, args: argparse.Namespace
) -> tuple[MigrationProgress, float, WorkflowHistory]:
    """The migration from start to DONE on an in-process worker: its progress, the worker's
    CPU seconds and its history."""
    task_queue = f"bench-migration-{uuid.uuid4()}"
    worker = build_worker(
        env.client,
        stack.settings,
        task_queue=task_queue,
        store=stack.store,
        peers=peers_from_state_dirs(stack.fleet.state_dir, stack.fleet.expect),
        verifiers=stack.fleet.verifier,
        witness=stack.witness,
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
        return progress, worker_cpu, await handle.fetch_history()


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def handoff_timeline(history: WorkflowHistory, activity_type: str = "migration_handoff") -> dict[str, float]:
    """Where a round's time goes, from the workflow's history: the mean seconds an
    ``activity_type`` activity (``migration_handoff``, ``migration_rebind``) waited to start
    after it was scheduled, ran, and the mean gap from a round's last completion to the next
    round's scheduling (the workflow task)."""
    scheduled: dict[int, datetime] = {}
    started: dict[int, datetime] = {}
    waits: list[float] = []
    runs: list[float] = []
    completions: list[datetime] = []
    schedules: list[datetime] = []
    for event in history.events:
        at = event.event_time.ToDatetime()
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            if event.activity_task_scheduled_event_attributes.activity_type.name == activity_type:
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


def kinds_of(kind: str) -> list[str]:
    return ["tee", "kms"] if kind == "both" else [kind]


@contextlib.contextmanager
def kms_home(home: Path, wanted: bool) -> Iterator[OpenBao | None]:
    """For KMS-wrapped blobs, an OpenBao dev server and ``home``'s settings pointing at it
    (written before anything reads them: the agents take theirs from there too)."""
    if not wanted:
        yield None
        return
    with openbao_dev() as bao:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / "rekey.toml").write_text(f'vault_addr = "{bao.addr}"\nvault_token = "{bao.token}"\n')
        yield bao


def _seed(stack: Stack, kind: str, count: int, body: int, again: bool) -> float:
    started = time.perf_counter()
    if kind == "tee":
        seed(stack.store, stack.fleet, count, body, namespace=f"{NAMESPACE}-again" if again else NAMESPACE)
    else:
        assert stack.bao is not None  # typing only: kms_home started it  # nosec B101
        namespace = f"{KMS_NAMESPACE}-again" if again else KMS_NAMESPACE
        seed_kms(stack.bao, stack.settings, stack.store, count, body, namespace)
    seconds = time.perf_counter() - started
    print(
        f"{count:,} {kind} blobs seeded over {len(stack.fleet.host_ids)} hosts in {seconds:.1f}s",
        file=sys.stderr,
    )
    return seconds


def _first_baseline(stack: Stack, kind: str, blobs: int) -> BaselineRun:
    """The baseline of ``kind``, then every blob it moved rolled back (and for KMS-wrapped
    blobs the release policy as it was: v1 only)."""
    migration = f"{BASELINE_ID}-1-{kind}"
    if kind == "kms":
        set_release_policy(stack.settings, stack.store, KMS_KEY, [V1, V2])
    done = timed_baseline(stack, kind, migration)
    restored = roll_back(stack.store, stack.witness, migration, sorted(stack.fleet.host_ids.values()))
    if restored.restored != blobs or stack.v1_left(kind) != blobs:
        raise RuntimeError(f"rollback after the {kind} baseline restored {restored.restored} blobs")
    if kind == "kms":
        set_release_policy(stack.settings, stack.store, KMS_KEY, [V1])
    return done


async def run(args: argparse.Namespace) -> dict[str, Any]:
    kinds = kinds_of(args.kind)
    tune_gc()  # as `rekey worker` does once started; the baseline runs in the same process
    root = Path(tempfile.mkdtemp(prefix="rekey-bench-migration-"))
    home = root / "home"
    n = args.blobs
    seeded: dict[str, float] = {}
    first: dict[str, BaselineRun] = {}
    second: dict[str, BaselineRun] = {}
    try:
        with kms_home(home, "kms" in kinds) as bao:
            settings = load_settings(home, environ={})
            store = SealedStateStore(settings.store_url)
            register_generations(store, root)
            signer = None
            if bao is not None:
                adapter_for(settings, KMS_KEY).create()
                set_release_policy(settings, store, KMS_KEY, [V1])
                signer = release_token_signer(settings)
            with fleet_of(root, home, args.hosts) as fleet:
                stack = Stack(
                    settings,
                    store,
                    fleet,
                    witness_for(settings, signer=signer_for(settings)),
                    plan_waves(fleet, args.waves),
                    args.batch_size,
                    bao,
                    signer,
                )
                for kind in kinds:
                    seeded[kind] = _seed(stack, kind, n, args.body, again=False)
                stored = store.count_by_generation().get(V1, 0)
                for kind in kinds:
                    first[kind] = _first_baseline(stack, kind, n)
                if store.count_by_generation() != {V1: len(kinds) * n}:
                    raise RuntimeError(f"the baselines left {store.count_by_generation()}")

                env = await start_dev_server(data_converter=data_converter(home))
                try:
                    agents_cpu, bao_cpu = _agents_cpu(fleet), stack.openbao_cpu()
                    progress, worker_cpu, history = await workflow_run(env, stack, args)
                    flow_agents_cpu = _agents_cpu(fleet) - agents_cpu
                    flow_bao_cpu = stack.openbao_cpu() - bao_cpu
                finally:
                    await env.shutdown()
                after = store.count_by_generation()
                left = {kind: stack.v1_left(kind) for kind in kinds}
                # The baselines once more, on as many fresh v1 blobs (the migrated ones stay on
                # v2): the better of the two runs is the baseline, so load on a shared machine
                # during one of them does not flatter the workflow.
                for kind in kinds:
                    _seed(stack, kind, n, args.body, again=True)
                    second[kind] = timed_baseline(stack, kind, f"{BASELINE_ID}-2-{kind}")
                if store.count_by_generation() != {V2: 2 * len(kinds) * n}:
                    raise RuntimeError(f"the second baselines left {store.count_by_generation()}")
                store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    moved = {"tee": progress.moved, "kms": progress.kms_moved}
    if (
        progress.phase != DONE
        or any(moved[kind] != n for kind in kinds)
        or after != {V2: len(kinds) * n}
        or any(left.values())
    ):
        raise RuntimeError(
            f"the migration ended {progress.phase} with {moved} of {n} a kind moved; store: {after}"
        )
    handoff_s = _seconds(progress, HANDING_OFF, VERIFYING)
    if len(kinds) == 1:
        by_kind = {kinds[0]: handoff_s}
    else:
        by_kind = split_handoff(
            history, _stamp(progress.phase_started[HANDING_OFF]), _stamp(progress.phase_started[VERIFYING])
        )
    run_s = (_stamp(progress.phase_started[DONE]) - _stamp(progress.started_at)).total_seconds()
    total = len(kinds) * n
    report: dict[str, Any] = {
        "kind": args.kind,
        "blobs": n,
        "hosts": args.hosts,
        "batch_size": args.batch_size,
        "waves": [len(w) for w in stack.waves],
        "gate_sample": args.gate_sample,
        "body_bytes": args.body,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "seeded": stored,
        "seed_s": {kind: round(s, 2) for kind, s in seeded.items()},
    }
    for kind in kinds:
        base_s = min(first[kind].seconds, second[kind].seconds)
        runs = (first[kind], second[kind])
        report[kind] = {
            "baseline": {
                "seconds": round(base_s, 3),
                "runs_s": [round(r.seconds, 3) for r in runs],
                "moved": [r.moved for r in runs],
                "per_s": round(n / base_s, 1),
            },
            "workflow": {
                "moved": moved[kind],
                "on_old": left[kind],
                "handoff_s": round(by_kind[kind], 3),
                "handoff_per_s": round(n / by_kind[kind], 1),
            },
            "handoff_ratio": round(base_s / by_kind[kind], 3),
            "cpu_us_per_blob": {
                "baseline_agents": round(sum(r.agents_cpu for r in runs) / (2 * n) * 1e6, 1),
                "baseline_loop": round(sum(r.own_cpu for r in runs) / (2 * n) * 1e6, 1),
                "baseline_openbao": round(sum(r.openbao_cpu for r in runs) / (2 * n) * 1e6, 1),
            },
        }
    base_all = sum(report[kind]["baseline"]["seconds"] for kind in kinds)
    report["workflow"] = {
        "on_new": after.get(V2, 0),
        "handoff_s": round(handoff_s, 3),
        "run_s": round(run_s, 3),
        "run_per_s": round(total / run_s, 1),
        "attestations": progress.attestations,
        "timeline": {step: handoff_timeline(history, step) for step in STEP_KINDS},
        "cpu_us_per_blob": {
            "agents": round(flow_agents_cpu / total * 1e6, 1),
            "worker": round(worker_cpu / total * 1e6, 1),
            "openbao": round(flow_bao_cpu / total * 1e6, 1),
        },
    }
    report["run_ratio"] = round(base_all / run_s, 3)
    return report


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


LABELS = {"tee": "hardware-sealed", "kms": "KMS-wrapped"}


def print_report(report: dict[str, Any]) -> None:
    kinds = kinds_of(report["kind"])
    w = report["workflow"]
    print(
        f"{report['blobs']:,} blobs of each kind ({', '.join(LABELS[k] for k in kinds)}), {report['hosts']}"
        f" hosts, batch size {report['batch_size']}, waves of {report['waves']} hosts"
        f" ({report['cores']} cores, load average {report['load_average'][0]:.1f}; seeded in"
        f" {sum(report['seed_s'].values()):.1f}s, not counted)"
    )
    print(
        f"{'':>16} {'seconds':>9} {'blobs/s':>9} {'ratio':>6} {'agents CPU us/blob':>19}"
        f" {'own CPU':>8} {'OpenBao':>8}"
    )
    for kind in kinds:
        part = report[kind]
        b, f, cpu = part["baseline"], part["workflow"], part["cpu_us_per_blob"]
        print(
            f"{kind + ' baseline':>16} {b['seconds']:>9.1f} {b['per_s']:>9,.0f} {'':>6}"
            f" {cpu['baseline_agents']:>19,.0f} {cpu['baseline_loop']:>8,.0f}"
            f" {cpu['baseline_openbao']:>8,.0f}"
        )
        print(
            f"{kind + ' hand-off':>16} {f['handoff_s']:>9.1f} {f['handoff_per_s']:>9,.0f}"
            f" {part['handoff_ratio']:>6.3f}"
        )
    cpu = w["cpu_us_per_blob"]
    print(
        f"{'whole run':>16} {w['run_s']:>9.1f} {w['run_per_s']:>9,.0f} {report['run_ratio']:>6.3f}"
        f" {cpu['agents']:>19,.0f} {cpu['worker']:>8,.0f} {cpu['openbao']:>8,.0f}"
    )
    print(
        "baseline: hand_off_batch (tee) / rebind_batch (kms) in a loop per host, no Temporal;"
        " hand-off: HANDING_OFF -> VERIFYING (by kind); whole run: start -> DONE, against the"
        " baselines one after the other; ratio = workflow rate / baseline rate (goal for the"
        " hand-off >= 0.8)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blobs", type=int, default=20_000, help="blobs of each kind (default 20000)")
    parser.add_argument(
        "--hosts", type=int, default=4, help="sim hosts, a v1 and a v2 agent each (default 4)"
    )
    parser.add_argument(
        "--batch-size",
        type=_batch,
        default=DEFAULT_HANDOFF_BATCH,
        help=f"blobs per batch (default {DEFAULT_HANDOFF_BATCH}, at most {MAX_HANDOFF_BATCH})",
    )
    parser.add_argument(
        "--waves", type=_waves, default=[100], help="cumulative host percentages per wave (default 100)"
    )
    parser.add_argument("--gate-sample", type=int, default=5, help="blobs the health gate opens per host (5)")
    parser.add_argument("--body", type=int, default=32, help="secret bytes per blob (default 32)")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="tee",
        help="what to migrate: hardware-sealed (tee), KMS-wrapped (kms) or both in one run (default tee)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.blobs < 1 or not 1 <= args.hosts <= args.blobs:
        parser.error("--blobs must be at least 1 and --hosts 1..blobs")
    report = asyncio.run(run(args))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
