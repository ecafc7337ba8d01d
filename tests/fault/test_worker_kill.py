"""Fault: the worker process is killed with SIGKILL three times at random moments during a
20,000-blob rotation and restarted each time; the rotation completes with the same final state.

The moments are random points inside the sweep (one in each third of it, read from the
``progress`` query), so the kills land mid-batch whatever the machine's speed. Each kill
leaves the running batches to Temporal's heartbeat timeout before they are retried.

Marked ``soak`` (a few minutes): run with ``make soak``."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.types import TASK_QUEUE
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey.client import rotation_id
from sealing.state import SealedState
from sealing.store import SealedStateStore
from tests.fixtures.openbao import OpenBao
from workflows.rotation import DONE, Progress, RotateKeyInput, RotateKeyWorkflow

pytestmark = [pytest.mark.soak, pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

BLOBS = 20_000
KILLS = 3


def _worker(home: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "rekey.cli", "--home", str(home), "worker"],
        env=os.environ | env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def test_rotation_survives_three_sigkills(
    temporal_env: WorkflowEnvironment, openbao: OpenBao, temporal_home: Path, tmp_path: Path
) -> None:
    name = f"kill-{secrets.token_hex(3)}"
    adapter = VaultTransitAdapter(
        openbao.client(), name, release_store=MemoryReleasePolicyStore(), governor=Governor(name)
    )
    adapter.create()
    store_url = f"sqlite:///{tmp_path / 'state.db'}"
    store = SealedStateStore(store_url)
    store.put_generation("gen-1", '{"id":"gen-1"}')
    state = SealedState(store, lambda _ref: adapter)

    def put(i: int) -> tuple[str, bytes]:
        data = secrets.token_bytes(32)
        state.put(namespace="ns", name=f"item-{i}", data=data, key_ref=adapter.key_ref, generation="gen-1")
        return f"item-{i}", data

    with ThreadPoolExecutor(8) as pool:
        plain = dict(pool.map(put, range(BLOBS)))
    env = {
        "REKEY_TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
        "REKEY_VAULT_ADDR": openbao.addr,
        "REKEY_VAULT_TOKEN": openbao.token,
        "REKEY_STORE_URL": store_url,
    }
    worker = _worker(temporal_home, env)
    handle = await temporal_env.client.start_workflow(
        RotateKeyWorkflow.run,
        RotateKeyInput(
            adapter.key_ref,
            grace_seconds=0,
            batch_size=100,
            batches_in_flight=2,
            requested_at=datetime.now(UTC).isoformat(),
        ),
        id=rotation_id(adapter.key_ref),
        task_queue=TASK_QUEUE,
    )
    kills = 0
    rng = random.Random()
    # One random moment in each third of the sweep, as a number of blobs re-wrapped.
    moments = [int(BLOBS * rng.uniform(third / 3 + 0.02, (third + 1) / 3 - 0.08)) for third in range(KILLS)]
    try:
        for moment in moments:
            while True:
                progress: Progress = await handle.query(RotateKeyWorkflow.progress)
                if progress.phase == DONE or progress.rewrapped + progress.conflicts >= moment:
                    break
                await asyncio.sleep(0.05)
            if progress.phase == DONE:
                break
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            kills += 1
            print(f"SIGKILL {kills} at {progress.rewrapped} of {BLOBS} re-wrapped ({progress.phase})")
            worker = _worker(temporal_home, env)
        result: Progress = await asyncio.wait_for(handle.result(), timeout=900)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert kills == KILLS, f"the rotation finished after {kills} kills; make it longer"
    assert result.phase == DONE and result.new_version == 2
    assert store.count_by_key_version(adapter.key_ref) == {2: BLOBS}
    assert adapter.describe().state_of(1) == "disabled"
    for name_, data in plain.items():
        assert state.get(namespace="ns", name=name_) == data
    store.close()
