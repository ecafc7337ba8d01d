"""Jittered wave starts on the time-skipping server (stub activities): each host's first batch
of a wave waits a durable timer of at most the bound, the history replays, a zero bound (and an
input recorded before the field existed) sets no timer, and the delays are a function of the
workflow's seeded randomness."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from audit.format import check_details
from tests.workflows.migration_stubs import NEW, OLD, WAIT, MigrationFleet, migrating
from workflows.migration import MigrateGenerationWorkflow, migration_id
from workflows.migration_state import DONE

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def env(temporal_time_skipping_env: WorkflowEnvironment) -> AsyncIterator[WorkflowEnvironment]:
    yield temporal_time_skipping_env


async def histories(env: WorkflowEnvironment, handle: WorkflowHandle[Any, Any]) -> list[WorkflowHistory]:
    """The histories of every run of the workflow, first to last (across continue-as-new)."""
    run_id: str | None = handle.first_execution_run_id
    runs = []
    while run_id:
        history = await env.client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        runs.append(history)
        last = history.events[-1]
        run_id = None
        if last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return runs


async def timers(env: WorkflowEnvironment, handle: WorkflowHandle[Any, Any]) -> list[float]:
    """The durations of the timers the workflow started in all its runs, in seconds."""
    return [
        e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta().total_seconds()
        for history in await histories(env, handle)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED
    ]


def first_batches(fleet: MigrationFleet) -> list[str]:
    return [c.request.host_id for c in fleet.named("migration_handoff") if c.request.after is None]


async def test_each_hosts_first_batch_waits_a_timer_within_the_bound(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=6, per_host=3)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(waves=[50, 100], grace_seconds=0, batch_size=1, jitter_seconds=30)
        result = await asyncio.wait_for(handle.result(), WAIT * 2)
        assert result.phase == DONE and result.moved == 18
        delays = await timers(env, handle)
        runs = await histories(env, handle)
    # One timer per host (a delay drawn as 0 ms sets none), none for the later batches (batch
    # size 1: three batches a host) nor for the grace (0).
    assert 1 <= len(delays) <= 6, delays
    assert all(0 < d <= 30 for d in delays), delays
    assert len(set(delays)) == len(delays)  # drawn, not one constant
    assert sorted(first_batches(fleet)) == sorted(fleet.hosts)
    assert [a.details["jitter_ms"] for a in fleet.audit if a.event == "migration.started"] == [30000]
    # The history replays with the same timers: the delays are deterministic.
    replayer = Replayer(
        workflows=[MigrateGenerationWorkflow],
        namespace=env.client.namespace,
        data_converter=env.client.data_converter,
    )
    for history in runs:
        await replayer.replay_workflow(history)


async def test_the_timers_come_before_the_first_batches_of_their_wave(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=1)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(waves=[100], grace_seconds=0, jitter_seconds=5)
        await asyncio.wait_for(handle.result(), WAIT)
        (history,) = await histories(env, handle)
    kinds = [
        e.event_type
        for e in history.events
        if e.event_type in (EventType.EVENT_TYPE_TIMER_FIRED, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
        and (
            e.event_type == EventType.EVENT_TYPE_TIMER_FIRED
            or e.activity_task_scheduled_event_attributes.activity_type.name == "migration_handoff"
        )
    ]
    fired = kinds.count(EventType.EVENT_TYPE_TIMER_FIRED)
    assert fired >= 1
    # Every hand-off is scheduled after the timers that came before it: the first hand-off of a
    # host with a delay follows its timer, so the last timer fires before the last hand-off.
    last_timer = max(i for i, k in enumerate(kinds) if k == EventType.EVENT_TYPE_TIMER_FIRED)
    assert last_timer < len(kinds) - 1


async def test_a_zero_jitter_sets_no_timer(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=4, per_host=2)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(waves=[50, 100], grace_seconds=0, jitter_seconds=0)
        result = await asyncio.wait_for(handle.result(), WAIT)
        assert result.phase == DONE
        assert await timers(env, handle) == []


async def test_an_input_without_the_field_decodes_with_no_jitter(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=3, per_host=1)
    target = f"{NEW}-{uuid.uuid4().hex[:8]}"
    # A start input as a client before the field existed sent it: no jitter_seconds key.
    recorded = {
        "from_generation": OLD,
        "to_generation": target,
        "waves": [100],
        "grace_seconds": 0,
        "on_failure": "rollback",
        "gate_sample": 1,
        "allow_same_svn": False,
        "requested_at": datetime.now(UTC).isoformat(),
        "started_by": "",
        "batch_size": 100,
        "state": None,
    }
    async with migrating(env, fleet) as migration:
        handle = await env.client.start_workflow(
            "MigrateGenerationWorkflow",
            recorded,
            id=migration_id(OLD, target),
            task_queue=migration.task_queue,
            result_type=dict,
        )
        result = await asyncio.wait_for(handle.result(), WAIT)
        assert result["phase"] == DONE
        assert await timers(env, handle) == []


async def test_every_audit_record_of_a_migration_is_one_the_audit_log_takes(env: WorkflowEnvironment) -> None:
    """The real audit log refuses floats and secret-looking member names (``keys``): a record it
    refuses would hold the migration at that step."""
    done, rolled_back = MigrationFleet.of(hosts=2, per_host=2), MigrationFleet.of(hosts=2, per_host=2)
    rolled_back.gate_fails = {"host-01"}
    for fleet in (done, rolled_back):
        async with migrating(env, fleet) as migration:
            handle = await migration.start(waves=[50, 100], grace_seconds=0, jitter_seconds=1.5)
            await asyncio.wait_for(handle.result(), WAIT)
        events = {a.event for a in fleet.audit}
        assert {"migration.started", "migration.widened"} <= events
        for record in fleet.audit:
            check_details(record.details)
    assert "migration.narrowed" in {a.event for a in done.audit}
    assert "migration.rolled_back" in {a.event for a in rolled_back.audit}


async def started_timers(handle: WorkflowHandle[Any, Any]) -> int:
    history = await handle.fetch_history()
    return sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED)


async def test_an_abort_in_the_jitter_rolls_back_without_waiting_it_out(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=3, per_host=1)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(waves=[100], jitter_seconds=600)
        deadline = asyncio.get_running_loop().time() + WAIT
        while await started_timers(handle) < 1:  # a host waits its jitter (real time: no skipping yet)
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
        waited = len(fleet.named("migration_handoff"))
        await handle.execute_update(MigrateGenerationWorkflow.abort)
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == "ROLLED_BACK"
    # The hosts still in their jitter never started a batch.
    assert len(fleet.named("migration_handoff")) == waited < 3


async def test_a_pause_in_the_jitter_holds_the_batch_until_resume(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=3, per_host=1)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(waves=[100], grace_seconds=0, jitter_seconds=600)
        deadline = asyncio.get_running_loop().time() + WAIT
        while await started_timers(handle) < 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
        await handle.execute_update(MigrateGenerationWorkflow.pause)
        before = len(fleet.named("migration_handoff"))
        await asyncio.sleep(1)
        assert len(fleet.named("migration_handoff")) == before < 3
        await handle.execute_update(MigrateGenerationWorkflow.resume)
        result = await asyncio.wait_for(handle.result(), WAIT * 2)
    assert result.phase == DONE and result.moved == 3
