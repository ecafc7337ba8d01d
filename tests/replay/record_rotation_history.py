"""Record the history of a full rotation for the replay test.

Run: ``python -m tests.replay.record_rotation_history``.

Runs RotateKeyWorkflow against a real Temporal dev server and OpenBao with the default data
converter (no codec: the checked-in history must be readable without a key; it holds only
ids, cursors and counts) and writes ``rotation_done.json`` beside this file. Re-record when a
change to the workflow is meant to break replay (and guard old histories with
``workflow.patched`` instead when running workflows must survive the change).
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import uuid
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from emulators.servers import openbao_dev
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey.client import rotation_id
from rekey.config import load_settings
from rekey.devstack.temporal import search_attribute_flags, temporal_cli
from rekey.worker import build_worker
from sealing.state import SealedState
from sealing.store import SealedStateStore
from workflows.rotation import RotateKeyInput, RotateKeyWorkflow

OUT = Path(__file__).with_name("rotation_done.json")


async def record() -> None:
    home = Path(tempfile.mkdtemp(prefix="rekey-replay-"))
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(), dev_server_extra_args=search_attribute_flags()
    )
    try:
        with openbao_dev() as server:
            adapter = VaultTransitAdapter(
                server.client(),
                "replay",
                release_store=MemoryReleasePolicyStore(),
                governor=Governor("replay"),
            )
            adapter.create()
            store = SealedStateStore(f"sqlite:///{home / 'state.db'}")
            store.put_generation("gen-1", '{"id":"gen-1"}')
            state = SealedState(store, lambda _ref: adapter)
            for i in range(60):
                state.put(
                    namespace="ns",
                    name=f"item-{i}",
                    data=secrets.token_bytes(32),
                    key_ref=adapter.key_ref,
                    generation="gen-1",
                )
            task_queue = f"replay-{uuid.uuid4()}"
            worker = build_worker(
                env.client,
                load_settings(home, environ={}),
                task_queue=task_queue,
                adapters=lambda _ref: adapter,
                store=store,
                audit=lambda *_: None,
            )
            async with worker:
                handle = await env.client.start_workflow(
                    RotateKeyWorkflow.run,
                    RotateKeyInput(
                        adapter.key_ref,
                        grace_seconds=0,
                        batch_size=10,
                        batches_in_flight=2,
                        started_by="replay-recorder",
                    ),
                    id=rotation_id(adapter.key_ref),
                    task_queue=task_queue,
                )
                await handle.result()
                history = await handle.fetch_history()
            OUT.write_text(history.to_json())
            print(f"wrote {OUT} ({len(history.events)} events)")
    finally:
        await env.shutdown()


if __name__ == "__main__":
    asyncio.run(record())
