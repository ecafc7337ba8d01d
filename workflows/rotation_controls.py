"""What operators see and send to a rotation: the ``progress`` query, the memo and search
attributes, and the updates with their validators (plus the signals of the workflow before
``rotation-safety-1``, kept for the runs that started before it). `RotateKeyWorkflow` inherits
them; the validators read only the state, so each answer is a synchronous yes or no."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta

from temporalio import workflow

from workflows.rotation_state import (
    ABORTED,
    AWAITING_COMMIT,
    AWAITING_DESTROY,
    BEFORE_RETIREMENT,
    BLOCKED,
    DESTROYING,
    DONE,
    KEY_REF_ATTRIBUTE,
    MEMO_PROGRESS,
    PATCH_SAFETY,
    PHASE_ATTRIBUTE,
    PREPARING,
    REMAINING_ATTRIBUTE,
    RETIRING,
    REWRAPPING,
    Progress,
    RotateKeyInput,
    RotationState,
)


class Refused(ValueError):
    """An update the current phase does not allow; its message says why and what is possible."""


def _due(state: RotationState, phase: str, wait: float | None) -> str:
    """When the wait of ``phase`` ends (ISO time), while the rotation is in it; else empty."""
    entered = state.phase_started.get(phase)
    if state.phase != phase or wait is None or not entered:
        return ""
    return (datetime.fromisoformat(entered) + timedelta(seconds=wait)).isoformat()


class RotationControls:
    def __init__(self) -> None:
        self._state = RotationState()
        self._input: RotateKeyInput | None = None
        self._safety = False

    # ----------------------------------------------------------------------- query, memo

    @workflow.query
    def progress(self) -> Progress:
        s = self._state
        request = self._input
        return Progress(
            request.key_ref if request else "",
            s.phase,
            s.old_primary,
            s.new_version,
            s.total,
            s.rewrapped,
            max(0, s.total - s.rewrapped - s.conflicts - s.failed),
            s.conflicts,
            s.failed,
            s.throttled_waits,
            s.rate,
            s.paused,
            s.started_at,
            s.updated_at,
            s.note,
            dict(s.phase_started),
            sweeps=s.sweeps,
            blocked_in=s.blocked_in,
            blocked_reason=s.blocked_reason,
            commit_due=_due(s, AWAITING_COMMIT, request.grace_seconds if request else None),
            destroy_due=_due(s, AWAITING_DESTROY, request.destroy_after_seconds if request else None),
            disabled=[v for v in s.retired if v],
            destroyed=[v for v in s.destroyed if v],
            destroy_cancelled=s.destroy_cancelled,
            grace_seconds=request.grace_seconds if request else 0.0,
            destroy_after_seconds=request.destroy_after_seconds if request else None,
            started_by=request.started_by if request else "",
        )

    def _publish(self) -> None:
        """Phase and counts into the memo and search attributes: what `describe` shows without
        a worker, and what the Temporal UI filters on."""
        if not self._safety or self._input is None:
            return
        progress = self.progress()
        workflow.upsert_memo({MEMO_PROGRESS: asdict(progress)})
        workflow.upsert_search_attributes(
            [
                KEY_REF_ATTRIBUTE.value_set(progress.key_ref),
                PHASE_ATTRIBUTE.value_set(progress.phase),
                REMAINING_ATTRIBUTE.value_set(progress.remaining),
            ]
        )

    # ------------------------------------------------------------------------- updates

    @workflow.update
    def pause(self) -> str:
        self._state.paused = True
        self._publish()
        if self._state.phase == AWAITING_COMMIT:
            return "paused: the old versions stay enabled while paused, even after the grace period"
        if self._state.phase == AWAITING_DESTROY:
            return "paused: the old versions are not destroyed while paused"
        return "paused: the sweep stops after the batches in flight"

    @pause.validator
    def _may_pause(self) -> None:
        s = self._state
        if s.phase in (DONE, ABORTED):
            raise Refused(f"the rotation is {s.phase}")
        if s.phase == BLOCKED:
            raise Refused("the rotation is BLOCKED (stopped already): resume it once the cause is fixed")
        if s.phase in (RETIRING, DESTROYING):
            raise Refused(f"the rotation is {s.phase}: a KMS change is under way and cannot be paused")
        if s.abort_requested:
            raise Refused("an abort is under way")
        if s.paused:
            raise Refused("the rotation is paused already")
        if s.approved and s.phase == AWAITING_COMMIT:
            raise Refused("approved already: the old versions are being disabled")
        if s.destroy_approved or s.destroy_cancelled:
            raise Refused("the destroy was decided already")

    @workflow.update
    def resume(self) -> str:
        s = self._state
        if s.phase == BLOCKED:
            s.resume_requested = True
            what = {"abort": "the abort", "cancel": "the cancel-destroy"}.get(s.blocked_kind, s.blocked_in)
            held = "; it stays paused: resume it again to go on" if s.paused else ""
            return f"resuming: {what} is tried again{held}"
        s.paused = False
        self._publish()
        return f"resumed in {s.phase}"

    @resume.validator
    def _may_resume(self) -> None:
        s = self._state
        if s.phase == BLOCKED:
            if s.resume_requested:
                raise Refused("a resume is under way")
            if s.abort_requested:
                raise Refused("an abort is under way")
            if s.cancel_requested:
                raise Refused("a cancel-destroy is under way")
            return
        if not s.paused:
            raise Refused(f"the rotation is not paused (phase {s.phase})")

    @workflow.update
    def abort(self) -> str:
        self._state.abort_requested = True
        if self._state.phase in (REWRAPPING, PREPARING):
            return "aborting: after the batches in flight; every blob stays readable"
        return "aborting: every blob stays readable"

    @abort.validator
    def _may_abort(self) -> None:
        s = self._state
        phase = s.blocked_in if s.phase == BLOCKED else s.phase
        if s.phase in (DONE, ABORTED):
            raise Refused(f"the rotation is {s.phase}")
        if s.abort_requested:
            raise Refused("an abort is under way")
        if s.approved and s.phase == AWAITING_COMMIT:
            raise Refused("approved already: the old versions are being disabled; no abort")
        if s.phase == BLOCKED and (s.resume_requested or s.cancel_requested):
            raise Refused("a resume or cancel-destroy is under way")
        if s.phase == BLOCKED and s.blocked_kind == "abort":
            return  # an abort that could not complete: try it again
        if phase not in BEFORE_RETIREMENT or [v for v in s.retired if v]:
            hint = (
                "; during the destroy delay, cancel-destroy keeps them disabled and not destroyed"
                if phase in (RETIRING, AWAITING_DESTROY)
                else ""
            )
            raise Refused(f"the rotation is {s.phase}: disabling the old versions has begun; no abort{hint}")

    @workflow.update
    def approve(self) -> str:
        self._state.approved = True
        return "approved: the old versions are disabled now"

    @approve.validator
    def _may_approve(self) -> None:
        s = self._state
        if s.phase != AWAITING_COMMIT:
            raise Refused(
                f"the rotation is {s.phase}: approve commits only in {AWAITING_COMMIT}, once every blob"
                " is re-wrapped and verified"
            )
        if s.paused:
            raise Refused("the rotation is paused: resume it first")
        if s.abort_requested:
            raise Refused("an abort is under way")
        if s.approved:
            raise Refused("approved already")

    @workflow.update
    def approve_destroy(self) -> str:
        self._state.destroy_approved = True
        return "destroy approved: the old versions are destroyed now (after a last census)"

    @approve_destroy.validator
    def _may_approve_destroy(self) -> None:
        s = self._state
        if s.phase != AWAITING_DESTROY:
            raise Refused(
                f"the rotation is {s.phase}: approve-destroy applies only in {AWAITING_DESTROY}"
                " (a rotation started with a destroy delay, after the old versions were disabled)"
            )
        if s.paused:
            raise Refused("the rotation is paused: resume it first")
        if s.destroy_approved or s.destroy_cancelled:
            raise Refused("the destroy was decided already")

    @workflow.update
    def cancel_destroy(self) -> str:
        self._state.destroy_cancelled = True
        self._state.cancel_requested = self._state.phase == BLOCKED
        return "destroy cancelled: the old versions stay disabled and are never destroyed by this rotation"

    @cancel_destroy.validator
    def _may_cancel_destroy(self) -> None:
        s = self._state
        phase = s.blocked_in if s.phase == BLOCKED else s.phase
        if phase != AWAITING_DESTROY:
            raise Refused(f"the rotation is {s.phase}: there is no destroy pending to cancel")
        if s.phase == BLOCKED and (s.resume_requested or s.reenabling):
            raise Refused("a resume is under way (it enables the old versions again to sweep them)")
        if s.phase == BLOCKED and s.blocked_kind == "cancel":
            return  # a cancel-destroy that could not complete: try it again
        if s.destroy_approved or s.destroy_cancelled:
            raise Refused("the destroy was decided already")

    # ------------------------------------------------------------------- legacy signals

    # The signals of the workflow before PATCH_SAFETY. A run started before it replays and
    # finishes with them as it began; a run started since ignores them: its controls are the
    # updates above, whose validators decide (a raw signal must not bypass them).

    def _legacy(self, name: str) -> bool:
        if workflow.patched(PATCH_SAFETY):
            workflow.logger.warning("signal %r ignored: send the update of that name", name)
            return False
        return True

    @workflow.signal(name="pause")
    def legacy_pause(self) -> None:
        if self._legacy("pause"):
            self._state.paused = True

    @workflow.signal(name="resume")
    def legacy_resume(self) -> None:
        if self._legacy("resume"):
            self._state.paused = False

    @workflow.signal(name="approve")
    def legacy_approve(self) -> None:
        if self._legacy("approve"):
            self._state.approved = True

    @workflow.signal(name="abort")
    def legacy_abort(self) -> None:
        if self._legacy("abort") and self._state.phase not in (RETIRING, DONE):
            self._state.abort_requested = True
