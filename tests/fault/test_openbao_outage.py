"""Fault: OpenBao stopped for 30 s during the re-wrap sweep and started again; the rotation
completes and the workflow never fails (activities retry over the governor's open circuit).

Marked ``soak`` (about a minute): run with ``make soak``."""

from __future__ import annotations

import asyncio
import secrets
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey import devstack
from rekey.client import rotation_id
from rekey.config import load_settings
from rekey.worker import build_worker
from sealing.state import SealedState
from sealing.store import SealedStateStore
from tests.fixtures.ports import free_port
from workflows.rotation import DONE, REWRAPPING, Progress, RotateKeyInput, RotateKeyWorkflow

pytestmark = [pytest.mark.soak, pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

BLOBS = 1500
OUTAGE_SECONDS = 30


def _port_pair() -> int:
    """A free port whose successor is free too (OpenBao's cluster listener takes port + 1)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free pair of ports")


async def test_rotation_survives_a_30s_openbao_outage(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    port = _port_pair()
    settings = load_settings(tmp_path / "home", environ={"REKEY_OPENBAO_PORT": str(port)})
    openbao = [devstack.OpenBaoServer()]
    devstack.up(settings, echo=lambda _l: None, components=openbao)
    try:
        client = devstack.openbao_client(settings)
        adapter = VaultTransitAdapter(
            client,
            "outage",
            release_store=MemoryReleasePolicyStore(),
            governor=Governor(f"outage-{secrets.token_hex(3)}", max_time=10),
        )
        adapter.create()
        store = SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}")
        store.put_generation("gen-1", '{"id":"gen-1"}')
        state = SealedState(store, lambda _ref: adapter)
        plain = {f"item-{i}": secrets.token_bytes(24) for i in range(BLOBS)}
        for name, data in plain.items():
            state.put(namespace="ns", name=name, data=data, key_ref=adapter.key_ref, generation="gen-1")
        task_queue = f"outage-{uuid.uuid4()}"
        worker = build_worker(
            temporal_env.client,
            settings,
            task_queue=task_queue,
            adapters=lambda _ref: adapter,
            store=store,
            audit=lambda *_: None,
        )
        async with worker:
            handle = await temporal_env.client.start_workflow(
                RotateKeyWorkflow.run,
                RotateKeyInput(
                    adapter.key_ref,
                    grace_seconds=0,
                    batch_size=10,
                    batches_in_flight=1,
                    requested_at=datetime.now(UTC).isoformat(),
                ),
                id=rotation_id(adapter.key_ref),
                task_queue=task_queue,
            )
            for _ in range(300):
                progress: Progress = await handle.query(RotateKeyWorkflow.progress)
                if progress.phase == REWRAPPING and progress.rewrapped > 0:
                    break
                await asyncio.sleep(0.1)
            at_stop = progress.rewrapped
            await asyncio.to_thread(devstack.down, settings, lambda _l: None, openbao)
            await asyncio.sleep(OUTAGE_SECONDS)
            during = (await handle.query(RotateKeyWorkflow.progress)).rewrapped
            await asyncio.to_thread(devstack.up, settings, lambda _l: None, openbao)
            result: Progress = await asyncio.wait_for(handle.result(), timeout=600)
        assert at_stop < BLOBS and during < BLOBS  # the outage really hit the sweep
        assert result.phase == DONE and result.rewrapped + result.conflicts == BLOBS
        assert store.count_by_key_version(adapter.key_ref) == {2: BLOBS}
        for name, data in plain.items():
            assert state.get(namespace="ns", name=name) == data
        store.close()
    finally:
        devstack.down(settings, echo=lambda _l: None, components=openbao)
