"""The rekey worker: hosts the workflows and the rotation's activities on task queue ``rekey``,
and the migration's activities on ``rekey-migration`` (`migration_task_queue`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig
from temporalio.worker import Worker

from activities.migration import MigrationActivities, PeerFor
from activities.migration_types import migration_task_queue
from activities.rotation import AuditSink, RotationActivities
from activities.types import TASK_QUEUE
from attestation.platform import PlatformVerifier
from attestation.ratls import RatlsVerifier
from attestation.token import ResultSigner
from audit import AuditLog, default_actor
from kms_adapters.contract import KmsAdapter
from kms_adapters.release import ReleasePolicyStore
from rekey.activity_logs import ActivityLogInterceptor
from rekey.agent_peer import peers_from_state_dirs, registered_expectations
from rekey.backends import (
    adapter_for,
    release_store,
    release_token_signer,
    signer_for,
    sim_root_ca,
    sim_verifiers,
    witness_for,
)
from rekey.client import check_namespace, connect
from rekey.codec import worker_converter
from rekey.config import Settings
from sealing.store import AgentRecord, SealedStateStore
from sealing.witness import ResettableWitness
from workflows.launcher import LaunchRotationWorkflow
from workflows.migration import MigrateGenerationWorkflow
from workflows.rotation import RotateKeyWorkflow

log = logging.getLogger("rekey.worker")
WORKFLOWS = [RotateKeyWorkflow, LaunchRotationWorkflow, MigrateGenerationWorkflow]
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
"""How long a stopping worker lets its activities finish: a re-wrap batch stops at its next
chunk boundary (a chunk is a second or so, longer only on a throttling KMS)."""


def open_audit_log(settings: Settings, *, actor: str | None = None) -> AuditLog:
    """The audit log of ``settings.store_url``, signing with the configured ``signing_key``
    (``rekey.backends.signer_for``: by default ``<home>/audit/ed25519.pem``, created on first
    use) and publishing its head to the freshness witness after every append. The witness also
    trusts pinned keys (``trusted_key_fingerprints``), so a head signed before a key rotation
    still reads and is moved forward."""
    signer = signer_for(settings)
    witness = witness_for(settings, signer=signer)
    return AuditLog(settings.store_url, signer, actor=actor, witness=witness)


def audit_sink(settings: Settings) -> AuditSink:
    log_ = open_audit_log(settings)

    def sink(event: str, subject: str, details: dict[str, Any], who: str) -> None:
        log_.append(event, subject, details, actor=who or default_actor())

    return sink


def agent_peers(settings: Settings, store: SealedStateStore | None = None) -> PeerFor:
    """Registered agents reached with the default caller's token from ``<home>/agent/<agent id>``
    if that directory exists (one state directory per agent: the same generation on several
    hosts), else ``<home>/agent/<generation>`` (the state directory ``rekey agent serve`` uses
    unless ``--state-dir``). An agent id is one path component (no ``/``, never ``.`` or ``..``)."""

    def state_dir(record: AgentRecord) -> Path:
        own = settings.home / "agent" / record.agent_id
        return own if own.is_dir() else settings.home / "agent" / record.generation

    roots = sim_root_ca(settings)

    def expect(record: AgentRecord) -> RatlsVerifier:
        # The certificate must show the agent's registered generation on its host.
        if store is not None:
            return registered_expectations(store, roots)(record)
        with SealedStateStore(settings.store_url) as opened:
            return registered_expectations(opened, roots)(record)

    return peers_from_state_dirs(state_dir, expect)


def worker_client(client: Client) -> Client:
    """``client`` with the worker's payload codec (:func:`rekey.codec.worker_converter`): a
    signal or update whose payload the codec refuses (copied from another workflow, or not
    encrypted) is dropped or rejected by the SDK instead of failing the workflow task on every
    attempt, which would keep the workflow from processing any later signal or update."""
    config = client.config()
    config["data_converter"] = worker_converter(client.data_converter)
    return Client(**config)


class RekeyWorker:
    """The Temporal workers of one rekey worker process, run and stopped together: one on the
    task queue (workflows, rotation activities), one on its migration queue (the migration's
    activities and its audit activity), so that a worker without migration activities, in a
    rolling upgrade, never takes a migration's activity task (see `migration_task_queue`)."""

    def __init__(self, *workers: Worker) -> None:
        self.workers = workers

    async def run(self) -> None:
        """Until every worker stops; one that fails stops the others."""
        async with asyncio.TaskGroup() as group:
            for worker in self.workers:
                group.create_task(worker.run())

    async def shutdown(self) -> None:
        await asyncio.gather(*(worker.shutdown() for worker in self.workers))

    async def __aenter__(self) -> RekeyWorker:
        async with contextlib.AsyncExitStack() as stack:
            for worker in self.workers:
                await stack.enter_async_context(worker)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


