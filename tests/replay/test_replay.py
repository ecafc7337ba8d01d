"""Replay the recorded history of a full rotation against the current workflow code: a change
that would break running rotations (non-determinism) fails here."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workflows.rotation import RotateKeyWorkflow

HISTORY = Path(__file__).with_name("rotation_done.json")


async def test_recorded_rotation_replays() -> None:
    history = WorkflowHistory.from_json("rotate:vault:replay", HISTORY.read_text())
    assert len(history.events) > 50  # a full rotation: prepare, several batches, verify, retire
    result = await Replayer(workflows=[RotateKeyWorkflow]).replay_workflow(
        history, raise_on_replay_failure=True
    )
    assert result.replay_failure is None
