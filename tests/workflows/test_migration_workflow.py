"""MigrateGenerationWorkflow on the time-skipping server with stub activities
(tests/workflows/migration_stubs.py): waves, the health gate and its failure modes, a host whose
old agent is down, abort, approve, the grace timer, refusals at ATTESTING, continue-as-new and
the validators."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.client import WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.migration_types import HANDOFF_BATCHES_PER_CALL, migration_task_queue
from audit.format import check_details, check_event
from tests.workflows.migration_stubs import (
    NEW,
    OLD,
    WAIT,
    Migration,
    MigrationFleet,
    StubMigrationActivities,
    migrating,
    wait_for,
)
from workflows.migration import MigrateGenerationWorkflow, MigrateInput, MigrationProgress, migration_id
from workflows.migration_state import (
    AWAITING_COMMIT,
    DONE,
    HANDING_OFF,
    ROLLED_BACK,
    VERIFYING,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
GRACE = timedelta(hours=24)


@pytest_asyncio.fixture(loop_scope="session")
async def env(temporal_time_skipping_env: WorkflowEnvironment) -> AsyncIterator[WorkflowEnvironment]:
    yield temporal_time_skipping_env


def phases(fleet: MigrationFleet) -> list[str]:
    return [a.details["to"] for a in fleet.audit if a.event == "migration.phase"]


def accepted_by_the_audit_log(fleet: MigrationFleet) -> None:
    """Every record the migration audited passes the audit log's checks (a detail named like
    key material is refused there, and the migration would stop on it)."""
    for record in fleet.audit:
        check_event(record.event)
        check_details(record.details)


def events(fleet: MigrationFleet) -> list[str]:
    return [a.event for a in fleet.audit]


async def refused(handle: WorkflowHandle[Any, MigrationProgress], update: Callable[..., Any]) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as failure:
        await asyncio.wait_for(handle.execute_update(update), WAIT)
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    return cause.message


# ------------------------------------------------------------------------------- waves


async def test_migration_moves_every_host_in_waves_and_commits_after_the_grace(
    env: WorkflowEnvironment,
) -> None:
    fleet = MigrationFleet.of(hosts=4, per_host=3)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(waves=[25, 50, 100], gate_sample=2)
        result = await asyncio.wait_for(handle.result(), WAIT * 2)
    assert result.phase == DONE
    assert phases(fleet) == ["WIDENING", HANDING_OFF, VERIFYING, AWAITING_COMMIT, "NARROWING", DONE]
    assert not any(g == OLD for _, g in fleet.blobs.values())
    assert fleet.copies == {}  # deleted at NARROWING
    # Waves in host order, one gate after each, every host's batches before its wave's gate.
    waves = [a.details for a in fleet.audit if a.event == "migration.wave"]
    assert [w["hosts"] for w in waves] == [["host-00"], ["host-01"], ["host-02", "host-03"]]
    assert [w["moved"] for w in waves] == [3, 3, 6]
    order = [c.name for c in fleet.calls if c.name in ("migration_handoff", "migration_gate")]
    assert order.count("migration_gate") == 4  # three waves and VERIFYING
    assert result.moved == 12 and result.remaining == 0
    assert result.attestations == 4 + 2 * 4  # ATTESTING: one per new agent; two per batch
    assert [h.moved for h in result.hosts] == [3, 3, 3, 3]
    # The grace period is a timer: NARROWING a day after AWAITING_COMMIT began.
    narrowing = fleet.named("migration_narrow")[0].at
    entered = result.phase_started[AWAITING_COMMIT]
    assert narrowing - __import__("datetime").datetime.fromisoformat(entered) >= GRACE
    assert fleet.release == ["widen", "narrow"]
    assert "migration.diff" in events(fleet) and "migration.started" in events(fleet)
    accepted_by_the_audit_log(fleet)


async def test_attestation_nonces_are_fresh_per_agent_and_run(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=3, per_host=1)
    async with migrating(env, fleet) as migration:
        first = await migration.start(grace_seconds=0)
        await asyncio.wait_for(first.result(), WAIT)
        second = await migration.start(grace_seconds=0)
        await asyncio.wait_for(second.result(), WAIT)
    nonces = [n.nonce_hex for c in fleet.named("migration_attest") for n in c.request.agents]
    assert len(nonces) == 6 and len(set(nonces)) == 6
    assert all(len(n) == 64 for n in nonces)


# ------------------------------------------------------------------------------ refusals


async def test_a_refusal_at_attesting_changes_nothing(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    fleet.attest_reasons = ["app-v2@host-00: debug enclave not allowed", "app-v2@host-01: svn 0 is below 1"]
    async with migrating(env, fleet) as migration:
        handle = await migration.start()
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == ROLLED_BACK and result.refused
    assert result.reasons == fleet.attest_reasons
    assert not fleet.named("migration_handoff") and not fleet.named("migration_release")
    assert all(g == OLD for _, g in fleet.blobs.values())
    assert "migration.refused" in events(fleet)


async def test_a_fleet_problem_refuses_before_any_attestation(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=1)
    fleet.fleet_reasons = ["host host-01 holds 1 blobs of app-v1 but runs no agent of app-v2"]
    async with migrating(env, fleet) as migration:
        result = await asyncio.wait_for((await migration.start()).result(), WAIT)
    assert result.refused and result.reasons == fleet.fleet_reasons
    assert not fleet.named("migration_attest")


async def test_bad_input_fails_before_any_activity(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=1, per_host=1)
    async with migrating(env, fleet) as migration:
        for options in (
            {"waves": [50, 10, 100]},
            {"waves": [10, 50]},
            {"on_failure": "retry"},
            {"grace_seconds": -1},
            {"jitter_seconds": -1},
            {"jitter_seconds": 601},
            {"to_generation": f"app:{uuid.uuid4().hex[:8]}"},  # migrate:<from>:<to> ambiguous
        ):
            handle = await migration.start(**options)
            with pytest.raises(WorkflowFailureError):
                await asyncio.wait_for(handle.result(), WAIT)
    assert fleet.calls == []


# ---------------------------------------------------------------------- failures in a wave


async def test_a_failed_gate_rolls_every_wave_back(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=3, per_host=2)
    fleet.gate_fails = {"host-01"}
    async with migrating(env, fleet) as migration:
        result = await asyncio.wait_for((await migration.start(waves=[33, 66, 100])).result(), WAIT)
    assert result.phase == ROLLED_BACK and not result.refused
    assert all(g == OLD for _, g in fleet.blobs.values()) and fleet.copies == {}
    rollbacks = [c.request.host_ids for c in fleet.named("migration_rollback")]
    assert rollbacks == [["host-01"], ["host-00"]]  # the failed wave first, then the one before
    assert not [c for c in fleet.named("migration_handoff") if c.request.host_id == "host-02"]
    assert any("health gate" in r and "host-01" in r for r in result.reasons)
    assert fleet.release == ["widen", "restore"]
    accepted_by_the_audit_log(fleet)


async def test_a_failed_gate_pauses_with_on_failure_pause_and_resume_goes_on(
    env: WorkflowEnvironment,
) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    fleet.gate_fails = {"host-00"}
    async with migrating(env, fleet) as migration:
        handle = await migration.start(on_failure="pause", grace_seconds=0)
        progress = await wait_for(handle, lambda p: p.paused)
        assert progress.phase == HANDING_OFF and progress.wave == 1
        assert not fleet.named("migration_rollback")
        fleet.gate_fails.clear()  # the operator fixed the new agent
        await handle.execute_update(MigrateGenerationWorkflow.resume)
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == DONE
    assert not any(g == OLD for _, g in fleet.blobs.values())


async def test_a_new_agent_dead_at_the_gate_rolls_back(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    fleet.gate_dead = {"host-01"}
    async with migrating(env, fleet) as migration:
        result = await asyncio.wait_for((await migration.start()).result(), WAIT)
    assert result.phase == ROLLED_BACK and not result.held
    assert all(g == OLD for _, g in fleet.blobs.values()) and fleet.copies == {}
    assert any("health gate" in r and "host-01" in r and "NewAgentFailed" in r for r in result.reasons)


async def test_a_new_agent_failing_mid_wave_rolls_back(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    fleet.new_fails = {"host-01"}
    async with migrating(env, fleet) as migration:
        result = await asyncio.wait_for((await migration.start()).result(), WAIT)
    assert result.phase == ROLLED_BACK
    assert all(g == OLD for _, g in fleet.blobs.values())
    assert any("host-01" in r and "NewAgentFailed" in r for r in result.reasons)


async def test_an_unreachable_old_agent_stops_before_its_host_and_resumes(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    fleet.old_down = {"host-01"}
    async with migrating(env, fleet) as migration:
        handle = await migration.start(grace_seconds=0)
        progress = await wait_for(handle, lambda p: bool(p.held))
        assert "host-01" in progress.held and progress.phase == HANDING_OFF
        assert fleet.on("host-01", OLD) == ["host-01-b000", "host-01-b001"]
        # The held state is queryable before its audit record's activity has run: wait for it.
        for _ in range(200):
            if "migration.held" in events(fleet):
                break
            await asyncio.sleep(0.05)
        assert "migration.held" in events(fleet)
        fleet.old_down.clear()
        await handle.execute_update(MigrateGenerationWorkflow.resume)
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == DONE and result.moved == 4


async def test_a_blob_rewritten_meanwhile_is_counted_as_a_conflict(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=1, per_host=3)
    fleet.rewrite_once = {"host-00-b001"}
    async with migrating(env, fleet) as migration:
        result = await asyncio.wait_for((await migration.start(grace_seconds=0)).result(), WAIT)
    assert result.phase == DONE and result.conflicts == 1 and result.moved == 3


async def test_blobs_left_on_the_old_generation_are_swept_again(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    fleet.late = [("host-01-late", "host-01")]
    async with migrating(env, fleet) as migration:
        result = await asyncio.wait_for((await migration.start(grace_seconds=0)).result(), WAIT)
    assert result.phase == DONE
    assert fleet.blobs["host-01-late"][1] != OLD
    sweeps = [a.details for a in fleet.audit if a.event == "migration.sweep"]
    assert sweeps == [{"sweep": 1, "remaining": 1, "kms_remaining": 0}]
    assert [c.request.host_id for c in fleet.named("migration_handoff")][-1] == "host-01"
    assert result.moved == 5 and result.remaining == 0


# --------------------------------------------------------------------------- operators


async def test_abort_before_narrowing_ends_rolled_back(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    async with migrating(env, fleet) as migration:
        handle = await migration.start()
        await wait_for(handle, lambda p: p.phase == AWAITING_COMMIT)
        assert "abort" in await handle.execute_update(MigrateGenerationWorkflow.abort)
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == ROLLED_BACK
    assert all(g == OLD for _, g in fleet.blobs.values()) and fleet.copies == {}
    assert not fleet.named("migration_narrow")


async def test_abort_mid_hand_off_rolls_back_what_moved(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=4)
    fleet.hold = asyncio.Event()
    async with migrating(env, fleet) as migration:
        handle = await migration.start(batch_size=1)
        await wait_for(handle, lambda p: p.phase == HANDING_OFF)
        await handle.execute_update(MigrateGenerationWorkflow.abort)
        assert "abort" in await refused(handle, MigrateGenerationWorkflow.abort)
        fleet.hold.set()
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == ROLLED_BACK
    assert all(g == OLD for _, g in fleet.blobs.values())


async def test_approve_ends_the_grace_early_and_is_refused_elsewhere(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=1, per_host=1)
    fleet.hold = asyncio.Event()
    async with migrating(env, fleet) as migration:
        handle = await migration.start(grace_seconds=10 * 365 * 24 * 3600)
        await wait_for(handle, lambda p: p.phase == HANDING_OFF)
        assert "approve commits only in AWAITING_COMMIT" in await refused(
            handle, MigrateGenerationWorkflow.approve
        )
        assert "not paused" in await refused(handle, MigrateGenerationWorkflow.resume)
        fleet.hold.set()
        progress = await wait_for(handle, lambda p: p.phase == AWAITING_COMMIT)
        assert progress.commit_due
        await handle.execute_update(MigrateGenerationWorkflow.approve)
        result = await asyncio.wait_for(handle.result(), WAIT)
        assert result.phase == DONE


async def test_blobs_written_through_the_old_generation_in_the_grace_are_swept_before_narrowing(
    env: WorkflowEnvironment,
) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(grace_seconds=10 * 365 * 24 * 3600)
        await wait_for(handle, lambda p: p.phase == AWAITING_COMMIT)
        fleet.blobs["host-01-late"] = ("host-01", OLD)  # a workload wrote through its old agent
        fleet.blobs["host-00-b000"] = ("host-00", OLD)  # and rewrote a handed-off item so
        await handle.execute_update(MigrateGenerationWorkflow.approve)
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == DONE
    assert not any(g == OLD for _, g in fleet.blobs.values())
    assert phases(fleet)[-4:] == [AWAITING_COMMIT, VERIFYING, "NARROWING", DONE]
    swept = [c.request.host_id for c in fleet.named("migration_handoff")][-2:]
    assert sorted(swept) == ["host-00", "host-01"]


async def test_a_pause_holds_the_commit_after_the_grace(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=1, per_host=1)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(skip_time=False)
        await wait_for(handle, lambda p: p.phase == AWAITING_COMMIT)
        await handle.execute_update(MigrateGenerationWorkflow.pause)
        assert "paused already" in await refused(handle, MigrateGenerationWorkflow.pause)
        assert "resume it first" in await refused(handle, MigrateGenerationWorkflow.approve)
        assert await asyncio.wait_for(env.fast_forward(handle, GRACE + timedelta(hours=1)), WAIT)
        progress = await handle.query(MigrateGenerationWorkflow.progress)
        assert progress.phase == AWAITING_COMMIT
        await handle.execute_update(MigrateGenerationWorkflow.resume)
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == DONE


async def test_the_memo_carries_the_progress(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=1)
    async with migrating(env, fleet) as migration:
        handle = await migration.start()
        await wait_for(handle, lambda p: p.phase == AWAITING_COMMIT)
        memo = await (await handle.describe()).memo_value("progress")
        assert memo["phase"] == AWAITING_COMMIT and memo["moved"] == 2 and len(memo["hosts"]) == 2
        await handle.execute_update(MigrateGenerationWorkflow.approve)
        await asyncio.wait_for(handle.result(), WAIT)


async def test_a_long_hand_off_continues_as_new_with_its_state(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=60)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(batch_size=1, grace_seconds=0, waves=[100])
        result = await asyncio.wait_for(handle.result(), WAIT * 4)
    assert result.phase == DONE and result.moved == 120 and result.remaining == 0
    runs = {c.run_id for c in fleet.named("migration_handoff")}
    assert len(runs) > 1
    assert [a.event for a in fleet.audit].count("migration.started") == 1
    assert not any(g == OLD for _, g in fleet.blobs.values())


async def test_a_recorded_start_input_is_refused(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=1, per_host=1)
    async with migrating(env, fleet) as migration:
        from workflows.migration import MigrateInput, migration_id

        request = MigrateInput(OLD, "app-v9", requested_at="2020-01-01T00:00:00+00:00")
        handle = await env.client.start_workflow(
            MigrateGenerationWorkflow.run,
            request,
            id=migration_id(OLD, "app-v9"),
            task_queue=migration.task_queue,
        )
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), WAIT)
    assert fleet.calls == []


_ = Migration


# ----------------------------------------------------------------------- KMS-wrapped


def with_kms(fleet: MigrationFleet, per_host: int) -> MigrationFleet:
    for host in fleet.hosts:
        for n in range(per_host):
            fleet.kms[f"{host}/k{n:03d}"] = (host, OLD)
    return fleet


async def test_kms_wrapped_blobs_move_with_their_hosts_wave_after_its_hardware_sealed_ones(
    env: WorkflowEnvironment,
) -> None:
    fleet = with_kms(MigrationFleet.of(hosts=3, per_host=2), per_host=3)
    async with migrating(env, fleet) as migration:
        result = await asyncio.wait_for((await migration.start(grace_seconds=0, batch_size=2)).result(), WAIT)
    assert result.phase == DONE
    assert not any(g == OLD for _, g in fleet.kms.values())
    assert result.kms_blobs == 9
    per_host = {h.host_id: (h.moved, h.kms_moved) for h in result.hosts}
    assert per_host == {h: (2, 3) for h in fleet.hosts}
    # Per host: every hand-off of its hardware-sealed blobs before its first re-binding.
    for host in fleet.hosts:
        steps = [c.name for c in fleet.calls if getattr(c.request, "host_id", None) == host]
        moves = [n for n in steps if n in ("migration_handoff", "migration_rebind")]
        assert moves.index("migration_rebind") > max(
            i for i, n in enumerate(moves) if n == "migration_handoff"
        )
    # A re-binding call, like a hand-off call, moves several batches (fewer rounds of a wave).
    calls = fleet.named("migration_rebind") + fleet.named("migration_handoff")
    assert {c.request.batches for c in calls} == {HANDOFF_BATCHES_PER_CALL}
    assert fleet.release == ["widen", "narrow"]
    accepted_by_the_audit_log(fleet)


async def test_a_failed_wave_rolls_back_the_kms_wrapped_blobs_too(env: WorkflowEnvironment) -> None:
    fleet = with_kms(MigrationFleet.of(hosts=2, per_host=1), per_host=2)
    fleet.gate_fails = {"host-01"}
    async with migrating(env, fleet) as migration:
        result = await asyncio.wait_for((await migration.start(waves=[50, 100])).result(), WAIT)
    assert result.phase == ROLLED_BACK
    assert all(g == OLD for _, g in fleet.kms.values()) and fleet.copies == {}
    assert fleet.release == ["widen", "restore"]


async def test_kms_wrapped_blobs_written_by_the_old_generation_in_the_grace_are_swept(
    env: WorkflowEnvironment,
) -> None:
    fleet = with_kms(MigrationFleet.of(hosts=2, per_host=1), per_host=1)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(grace_seconds=10 * 365 * 24 * 3600)
        await wait_for(handle, lambda p: p.phase == AWAITING_COMMIT)
        fleet.kms["host-01/late"] = ("host-01", OLD)  # sealed under the key for the old generation
        await handle.execute_update(MigrateGenerationWorkflow.approve)
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == DONE
    assert fleet.kms["host-01/late"][1] != OLD
    assert phases(fleet)[-4:] == [AWAITING_COMMIT, VERIFYING, "NARROWING", DONE]


# ------------------------------------------------------------------------ rolling upgrade


async def test_a_worker_without_migration_activities_on_the_queue_neither_fails_nor_holds_it(
    env: WorkflowEnvironment,
) -> None:
    """In a rolling upgrade an older worker polls the workflow's task queue without the
    migration's activities (it would answer NotFoundError and spend their retries): they wait
    on the migration queue until an upgraded worker takes them, and the migration goes on."""
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    task_queue, target = f"migration-{uuid.uuid4()}", f"{NEW}-{uuid.uuid4().hex[:8]}"

    @activity.defn(name="rotate_key")
    async def rotate_key() -> None:  # what the older worker has: it polls activity tasks too
        raise AssertionError("not called")

    old_worker = Worker(
        env.client, task_queue=task_queue, workflows=[MigrateGenerationWorkflow], activities=[rotate_key]
    )
    async with old_worker:
        handle = await env.client.start_workflow(
            MigrateGenerationWorkflow.run,
            MigrateInput(OLD, target, requested_at=datetime.now(UTC).isoformat(), grace_seconds=0),
            id=migration_id(OLD, target),
            task_queue=task_queue,
        )
        waiting = await wait_for(handle, lambda p: bool(p.started_at))
        pending = (await handle.describe()).raw_description.pending_activities
        assert [a.activity_type.name for a in pending] == ["audit"] and pending[0].attempt == 1
        assert not waiting.held and waiting.phase == "ATTESTING"
        async with Worker(
            env.client,
            task_queue=migration_task_queue(task_queue),
            activities=StubMigrationActivities(fleet).all(),
        ):
            result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == DONE and not result.held and not result.reasons
    assert not any(g == OLD for _, g in fleet.blobs.values())


async def test_retries_that_run_out_hold_the_migration_instead_of_rolling_it_back(
    env: WorkflowEnvironment,
) -> None:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    fleet.store_down = {"host-01"}
    async with migrating(env, fleet) as migration:
        handle = await migration.start(grace_seconds=0, waves=[100])
        progress = await wait_for(handle, lambda p: bool(p.held))
        assert "host-01" in progress.held and "StoreUnavailable" in progress.held
        assert not fleet.named("migration_rollback")
        assert all(g != OLD for h, g in fleet.blobs.values() if h == "host-00")  # what moved stays moved
        fleet.store_down.clear()  # the store is back
        await handle.execute_update(MigrateGenerationWorkflow.resume)
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == DONE
    assert not any(g == OLD for _, g in fleet.blobs.values())


async def test_a_key_without_a_release_policy_met_mid_wave_holds_and_resumes(
    env: WorkflowEnvironment,
) -> None:
    fleet = with_kms(MigrationFleet.of(hosts=2, per_host=1), per_host=2)
    fleet.unset_policy = {"host-01"}
    async with migrating(env, fleet) as migration:
        handle = await migration.start(grace_seconds=0)
        progress = await wait_for(handle, lambda p: bool(p.held))
        assert progress.phase == HANDING_OFF and "vault:late" in progress.held
        assert "no release policy" in progress.held and "release policy is set" in progress.held
        assert fleet.release == ["widen"] and not fleet.named("migration_rollback")  # held, not rolled back
        fleet.unset_policy.clear()  # an operator ran rekey key release-policy set
        await handle.execute_update(MigrateGenerationWorkflow.resume)
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == DONE and not any(g == OLD for _, g in fleet.kms.values())


async def test_the_generation_claims_are_released_when_the_migration_ends(env: WorkflowEnvironment) -> None:
    fleet = MigrationFleet.of(hosts=1, per_host=1)
    async with migrating(env, fleet) as migration:
        done = await asyncio.wait_for((await migration.start(grace_seconds=0)).result(), WAIT)
        assert done.phase == DONE
        [claims] = fleet.named("migration_release_claims")
        assert claims.request.migration_id == f"migrate:{OLD}:{done.to_generation}"
        assert fleet.named("audit")[-2].request.details["to"] == DONE  # released before DONE
        fleet.calls.clear()
        fleet.fleet_reasons = ["MigrationClaimed: generation app-v1 is in migration migrate:app-v1:x"]
        refused_ = await asyncio.wait_for((await migration.start()).result(), WAIT)
    assert refused_.phase == ROLLED_BACK and refused_.refused
    assert len(fleet.named("migration_release_claims")) == 1