def build_worker(
    client: Client,
    settings: Settings,
    *,
    task_queue: str = TASK_QUEUE,
    adapters: Callable[[str], KmsAdapter] | None = None,
    store: SealedStateStore | None = None,
    audit: AuditSink | None = None,
    max_concurrent_activities: int = 16,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    peers: PeerFor | None = None,
    verifiers: Callable[[str], PlatformVerifier] | None = None,
    witness: ResettableWitness | None = None,
    release_policies: ReleasePolicyStore | None = None,
    token_signer: ResultSigner | None = None,
) -> RekeyWorker:
    """``release_policies`` (default: the KMS adapters' store, `rekey.backends.release_store`)
    and ``token_signer`` (default `rekey.backends.release_token_signer`): what a migration of
    KMS-wrapped state widens and narrows, and what signs the new agents' release tokens."""
    store = store or SealedStateStore(settings.store_url)
    sink = audit or audit_sink(settings)
    activities = RotationActivities(adapters or (lambda ref: adapter_for(settings, ref)), store, sink)
    migration = MigrationActivities(
        store,
        peers or agent_peers(settings, store),
        verifiers or sim_verifiers(settings),
        # Hand-offs keep the freshness checkpoints naming the blobs the store holds.
        witness if witness is not None else witness_for(settings, signer=signer_for(settings)),
        release_policies=release_policies if release_policies is not None else release_store(settings),
        token_signer=token_signer or release_token_signer(settings),
        audit=sink,
    )
    client = worker_client(client)

    def worker(queue: str, activities: list[Callable[..., Any]], **options: Any) -> Worker:
        return Worker(
            client,
            task_queue=queue,
            activities=activities,
            activity_executor=ThreadPoolExecutor(max_concurrent_activities),
            max_concurrent_activities=max_concurrent_activities,
            # After shutdown() activities get this long before they are cancelled; the re-wrap
            # batch stops on the worker-shutdown notice already, at a chunk boundary.
            graceful_shutdown_timeout=timedelta(seconds=shutdown_timeout),
            interceptors=[ActivityLogInterceptor()],  # one log event per activity outcome
            **options,
        )

    return RekeyWorker(
        worker(task_queue, activities.all(), workflows=WORKFLOWS),
        worker(migration_task_queue(task_queue), [*migration.all(), activities.audit]),
    )


def tune_gc() -> None:
    """Set the cyclic garbage collector up for a long-running worker, once it has started.

    A re-wrap sweep allocates a few small objects per blob, which keeps triggering collections;
    each full collection walked every object the worker had loaded (Temporal SDK, protobuf
    modules, SQLAlchemy), and that cost a quarter of the sweep's time (measured with
    loadtest/bench_rotation.py: 25k -> 32k blobs/s from this alone). Freezing what start-up
    created takes it out of every later collection; a larger first threshold makes young
    collections rarer. Reference counting still frees almost everything at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def forward_core_logs() -> None:
    """The Temporal SDK core's log lines (warnings and up) through Python's ``logging`` (logger
    ``temporalio.core``) instead of its own format on stderr: with ``--log-format json`` every
    line the worker writes is then a JSON event. Replaces the process's default runtime, so it
    must run before the first client connects."""
    forwarding = LogForwardingConfig(logger=logging.getLogger("temporalio.core"))
    telemetry = TelemetryConfig(
        logging=LoggingConfig(filter=LoggingConfig.default.filter, forwarding=forwarding)
    )
    Runtime.set_default(Runtime(telemetry=telemetry), error_if_already_set=False)


async def run_worker(
    settings: Settings, *, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S, log_format: str = "text"
) -> None:
    """Poll until SIGTERM or SIGINT, then shut down gracefully: stop polling, let running
    activities finish (a re-wrap batch stops at its next chunk boundary and is retried on
    another worker from its heartbeat) for up to ``shutdown_timeout`` seconds, then return.
    ``log_format`` ``json``: the SDK core's lines too go through ``logging`` (`forward_core_logs`)."""
    if log_format == "json":
        forward_core_logs()
    client = await connect(settings)
    await check_namespace(client)  # a rotation could not even record its phase without them
    worker = build_worker(client, settings, shutdown_timeout=shutdown_timeout)
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(signum: signal.Signals) -> None:
        if not received:
            received.append(signum.name)
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        log.debug(
            "rekey worker polling task queues %s and %s on %s",
            TASK_QUEUE,
            migration_task_queue(TASK_QUEUE),
            settings.temporal_address,
        )
        running = asyncio.create_task(worker.run())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if running.done():  # the worker failed (or stopped) on its own
            stopping.cancel()
            running.result()
            return
        log.info(
            "rekey worker: %s, stopping: no new tasks; running activities have %.0fs to finish",
            received[0],
            shutdown_timeout,
            extra={"signal": received[0], "shutdown_timeout_s": shutdown_timeout},
        )
        await worker.shutdown()
        await running
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
