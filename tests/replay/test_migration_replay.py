"""Replay every checked-in MigrateGenerationWorkflow history (tests/replay/histories/migration/,
recorded by ``python -m tests.replay.record_migration_history``) against the current workflow
code: a change to the commands the workflow issues fails here, so a change to a released
workflow goes behind ``workflow.patched`` (docs/workflow-versioning.md)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.replay import corpus
from workflows.migration import PHASES, MigrateGenerationWorkflow

INDEX = corpus.MIGRATION_HISTORIES / corpus.INDEX.name
FILES = sorted(corpus.MIGRATION_HISTORIES.glob("*.json"))


def _history(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(corpus.index(INDEX)[path.name].workflow_id, path.read_text())


def _scheduled(doc: dict, name: str) -> int:
    return sum(
        1
        for e in corpus.events(doc)
        if e.get("activityTaskScheduledEventAttributes", {}).get("activityType", {}).get("name") == name
    )


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
async def test_migration_history_replays(path: Path) -> None:
    history = _history(path)
    assert history.events
    result = await Replayer(workflows=[MigrateGenerationWorkflow]).replay_workflow(
        history, raise_on_replay_failure=True
    )
    assert result.replay_failure is None


def test_the_corpus_covers_every_phase_and_the_moves() -> None:
    docs = [corpus.load(path) for path in FILES]
    passed = {phase for doc in docs for phase in corpus.phases(doc)}
    assert passed == set(PHASES), f"missing {sorted(set(PHASES) - passed)}"
    kinds = set().union(*(corpus.event_types(doc) for doc in docs))
    for kind in (
        corpus.TIMER_STARTED,
        corpus.UPDATE_ACCEPTED,
        corpus.CONTINUED_AS_NEW,
        corpus.ACTIVITY_FAILED,
    ):
        assert kind in kinds, kind
    for name in ("migration_handoff", "migration_rebind", "migration_gate", "migration_rollback"):
        assert any(_scheduled(doc, name) for doc in docs), f"no history schedules {name}"
    audits = [text for doc in docs for text in corpus.payload_texts(doc)]
    for event in ("migration.sweep", "migration.paused", "migration.held", "migration.rollback"):
        assert any(f'"{event}"' in text for text in audits), f"no history audits {event}"
    assert {entry.stops_in for entry in corpus.index(INDEX).values()} >= {"DONE", "ROLLED_BACK"}


def test_the_index_matches_the_histories() -> None:
    entries = corpus.index(INDEX)
    assert {path.name for path in FILES} == set(entries)
    for path in FILES:
        seen = corpus.phases(corpus.load(path))
        assert entries[path.name].stops_in == (seen[-1] if seen else "")


def test_migration_histories_hold_no_key_material() -> None:
    for path in FILES:
        assert corpus.secrets_in(corpus.load(path)) == [], path.name


async def test_a_changed_workflow_fails_the_replay() -> None:
    """The replay can fail: a history whose first activity is another one than the code's."""
    doc = copy.deepcopy(corpus.load(corpus.MIGRATION_HISTORIES / "done.json"))
    scheduled = [
        e["activityTaskScheduledEventAttributes"]
        for e in doc["events"]
        if "activityTaskScheduledEventAttributes" in e
    ]
    fleet = next(a for a in scheduled if a["activityType"]["name"] == "migration_fleet")
    fleet["activityType"]["name"] = "migration_plan"
    history = WorkflowHistory.from_json(corpus.index(INDEX)["done.json"].workflow_id, json.dumps(doc))
    with pytest.raises(workflow.NondeterminismError, match="TMPRL1100"):
        await Replayer(workflows=[MigrateGenerationWorkflow]).replay_workflow(
            history, raise_on_replay_failure=True
        )
