"""Replay every checked-in workflow history against the current workflow code: a change that
would break running rotations or launches (non-determinism, TMPRL1100) fails here.

The corpus (recorded by ``python -m tests.replay.record_rotation_history``) stops in every
phase a rotation can wait in, and passes through every other one; the coverage test keeps it
that way. ``rotation_done.json`` predates PATCH_SAFETY: it proves the patch keeps old
histories replaying. docs/workflow-versioning.md has the release procedure.
"""

from __future__ import annotations

import base64
import copy
import json
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.replay import corpus
from workflows.launcher import LaunchRotationWorkflow
from workflows.rotation import RotateKeyWorkflow
from workflows.rotation_state import PHASES, RotateKeyInput

FILES = corpus.history_files()
WORKFLOWS = [RotateKeyWorkflow, LaunchRotationWorkflow]
EVENT_KINDS = {
    corpus.TIMER_STARTED: "a timer started",
    corpus.UPDATE_ACCEPTED: "an update accepted",
    corpus.CONTINUED_AS_NEW: "a continue-as-new",
    corpus.ACTIVITY_FAILED: "an activity failure",
}


def _history(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(corpus.workflow_id_of(path), path.read_text())


def _name(path: Path) -> str:
    return str(path.relative_to(corpus.HERE))


@pytest.mark.parametrize("path", FILES, ids=_name)
async def test_history_replays(path: Path) -> None:
    history = _history(path)
    assert history.events, f"{_name(path)} holds no events"
    result = await Replayer(workflows=WORKFLOWS).replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


def test_corpus_covers_every_phase_and_event_kind() -> None:
    passed: set[str] = set()
    kinds: set[str] = set()
    for path in FILES:
        doc = corpus.load(path)
        passed.update(corpus.phases(doc))
        kinds.update(corpus.event_types(doc))
    assert not set(PHASES) - passed, f"no history passes through {sorted(set(PHASES) - passed)}"
    assert not passed - set(PHASES), f"unknown phases in the corpus: {sorted(passed - set(PHASES))}"
    missing = [what for kind, what in EVENT_KINDS.items() if kind not in kinds]
    assert not missing, f"no history holds {', '.join(missing)}"
    # A refused update leaves no event (the server drops its workflow task), so the recorder
    # states each refusal it saw in the index.
    refused = [refusal for entry in corpus.index().values() for refusal in entry.refused]
    assert any(refusal.startswith("approve in ") for refusal in refused), "no refused approve recorded"


def test_corpus_stops_in_every_waiting_phase() -> None:
    """A history fetched while the workflow waits: the review's TMPRL1100 was in one of these."""
    stops = {entry.stops_in for entry in corpus.index().values()}
    for phase in ("AWAITING_COMMIT", "AWAITING_DESTROY", "BLOCKED", "ABORTED", "DONE"):
        assert phase in stops, f"no history stops in {phase}"


def test_index_matches_the_histories() -> None:
    entries = corpus.index()
    files = {path.name for path in corpus.HISTORIES.glob("*.json")}
    assert files == set(entries), "histories/corpus.toml and the history files disagree"
    for name, entry in entries.items():
        doc = corpus.load(corpus.HISTORIES / name)
        seen = corpus.phases(doc)
        assert entry.stops_in == (seen[-1] if seen else ""), f"{name} stops in {seen[-1:]}"
        for refusal in entry.refused:
            update, _, rest = refusal.partition(" in ")
            phase = rest.split(":", 1)[0]
            assert phase in seen, f"{name}: refused {update} in {phase}, a phase it never entered"


def test_histories_hold_no_key_material() -> None:
    for path in FILES:
        assert corpus.secrets_in(corpus.load(path)) == [], _name(path)


def test_a_planted_ciphertext_is_found() -> None:
    doc = corpus.load(corpus.HISTORIES / "awaiting_commit.json")
    planted = copy.deepcopy(doc)
    payload = {"metadata": {"encoding": "anNvbi9wbGFpbg=="}, "data": ""}
    payload["data"] = base64.b64encode(json.dumps({"wrapped": "vault:v2:AAAA"}).encode()).decode()
    planted["events"][0]["workflowExecutionStartedEventAttributes"]["input"]["payloads"].append(payload)
    assert corpus.secrets_in(doc) == []
    assert corpus.secrets_in(planted) == [r"vault:v\d+:"]
    assert corpus.secrets_in(doc, ("replay-recorder",)) == ["a known secret (15 chars)"]


@workflow.defn(name="RotateKeyWorkflow", sandboxed=False)
class _TimerFirst:
    """A RotateKeyWorkflow whose first command is a timer: no recorded history matches it."""

    @workflow.run
    async def run(self, request: RotateKeyInput) -> None:
        workflow.patched("rotation-safety-1")
        await workflow.sleep(timedelta(seconds=1))


async def test_a_changed_command_fails_the_replay() -> None:
    history = _history(corpus.HISTORIES / "awaiting_commit.json")
    with pytest.raises(workflow.NondeterminismError, match="TMPRL1100"):
        await Replayer(workflows=[_TimerFirst]).replay_workflow(history, raise_on_replay_failure=True)
