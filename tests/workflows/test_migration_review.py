"""Faults found by review of MigrateGenerationWorkflow, on the time-skipping server with the stub
activities of tests/workflows/migration_stubs.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from tests.workflows.migration_stubs import OLD, WAIT, MigrationFleet, migrating, wait_for
from workflows.migration import MigrateGenerationWorkflow
from workflows.migration_state import ROLLED_BACK

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def env(temporal_time_skipping_env: WorkflowEnvironment) -> AsyncIterator[WorkflowEnvironment]:
    yield temporal_time_skipping_env


async def test_a_rollback_that_fails_is_finished_on_resume_not_forgotten(env: WorkflowEnvironment) -> None:
    """A failed gate rolls back; the rollback activity fails and holds the migration; resume
    must finish the rollback, not go on handing off to the generation whose gate failed."""
    fleet = MigrationFleet.of(hosts=3, per_host=2)
    fleet.gate_fails = {"host-01"}
    fleet.rollback_fails = 1
    async with migrating(env, fleet) as migration:
        handle = await migration.start(waves=[33, 66, 100], grace_seconds=0)
        progress = await wait_for(handle, lambda p: bool(p.held))
        assert "StoreUnavailable" in progress.held
        fleet.gate_fails.clear()  # the new agent answers again: the gate's verdict still stands
        await handle.execute_update(MigrateGenerationWorkflow.resume)
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.phase == ROLLED_BACK
    assert all(g == OLD for _, g in fleet.blobs.values()) and fleet.copies == {}
    assert not [c for c in fleet.named("migration_handoff") if c.request.host_id == "host-02"]
    assert fleet.release[-1] == "restore"
