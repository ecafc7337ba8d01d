"""``rekey generation register NEW --supersedes OLD --auto-migrate`` against the real Temporal dev
server: the registration starts ``migrate:<OLD>:<NEW>``, and a second one (or two starts at once)
attaches to it instead of starting another. No worker polls the task queue, so the migration
stays running; the test terminates it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path

import pytest
import yaml
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from rekey.client.errors import MigrationOverlaps
from rekey.client.migrations import start_migration
from tests.fixtures.cli import MANIFEST, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def test_auto_migrate_starts_the_migration_once(
    temporal_env: WorkflowEnvironment,
    temporal_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The session's home: its codec keys are the ones temporal_env's client decodes with.
    monkeypatch.setenv("REKEY_HOME", str(temporal_home))
    monkeypatch.setenv("REKEY_STORE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    monkeypatch.setenv("REKEY_TEMPORAL_ADDRESS", temporal_env.client.service_client.config.target_host)
    tag = uuid.uuid4().hex[:8]
    old, new = f"auto-{tag}-v1", f"auto-{tag}-v2"
    for generation, svn in ((old, 2), (new, 3)):
        path = tmp_path / f"{generation}.yaml"
        path.write_text(
            yaml.safe_dump(MANIFEST | {"id": generation, "svn": svn, "measurement": f"{svn:02x}" * 32})
        )
    workflow_id = f"migrate:{old}:{new}"

    async def rekey(*args: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(run_cli, capsys, *args)

    register_new = ("generation", "register", str(tmp_path / f"{new}.yaml"), "--supersedes", old)
    handles = [temporal_env.client.get_workflow_handle(workflow_id)]
    try:
        assert (await rekey("generation", "register", str(tmp_path / f"{old}.yaml")))[0] == 0
        code, out, err = await rekey(
            *register_new, "--auto-migrate", "--grace", "0s", "--jitter", "0s", "--json"
        )
        assert code == 0, err
        answer = json.loads(out)
        assert answer["created"] is True and answer["supersedes"] == old
        assert answer["migration"] == {"id": workflow_id, "started": True}
        first = await handles[0].describe()
        assert first.status == WorkflowExecutionStatus.RUNNING

        # Registering again (idempotent) with --auto-migrate attaches to the running migration.
        code, out, err = await rekey(*register_new, "--auto-migrate")
        assert code == 0, err
        assert f"already registered: generation {new}" in out
        assert f"attached to the running {workflow_id}" in out
        again = await handles[0].describe()
        assert again.run_id == first.run_id and again.status == WorkflowExecutionStatus.RUNNING
        code, out, _ = await rekey("generation", "show", new, "--json")
        assert json.loads(out)["supersedes"] == old

        # The next patch cannot start while this migration is open (it would share its generation).
        with pytest.raises(MigrationOverlaps, match=f"{workflow_id} involves {new}"):
            await start_migration(temporal_env.client, new, f"auto-{tag}-v3", grace=0)

        # Two starts at once (two registrations racing): one workflow, one of them started it.
        source, target = f"auto-{tag}-w1", f"auto-{tag}-w2"
        racing = await asyncio.gather(
            *(start_migration(temporal_env.client, source, target, grace=0) for _ in range(2))
        )
        handles.append(temporal_env.client.get_workflow_handle(racing[0].id))
        assert sorted(m.started for m in racing) == [False, True]
        runs = {(await temporal_env.client.get_workflow_handle(m.id).describe()).run_id for m in racing}
        assert len(runs) == 1
    finally:
        for handle in handles:
            with contextlib.suppress(RPCError):  # never started: an assertion before it failed
                await handle.terminate("test over")
