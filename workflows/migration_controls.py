"""What operators see and send to a migration: the ``progress`` query, the memo, and the updates
with their validators. `MigrateGenerationWorkflow` inherits them; the validators read only the
state, so each answer is a synchronous yes or no."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import SearchAttributeKey

from workflows.migration_state import (
    AWAITING_COMMIT,
    DONE,
    HANDING_OFF,
    MEMO_PROGRESS,
    NARROWING,
    ROLLED_BACK,
    HostProgress,
    MigrateInput,
    MigrationProgress,
    MigrationState,
)

PHASE_ATTRIBUTE = SearchAttributeKey.for_keyword("RekeyPhase")


class Refused(ValueError):
    """An update the current phase does not allow; its message says why and what is possible."""


class MigrationControls:
    def __init__(self) -> None:
        self._state = MigrationState()
        self._input: MigrateInput | None = None

    # ----------------------------------------------------------------------- query, memo

    @workflow.query
    def progress(self) -> MigrationProgress:
        s = self._state
        request = self._input
        hosts = [
            HostProgress(
                h.host_id,
                h.wave,
                h.state,
                h.total,
                h.moved,
                h.remaining,
                h.conflicts,
                h.rolled_back,
                h.kms_total,
                h.kms_moved,
                h.kms_remaining,
            )
            for h in s.hosts
        ]
        commit_due = ""
        entered = s.phase_started.get(AWAITING_COMMIT)
        if s.phase == AWAITING_COMMIT and entered and request is not None:
            commit_due = (
                datetime.fromisoformat(entered) + timedelta(seconds=request.grace_seconds)
            ).isoformat()
        in_wave = s.phase == HANDING_OFF and s.wave < len(s.waves)
        return MigrationProgress(
            request.from_generation if request else "",
            request.to_generation if request else "",
            s.phase,
            s.wave + 1 if in_wave else (len(s.waves) if s.wave >= len(s.waves) and s.waves else 0),
            len(s.waves),
            hosts,
            [w for w in s.waves],
            sum(h.total for h in s.hosts),
            sum(h.moved for h in s.hosts),
            sum(h.remaining for h in s.hosts),
            sum(h.conflicts for h in s.hosts),
            s.attestations,
            s.kms_blobs,
            s.paused,
            s.held,
            s.refused,
            list(s.reasons),
            s.started_at,
            s.updated_at,
            dict(s.phase_started),
            commit_due=commit_due,
            grace_seconds=request.grace_seconds if request else 0.0,
            on_failure=request.on_failure if request else "",
            started_by=request.started_by if request else "",
            note=s.note,
            kms_moved=sum(h.kms_moved for h in s.hosts),
            kms_remaining=sum(h.kms_remaining for h in s.hosts),
            kms_conflicts=sum(h.kms_conflicts for h in s.hosts),
        )

    def _publish(self) -> None:
        """Phase and counts into the memo and the phase search attribute: what `describe`
        shows without a worker."""
        if self._input is None:
            return
        workflow.upsert_memo({MEMO_PROGRESS: asdict(self.progress())})
        workflow.upsert_search_attributes([PHASE_ATTRIBUTE.value_set(self._state.phase)])

    # ------------------------------------------------------------------------- updates

    @workflow.update
    def pause(self) -> str:
        self._state.paused = True
        self._publish()
        if self._state.phase == AWAITING_COMMIT:
            return "paused: the old generation's copies are kept while paused, even after the grace period"
        return "paused: the hand-off stops after the batch in flight"

    @pause.validator
    def _may_pause(self) -> None:
        s = self._state
        if s.phase in (DONE, ROLLED_BACK):
            raise Refused(f"the migration is {s.phase}")
        if s.phase == NARROWING:
            raise Refused("the migration is NARROWING: the old copies are being deleted; it cannot be paused")
        if s.abort_requested:
            raise Refused("an abort is under way")
        if s.paused:
            raise Refused("the migration is paused already")
        if s.approved:
            raise Refused("approved already: the migration is committing")

    @workflow.update
    def resume(self) -> str:
        s = self._state
        held = s.held
        s.paused = False
        s.held = ""
        self._publish()
        return f"resumed in {s.phase}" + (f" (it had stopped: {held})" if held else "")

    @resume.validator
    def _may_resume(self) -> None:
        s = self._state
        if s.phase in (DONE, ROLLED_BACK):
            raise Refused(f"the migration is {s.phase}")
        if s.held:
            return  # a stop (or an abort that could not finish): try it again
        if s.abort_requested:
            raise Refused("an abort is under way")
        if not s.paused:
            raise Refused(f"the migration is not paused (phase {s.phase})")

    @workflow.update
    def abort(self) -> str:
        self._state.abort_requested = True
        return "aborting: every moved blob goes back to the old generation's copy; ends ROLLED_BACK"

    @abort.validator
    def _may_abort(self) -> None:
        s = self._state
        if s.phase in (DONE, ROLLED_BACK):
            raise Refused(f"the migration is {s.phase}")
        if s.phase == NARROWING or s.committed:
            raise Refused(
                "the migration is committing (NARROWING): the old copies are being deleted; no abort"
            )
        if s.abort_requested:
            raise Refused("an abort is under way" + (": resume retries it" if s.held else ""))
        if s.approved:
            raise Refused("approved already: the migration is committing; no abort")

    @workflow.update
    def approve(self) -> str:
        self._state.approved = True
        return "approved: the old generation is narrowed out and its copies deleted now"

    @approve.validator
    def _may_approve(self) -> None:
        s = self._state
        if s.phase != AWAITING_COMMIT:
            raise Refused(
                f"the migration is {s.phase}: approve commits only in {AWAITING_COMMIT}, once every"
                " blob is handed off and verified"
            )
        if s.paused:
            raise Refused("the migration is paused: resume it first")
        if s.abort_requested:
            raise Refused("an abort is under way")
        if s.approved:
            raise Refused("approved already")
