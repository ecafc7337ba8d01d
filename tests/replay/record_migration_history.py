"""Record the MigrateGenerationWorkflow histories the replay test replays
(``tests/replay/test_migration_replay.py``): one per scenario, in ``histories/migration/``.

Run: ``python -m tests.replay.record_migration_history`` (about 20 s).

Runs the workflow on a Temporal dev server with time skipping (so grace timers fire at once;
its continue-as-new suggestion lowered as in the tests) and the stub activities of
``tests/workflows/migration_stubs.py`` under the real names: a history records the workflow's
commands and the activities' results, and the stubs answer what the real activities would (ids,
cursors and counts). The default data converter and no codec: a checked-in history must be
readable without a key (every file is checked for ciphertexts and tokens before it is written).

Scenarios: ``done`` (three waves, hardware-sealed and KMS-wrapped blobs, a blob written late
that VERIFYING sweeps, a grace timer), ``rolled_back`` (a failed gate), ``paused_resumed`` (a
failed gate with ``on_failure="pause"``, then ``resume``), ``held_resumed`` (an old agent down,
then ``resume``) and ``continued_as_new`` (a long hand-off: the first run and its successor).

When the workflow changes: a change to the commands it issues (an activity added, removed or
reordered, a timer, a different task queue...) fails ``test_migration_replay`` on these files.
Once the workflow has been released, guard such a change with ``workflow.patched`` (the rotation
does: docs/workflow-versioning.md) so that the old histories still replay, then run this
script again: it writes the new histories beside the old ones under new names only if you give
them one (``--suffix pre-<change>`` renames the existing files first, and keep those until no
running migration predates the change); without ``--suffix`` it overwrites them, which is right
only for a workflow no one runs yet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from rekey.devstack.temporal import search_attribute_flags
from tests.fixtures.temporal import SUGGEST_CONTINUE_AS_NEW, TEMPORAL_CLI
from tests.replay import corpus
from tests.workflows.migration_stubs import OLD, MigrationFleet, migrating, wait_for
from workflows.migration import MigrateGenerationWorkflow, MigrationProgress

WAIT = 60.0

Handle = WorkflowHandle[Any, MigrationProgress]


def with_kms(fleet: MigrationFleet, per_host: int) -> MigrationFleet:
    for host in fleet.hosts:
        for n in range(per_host):
            fleet.kms[f"{host}/k{n:03d}"] = (host, OLD)
    return fleet


async def done(env: WorkflowEnvironment) -> list[Handle]:
    fleet = with_kms(MigrationFleet.of(hosts=4, per_host=3), per_host=2)
    fleet.late = [("host-01-late", "host-01")]
    async with migrating(env, fleet) as migration:
        handle = await migration.start(waves=[25, 50, 100], gate_sample=2, grace_seconds=3600)
        await asyncio.wait_for(handle.result(), WAIT)
    return [handle]


async def rolled_back(env: WorkflowEnvironment) -> list[Handle]:
    fleet = with_kms(MigrationFleet.of(hosts=3, per_host=2), per_host=1)
    fleet.gate_fails = {"host-01"}
    async with migrating(env, fleet) as migration:
        handle = await migration.start(waves=[33, 66, 100])
        await asyncio.wait_for(handle.result(), WAIT)
    return [handle]


async def paused_resumed(env: WorkflowEnvironment) -> list[Handle]:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    fleet.gate_fails = {"host-00"}
    async with migrating(env, fleet) as migration:
        handle = await migration.start(on_failure="pause", grace_seconds=0)
        await wait_for(handle, lambda p: p.paused)
        fleet.gate_fails.clear()
        await handle.execute_update(MigrateGenerationWorkflow.resume)
        await asyncio.wait_for(handle.result(), WAIT)
    return [handle]


async def held_resumed(env: WorkflowEnvironment) -> list[Handle]:
    fleet = MigrationFleet.of(hosts=2, per_host=2)
    fleet.old_down = {"host-01"}
    async with migrating(env, fleet) as migration:
        handle = await migration.start(grace_seconds=0)
        await wait_for(handle, lambda p: bool(p.held))
        while "migration.held" not in [a.event for a in fleet.audit]:
            await asyncio.sleep(0.05)
        fleet.old_down.clear()
        await handle.execute_update(MigrateGenerationWorkflow.resume)
        await asyncio.wait_for(handle.result(), WAIT)
    return [handle]


async def continued_as_new(env: WorkflowEnvironment) -> list[Handle]:
    fleet = MigrationFleet.of(hosts=2, per_host=60)
    async with migrating(env, fleet) as migration:
        handle = await migration.start(batch_size=1, grace_seconds=0, waves=[100])
        await asyncio.wait_for(handle.result(), WAIT * 2)
    return [handle]


SCENARIOS: dict[str, Callable[[WorkflowEnvironment], Awaitable[list[Handle]]]] = {
    "done": done,
    "rolled_back": rolled_back,
    "paused_resumed": paused_resumed,
    "held_resumed": held_resumed,
    "continued_as_new": continued_as_new,
}


def names(scenario: str, count: int) -> list[str]:
    if count == 1:
        return [f"{scenario}.json"]
    return [f"{scenario}_first_run.json", *(f"{scenario}_successor_{n}.json" for n in range(1, count))]


async def runs(env: WorkflowEnvironment, handle: Handle) -> list[tuple[str, dict[str, Any]]]:
    """Every run of ``handle``'s workflow from its first, each as (run id, history)."""
    run_id = handle.first_execution_run_id or handle.run_id
    found = []
    while run_id:
        history = await env.client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        doc = json.loads(history.to_json())
        found.append((run_id, doc))
        last = doc["events"][-1].get("workflowExecutionContinuedAsNewEventAttributes") or {}
        run_id = last.get("newExecutionRunId")
    return found


