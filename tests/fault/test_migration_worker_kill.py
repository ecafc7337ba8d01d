"""Fault: the real ``rekey worker`` process is SIGKILLed while a host is mid-hand-off (part of
its blobs moved, a ``migration_handoff`` activity running), and a new worker is started. The
migration completes, no blob is lost, and every blob reads back through the v2 agent on its host.

One sim host (the worker finds the agents' tokens in ``<home>/agent/<generation>`` and the
host's root CA under ``<home>/hosts/``), one blob a batch so that the hand-off lasts many
activities. The killed activity is retried once its heartbeat times out (20 s), from
the cursor of the last batch that finished: the blobs it had already swapped are no longer on
v1 and are not handed off twice."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.types import TASK_QUEUE
from rekey.backends import witness_for
from rekey.codec import data_converter
from rekey.config import load_settings
from sealing.state import SealedState
from sealing.store import SealedStateStore
from sealing.tee.sim import ROOT_CA_CERT_FILE
from tests.fault.migration_fleet import (
    Fleet,
    manifests,
    progress,
    register_generations,
    start_migration,
    wait_for,
)
from workflows.migration import MigrationProgress
from workflows.migration_state import DONE

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

BLOBS = 12


def _worker(home: Path, address: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "rekey.cli", "--home", str(home), "worker"],
        env=os.environ | {"REKEY_TEMPORAL_ADDRESS": address},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _kill(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)


async def test_a_worker_sigkilled_mid_hand_off_is_replaced_and_the_migration_completes(
    tmp_path: Path, temporal_env: WorkflowEnvironment
) -> None:
    home = tmp_path / "home"
    generations = manifests(f"wk{uuid.uuid4().hex[:8]}")
    register_generations(tmp_path, generations)
    fleet = Fleet(tmp_path, generations)
    address = temporal_env.client.service_client.config.target_host
    worker: subprocess.Popen[bytes] | None = None
    try:
        fleet.start("host", "v1", "v2")
        (home / "hosts" / "host").mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "host" / ROOT_CA_CERT_FILE, home / "hosts" / "host" / ROOT_CA_CERT_FILE)
        settings = load_settings(home, environ={})
        store = SealedStateStore(settings.store_url)
        state = SealedState(store, lambda _ref: None, witness_for(settings))  # type: ignore[arg-type,return-value]
        secrets: dict[str, bytes] = {}
        v1 = fleet.sealer("host", "v1")
        for i in range(BLOBS):
            secrets[f"item-{i:02d}"] = os.urandom(24)
            state.put_sealed(
                namespace="app",
                name=f"item-{i:02d}",
                data=secrets[f"item-{i:02d}"],
                policy="mrenclave",
                sealer=v1,
            )

        # The worker process's payload codec keys are this home's: so are the client's.
        client = await Client.connect(
            address, namespace=temporal_env.client.namespace, data_converter=data_converter(home)
        )
        worker = _worker(home, address)
        handle = await start_migration(
            client, generations, TASK_QUEUE, grace_seconds=0, batch_size=1, batches_per_call=1, gate_sample=2
        )

        async def mid_hand_off() -> tuple[MigrationProgress, Any] | None:
            now = await progress(handle)
            host = now.hosts[0] if now.hosts else None
            if host is None or not 2 <= host.moved < host.total:
                return None
            running = [
                a
                for a in (await handle.describe()).raw_description.pending_activities
                if a.activity_type.name == "migration_handoff"
                and a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
            ]
            return (now, running[0]) if running else None

        at_kill, in_flight = await wait_for(mid_hand_off, "a hand-off batch running mid-host", every=0.02)
        _kill(worker)
        assert at_kill.hosts[0].moved < BLOBS
        worker = _worker(home, address)
        result: MigrationProgress = await wait_for(
            lambda: _result_if_done(handle), "the migration to finish after the kill", timeout=400, every=1.0
        )
        assert result.phase == DONE, result
        assert (result.moved, result.remaining, result.total) == (BLOBS, 0, BLOBS)
        # The batch the kill interrupted was attempted again (its heartbeat timed out).
        history = await handle.fetch_history()
        attempts = [
            e.activity_task_started_event_attributes.attempt
            for e in history.events
            if e.HasField("activity_task_started_event_attributes")
        ]
        # Unless the batch in flight finished in the instant between the describe and the kill
        # (a one-blob batch can): then it completed on its first attempt, before the kill.
        scheduled = {
            e.event_id
            for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")
            and e.activity_task_scheduled_event_attributes.activity_id == in_flight.activity_id
        }
        finished_first_try = (
            any(
                e.HasField("activity_task_completed_event_attributes")
                and e.activity_task_completed_event_attributes.scheduled_event_id in scheduled
                for e in history.events
            )
            and max(attempts) == 1
        )
        assert max(attempts) >= 2 or finished_first_try, attempts
        generation = generations["v2"]["id"]
        assert len(store.summaries()) == BLOBS
        v2 = fleet.sealer("host", "v2")
        for name, secret in secrets.items():
            assert store.get_by_name("app", name).generation == generation
            assert state.get(namespace="app", name=name, sealer=v2) == secret
        store.close()
    finally:
        if worker is not None:
            _kill(worker)
        fleet.stop()


async def _result_if_done(handle: Any) -> MigrationProgress | None:
    description = await handle.describe()
    if description.status is None or description.status.name == "RUNNING":
        return None
    result: MigrationProgress = await handle.result()
    return result
