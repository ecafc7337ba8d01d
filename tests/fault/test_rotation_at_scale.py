"""Acceptance at scale: rotating a key with 20,000 blobs on each real backend (OpenBao, moto's
KMS, the Azure Key Vault emulator through the real SDK) completes; every blob unseals; none is
on the old version; the old version is disabled; the audit log verifies.

Marked ``soak`` (several minutes): run with ``make soak``."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from audit import AuditLog, load_or_create_signing_key, trusted_public_keys
from kms_adapters.contract import KmsAdapter
from kms_adapters.release import MemoryReleasePolicyStore, ReleasePolicyStore
from rekey.client import rotation_id
from rekey.config import load_settings
from rekey.worker import build_worker
from sealing.state import SealedState
from sealing.store import SealedStateStore
from workflows.rotation import DONE, Progress, RotateKeyInput, RotateKeyWorkflow

pytestmark = [pytest.mark.soak, pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

BLOBS = 20_000


@pytest.mark.parametrize("backend", ["vault", "aws", "azure"])
async def test_rotation_of_20000_blobs(
    backend: str, request: pytest.FixtureRequest, temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    factory: Callable[[str, ReleasePolicyStore], KmsAdapter] = request.getfixturevalue(
        f"{backend}_adapter_factory"
    )
    adapter = factory(f"scale-{secrets.token_hex(3)}", MemoryReleasePolicyStore())
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
    audit_log = AuditLog(store_url, load_or_create_signing_key(tmp_path / "audit" / "ed25519.pem"))

    def audit(event: str, subject: str, details: dict[str, Any], who: str) -> None:
        audit_log.append(event, subject, details, actor=who)

    task_queue = f"scale-{uuid.uuid4()}"
    worker = build_worker(
        temporal_env.client,
        load_settings(tmp_path, environ={}),
        task_queue=task_queue,
        adapters=lambda _ref: adapter,
        store=store,
        audit=audit,
    )
    async with worker:
        handle = await temporal_env.client.start_workflow(
            RotateKeyWorkflow.run,
            RotateKeyInput(adapter.key_ref, grace_seconds=0, requested_at=datetime.now(UTC).isoformat()),
            id=rotation_id(adapter.key_ref),
            task_queue=task_queue,
        )
        result: Progress = await handle.result()
    rate = f"{result.current_rate:.0f}/s"
    print(f"{backend}: {result.rewrapped} re-wrapped, {result.conflicts} conflicts, last batch rate {rate}")
    assert result.phase == DONE and result.rewrapped == BLOBS and result.failed == 0
    assert store.count_by_key_version(adapter.key_ref) == {2: BLOBS}
    assert adapter.describe().state_of(1) == "disabled"
    with ThreadPoolExecutor(8) as pool:
        opened = dict(
            zip(plain, pool.map(lambda name: state.get(namespace="ns", name=name), plain), strict=True)
        )
    assert opened == plain
    report = audit_log.verify(trusted_public_keys(tmp_path))
    assert report.ok and report.count > 5, report
    audit_log.close()
    store.close()