async def record(out: Path, suffix: str | None) -> None:
    env = await WorkflowEnvironment.start_time_skipping_v2(
        dev_server_existing_path=TEMPORAL_CLI,
        dev_server_extra_args=[
            *search_attribute_flags(),
            "--dynamic-config-value",
            "frontend.WorkflowTimeSkippingEnabled=true",
            "--dynamic-config-value",
            f"limit.historyCount.suggestContinueAsNew={SUGGEST_CONTINUE_AS_NEW}",
        ],
    )
    entries = corpus.index(out / corpus.INDEX.name)
    if suffix:  # the current files stay, under their new names, for the histories recorded now
        for name in list(entries):
            renamed = name.replace(".json", f"-{suffix}.json")
            (out / name).rename(out / renamed)
            entry = entries.pop(name)
            entries[renamed] = corpus.Entry(renamed, entry.workflow_id, entry.stops_in, entry.refused)
    try:
        for scenario, run in SCENARIOS.items():
            (handle,) = await run(env)
            recorded = await runs(env, handle)
            if (scenario == "continued_as_new") != (len(recorded) > 1):
                raise SystemExit(
                    f"{scenario}: {len(recorded)} runs (continue-as-new only in continued_as_new)"
                )
            for name, (_run, doc) in zip(names(scenario, len(recorded)), recorded, strict=True):
                found = corpus.secrets_in(doc)
                if found:
                    raise SystemExit(f"{name}: the history holds {found}; not written")
                seen = corpus.phases(doc)
                (out / name).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
                entries[name] = corpus.Entry(name, handle.id, seen[-1] if seen else "", [])
                print(f"{name}: {len(doc['events'])} events, {' -> '.join(seen)}")
    finally:
        await env.shutdown()
    corpus.write_index(list(entries.values()), out / corpus.INDEX.name, recorder=Path(__file__).stem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=corpus.MIGRATION_HISTORIES)
    parser.add_argument("--suffix", help="keep the current histories, renamed <name>-<suffix>.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(record(args.out, args.suffix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
