"""RotateKeyWorkflow end to end: a real Temporal dev server, a real OpenBao, a real SQLite store."""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey.client import (
    InvalidOption,
    RekeyClient,
    RotationBlocked,
    RotationFailed,
    RotationHandle,
    RotationNotFound,
    RotationRefused,
    rotation_id,
)
from rekey.config import load_settings
from rekey.worker import build_worker
from tests.fixtures.openbao import OpenBao
from tests.fixtures.rotation import Rig, all_readable, eventually, rotation_rig, wait_phase
from workflows.rotation import ABORTED, AWAITING_COMMIT, DONE, Progress, RotateKeyInput, RotateKeyWorkflow

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


Setup = Rig


@pytest_asyncio.fixture(loop_scope="session")
async def setup(temporal_env: WorkflowEnvironment, openbao: OpenBao, tmp_path: Path) -> AsyncIterator[Setup]:
    async with rotation_rig(temporal_env, openbao, tmp_path) as rig, rig.worker():
        yield rig


async def test_rotation_rewraps_everything_and_retires_the_old_version(setup: Setup) -> None:
    handle = await setup.start(grace=0, batch_size=50, in_flight=3)
    result = await handle.result()
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
    handle = await setup.start(grace=3600, batch_size=50)
    assert handle.started is True
    await wait_phase(handle, AWAITING_COMMIT)
    again = await setup.start(grace=0)  # a second start attaches to the running rotation
    assert (again.started, again.id) == (False, handle.id)
    assert (await again.status()).grace_seconds == 3600  # its own options stay
    assert (await handle.abort()).startswith("aborting")
    result = await handle.result()
    assert result.phase == ABORTED
    assert setup.adapter.describe().state_of(1) == "enabled"
    all_readable(setup)


async def test_approve_commits_before_the_grace_period(setup: Setup) -> None:
    handle = await setup.start(grace=24 * 3600, batch_size=100)
    await wait_phase(handle, AWAITING_COMMIT)
    await handle.approve()
    result = await handle.result()
    assert result.phase == DONE
    assert setup.adapter.describe().state_of(1) == "disabled"
    all_readable(setup)


