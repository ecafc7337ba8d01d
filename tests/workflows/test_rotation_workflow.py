"""RotateKeyWorkflow on a time-skipping Temporal dev server, with stub activities
(tests/workflows/stubs.py): timers, commit, abort, pause, re-sweep, continue-as-new, refusals."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.types import MAX_BATCH, MAX_IN_FLIGHT
from tests.workflows.stubs import (
    EVERY_PHASE,
    GRACE,
    KEY_REF,
    RESWEPT,
    WAIT,
    Fleet,
    Rotation,
    StubActivities,
    counts,
    entered,
    rotating,
    started,
    wait_for_progress,
    wait_phase,
)
from workflows.rotation import (
    ABORTED,
    AWAITING_COMMIT,
    AWAITING_DESTROY,
    DESTROYING,
    DONE,
    MAX_WAIT_SECONDS,
    PREPARING,
    REWRAPPING,
    VERIFYING,
    RotateKeyWorkflow,
)
from workflows.rotation_state import (
    MAX_START_DELAY_SECONDS,
    MAX_START_SKEW_SECONDS,
    RotateKeyInput,
    RotationState,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


# ----------------------------------------------------------------------------- commit by timer


async def test_grace_period_expires_then_retires(rotation: Rotation) -> None:
    _, progress = await rotation.run()  # the default grace: 24 hours, no approve

    assert progress.phase == DONE
    assert counts(progress) == (40, 40, 0, 0, 0, 0, 3, 4)
    assert rotation.fleet.phases() == EVERY_PHASE
    [(action, at)] = rotation.fleet.retirements()  # no destroy without destroy_after_seconds
    assert action == "disable"
    assert started(progress) + GRACE <= at < started(progress) + GRACE + timedelta(minutes=1)
    assert [c.request.details["version"] for c in rotation.fleet.audits("key.version.disabled")] == [2, 3]
    assert rotation.fleet.versions == {1: "destroyed", 2: "disabled", 3: "disabled", 4: "enabled"}
    assert set(rotation.fleet.blobs.values()) == {4}


async def test_destroy_after_its_delay(rotation: Rotation) -> None:
    delay = timedelta(days=7)
    _, progress = await rotation.run(destroy_after_seconds=delay.total_seconds())

    assert progress.phase == DONE
    [(disable, disabled_at), (destroy, destroyed_at)] = rotation.fleet.retirements()
    assert (disable, destroy) == ("disable", "destroy")
    assert disabled_at >= started(progress) + GRACE
    assert disabled_at + delay <= destroyed_at < disabled_at + delay + timedelta(minutes=1)
    assert [c.request.details["version"] for c in rotation.fleet.audits("key.version.destroyed")] == [2, 3]
    assert rotation.fleet.versions == {1: "destroyed", 2: "destroyed", 3: "destroyed", 4: "enabled"}
    assert rotation.fleet.phases() == [*EVERY_PHASE[:-1], AWAITING_DESTROY, DESTROYING, DONE]
    assert all(call.request.census for call in rotation.fleet.called("retire_versions"))


# ----------------------------------------------------------------------------------- approve


async def test_approve_commits_before_the_timer(rotation: Rotation) -> None:
    # Time runs only when the test moves it: the workflow is seen waiting, an hour passes,
    # then the approve commits at once, 23 hours before the timer would have.
    handle = await rotation.start(skip_time=False)
    await wait_phase(handle, AWAITING_COMMIT)
    assert await asyncio.wait_for(rotation.env.fast_forward(handle, timedelta(hours=1)), WAIT)
    assert (await handle.query(RotateKeyWorkflow.progress)).phase == AWAITING_COMMIT
    await handle.execute_update(RotateKeyWorkflow.approve)
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == DONE
    assert rotation.fleet.phases() == EVERY_PHASE
    [(action, at)] = rotation.fleet.retirements()
    assert action == "disable"
    assert started(progress) + timedelta(hours=1) <= at < started(progress) + timedelta(hours=2)


# ------------------------------------------------------------------------------------- abort


def not_retired(rotation: Rotation) -> None:
    assert rotation.fleet.retirements() == []
    assert rotation.fleet.versions[2] == rotation.fleet.versions[3] == "enabled"
    assert len(rotation.fleet.audits("rotation.aborted")) == 1
    assert rotation.fleet.audits("rotation.done") == []


async def test_abort_while_preparing_before_the_rotate(rotation: Rotation) -> None:
    gate = rotation.fleet.hold("audit", lambda request: request.event == "rotation.started")
    handle = await rotation.start()
    await entered(gate)
    await handle.execute_update(RotateKeyWorkflow.abort)
    gate.released.set()
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert rotation.fleet.phases() == [PREPARING, ABORTED]
    assert [call.name for call in rotation.fleet.calls if call.name != "audit"] == []
    assert rotation.fleet.primary == 3
    not_retired(rotation)


async def test_abort_while_preparing_after_the_rotate(rotation: Rotation) -> None:
    # PREPARING finishes what it started; the abort stops the sweep before its first batch.
    gate = rotation.fleet.hold("rotate_key")
    handle = await rotation.start()
    await entered(gate)
    await handle.execute_update(RotateKeyWorkflow.abort)
    gate.released.set()
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert (progress.old_primary, progress.new_version, progress.total) == (3, 4, 40)
    assert rotation.fleet.phases() == [PREPARING, REWRAPPING, ABORTED]
    assert rotation.fleet.called("plan_batches") == []
    not_retired(rotation)


async def test_abort_while_rewrapping(rotation: Rotation) -> None:
    # The batches in flight finish; no further batch starts.
    gate = rotation.fleet.hold("rewrap_batch", lambda request: request.start is None)
    handle = await rotation.start()
    await entered(gate)
    await handle.execute_update(RotateKeyWorkflow.abort)
    gate.released.set()
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert rotation.fleet.phases() == [PREPARING, REWRAPPING, ABORTED]
    assert len(rotation.fleet.called("rewrap_batch")) == 2
    assert (progress.total, progress.rewrapped, progress.remaining) == (40, 20, 20)
    not_retired(rotation)


async def test_abort_while_paused(rotation: Rotation) -> None:
    gate = rotation.fleet.hold("rewrap_batch", lambda request: request.start is None)
    handle = await rotation.start()
    await entered(gate)
    await handle.execute_update(RotateKeyWorkflow.pause)
    gate.released.set()
    paused = await wait_for_progress(handle, lambda p: p.paused and p.rewrapped == 20)
    assert paused.phase == REWRAPPING
    await handle.execute_update(RotateKeyWorkflow.abort)
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert rotation.fleet.phases() == [PREPARING, REWRAPPING, ABORTED]
    assert len(rotation.fleet.called("rewrap_batch")) == 2
    not_retired(rotation)


async def test_abort_while_verifying(rotation: Rotation) -> None:
    # The abort takes effect as soon as the activity in flight returns.
    gate = rotation.fleet.hold("verify_sample")
    handle = await rotation.start()
    await entered(gate)
    assert (await handle.query(RotateKeyWorkflow.progress)).phase == VERIFYING
    await handle.execute_update(RotateKeyWorkflow.abort)
    gate.released.set()
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert rotation.fleet.phases() == [PREPARING, REWRAPPING, VERIFYING, ABORTED]
    assert rotation.fleet.audits("rewrap.counts") == []
    assert progress.rewrapped == 40
    not_retired(rotation)


async def test_abort_while_awaiting_commit(rotation: Rotation) -> None:
    handle = await rotation.start(skip_time=False)
    await wait_phase(handle, AWAITING_COMMIT)
    assert await asyncio.wait_for(rotation.env.fast_forward(handle, timedelta(hours=1)), WAIT)
    await handle.execute_update(RotateKeyWorkflow.abort)
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert rotation.fleet.phases() == [PREPARING, REWRAPPING, VERIFYING, AWAITING_COMMIT, ABORTED]
    assert progress.rewrapped == 40
    not_retired(rotation)


# ------------------------------------------------------------------------------ pause, resume


async def test_pause_stops_new_batches_and_resume_continues(rotation: Rotation) -> None:
    gate = rotation.fleet.hold("rewrap_batch", lambda request: request.start is None)
    handle = await rotation.start()
    await entered(gate)
    await handle.execute_update(RotateKeyWorkflow.pause)
    gate.released.set()  # the two batches in flight finish

    paused = await wait_for_progress(handle, lambda p: p.paused and p.rewrapped == 20)
    await asyncio.sleep(0.5)  # room for a batch that should not start
    assert len(rotation.fleet.called("rewrap_batch")) == 2
    assert len(rotation.fleet.called("plan_batches")) == 1
    assert (paused.phase, paused.remaining) == (REWRAPPING, 20)

    await handle.execute_update(RotateKeyWorkflow.resume)
    progress = await asyncio.wait_for(handle.result(), WAIT)
    assert progress.phase == DONE
    assert not progress.paused
    assert counts(progress) == (40, 40, 0, 0, 0, 0, 3, 4)
    assert len(rotation.fleet.called("rewrap_batch")) == 4
    assert rotation.fleet.phases() == EVERY_PHASE


# --------------------------------------------------------------------- re-sweep and counts


async def test_failed_blobs_are_swept_again(rotation: Rotation) -> None:
    fleet = rotation.fleet
    fleet.fail_once = {"blob-0003", "blob-0031"}
    fleet.conflicts = {"blob-0010"}
    fleet.throttled = {"blob-0001", "blob-0002", "blob-0020"}
    _, progress = await rotation.run(grace_seconds=0)

    assert progress.phase == DONE
    # The two failures are counted again by the re-sweep, which re-wraps them.
    assert counts(progress) == (42, 39, 0, 1, 2, 3, 3, 4)
    assert fleet.phases() == RESWEPT
    planned_after = [call.request.after for call in fleet.called("plan_batches")]
    assert planned_after == [None, "blob-0019", "blob-0039", None, "blob-0031"]  # from the start again
    [counted] = fleet.audits("rewrap.counts")
    assert counted.request.details["failed"] == 2


# --------------------------------------------------------------------------- continue-as-new


def awkward_fleet() -> Fleet:
    fleet = Fleet(128)
    fleet.fail_once = {"blob-0007"}
    fleet.conflicts = {"blob-0100"}
    fleet.throttled = {"blob-0050", "blob-0120"}
    return fleet


async def test_continue_as_new_carries_the_state(temporal_time_skipping_env: WorkflowEnvironment) -> None:
    env = temporal_time_skipping_env
    # 16 rounds of 4 batches of 2 blobs: the history passes the lowered suggestion twice.
    async with rotating(env, awkward_fleet()) as rotation:
        handle, progress = await rotation.run(batch_size=2, batches_in_flight=4, grace_seconds=0)
    fleet = rotation.fleet
    runs = list(dict.fromkeys(call.run_id for call in fleet.calls))
    assert len(runs) >= 3
    assert runs[0] == handle.first_execution_run_id
    assert (await env.client.get_workflow_handle(handle.id).describe()).run_id == runs[-1]
    first = await env.client.get_workflow_handle(handle.id, run_id=runs[0]).fetch_history()
    assert first.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    assert {call.name for call in fleet.calls if call.run_id != runs[0]} >= {"plan_batches", "rewrap_batch"}

    # A continued run does not start the rotation again: one start, one rotate, from the first run.
    assert [call.run_id for call in fleet.audits("rotation.started")] == [runs[0]]
    assert [call.run_id for call in fleet.called("rotate_key")] == [runs[0]]
    first_task = next(e for e in first.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED)
    first_task_at = first_task.event_time.ToDatetime(tzinfo=UTC)  # truncated to microseconds
    assert abs(started(progress) - first_task_at) < timedelta(milliseconds=1)
    assert progress.phase == DONE
    assert fleet.phases() == RESWEPT  # blob-0007 failed once

    # The same fleet in two big batches needs no continue-as-new, and ends with the same counts.
    async with rotating(env, awkward_fleet()) as reference:
        _, without = await reference.run(batch_size=100, batches_in_flight=2, grace_seconds=0)
    assert len({call.run_id for call in reference.fleet.calls}) == 1
    assert counts(progress) == counts(without) == (129, 127, 0, 1, 1, 2, 3, 4)
    assert reference.fleet.phases() == fleet.phases()


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("batch_size", "batches_in_flight"),
    [(0, 2), (MAX_BATCH + 1, 2), (10, 0), (10, MAX_IN_FLIGHT + 1)],
)
async def test_out_of_range_sizing_is_refused_before_any_activity(
    rotation: Rotation, batch_size: int, batches_in_flight: int
) -> None:
    handle = await rotation.start(batch_size=batch_size, batches_in_flight=batches_in_flight)
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), WAIT)

    assert isinstance(failure.value.cause, ApplicationError)
    assert failure.value.cause.non_retryable
    assert f"got {batch_size} and {batches_in_flight}" in failure.value.cause.message
    assert rotation.fleet.calls == []


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("grace_seconds", float("inf")),
        ("grace_seconds", float("nan")),
        ("grace_seconds", -1.0),
        ("grace_seconds", MAX_WAIT_SECONDS + 1.0),
        ("destroy_after_seconds", 1e300),
    ],
)
async def test_waits_no_timer_could_take_are_refused_before_any_activity(
    rotation: Rotation, option: str, value: float
) -> None:
    # A starter other than rekey.client (which refuses these) must not leave a rotation whose
    # workflow task fails for ever: it fails at once, before anything happens.
    handle = await rotation.start(**{option: value})
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), WAIT)

    assert isinstance(failure.value.cause, ApplicationError)
    assert failure.value.cause.non_retryable
    assert failure.value.cause.message.startswith(f"{option} must be 0..{MAX_WAIT_SECONDS} (ten years)")
    assert rotation.fleet.calls == []


@pytest.mark.parametrize(
    ("offset", "kind"),
    [
        (timedelta(hours=-3), "StaleStartRequest"),  # a finished rotation's input, started again
        (timedelta(seconds=-(MAX_START_DELAY_SECONDS + 60)), "StaleStartRequest"),
        (timedelta(seconds=MAX_START_SKEW_SECONDS + 60), "StaleStartRequest"),
        ("yesterday", "InvalidStart"),
        ("", "InvalidStart"),  # an input without requested_at (not from rekey.client)
    ],
)
async def test_a_replayed_start_input_is_refused_before_any_activity(
    rotation: Rotation, offset: timedelta | str, kind: str
) -> None:
    # The codec binds a start input to its workflow id, not to its run: someone who can start
    # workflows but holds no codec key could start a recorded input again under the same id.
    now = datetime.now(UTC)  # each workflow's virtual clock starts at the real time
    requested_at = offset if isinstance(offset, str) else (now + offset).isoformat()
    handle = await rotation.start(requested_at=requested_at)
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), WAIT)

    assert isinstance(failure.value.cause, ApplicationError)
    assert failure.value.cause.type == kind and failure.value.cause.non_retryable
    assert rotation.fleet.calls == []


async def test_a_fresh_start_request_runs(rotation: Rotation) -> None:
    now = datetime.now(UTC)
    _, progress = await rotation.run(requested_at=(now - timedelta(seconds=30)).isoformat(), grace_seconds=0)
    assert progress.phase == "DONE"


async def test_a_carried_over_state_outside_continue_as_new_is_refused(rotation: Rotation) -> None:
    # A continued-as-new successor's recorded input (it holds the state) started again by hand
    # would run the rest of a finished rotation once more.
    state = RotationState(phase=REWRAPPING, old_primary=3, new_version=4, total=10, started_at="x")
    handle = await rotation.start(state=state)
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), WAIT)
    assert isinstance(failure.value.cause, ApplicationError)
    assert failure.value.cause.type == "InvalidStart" and "continue-as-new" in failure.value.cause.message
    assert rotation.fleet.calls == []


async def test_a_start_that_waits_for_a_worker_is_not_a_replay(
    temporal_time_skipping_env: WorkflowEnvironment,
) -> None:
    # Dated just inside the window when the server starts it, taken up by a worker only after
    # the window has passed (no worker was polling): the run's start is the server's, so it runs.
    env = temporal_time_skipping_env
    task_queue = f"late-{uuid.uuid4()}"
    requested = datetime.now(UTC) - timedelta(seconds=MAX_START_DELAY_SECONDS - 3)
    with env.with_time_skipping_disabled():
        handle = await env.client.start_workflow(
            RotateKeyWorkflow.run,
            RotateKeyInput(KEY_REF, grace_seconds=0, batch_size=10, requested_at=requested.isoformat()),
            id=f"rotate:{KEY_REF}-{uuid.uuid4()}",
            task_queue=task_queue,
        )
        await asyncio.sleep(5)  # past the window before any worker polls
    fleet = Fleet()
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[RotateKeyWorkflow],
        activities=StubActivities(fleet).all(),
    ):
        progress = await asyncio.wait_for(handle.result(), WAIT)
    assert progress.phase == DONE
