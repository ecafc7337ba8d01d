"""RotateKeyWorkflow end to end: a real Temporal dev server, a real OpenBao, a real SQLite store."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.testing import WorkflowEnvironment

from audit import AuditLog, load_or_create_signing_key, trusted_public_keys
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey.config import load_settings
from rekey.worker import build_worker
from sealing.state import SealedState
from sealing.store import SealedStateStore
from tests.fixtures.openbao import OpenBao
from workflows.rotation import (
    ABORTED,
    AWAITING_COMMIT,
    DONE,
    Progress,
    RotateKeyInput,
    RotateKeyWorkflow,
    workflow_id,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


@dataclass
class Setup:
    env: WorkflowEnvironment
    key_ref: str
    adapter: VaultTransitAdapter
    store: SealedStateStore
    state: SealedState
    task_queue: str
    events: list[tuple[str, str, dict[str, Any]]]
    blobs: dict[str, bytes]

    async def start(self, **options: Any) -> Any:
        return await self.env.client.start_workflow(
            RotateKeyWorkflow.run,
            RotateKeyInput(self.key_ref, **options),
            id=workflow_id(self.key_ref),
            task_queue=self.task_queue,
        )


@pytest_asyncio.fixture(loop_scope="session")
async def setup(temporal_env: WorkflowEnvironment, openbao: OpenBao, tmp_path: Path) -> AsyncIterator[Setup]:
    name = f"rot-{secrets.token_hex(4)}"
    adapter = VaultTransitAdapter(
        openbao.client(), name, release_store=MemoryReleasePolicyStore(), governor=Governor(f"rot-{name}")
    )
    adapter.create()
    store = SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}")
    store.put_generation("gen-1", '{"id":"gen-1"}')
    state = SealedState(store, lambda _ref: adapter)
    blobs = {}
    for i in range(240):
        data = secrets.token_bytes(64)
        state.put(namespace="ns", name=f"item-{i}", data=data, key_ref=adapter.key_ref, generation="gen-1")
        blobs[f"item-{i}"] = data
    events: list[tuple[str, str, dict[str, Any]]] = []
    audit_log = AuditLog(
        f"sqlite:///{tmp_path / 'state.db'}", load_or_create_signing_key(tmp_path / "audit" / "ed25519.pem")
    )

    def audit(event: str, subject: str, details: dict[str, Any], who: str) -> None:
        audit_log.append(event, subject, details, actor=who)  # the real log: it validates details
        events.append((event, subject, details))

    task_queue = f"rekey-test-{uuid.uuid4()}"
    worker = build_worker(
        temporal_env.client,
        load_settings(tmp_path, environ={}),
        task_queue=task_queue,
        adapters=lambda _ref: adapter,
        store=store,
        audit=audit,
    )
    async with worker:
        yield Setup(temporal_env, adapter.key_ref, adapter, store, state, task_queue, events, blobs)
    report = audit_log.verify(trusted_public_keys(tmp_path))
    assert report.ok and report.count == len(events), report
    audit_log.close()
    store.close()


def all_readable(setup: Setup) -> None:
    for name, data in setup.blobs.items():
        assert setup.state.get(namespace="ns", name=name) == data


async def wait_phase(handle: Any, phase: str) -> Progress:
    for _ in range(600):
        progress: Progress = await handle.query(RotateKeyWorkflow.progress)
        if progress.phase == phase:
            return progress
        await asyncio.sleep(0.1)
    raise AssertionError(f"rotation never reached {phase}")


async def test_rotation_rewraps_everything_and_retires_the_old_version(setup: Setup) -> None:
    handle = await setup.start(grace_seconds=0, batch_size=50, batches_in_flight=3)
    result: Progress = await handle.result()
    assert result.phase == DONE and result.new_version == 2
    assert result.total == 240 and result.rewrapped == 240 and result.remaining == 0
    assert setup.store.count_by_key_version(setup.key_ref) == {2: 240}
    info = setup.adapter.describe()
    assert info.state_of(1) == "disabled" and info.primary_version == 2
    all_readable(setup)
    events = [e for e, _, _ in setup.events]
    assert events[0] == "rotation.started" and events[-1] == "rotation.done"
    assert "key.version.created" in events and "key.version.disabled" in events


async def test_abort_before_retirement_leaves_everything_readable(setup: Setup) -> None:
    handle = await setup.start(grace_seconds=3600, batch_size=50)
    await wait_phase(handle, AWAITING_COMMIT)
    with pytest.raises(WorkflowAlreadyStartedError):
        await setup.start()  # a second rotation of the same key is refused while one runs
    await handle.signal(RotateKeyWorkflow.abort)
    result: Progress = await handle.result()
    assert result.phase == ABORTED
    assert setup.adapter.describe().state_of(1) == "enabled"
    all_readable(setup)


async def test_approve_commits_before_the_grace_period(setup: Setup) -> None:
    handle = await setup.start(grace_seconds=24 * 3600, batch_size=100)
    await wait_phase(handle, AWAITING_COMMIT)
    await handle.signal(RotateKeyWorkflow.approve)
    result: Progress = await handle.result()
    assert result.phase == DONE
    assert setup.adapter.describe().state_of(1) == "disabled"
    all_readable(setup)


async def test_pause_and_resume(setup: Setup) -> None:
    handle = await setup.start(grace_seconds=0, batch_size=20, batches_in_flight=1)
    await handle.signal(RotateKeyWorkflow.pause)
    progress: Progress = await handle.query(RotateKeyWorkflow.progress)
    assert progress.paused
    await asyncio.sleep(0.5)
    paused_at = (await handle.query(RotateKeyWorkflow.progress)).rewrapped
    await asyncio.sleep(0.5)
    assert (await handle.query(RotateKeyWorkflow.progress)).rewrapped == paused_at
    await handle.signal(RotateKeyWorkflow.resume)
    result: Progress = await handle.result()
    assert result.phase == DONE and result.rewrapped == 240


async def test_writer_during_rotation_loses_nothing(setup: Setup) -> None:
    """A workload keeps updating blobs through the rotation: nothing lost, all end on v2."""
    stop = asyncio.Event()
    latest: dict[str, bytes] = dict(setup.blobs)

    def write_some(round_: int) -> None:
        for i in range(0, 240, 7):
            name = f"item-{(i + round_) % 240}"
            data = f"{name} round {round_}".encode()
            setup.state.put(namespace="ns", name=name, data=data, key_ref=setup.key_ref, generation="gen-1")
            latest[name] = data

    async def writer() -> None:
        round_ = 0
        while not stop.is_set():
            await asyncio.to_thread(write_some, round_)
            round_ += 1

    task = asyncio.create_task(writer())
    handle = await setup.start(grace_seconds=0, batch_size=10, batches_in_flight=2)
    result: Progress = await handle.result()
    stop.set()
    await task
    assert result.phase == DONE
    assert setup.store.count_by_key_version(setup.key_ref) == {2: 240}
    for name, data in latest.items():
        assert setup.state.get(namespace="ns", name=name) == data


async def test_raw_history_holds_no_plaintext_or_dek(setup: Setup) -> None:
    """Read without the codec, the recorded history of a rotation contains none of the test's
    plaintexts or DEKs, raw or base64 (activities pass ids and cursors only)."""
    import base64

    from temporalio.client import Client

    handle = await setup.start(grace_seconds=0, batch_size=60)
    await handle.result()
    raw_client = await Client.connect(setup.env.client.service_client.config.target_host)
    history = await raw_client.get_workflow_handle(handle.id).fetch_history()
    raw = history.to_json().encode() + b"".join(e.SerializeToString() for e in history.events)
    secrets_: list[bytes] = list(setup.blobs.values())
    for record in setup.store.iter_records(key_ref=setup.key_ref):
        secrets_.append(setup.adapter.unwrap(envelope_parse(record.blob).wrapped_dek))
    for secret in secrets_:
        for form in (secret, base64.b64encode(secret), base64.urlsafe_b64encode(secret)):
            assert form not in raw


def envelope_parse(blob: bytes) -> Any:
    from sealing.envelope import parse

    return parse(blob)


async def test_cli_drives_a_rotation(
    setup: Setup, temporal_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rekey rotate start --wait` and `rekey rotate status --json` against the same server."""
    import json

    from tests.fixtures.cli import run_cli

    monkeypatch.setenv("REKEY_HOME", str(temporal_home))  # the codec keys the test server's clients use
    monkeypatch.setenv("REKEY_TEMPORAL_ADDRESS", setup.env.client.service_client.config.target_host)

    def rekey(*args: str) -> tuple[int, str, str]:
        return run_cli(capsys, *args)

    handle = await setup.start(grace_seconds=3600, batch_size=100)
    await wait_phase(handle, AWAITING_COMMIT)
    code, out, err = await asyncio.to_thread(rekey, "rotate", "status", setup.key_ref, "--json")
    assert code == 0, err
    assert json.loads(out)["phase"] == AWAITING_COMMIT
    code, _, err = await asyncio.to_thread(rekey, "rotate", "start", setup.key_ref)
    assert code == 2 and "already running" in err and len(err.strip().splitlines()) == 1
    code, out, _ = await asyncio.to_thread(rekey, "rotate", "approve", setup.key_ref)
    assert code == 0 and "approve" in out
    assert (await handle.result()).phase == DONE
    code, _, err = await asyncio.to_thread(rekey, "rotate", "status", "vault:never-rotated")
    assert code == 2 and err.startswith("error: no rotation rotate:vault:never-rotated")
    code, _, err = await asyncio.to_thread(rekey, "rotate", "start", setup.key_ref, "--batch-size", "10001")
    assert code == 2 and "10001 is not in the range 1<=x<=10000" in err


async def test_out_of_range_sizing_fails_the_workflow_before_anything_changes(setup: Setup) -> None:
    from temporalio.client import WorkflowFailureError

    handle = await setup.start(grace_seconds=0, batch_size=20_000)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert "batch_size must be 1..10000" in str(failure.value.cause)
    assert setup.adapter.describe().primary_version == 1  # nothing was rotated
