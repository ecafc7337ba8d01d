"""A refused payload does not wedge a running rotation (issue 12 review finding B), against the
real Temporal dev server and OpenBao with rekey's own worker (rekey.worker.build_worker): a plain
signal or update, or one carrying a ciphertext bound to another workflow, sent to a rotation in
AWAITING_COMMIT is dropped or rejected; the operator's pause and abort afterwards are processed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.common import RawValue
from temporalio.converter import WorkflowSerializationContext
from temporalio.testing import WorkflowEnvironment

from rekey.codec import EncryptionCodec
from tests.fixtures.openbao import OpenBao
from tests.fixtures.rotation import Rig, all_readable, rotation_rig, wait_phase
from workflows.rotation import ABORTED, AWAITING_COMMIT

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


@pytest_asyncio.fixture(loop_scope="session")
async def rig(temporal_env: WorkflowEnvironment, openbao: OpenBao, tmp_path: Path) -> AsyncIterator[Rig]:
    async with rotation_rig(temporal_env, openbao, tmp_path, blobs=20, prefix="refused") as rig:
        yield rig


async def _copied(rig: Rig) -> Payload:
    """A ciphertext as it sits in another rotation's history: encrypted by rekey's codec, bound
    to that rotation's workflow id."""
    codec = rig.env.client.data_converter.payload_codec
    assert isinstance(codec, EncryptionCodec)
    other = codec.with_context(
        WorkflowSerializationContext(namespace=rig.env.client.namespace, workflow_id="rotate:vault:other")
    )
    [payload] = await other.encode(
        [Payload(metadata={"encoding": b"json/plain"}, data=json.dumps({}).encode())]
    )
    return payload


async def _signals_processed(client: Client, workflow_id: str, count: int) -> list[str]:
    """The event kinds once the worker has completed a workflow task after ``count`` signals."""
    for _ in range(600):  # bounded wait, not a timing assertion
        kinds = [
            str(e.WhichOneof("attributes"))
            async for e in client.get_workflow_handle(workflow_id).fetch_history_events()
        ]
        signals = [i for i, k in enumerate(kinds) if k == "workflow_execution_signaled_event_attributes"]
        if len(signals) >= count and "workflow_task_completed_event_attributes" in kinds[signals[-1] :]:
            return kinds
        await asyncio.sleep(0.1)
    raise AssertionError(f"the worker never processed the signals sent to {workflow_id}")


async def test_refused_signals_and_updates_do_not_wedge_a_rotation(rig: Rig) -> None:
    """Attack: someone who may signal and update workflows but has no codec key sends the rotation
    a plain "abort" and "pause" signal and "approve" and "abort" updates with a plain argument or
    one copied from another rotation. Nothing of it acts (no abort, no pause, no commit), no
    workflow task fails, and the operator's pause and abort afterwards are answered and done."""
    raw = Client(rig.env.client.service_client, namespace=rig.env.client.namespace)
    async with rig.worker():
        rotation = await rig.start(grace=3600, batch_size=20)
        await wait_phase(rotation, AWAITING_COMMIT)
        target = raw.get_workflow_handle(rotation.id)
        copied = RawValue(await _copied(rig))
        plain = {"forged": True}
        await target.signal("abort", plain)
        await target.signal("pause", copied)
        kinds = await _signals_processed(raw, rotation.id, 2)
        for name, argument in (("approve", plain), ("abort", copied)):
            with pytest.raises(WorkflowUpdateFailedError):  # rejected, not left hanging on a failed task
                await target.execute_update(name, argument, rpc_timeout=timedelta(seconds=60))
        progress = await rotation.status()
        assert progress.phase == AWAITING_COMMIT and not progress.paused
        kinds = [str(e.WhichOneof("attributes")) async for e in target.fetch_history_events()]
        assert "workflow_task_failed_event_attributes" not in kinds
        assert "workflow_execution_update_accepted_event_attributes" not in kinds

        assert (await rotation.pause()).startswith("paused")
        assert (await rotation.status()).paused
        assert (await rotation.abort()).startswith("aborting")
        result = await rotation.result()
    assert result.phase == ABORTED
    assert rig.adapter.describe().state_of(1) == "enabled"
    all_readable(rig)
