"""Operator controls and failure handling of RotateKeyWorkflow (time-skipping server, stubs):
updates refused with a reason in the phases that do not allow them, the destroy delay and its
own approval, a pause that holds the commit, censuses before every retirement, BLOCKED and
resume, the memo and search attributes, and one rotation per key whoever starts it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from tests.workflows.stubs import (
    EVERY_PHASE,
    GRACE,
    KEY_REF,
    WAIT,
    Rotation,
    entered,
    started,
    wait_for_progress,
    wait_phase,
)
from workflows.launcher import LaunchRotationWorkflow
from workflows.rotation import (
    ABORTED,
    AWAITING_COMMIT,
    AWAITING_DESTROY,
    BLOCKED,
    DESTROYING,
    DONE,
    MAX_SWEEPS,
    PREPARING,
    RETIRING,
    REWRAPPING,
    VERIFYING,
    LaunchRotationInput,
    Progress,
    RotateKeyInput,
    RotateKeyWorkflow,
)
from workflows.rotation_state import KEY_REF_ATTRIBUTE, MEMO_PROGRESS, PHASE_ATTRIBUTE, REMAINING_ATTRIBUTE

pytestmark = pytest.mark.asyncio(loop_scope="session")

WEEK = timedelta(days=7)


async def refused(handle: WorkflowHandle[Any, Progress], update: Callable[..., Any]) -> str:
    """The reason the workflow gave for refusing ``update``."""
    with pytest.raises(WorkflowUpdateFailedError) as failure:
        await asyncio.wait_for(handle.execute_update(update), WAIT)
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    return cause.message


async def result(handle: WorkflowHandle[Any, Progress]) -> Progress:
    return await asyncio.wait_for(handle.result(), WAIT)


# ----------------------------------------------------------------------------- approve


async def test_approve_is_refused_until_awaiting_commit(rotation: Rotation) -> None:
    # An approve during PREPARING used to skip the whole grace period: now each phase before
    # AWAITING_COMMIT says no, and the grace period still runs its 24 hours.
    gates = {
        PREPARING: rotation.fleet.hold("rotate_key"),
        REWRAPPING: rotation.fleet.hold("rewrap_batch", lambda request: request.start is None),
        VERIFYING: rotation.fleet.hold("verify_sample"),
    }
    handle = await rotation.start()
    for phase, gate in gates.items():
        await entered(gate)
        reason = await refused(handle, RotateKeyWorkflow.approve)
        assert reason.startswith(f"the rotation is {phase}: approve commits only in AWAITING_COMMIT")
        gate.released.set()
    progress = await result(handle)

    assert progress.phase == DONE
    [(action, at)] = rotation.fleet.retirements()
    assert action == "disable"
    assert at >= started(progress) + GRACE
    assert rotation.fleet.phases() == EVERY_PHASE


async def test_pause_holds_the_commit_past_the_grace_period(rotation: Rotation) -> None:
    handle = await rotation.start(skip_time=False)
    await wait_phase(handle, AWAITING_COMMIT)
    assert "even after the grace period" in await asyncio.wait_for(
        handle.execute_update(RotateKeyWorkflow.pause), WAIT
    )
    assert await refused(handle, RotateKeyWorkflow.pause) == "the rotation is paused already"
    assert await refused(handle, RotateKeyWorkflow.approve) == "the rotation is paused: resume it first"
    assert await asyncio.wait_for(rotation.env.fast_forward(handle, GRACE + timedelta(hours=1)), WAIT)

    held = await handle.query(RotateKeyWorkflow.progress)
    assert (held.phase, held.paused) == (AWAITING_COMMIT, True)
    assert rotation.fleet.retirements() == []

    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    progress = await result(handle)
    assert progress.phase == DONE
    assert [action for action, _ in rotation.fleet.retirements()] == ["disable"]


# ------------------------------------------------------------------ retirement, destroy


async def test_abort_is_refused_once_disabling_began(rotation: Rotation) -> None:
    gate = rotation.fleet.hold("retire_versions", lambda request: request.action == "disable")
    handle = await rotation.start(
        skip_time=False, grace_seconds=0, destroy_after_seconds=WEEK.total_seconds()
    )
    await entered(gate)
    reason = await refused(handle, RotateKeyWorkflow.abort)
    assert reason.startswith("the rotation is RETIRING: disabling the old versions has begun; no abort")
    assert "pause" not in await refused(handle, RotateKeyWorkflow.cancel_destroy)
    assert "a KMS change is under way" in await refused(handle, RotateKeyWorkflow.pause)
    gate.released.set()

    await wait_phase(handle, AWAITING_DESTROY)
    reason = await refused(handle, RotateKeyWorkflow.abort)
    assert "cancel-destroy keeps them disabled" in reason
    assert "destroy cancelled" in await asyncio.wait_for(
        handle.execute_update(RotateKeyWorkflow.cancel_destroy), WAIT
    )
    progress = await result(handle)

    assert progress.phase == DONE
    assert progress.destroy_cancelled
    assert (progress.disabled, progress.destroyed) == ([2, 3], [])
    assert [action for action, _ in rotation.fleet.retirements()] == ["disable"]
    assert rotation.fleet.versions == {1: "destroyed", 2: "disabled", 3: "disabled", 4: "enabled"}
    assert len(rotation.fleet.audits("key.version.destroy_cancelled")) == 1
    assert rotation.fleet.audits("rotation.aborted") == []


async def test_approve_destroy_destroys_before_the_delay(rotation: Rotation) -> None:
    handle = await rotation.start(
        skip_time=False, grace_seconds=0, destroy_after_seconds=WEEK.total_seconds()
    )
    waiting = await wait_phase(handle, AWAITING_DESTROY)
    assert waiting.destroy_due  # when the destroy would run by itself
    assert "approve commits only in" in await refused(handle, RotateKeyWorkflow.approve)
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.approve_destroy), WAIT)
    progress = await result(handle)

    assert progress.phase == DONE
    [(_, disabled_at), (destroy, destroyed_at)] = rotation.fleet.retirements()
    assert destroy == "destroy"
    assert destroyed_at < disabled_at + timedelta(hours=1)  # not a week later
    assert progress.destroyed == [2, 3]
    assert rotation.fleet.phases()[-3:] == [AWAITING_DESTROY, DESTROYING, DONE]


async def test_no_destroy_is_offered_without_a_destroy_delay(rotation: Rotation) -> None:
    handle = await rotation.start(skip_time=False)
    await wait_phase(handle, AWAITING_COMMIT)
    assert "applies only in AWAITING_DESTROY" in await refused(handle, RotateKeyWorkflow.approve_destroy)
    assert "no destroy pending" in await refused(handle, RotateKeyWorkflow.cancel_destroy)
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.approve), WAIT)
    progress = await result(handle)
    assert progress.phase == DONE
    assert [action for action, _ in rotation.fleet.retirements()] == ["disable"]


async def test_a_blob_written_during_the_destroy_delay_stops_the_destroy(rotation: Rotation) -> None:
    # A restore (or a stale writer) puts a blob under old version 2 while the old versions wait
    # to be destroyed: the census before the destroy finds it and nothing is destroyed.
    fleet = rotation.fleet
    handle = await rotation.start(
        skip_time=False, grace_seconds=0, destroy_after_seconds=WEEK.total_seconds()
    )
    await wait_phase(handle, AWAITING_DESTROY)
    fleet.blobs["blob-restored"] = 2
    assert await asyncio.wait_for(rotation.env.fast_forward(handle, WEEK + timedelta(minutes=1)), WAIT)

    blocked = await wait_phase(handle, BLOCKED)
    assert blocked.blocked_in == AWAITING_DESTROY
    assert blocked.blocked_reason.startswith("1 stored blobs are still wrapped by disabled versions [2, 3]")
    assert fleet.versions == {1: "destroyed", 2: "disabled", 3: "disabled", 4: "enabled"}
    assert fleet.audits("key.version.destroyed") == []
    assert [c.request.details for c in fleet.audits("retire.census")] == [
        {"action": "destroy", "still_wrapped": 1}
    ]
    assert "no abort" in await refused(handle, RotateKeyWorkflow.abort)

    # Resume: the versions are enabled again, the blob re-wrapped, the census passes, and
    # the destroy waits its full delay again.
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    await wait_phase(handle, AWAITING_DESTROY)
    assert fleet.blobs["blob-restored"] == 4
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.approve_destroy), WAIT)
    progress = await result(handle)

    assert progress.phase == DONE
    assert fleet.versions == {1: "destroyed", 2: "destroyed", 3: "destroyed", 4: "enabled"}
    assert [c.request.details["version"] for c in fleet.audits("key.version.enabled")] == [2, 3]
    assert fleet.phases() == [
        *EVERY_PHASE[:-1],
        AWAITING_DESTROY,
        DESTROYING,
        BLOCKED,
        REWRAPPING,
        VERIFYING,
        RETIRING,  # committed already: no second grace period
        AWAITING_DESTROY,
        DESTROYING,
        DONE,
    ]


async def test_a_blob_found_by_the_census_before_disabling_is_swept_first(rotation: Rotation) -> None:
    fleet = rotation.fleet
    gate = fleet.hold("retire_versions", lambda request: request.action == "disable")
    handle = await rotation.start()
    await entered(gate)
    fleet.blobs["blob-late"] = 3  # written under the old primary from a stale cache
    gate.released.set()
    progress = await result(handle)

    assert progress.phase == DONE
    assert fleet.blobs["blob-late"] == 4
    assert fleet.phases() == [
        PREPARING,
        REWRAPPING,
        VERIFYING,
        AWAITING_COMMIT,
        RETIRING,
        REWRAPPING,
        VERIFYING,
        RETIRING,  # committed already: no second grace period
        DONE,
    ]
    assert [c.request.details for c in fleet.audits("retire.census")] == [
        {"action": "disable", "still_wrapped": 1}
    ]
    assert progress.total == 41


# ------------------------------------------------------------------------------ BLOCKED


async def test_an_expired_credential_mid_sweep_blocks_and_resume_finishes(rotation: Rotation) -> None:
    fleet = rotation.fleet
    fleet.deny_batch_once = {"blob-0009"}  # the second batch of the first round
    handle = await rotation.start(grace_seconds=0)
    blocked = await wait_phase(handle, BLOCKED)

    assert blocked.blocked_in == REWRAPPING
    assert blocked.blocked_reason == "PermissionDenied: token expired"
    assert blocked.rewrapped == 10  # the first batch of the round is kept
    assert "BLOCKED (stopped already)" in await refused(handle, RotateKeyWorkflow.pause)

    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    progress = await result(handle)
    assert progress.phase == DONE
    assert (progress.total, progress.rewrapped, progress.remaining) == (40, 40, 0)
    assert len(fleet.called("rotate_key")) == 1  # no second version
    assert fleet.primary == 4
    [record] = fleet.audits("rotation.blocked")
    assert record.request.details == {"phase": REWRAPPING, "reason": "PermissionDenied: token expired"}
    assert len(fleet.audits("rotation.resumed")) == 1


async def test_the_sweep_limit_blocks_and_resume_after_the_fix_finishes(rotation: Rotation) -> None:
    fleet = rotation.fleet
    fleet.fail_always = {"blob-0005"}
    handle = await rotation.start(grace_seconds=0)
    blocked = await wait_phase(handle, BLOCKED)

    assert blocked.blocked_in == REWRAPPING
    assert blocked.blocked_reason.startswith(
        f"1 blobs of {KEY_REF} are still below version 4 after {MAX_SWEEPS} sweeps"
    )
    fleet.fail_always.clear()  # the operator repaired the blob
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    progress = await result(handle)
    assert progress.phase == DONE
    assert fleet.blobs["blob-0005"] == 4


async def test_a_refused_audit_record_blocks_instead_of_retrying_for_ever(rotation: Rotation) -> None:
    rotation.fleet.fail_audit_once = {"rewrap.counts"}
    handle = await rotation.start(grace_seconds=0)
    blocked = await wait_phase(handle, BLOCKED)
    assert blocked.blocked_in == VERIFYING
    assert blocked.blocked_reason == "ValueError: the audit log refused the record"

    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    assert (await result(handle)).phase == DONE


async def test_abort_while_blocked_before_retirement(rotation: Rotation) -> None:
    rotation.fleet.deny_batch_once = {None}
    handle = await rotation.start()
    await wait_phase(handle, BLOCKED)
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.abort), WAIT)
    progress = await result(handle)
    assert progress.phase == ABORTED
    assert rotation.fleet.retirements() == []


# --------------------------------------------------------------- status without a worker


async def test_phase_and_counts_are_kept_where_temporal_shows_them(rotation: Rotation) -> None:
    handle = await rotation.start(skip_time=False)
    await wait_phase(handle, AWAITING_COMMIT)
    description = await handle.describe()
    memo = await description.memo_value(MEMO_PROGRESS)
    assert memo["phase"] == AWAITING_COMMIT
    assert (memo["total"], memo["rewrapped"], memo["remaining"]) == (40, 40, 0)
    assert memo["commit_due"]
    attributes = description.typed_search_attributes
    assert attributes.get(KEY_REF_ATTRIBUTE) == KEY_REF
    assert attributes.get(PHASE_ATTRIBUTE) == AWAITING_COMMIT
    assert attributes.get(REMAINING_ATTRIBUTE) == 0

    query = f"RekeyKeyRef = '{KEY_REF}' AND RekeyPhase = '{AWAITING_COMMIT}' AND WorkflowId = '{handle.id}'"
    async with asyncio.timeout(WAIT):
        while not [w async for w in rotation.env.client.list_workflows(query)]:
            await asyncio.sleep(0.1)
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.approve), WAIT)
    await result(handle)
    memo = await (await handle.describe()).memo_value(MEMO_PROGRESS)
    assert memo["phase"] == DONE


# ----------------------------------------------------------------- one rotation per key


async def test_schedules_and_a_manual_start_at_once_give_one_rotation(rotation: Rotation) -> None:
    env, fleet = rotation.env, rotation.fleet
    rotation_id = f"rotate:{KEY_REF}-{uuid.uuid4()}"
    request = RotateKeyInput(
        KEY_REF,
        grace_seconds=0,
        batch_size=10,
        batches_in_flight=2,
        started_by="test",
        requested_at=datetime.now(UTC).isoformat(),
    )
    gate = fleet.hold("rotate_key")  # keep the rotation running while the others start

    async def launch(n: int) -> str:
        handle = await env.client.start_workflow(
            LaunchRotationWorkflow.run,
            LaunchRotationInput(rotation_id, request),
            id=f"launch-{n}-{uuid.uuid4()}",
            task_queue=rotation.task_queue,
        )
        return await asyncio.wait_for(handle.result(), WAIT)

    async def manual() -> str:
        handle = await env.client.start_workflow(
            RotateKeyWorkflow.run,
            request,
            id=rotation_id,
            task_queue=rotation.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        return handle.result_run_id or ""

    starts = asyncio.gather(launch(1), launch(2), manual())
    await entered(gate)
    gate.released.set()
    launched_1, launched_2, run_id = await asyncio.wait_for(starts, WAIT)
    progress = await result(env.client.get_workflow_handle_for(RotateKeyWorkflow.run, rotation_id))

    assert progress.phase == DONE
    assert fleet.primary == 4  # exactly one new version
    assert len({call.run_id for call in fleet.called("rotate_key")}) == 1
    assert fleet.called("rotate_key")[0].run_id == run_id
    outcomes = sorted([launched_1.split(" ")[0], launched_2.split(" ")[0]])
    assert outcomes in (["skipped:", "skipped:"], ["skipped:", "started"])
    assert len(fleet.audits("rotation.skipped")) == outcomes.count("skipped:")


# ------------------------------------------------------------- races and failed records


async def test_cancel_destroy_while_blocked_before_the_destroy_ends_the_rotation(rotation: Rotation) -> None:
    fleet = rotation.fleet
    handle = await rotation.start(
        skip_time=False, grace_seconds=0, destroy_after_seconds=WEEK.total_seconds()
    )
    await wait_phase(handle, AWAITING_DESTROY)
    fleet.blobs["blob-restored"] = 2
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.approve_destroy), WAIT)
    await wait_phase(handle, BLOCKED)
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.cancel_destroy), WAIT)
    progress = await result(handle)

    assert progress.phase == DONE and progress.destroy_cancelled
    assert progress.destroyed == []
    assert fleet.versions == {1: "destroyed", 2: "disabled", 3: "disabled", 4: "enabled"}
    assert len(fleet.audits("key.version.destroy_cancelled")) == 1


async def test_an_abort_the_audit_log_refuses_blocks_once_and_is_retried(rotation: Rotation) -> None:
    # The abort's own record fails: the rotation stops in BLOCKED (no loop of retries), and a
    # second abort (or a resume) completes it.
    rotation.fleet.fail_audit_once = {"rotation.aborted"}
    handle = await rotation.start(skip_time=False)
    await wait_phase(handle, AWAITING_COMMIT)
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.abort), WAIT)
    blocked = await wait_phase(handle, BLOCKED)
    assert blocked.blocked_reason.startswith("the abort could not be completed: ValueError: ")
    await asyncio.sleep(1.0)  # room for a loop that must not happen
    events = len((await handle.fetch_history()).events)
    assert events < 200, f"{events} history events: the failed abort is being retried in a loop"
    assert (await handle.query(RotateKeyWorkflow.progress)).phase == BLOCKED

    assert "the abort is tried again" in await asyncio.wait_for(
        handle.execute_update(RotateKeyWorkflow.resume), WAIT
    )
    progress = await result(handle)
    assert progress.phase == ABORTED
    assert len(rotation.fleet.audits("rotation.aborted")) == 2  # the refused one and the retry
    assert rotation.fleet.retirements() == []


async def test_a_resume_after_the_destroy_delay_never_waits_it_again(rotation: Rotation) -> None:
    fleet = rotation.fleet
    fleet.fail_phase_audit_once = {DESTROYING}
    handle = await rotation.start(
        skip_time=False, grace_seconds=0, destroy_after_seconds=WEEK.total_seconds()
    )
    await wait_phase(handle, AWAITING_DESTROY)
    assert await asyncio.wait_for(rotation.env.fast_forward(handle, WEEK + timedelta(minutes=1)), WAIT)
    blocked = await wait_phase(handle, BLOCKED)
    assert blocked.blocked_in == DESTROYING  # the delay was over: resuming must not wait again

    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    progress = await result(handle)
    assert progress.phase == DONE and progress.destroyed == [2, 3]
    [(_, disabled_at), (destroy, destroyed_at)] = fleet.retirements()
    assert destroy == "destroy"
    assert destroyed_at < disabled_at + WEEK + timedelta(hours=1)


async def test_a_failed_record_after_the_commit_never_waits_a_second_grace_period(rotation: Rotation) -> None:
    fleet = rotation.fleet
    fleet.fail_phase_audit_once = {RETIRING}  # the grace period is over; its record fails
    handle = await rotation.start(skip_time=False)
    waiting = await wait_phase(handle, AWAITING_COMMIT)
    await asyncio.wait_for(rotation.env.fast_forward(handle, GRACE + timedelta(minutes=1)), WAIT)
    blocked = await wait_phase(handle, BLOCKED)
    assert blocked.blocked_in == RETIRING
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    progress = await result(handle)  # no second 24 hours: this would time out
    assert progress.phase == DONE
    [(_, disabled_at)] = fleet.retirements()
    entered = datetime.fromisoformat(waiting.phase_started[AWAITING_COMMIT])
    assert entered + GRACE <= disabled_at < entered + GRACE + timedelta(hours=1)


async def test_approve_excludes_pause_and_abort_sent_at_the_same_time(rotation: Rotation) -> None:
    handle = await rotation.start(skip_time=False)
    await wait_phase(handle, AWAITING_COMMIT)
    answers = await asyncio.gather(
        handle.execute_update(RotateKeyWorkflow.approve),
        handle.execute_update(RotateKeyWorkflow.pause),
        handle.execute_update(RotateKeyWorkflow.abort),
        return_exceptions=True,
    )
    approved, paused, aborted = answers
    if isinstance(approved, str):  # the approve came first: the pause and the abort are refused
        assert isinstance(paused, WorkflowUpdateFailedError) and isinstance(
            aborted, WorkflowUpdateFailedError
        )
    else:  # the pause or the abort came first: the approve is refused, the abort goes ahead
        assert isinstance(aborted, str) and aborted.startswith("aborting")
    progress = await result(handle)
    assert progress.phase == (DONE if isinstance(approved, str) else ABORTED)
    assert (rotation.fleet.retirements() == []) == (progress.phase == ABORTED)


async def restored_blob_blocks_the_destroy(rotation: Rotation) -> WorkflowHandle[Any, Progress]:
    handle = await rotation.start(
        skip_time=False, grace_seconds=0, destroy_after_seconds=WEEK.total_seconds()
    )
    await wait_phase(handle, AWAITING_DESTROY)
    rotation.fleet.blobs["blob-restored"] = 2
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.approve_destroy), WAIT)
    await wait_phase(handle, BLOCKED)
    return handle


async def test_a_cancel_destroy_the_audit_log_refuses_blocks_once_and_is_retried(rotation: Rotation) -> None:
    handle = await restored_blob_blocks_the_destroy(rotation)
    rotation.fleet.fail_audit_once = {"key.version.destroy_cancelled"}
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.cancel_destroy), WAIT)
    blocked = await wait_for_progress(
        handle, lambda p: p.phase == BLOCKED and p.blocked_reason.startswith("the cancel-destroy could not")
    )
    assert blocked.blocked_in == AWAITING_DESTROY
    await asyncio.sleep(1.0)  # room for a loop that must not happen
    assert len((await handle.fetch_history()).events) < 250
    assert "the cancel-destroy is tried again" in await asyncio.wait_for(
        handle.execute_update(RotateKeyWorkflow.resume), WAIT
    )
    progress = await result(handle)
    assert (progress.phase, progress.destroy_cancelled, progress.destroyed) == (DONE, True, [])
    assert rotation.fleet.versions[2] == rotation.fleet.versions[3] == "disabled"


async def test_cancel_destroy_is_refused_once_a_resume_enabled_the_versions(rotation: Rotation) -> None:
    # The resume enables the old versions again to sweep the restored blob; its record then
    # fails. A cancel-destroy now must not end the rotation DONE with the versions enabled.
    fleet = rotation.fleet
    handle = await restored_blob_blocks_the_destroy(rotation)
    fleet.fail_audit_once = {"key.version.enabled"}
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    blocked = await wait_for_progress(handle, lambda p: p.phase == BLOCKED and p.blocked_in == REWRAPPING)
    assert blocked.disabled == []
    assert fleet.versions[2] == fleet.versions[3] == "enabled"
    assert "no destroy pending" in await refused(handle, RotateKeyWorkflow.cancel_destroy)

    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    await wait_phase(handle, AWAITING_DESTROY)
    assert fleet.versions[2] == fleet.versions[3] == "disabled"
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.approve_destroy), WAIT)
    progress = await result(handle)
    assert progress.phase == DONE and progress.destroyed == [2, 3]
    assert fleet.blobs["blob-restored"] == 4
    disabled = [c.request.details["version"] for c in fleet.audits("key.version.disabled")]
    assert disabled == [2, 3, 2, 3]  # recorded again when disabled again


async def test_a_pause_holds_through_a_block_and_its_resume(rotation: Rotation) -> None:
    fleet = rotation.fleet
    gate = fleet.hold("rewrap_batch", lambda request: request.start is None)
    fleet.deny_batch_once = {"blob-0009"}
    handle = await rotation.start(grace_seconds=0)
    await entered(gate)
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.pause), WAIT)
    gate.released.set()
    blocked = await wait_phase(handle, BLOCKED)
    assert blocked.paused
    answer = await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    assert answer.endswith("it stays paused: resume it again to go on")
    held = await wait_for_progress(handle, lambda p: p.phase == REWRAPPING)
    await asyncio.sleep(0.5)  # room for a batch that must not start
    assert held.paused and len(fleet.called("rewrap_batch")) == 2
    await asyncio.wait_for(handle.execute_update(RotateKeyWorkflow.resume), WAIT)
    assert (await result(handle)).phase == DONE


async def test_a_schedule_made_long_ago_still_starts_a_rotation(rotation: Rotation) -> None:
    # The launcher's input is bound when the schedule is made; each run dates the rotation's
    # start request anew, so the replayed-start check never refuses a scheduled rotation.
    env = rotation.env
    rotation_id = f"rotate:{KEY_REF}-{uuid.uuid4()}"
    made = (datetime.now(UTC) - timedelta(days=30)).isoformat()
    request = RotateKeyInput(KEY_REF, grace_seconds=0, batch_size=10, started_by="test", requested_at=made)
    handle = await env.client.start_workflow(
        LaunchRotationWorkflow.run,
        LaunchRotationInput(rotation_id, request),
        id=f"launch:{uuid.uuid4()}",
        task_queue=rotation.task_queue,
    )
    assert await asyncio.wait_for(handle.result(), WAIT) == f"started {rotation_id}"
    progress = await result(env.client.get_workflow_handle_for(RotateKeyWorkflow.run, rotation_id))
    assert progress.phase == DONE
