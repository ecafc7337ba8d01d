"""``LaunchRotationWorkflow``: what a rotation schedule starts."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.types import AuditInput

from workflows.rotation import LOCAL_RETRY, RotateKeyWorkflow
from workflows.rotation_state import PATCH_FRESH_LAUNCH, LaunchRotationInput


@workflow.defn(name="LaunchRotationWorkflow")
class LaunchRotationWorkflow:
    """What a rotation schedule starts: it starts ``RotateKeyWorkflow`` under the key's one
    rotation id, or records that a rotation of the key is running already and ends. So a
    schedule, its trigger, a second schedule and a manual start can never rotate one key twice
    at once, whatever the schedule's overlap policy."""

    @workflow.run
    async def run(self, launch: LaunchRotationInput) -> str:
        request = launch.request
        if workflow.patched(PATCH_FRESH_LAUNCH):
            # The schedule's input was bound when the schedule was made; each run asks anew.
            request = dataclasses.replace(request, requested_at=workflow.now().isoformat())
        try:
            await workflow.start_child_workflow(
                RotateKeyWorkflow.run,
                request,
                id=launch.rotation_id,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
            )
        except WorkflowAlreadyStartedError:
            await workflow.execute_activity(
                "audit",
                AuditInput(
                    "rotation.skipped",
                    launch.request.key_ref,
                    {"running": launch.rotation_id},
                    launch.request.started_by or workflow.info().workflow_id,
                ),
                start_to_close_timeout=timedelta(seconds=120),
                retry_policy=LOCAL_RETRY,
            )
            return f"skipped: {launch.rotation_id} is running"
        return f"started {launch.rotation_id}"
