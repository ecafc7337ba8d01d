"""`rekey.client.migrations.release_claim` against the Temporal dev server: the claims of a
running migration are never released (its rollback does that); once its workflow was
terminated, they are, and a migration of its generations can start again."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from rekey.client.errors import MigrationOverlaps
from rekey.client.migrations import release_claim, start_migration
from sealing.store import SealedStateStore

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def test_a_terminated_migrations_claims_are_released_only_once_it_stopped(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    old, new = f"claim-{tag}-v1", f"claim-{tag}-v2"
    queue = f"no-worker-{tag}"  # nobody runs it: it stays open, as a stuck migration would
    migration = await start_migration(temporal_env.client, old, new, grace=0, task_queue=queue)
    with SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}", create=True) as store:
        assert store.claim_generations(migration.id, "run-1", [old, new]) == []  # as ATTESTING does
        with pytest.raises(MigrationOverlaps, match=f"{migration.id} is still running"):
            await release_claim(temporal_env.client, store, migration.id)
        assert len(store.migration_claims()) == 2
        await temporal_env.client.get_workflow_handle(migration.id).terminate("an operator")
        released = await release_claim(temporal_env.client, store, migration.id)
        assert sorted(c.generation for c in released) == [old, new] and store.migration_claims() == []
        assert store.claim_generations(f"migrate:{new}:x", "run-2", [new, "x"]) == []