async def test_pause_and_resume(setup: Setup) -> None:
    handle = await setup.start(grace=0, batch_size=20, in_flight=1)
    await handle.pause()
    progress = await handle.status()
    assert progress.paused
    await asyncio.sleep(0.5)
    paused_at = (await handle.status()).rewrapped
    await asyncio.sleep(0.5)
    assert (await handle.status()).rewrapped == paused_at
    await handle.resume()
    result = await handle.result()
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
    handle = await setup.start(grace=0, batch_size=10, in_flight=2)
    result = await handle.result()
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

    handle = await setup.start(grace=0, batch_size=60)
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
    # The worker's store: status reads the recorded failures there (it creates none of its own).
    monkeypatch.setenv("REKEY_STORE_URL", setup.store_url)
    monkeypatch.setenv("REKEY_VAULT_ADDR", setup.openbao.addr)  # `rotate start` checks the key there
    monkeypatch.setenv("REKEY_VAULT_TOKEN", setup.openbao.token)

    def rekey(*args: str) -> tuple[int, str, str]:
        return run_cli(capsys, *args)

    handle = await setup.start(grace=3600, batch_size=100)
    await wait_phase(handle, AWAITING_COMMIT)
    code, out, err = await asyncio.to_thread(rekey, "rotate", "status", setup.key_ref, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["phase"] == AWAITING_COMMIT and status["commit_due"]
    assert (status["worker_polling"], status["workflow_status"], status["failures_recorded"]) == (
        True,
        "RUNNING",
        0,
    )

    async def listed() -> Any:
        code, out, err = await asyncio.to_thread(
            rekey, "rotate", "list", "--key", setup.key_ref, "--phase", AWAITING_COMMIT, "--json"
        )
        assert code == 0, err
        return [row for row in json.loads(out) if row["id"] == handle.id]

    [row] = await eventually(listed, "the rotation is listed by key and phase")
    assert (row["phase"], row["status"], row["key_ref"]) == (AWAITING_COMMIT, "RUNNING", setup.key_ref)
    code, out, err = await asyncio.to_thread(rekey, "rotate", "list", "--phase", "NOPE")
    assert code == 2 and "Invalid value for '--phase'" in err
    code, out, err = await asyncio.to_thread(rekey, "rotate", "start", setup.key_ref)
    assert code == 0 and out == "" and "is running already: attached to" in err
    code, out, err = await asyncio.to_thread(rekey, "rotate", "approve-destroy", setup.key_ref)
    assert code == 2 and err.startswith("error: approve-destroy refused by rotate:")
    assert "applies only in AWAITING_DESTROY" in err and len(err.strip().splitlines()) == 1
    code, out, _ = await asyncio.to_thread(rekey, "rotate", "approve", setup.key_ref)
    assert code == 0 and "approved" in out
    assert (await handle.result()).phase == DONE
    code, _, err = await asyncio.to_thread(rekey, "rotate", "status", "vault:never-rotated")
    assert code == 2 and err.startswith("error: no rotation rotate:vault:never-rotated")
    code, _, err = await asyncio.to_thread(rekey, "rotate", "start", setup.key_ref, "--batch-size", "10001")
    assert code == 2 and "10001 is not in the range 1<=x<=10000" in err


async def test_out_of_range_sizing_fails_the_workflow_before_anything_changes(setup: Setup) -> None:
    # Started around rekey.client (which refuses it before it starts, below): the workflow
    # itself refuses it too, before its first activity.
    await setup.env.client.start_workflow(
        RotateKeyWorkflow.run,
        RotateKeyInput(
            setup.key_ref, grace_seconds=0, batch_size=20_000, requested_at=datetime.now(UTC).isoformat()
        ),
        id=rotation_id(setup.key_ref),
        task_queue=setup.task_queue,
    )
    with pytest.raises(RotationFailed) as failure:
        await setup.client.rotation(setup.key_ref).result()
    assert "batch_size must be 1..10000" in failure.value.cause
    assert setup.adapter.describe().primary_version == 1  # nothing was rotated
    with pytest.raises(InvalidOption, match="batch_size must be an integer from 1 to 10000"):
        await setup.start(grace=0, batch_size=20_000)


# ------------------------------------------------------------------ the Python API (rekey.client)


async def test_client_starts_watches_signals_and_lists_a_rotation(setup: Setup) -> None:
    client = setup.client
    rotation = await client.start_rotation(setup.key_ref, grace="1h", batch_size=20, in_flight=1)
    assert rotation.id == f"rotate:{setup.key_ref}" and rotation.key_ref == setup.key_ref
    assert client.rotation(setup.key_ref).id == rotation.id == client.rotation(rotation.id).id

    async def listed(status: str) -> Any:
        rows = await client.list_rotations(running_only=status == "RUNNING")
        return next((r for r in rows if r.id == rotation.id and r.status == status), None)

    running = await eventually(lambda: listed("RUNNING"), "the rotation is listed as running")
    assert running.key_ref == setup.key_ref and running.closed_at is None
    assert (await rotation.describe()).status == "RUNNING"

    snapshots: list[Progress] = []
    approved = False
    async for progress in rotation.watch(interval=0.1):
        snapshots.append(progress)
        if progress.phase == AWAITING_COMMIT and not approved:
            await rotation.pause()  # after the sweep a pause changes nothing but the flag
            assert (await rotation.status()).paused
            await rotation.resume()
            assert not (await rotation.status()).paused
            await rotation.approve()
            approved = True
    final = snapshots[-1]
    assert final.phase == DONE and final.rewrapped == 240 and final.remaining == 0
    assert final == await rotation.result()
    assert [p.rewrapped for p in snapshots] == sorted(p.rewrapped for p in snapshots)
    assert {p.phase for p in snapshots} >= {AWAITING_COMMIT, DONE}
    completed = await eventually(lambda: listed("COMPLETED"), "the rotation is listed as completed")
    assert completed.closed_at is not None
    assert all(r.id != rotation.id for r in await client.list_rotations(running_only=True))

    with pytest.raises(RotationRefused, match=r"^cannot approve rotate:vault:rot-[0-9a-f]+: it has ended"):
        await rotation.approve()  # it ended: nothing runs under that id any more
    with pytest.raises(RotationNotFound, match=r"^no rotation rotate:vault:never-rotated: "):
        await client.rotation("vault:never-rotated").status()
    with pytest.raises(RotationNotFound):
        await client.rotation("vault:never-rotated").describe()
    all_readable(setup)


async def test_client_reports_what_failed_not_that_an_activity_failed(
    setup: Setup, openbao: OpenBao, tmp_path: Path
) -> None:
    """A rotation of a key the KMS does not have stops in BLOCKED at its first activity;
    `RotationBlocked` carries the KMS's message, not the wrapper's "Activity task failed"."""
    absent = VaultTransitAdapter(
        openbao.client(),
        f"absent-{secrets.token_hex(4)}",
        release_store=MemoryReleasePolicyStore(),
        governor=Governor(f"absent-{secrets.token_hex(4)}"),
    )
    task_queue = f"rekey-test-{uuid.uuid4()}"
    worker = build_worker(
        setup.env.client,
        load_settings(tmp_path, environ={}),
        task_queue=task_queue,
        adapters=lambda _ref: absent,
        store=setup.store,
        audit=lambda *_: None,
    )
    async with worker:
        client = RekeyClient(setup.env.client, task_queue=task_queue)
        rotation = await client.start_rotation(absent.key_ref, grace=0)
        with pytest.raises(RotationBlocked) as blocked:
            async for _ in rotation.watch(interval=0.1):
                pass
        assert blocked.value.rotation_id == rotation.id
        assert blocked.value.progress.blocked_in == "PREPARING"
        assert "does not exist" in str(blocked.value) and "Activity task failed" not in str(blocked.value)
        assert str(blocked.value).startswith(f"rotation {rotation.id} is BLOCKED in PREPARING: NotFound: ")
        assert (await rotation.describe()).status == "RUNNING"
        await rotation.abort()
        assert (await rotation.result()).phase == ABORTED


async def _exists(rotation: RotationHandle) -> bool:
    try:
        await rotation.describe()
    except RotationNotFound:
        return False
    return True


async def test_client_schedules_a_rotation(setup: Setup) -> None:
    from rekey.client import InvalidDuration, ScheduleExists, ScheduleNotFound

    client = setup.client
    with pytest.raises(InvalidDuration):
        await client.create_schedule(setup.key_ref, every=0)
    schedule_id = await client.create_schedule(setup.key_ref, every="30d", grace=0, batch_size=100)
    assert schedule_id == f"schedule:rotate:{setup.key_ref}"
    with pytest.raises(ScheduleExists, match="exists already"):
        await client.create_schedule(setup.key_ref, every="7d")

    async def listed() -> Any:
        return next((s for s in await client.list_schedules() if s.id == schedule_id), None)

    schedule = await eventually(listed, "the schedule is listed")
    assert schedule.key_ref == setup.key_ref and not schedule.paused
    assert schedule.every_seconds == 30 * 86400 and schedule.next_runs and not schedule.recent_launches

    await client.pause_schedule(setup.key_ref)
    assert (await listed()).paused  # the state comes from the schedule itself, not the lagging list
    await client.unpause_schedule(schedule_id)
    assert not (await client.describe_schedule(schedule_id)).paused

    async def triggered() -> Any:
        described = await client.describe_schedule(schedule_id)
        return described if described.recent_launches else None

    await client.trigger_schedule(schedule_id)
    schedule = await eventually(triggered, "the triggered rotation shows in the schedule")
    (launched,) = schedule.recent_launches
    assert launched.startswith(f"launch:schedule:rotate:{setup.key_ref}-")  # a schedule appends the time
    rotation = client.rotation(setup.key_ref)  # the launcher started the key's one rotation
    await eventually(lambda: _exists(rotation), "the launched rotation exists")
    assert (await rotation.result()).phase == DONE
    assert setup.store.count_by_key_version(setup.key_ref) == {2: 240}

    assert await client.delete_schedule(setup.key_ref) == schedule_id
    with pytest.raises(ScheduleNotFound, match=f"^cannot pause {re.escape(schedule_id)}: "):
        await client.pause_schedule(schedule_id)
    with pytest.raises(ScheduleNotFound):
        await client.describe_schedule(schedule_id)
    assert schedule_id not in [s.id for s in await client.list_schedules()]
    all_readable(setup)


async def test_cli_manages_a_schedule(
    temporal_env: WorkflowEnvironment,
    openbao: OpenBao,
    temporal_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`rekey schedule create | list | pause | unpause | trigger | delete` against the test server
    (`schedule list` used to crash whenever a schedule existed)."""
    import json

    from tests.fixtures.cli import run_cli

    monkeypatch.setenv("REKEY_HOME", str(temporal_home))
    monkeypatch.setenv("REKEY_TEMPORAL_ADDRESS", temporal_env.client.service_client.config.target_host)
    monkeypatch.setenv("REKEY_VAULT_ADDR", openbao.addr)  # `schedule create` checks the key there
    monkeypatch.setenv("REKEY_VAULT_TOKEN", openbao.token)
    monkeypatch.setenv("COLUMNS", "200")
    key_ref = f"vault:sched-{secrets.token_hex(4)}"
    schedule_id = f"schedule:rotate:{key_ref}"

    async def rekey(*args: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(run_cli, capsys, *args)

    async def listed() -> Any:
        code, out, err = await rekey("schedule", "list", "--json")
        assert code == 0, err
        return next((row for row in json.loads(out) if row["id"] == schedule_id), None)

    assert (await rekey("key", "create", key_ref))[0] == 0
    code, out, err = await rekey("schedule", "create", key_ref, "--every", "30d", "--grace", "0s")
    assert (code, out, err) == (0, f"created {schedule_id}: rotate {key_ref} every 30d\n", "")
    code, _, err = await rekey("schedule", "create", key_ref, "--every", "7d")
    assert code == 2 and err == f"error: a schedule for {key_ref} exists already ({schedule_id})\n"

    row = await eventually(listed, "the schedule is listed")
    assert row["paused"] is False and len(row["next_runs"]) == 3 and row["recent"] == []
    code, out, _ = await rekey("schedule", "list")
    line = next(line for line in out.splitlines() if line.startswith(schedule_id))
    assert line.split()[1] == "false" and row["next_runs"][0][:19] in line

    assert await rekey("schedule", "pause", key_ref) == (0, f"pause: {schedule_id}\n", "")
    assert (await listed())["paused"] is True
    code, out, _ = await rekey("schedule", "list")
    assert next(line for line in out.splitlines() if line.startswith(schedule_id)).split()[1] == "true"
    assert await rekey("schedule", "unpause", schedule_id) == (0, f"unpause: {schedule_id}\n", "")
    assert (await listed())["paused"] is False

    # No worker polls the CLI's task queue here: the triggered rotation starts and is ended below.
    assert await rekey("schedule", "trigger", schedule_id) == (0, f"trigger: {schedule_id}\n", "")

    async def triggered() -> Any:
        row = await listed()
        return row if row["recent"] else None

    (launched,) = (await eventually(triggered, "the triggered launcher shows in the list"))["recent"]
    assert launched.startswith(f"launch:schedule:rotate:{key_ref}-")
    await temporal_env.client.get_workflow_handle(launched).terminate("test: no worker for it")

    assert await rekey("schedule", "delete", key_ref) == (0, f"delete: {schedule_id}\n", "")
    assert await listed() is None
    code, out, err = await rekey("schedule", "pause", key_ref)
    assert code == 2 and out == "" and err.startswith(f"error: cannot pause {schedule_id}: ")
    assert len(err.strip().splitlines()) == 1
    code, _, err = await rekey("schedule", "trigger", "rotate:")
    assert code == 2 and err == (
        "error: key reference 'rotate:': unknown backend 'rotate' (one of vault, aws, azure)\n"
    )


async def test_an_update_no_worker_answered_in_time_says_it_may_still_apply(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker dies after its last poll: the approve reaches Temporal but nobody answers.
    The caller is told it may still apply (not that it failed), and it does once a worker is
    back; sending it again with the same update id gives the same outcome, not a second one."""
    import rekey.client.rotations as rotations
    from rekey.client import UpdateUnanswered

    task_queue = f"rekey-test-{uuid.uuid4()}"

    def worker() -> Any:
        return build_worker(
            setup.env.client,
            load_settings(tmp_path, environ={}),
            task_queue=task_queue,
            adapters=lambda _ref: setup.adapter,
            store=setup.store,
            audit=lambda *_: None,
        )

    client = RekeyClient(setup.env.client, task_queue=task_queue)
    async with worker():
        rotation = await client.start_rotation(setup.key_ref, grace="1h", batch_size=100)
        await wait_phase(rotation, AWAITING_COMMIT)
    monkeypatch.setattr(rotations, "UPDATE_TIMEOUT", timedelta(seconds=2))
    with pytest.raises(
        UpdateUnanswered, match=r"not answered within 2s \(update id ticket-7\); it may still apply"
    ):
        await rotation.approve(update_id="ticket-7")
    assert setup.adapter.describe().state_of(1) == "enabled"  # nothing happened yet
    monkeypatch.undo()  # the answer of the worker that comes back gets the usual time, not 2 s
    async with worker():
        assert (await rotation.approve(update_id="ticket-7")).startswith("approved")  # the same update
        assert (await rotation.result()).phase == DONE
    assert setup.adapter.describe().state_of(1) == "disabled"
