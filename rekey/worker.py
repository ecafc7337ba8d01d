"""The rekey worker: hosts the workflows and activities on task queue ``rekey``."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from activities.rotation import AuditSink, RotationActivities
from activities.types import TASK_QUEUE
from audit import AuditLog, default_actor, default_signing_key_path, load_or_create_signing_key
from kms_adapters.contract import KmsAdapter
from rekey.backends import adapter_for
from rekey.client import connect
from rekey.config import Settings
from sealing.store import SealedStateStore
from workflows.rotation import RotateKeyWorkflow

log = logging.getLogger("rekey.worker")
WORKFLOWS = [RotateKeyWorkflow]


def open_audit_log(settings: Settings, *, actor: str | None = None) -> AuditLog:
    """The audit log of ``settings.store_url``, signing with ``<home>/audit/ed25519.pem``
    (created on first use)."""
    key = load_or_create_signing_key(default_signing_key_path(settings.home))
    return AuditLog(settings.store_url, key, actor=actor)


def audit_sink(settings: Settings) -> AuditSink:
    log_ = open_audit_log(settings)

    def sink(event: str, subject: str, details: dict[str, Any], who: str) -> None:
        log_.append(event, subject, details, actor=who or default_actor())

    return sink


def build_worker(
    client: Client,
    settings: Settings,
    *,
    task_queue: str = TASK_QUEUE,
    adapters: Callable[[str], KmsAdapter] | None = None,
    store: SealedStateStore | None = None,
    audit: AuditSink | None = None,
    max_concurrent_activities: int = 16,
) -> Worker:
    activities = RotationActivities(
        adapters or (lambda ref: adapter_for(settings, ref)),
        store or SealedStateStore(settings.store_url),
        audit or audit_sink(settings),
    )
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=activities.all(),
        activity_executor=ThreadPoolExecutor(max_concurrent_activities),
        max_concurrent_activities=max_concurrent_activities,
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


async def run_worker(settings: Settings) -> None:
    client = await connect(settings)
    worker = build_worker(client, settings)
    tune_gc()
    log.info("rekey worker polling task queue %s on %s", TASK_QUEUE, settings.temporal_address)
    await worker.run()
