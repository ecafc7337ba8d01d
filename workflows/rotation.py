"""``RotateKeyWorkflow``: two-phase rotation of one KMS key, with every stored DEK re-wrapped.

PREPARING -> REWRAPPING -> VERIFYING -> AWAITING_COMMIT -> RETIRING [-> AWAITING_DESTROY ->
DESTROYING] -> DONE, or ABORTED; any phase may stop in BLOCKED (a failure that retrying cannot
fix), which waits for ``resume`` (after the cause is fixed) or ``abort``.

Deterministic: no I/O, no cryptography, no SDK; only ids, cursors and counts in its state.
Operators steer it with updates whose validators refuse what the phase does not allow, so a
caller gets a synchronous yes or no (the README has the table). Phase and counts are kept
in the memo and in search attributes, so status works without a worker.

Versioning: every change to the commands this workflow issues goes behind ``workflow.patched``
(the ``PATCH_*`` ids below); checked-in histories of every phase replay in ``make test``
(tests/replay/); docs/workflow-versioning.md has the release procedure.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from activities.types import (
        MAX_BATCH,
        MAX_IN_FLIGHT,
        MUTATION_HEARTBEAT_S,
        MUTATION_TIMEOUT_S,
        VERSIONS_IN_USE,
        AuditInput,
        CountInput,
        KeyRefInput,
        KeyState,
        PlanInput,
        RetireInput,
        RewrapBatchInput,
        RewrapBatchResult,
        RotateToInput,
        VerifyInput,
    )

from workflows.rotation_controls import Refused, RotationControls
from workflows.rotation_state import (
    ABORTED,
    AWAITING_COMMIT,
    AWAITING_DESTROY,
    BLOCKED,
    DESTROYING,
    DONE,
    MAX_REASON,
    MAX_START_DELAY_SECONDS,
    MAX_START_SKEW_SECONDS,
    MAX_SWEEPS,
    MAX_WAIT_SECONDS,
    PATCH_SAFETY,
    PATCH_START_CHECK,
    PHASES,
    PREPARING,
    RETIRING,
    REWRAPPING,
    VERIFYING,
    LaunchRotationInput,
    Progress,
    RotateKeyInput,
    RotationState,
)

__all__ = [
    "ABORTED",
    "AWAITING_COMMIT",
    "AWAITING_DESTROY",
    "BLOCKED",
    "DESTROYING",
    "DONE",
    "MAX_SWEEPS",
    "MAX_WAIT_SECONDS",
    "PHASES",
    "PREPARING",
    "RETIRING",
    "REWRAPPING",
    "VERIFYING",
    "LaunchRotationInput",
    "Progress",
    "Refused",
    "RotateKeyInput",
    "RotateKeyWorkflow",
    "RotationState",
]

# KMS calls are retried by the governor inside an activity; Temporal retries the activity
# after that, for as long as it takes (an outage must not fail the rotation).
KMS_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(seconds=30)
)
# Store and audit activities: a few minutes of retries, then the rotation stops in BLOCKED and
# says why (a store that stays down is an operator's problem, not one to retry for ever).
LOCAL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=12,
)


def _reason(error: BaseException) -> str:
    """One printable line for an activity failure: the innermost cause's type and message."""
    while isinstance(error, ActivityError) and error.cause is not None:
        error = error.cause
    kind = error.type if isinstance(error, ApplicationError) and error.type else type(error).__name__
    message = error.message if isinstance(error, FailureError) else str(error)
    text = " ".join(f"{kind}: {message}".split())
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text[:MAX_REASON]


def _in_use(error: ActivityError) -> int | None:
    """The count of a retire census refusal, or None for any other failure."""
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.type == VERSIONS_IN_USE:
        details = list(cause.details)
        return int(details[0]) if details and isinstance(details[0], int | float) else 1
    return None


@workflow.defn(name="RotateKeyWorkflow")
class RotateKeyWorkflow(RotationControls):
    """The phases (this class) over the query, memo, updates and validators it inherits."""

    # ------------------------------------------------------------------------- helpers

    def _now(self) -> str:
        return workflow.now().isoformat()

    async def _activity(
        self,
        name: str,
        arg: object,
        result_type: type | None = None,
        timeout: float = 120,
        heartbeat: float | None = None,
        retry: RetryPolicy = KMS_RETRY,
    ) -> Any:
        return await workflow.execute_activity(
            name,
            arg,
            result_type=result_type,
            start_to_close_timeout=timedelta(seconds=timeout),
            heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None,
            retry_policy=retry,
        )

    async def _mutation(self, name: str, arg: object, result_type: type) -> Any:
        """A KMS change: above the governor's budget per call, with heartbeats between calls,
        so a timed-out attempt never runs beside its retry."""
        return await self._activity(
            name, arg, result_type, timeout=MUTATION_TIMEOUT_S, heartbeat=MUTATION_HEARTBEAT_S
        )

    async def _audit(self, event: str, details: dict[str, Any]) -> None:
        assert self._input is not None
        await self._activity(
            "audit",
            AuditInput(
                event, self._input.key_ref, details, self._input.started_by or workflow.info().workflow_id
            ),
            retry=LOCAL_RETRY if self._safety else KMS_RETRY,
        )

    async def _phase(self, phase: str) -> None:
        previous, self._state.phase = self._state.phase, phase
        self._state.updated_at = self._state.phase_started[phase] = self._now()
        self._publish()
        await self._audit(
            "phase.changed", {"from": previous, "to": phase, "rewrapped": self._state.rewrapped}
        )

    async def _checkpoint(self) -> bool:
        """Wait while paused; True if an abort was requested."""
        await workflow.wait_condition(lambda: not self._state.paused or self._state.abort_requested)
        return self._state.abort_requested

    # ----------------------------------------------------------------------------- run

    @workflow.run
    async def run(self, request: RotateKeyInput) -> Progress:
        """Run the phase the state is in until DONE or ABORTED, from the one a continued-as-new
        run carried over. A failure that retrying cannot fix stops the rotation in BLOCKED."""
        self._safety = workflow.patched(PATCH_SAFETY)
        await self._start(request)
        s = self._state
        steps = {
            PREPARING: self._prepare,
            REWRAPPING: self._rewrap_phase,
            VERIFYING: self._verify,
            AWAITING_COMMIT: self._await_commit,
            RETIRING: self._disable,
            AWAITING_DESTROY: self._await_destroy,
            DESTROYING: self._destroy,
            BLOCKED: self._blocked,
        }
        while s.phase not in (DONE, ABORTED):
            phase = s.phase
            try:
                await steps[phase](request)
            except ActivityError as exc:
                if not self._safety:
                    raise
                # The phase in effect at the failure (a transition may have happened), unless
                # the failure was in recording an end or the block itself: then the step's own.
                where = s.phase if s.phase not in (DONE, ABORTED, BLOCKED) else phase
                await self._block(where, "error", _reason(exc))
        return self.progress()

    async def _start(self, request: RotateKeyInput) -> None:
        """Refuse out-of-range sizing and waits before any activity; take over a carried-over
        state, or record the start of a new rotation."""
        self._input = request
        if not (1 <= request.batch_size <= MAX_BATCH and 1 <= request.batches_in_flight <= MAX_IN_FLIGHT):
            raise ApplicationError(
                f"batch_size must be 1..{MAX_BATCH} and batches_in_flight 1..{MAX_IN_FLIGHT},"
                f" got {request.batch_size} and {request.batches_in_flight}",
                non_retryable=True,
            )
        for name, wait in (
            ("grace_seconds", request.grace_seconds),
            ("destroy_after_seconds", request.destroy_after_seconds),
        ):
            if wait is not None and not 0 <= wait <= MAX_WAIT_SECONDS:  # NaN fails it too
                raise ApplicationError(
                    f"{name} must be 0..{MAX_WAIT_SECONDS} (ten years), got {wait}", non_retryable=True
                )
        if workflow.patched(PATCH_START_CHECK):
            if request.state is None:
                self._refuse_replayed_start(request.requested_at)
            elif workflow.info().continued_run_id is None:
                # Only continue-as-new carries a state over; a recorded successor input started
                # again by hand would otherwise run the rest of a finished rotation once more.
                raise ApplicationError(
                    "a rotation's carried-over state is accepted only from continue-as-new",
                    type="InvalidStart",
                    non_retryable=True,
                )
        if request.state is not None:
            self._state = request.state
        s = self._state
        if not s.started_at:
            s.started_at = s.updated_at = s.phase_started[PREPARING] = self._now()
            self._publish()
            await self._audit(
                "rotation.started",
                {  # the audit log takes integers only (floats have no canonical encoding)
                    "grace_seconds": int(request.grace_seconds),
                    "destroy_after_seconds": None
                    if request.destroy_after_seconds is None
                    else int(request.destroy_after_seconds),
                },
            )

    @staticmethod
    def _refuse_replayed_start(requested_at: str) -> None:
        """A start input is bound to its workflow id, not to its run: someone who can start
        workflows could start a finished rotation's recorded input again under the same id.
        Such an input carries the time it was first requested, so it is refused here, before
        any activity, once it is older than MAX_START_DELAY_SECONDS."""
        try:
            requested = datetime.fromisoformat(requested_at) if requested_at else None
        except ValueError:
            requested = None
        if requested is None or requested.tzinfo is None:
            raise ApplicationError(
                "requested_at must be an ISO 8601 time with an offset (rekey.client sets it)",
                type="InvalidStart",
                non_retryable=True,
            )
        # The server's start time of this execution (deterministic on replay), not the first
        # workflow task's: a start that waits for a worker is not a replay.
        age = (workflow.info().workflow_start_time - requested).total_seconds()
        if not -MAX_START_SKEW_SECONDS <= age <= MAX_START_DELAY_SECONDS:
            raise ApplicationError(
                f"start request dated {requested_at} is {int(age)} s from this run's start"
                f" (allowed: -{MAX_START_SKEW_SECONDS}..{MAX_START_DELAY_SECONDS}): a replayed start input"
                " is refused; start the rotation again",
                type="StaleStartRequest",
                non_retryable=True,
            )

    async def _aborted(self) -> None:
        await self._phase(ABORTED)
        await self._audit(
            "rotation.aborted", {"rewrapped": self._state.rewrapped, "note": "every blob stays readable"}
        )

    async def _prepare(self, request: RotateKeyInput) -> None:
        """PREPARING: rotate the key to the next version and count what has to be re-wrapped.

        Resumable: a version made by an earlier attempt (or before a BLOCKED) is found, not made twice."""
        s = self._state
        if await self._checkpoint():
            return await self._aborted()
        if not s.new_version:
            key = await self._activity("describe_key", KeyRefInput(request.key_ref), KeyState)
            assert isinstance(key, KeyState)
            s.old_primary = key.primary_version
            s.new_version = key.primary_version + 1
        made = await self._mutation(
            "rotate_key", RotateToInput(request.key_ref, s.new_version, s.old_primary), KeyState
        )
        assert isinstance(made, KeyState)
        s.new_version = made.primary_version  # the activity refuses any other than the target
        if not s.version_created:
            await self._audit("key.version.created", {"version": s.new_version, "previous": s.old_primary})
            s.version_created = True
        total = await self._activity(
            "count_below", CountInput(request.key_ref, s.new_version), int, retry=self._local()
        )
        s.total = int(total)
        await self._phase(REWRAPPING)

    def _local(self) -> RetryPolicy:
        return LOCAL_RETRY if self._safety else KMS_RETRY

    async def _rewrap_phase(self, request: RotateKeyInput) -> None:
        """REWRAPPING: batches until no record is left below the new version, then VERIFYING.

        Continues as new (raises) when the history asks for it."""
        s = self._state
        while True:
            if await self._checkpoint():
                return await self._aborted()
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(RotateKeyInput(**{**request.__dict__, "state": self._state}))
            bounds = await self._activity(
                "plan_batches",
                PlanInput(
                    request.key_ref, s.new_version, s.cursor, request.batch_size, request.batches_in_flight
                ),
                list[str],
                retry=self._local(),
            )
            assert isinstance(bounds, list)
            if not bounds:
                return await self._phase(VERIFYING)
            await self._round(request, bounds)

    async def _round(self, request: RotateKeyInput, bounds: list[str]) -> None:
        """One round of batches in flight. Every batch is awaited; the counts of those that
        finished are kept and the cursor moves only past them, then a failure is raised."""
        s = self._state
        started = workflow.now()
        starts = [s.cursor, *bounds[:-1]]
        results = await asyncio.gather(
            *(
                self._activity(
                    "rewrap_batch",
                    RewrapBatchInput(request.key_ref, s.new_version, start, end, request.batch_size),
                    RewrapBatchResult,
                    timeout=3600,  # a backstop: the heartbeat timeout finds a dead worker
                    heartbeat=60,
                )
                for start, end in zip(starts, bounds, strict=True)
            ),
            return_exceptions=self._safety,
        )
        done = 0
        failure: BaseException | None = None
        for start, end, result in zip(starts, bounds, results, strict=True):
            if isinstance(result, BaseException):
                if failure is None:
                    failure, s.cursor = result, start  # redo from the first failed batch
                continue
            assert isinstance(result, RewrapBatchResult)
            s.rewrapped += result.rewrapped
            s.conflicts += result.conflicts
            s.failed += result.failed
            s.throttled_waits += result.throttled
            s.failed_ids = (s.failed_ids + result.failed_ids)[:20]
            done += result.rewrapped + result.conflicts
            if failure is None:
                s.cursor = end
        elapsed = (workflow.now() - started).total_seconds()
        s.rate = done / elapsed if elapsed > 0 else s.rate
        s.updated_at = self._now()
        self._publish()
        if failure is not None:
            raise failure

    async def _verify(self, request: RotateKeyInput) -> None:
        """VERIFYING: records still below the new version (failed, or written meanwhile) send the
        rotation back to REWRAPPING from the start, at most MAX_SWEEPS times (then BLOCKED); none
        left, a sample is unwrapped and the rotation awaits its commit (or, once committed, goes
        straight back to retiring)."""
        s = self._state
        remaining = int(
            await self._activity(
                "count_below", CountInput(request.key_ref, s.new_version), int, retry=self._local()
            )
        )
        if self._safety and s.abort_requested:
            return await self._aborted()
        if remaining:
            await self._sweep_again(request, remaining)
            return
        checked = await self._activity(
            "verify_sample", VerifyInput(request.key_ref, s.new_version, request.verify_sample), int
        )
        if self._safety and s.abort_requested:
            return await self._aborted()
        await self._audit(
            "rewrap.counts",
            {
                "total": s.total,
                "rewrapped": s.rewrapped,
                "conflicts": s.conflicts,
                "failed": s.failed,
                "verified_sample": checked,
                "remaining_on_old": 0,
            },
        )
        await self._phase(RETIRING if s.committed else AWAITING_COMMIT)

    async def _sweep_again(self, request: RotateKeyInput, remaining: int) -> None:
        s = self._state
        s.sweeps += 1
        if s.sweeps >= MAX_SWEEPS:
            if not self._safety:
                raise ApplicationError(
                    f"{remaining} blobs of {request.key_ref} are still below version {s.new_version}"
                    f" after {s.sweeps} sweeps; see failed_ids",
                    non_retryable=True,
                )
            s.sweeps = 0  # a resume sweeps MAX_SWEEPS times again
            await self._block(
                REWRAPPING,
                "error",
                f"{remaining} blobs of {request.key_ref} are still below version {s.new_version} after"
                f" {MAX_SWEEPS} sweeps; `rekey rotate failures` lists them and why",
            )
            return
        s.cursor = None
        s.total += remaining
        await self._phase(REWRAPPING)

    async def _await_commit(self, request: RotateKeyInput) -> None:
        """AWAITING_COMMIT: an approve, or the grace period running out (and no pause), commits."""
        s = self._state
        if s.committed:  # committed before a BLOCKED: never wait a second grace period
            return await self._phase(RETIRING)
        if request.grace_seconds > 0 and not s.approved:
            # Expiry without an approve means commit; the timer is durable (worker restarts).
            grace = timedelta(seconds=request.grace_seconds)
            if self._safety:  # the time left, if this run took the phase over from another
                entered = datetime.fromisoformat(s.phase_started.get(AWAITING_COMMIT) or self._now())
                grace = max(timedelta(0), entered + grace - workflow.now())
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: s.approved or s.abort_requested, timeout=grace)
        # A pause holds the commit, even once the grace period is over.
        await workflow.wait_condition(lambda: not s.paused or s.approved or s.abort_requested)
        if s.abort_requested:
            return await self._aborted()
        s.committed = True
        await self._phase(RETIRING)

    async def _disable(self, request: RotateKeyInput) -> None:
        """RETIRING: disable the old versions after a census finds nothing still on them;
        anything found is swept again (and the census repeated) before any version is disabled."""
        s = self._state
        if not s.retired:
            disabled, found = await self._retire_after_census(request, "disable")
            if found:
                return await self._sweep_again(request, found)
            s.retired = disabled or [0]
        await self._record_versions("disabled", s.retired)
        if request.destroy_after_seconds is None or s.destroy_cancelled:
            return await self._done()
        if self._safety:
            await self._phase(AWAITING_DESTROY)
        else:  # histories before PATCH_SAFETY: the delay, then the destroy, in RETIRING
            await workflow.sleep(timedelta(seconds=request.destroy_after_seconds))
            await self._destroy(request)

    async def _retire_after_census(self, request: RotateKeyInput, action: str) -> tuple[list[int], int]:
        """``retire_versions`` (disable or destroy) after its census: (the versions it changed, 0),
        or ([], how many) when the census found stored blobs still on old versions; that is
        recorded (``retire.census``) and nothing was changed."""
        try:
            changed = await self._mutation(
                "retire_versions",
                RetireInput(request.key_ref, self._state.new_version, action, census=True),
                list[int],
            )
        except ActivityError as exc:
            found = _in_use(exc)
            if found is None or not self._safety:
                raise
            await self._audit("retire.census", {"action": action, "still_wrapped": found})
            return [], found
        return list(changed), 0

    async def _await_destroy(self, request: RotateKeyInput) -> None:
        """AWAITING_DESTROY: the destroy delay; approve-destroy shortens it, cancel-destroy ends
        the rotation with the old versions disabled, a pause holds it."""
        s = self._state
        assert request.destroy_after_seconds is not None
        entered = s.phase_started.get(AWAITING_DESTROY) or self._now()
        due = datetime.fromisoformat(entered) + timedelta(seconds=request.destroy_after_seconds)
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(
                lambda: s.destroy_approved or s.destroy_cancelled,
                timeout=max(timedelta(0), due - workflow.now()),
            )
        await workflow.wait_condition(lambda: not s.paused or s.destroy_approved or s.destroy_cancelled)
        if s.destroy_cancelled:
            await self._audit("key.version.destroy_cancelled", {"versions": [v for v in s.retired if v]})
            return await self._done()
        await self._phase(DESTROYING)

    async def _destroy(self, request: RotateKeyInput) -> None:
        """DESTROYING: a last census, then destroy. Anything still on an old version stops it:
        BLOCKED, and nothing is destroyed."""
        s = self._state
        if not s.destroyed:
            destroyed, found = await self._retire_after_census(request, "destroy")
            if found:
                s.destroy_approved = False  # that approval is spent: the destroy did not happen
                return await self._block(
                    AWAITING_DESTROY,
                    "in_use",
                    f"{found} stored blobs are still wrapped by disabled versions"
                    f" {[v for v in s.retired if v]}; nothing was destroyed. resume re-enables them and"
                    " sweeps again; cancel-destroy ends the rotation with them disabled",
                )
            s.destroyed = destroyed or [0]
        await self._record_versions("destroyed", s.destroyed)
        await self._done()

    async def _record_versions(self, what: str, versions: list[int]) -> None:
        """One ``key.version.<what>`` record per version, each once (a resume after a failed
        record writes the ones still missing)."""
        for version in versions:
            mark = f"{what}:{version}"
            if version and mark not in self._state.recorded:
                await self._audit(f"key.version.{what}", {"version": version})
                self._state.recorded.append(mark)

    async def _done(self) -> None:
        await self._phase(DONE)
        s = self._state
        await self._audit("rotation.done", {"new_version": s.new_version, "rewrapped": s.rewrapped})

    # ------------------------------------------------------------------------- blocked

    async def _block(self, phase: str, kind: str, reason: str) -> None:
        """Stop in BLOCKED, with the reason in the state, the memo and (if it can be written)
        the audit log; the loop in `run` then waits in `_blocked`. An abort whose own records
        failed is not retried at once (it would loop): resume or abort retries it."""
        s = self._state
        if s.abort_requested:
            kind, s.abort_requested = "abort", False
            reason = f"the abort could not be completed: {reason}"[:MAX_REASON]
        s.blocked_in, s.blocked_kind, s.blocked_reason = phase, kind, reason
        s.resume_requested = False
        s.phase = BLOCKED
        s.updated_at = s.phase_started[BLOCKED] = self._now()
        self._publish()
        try:
            await self._audit("phase.changed", {"from": phase, "to": BLOCKED, "rewrapped": s.rewrapped})
            await self._audit("rotation.blocked", {"phase": phase, "reason": reason})
        except ActivityError as exc:  # the audit log may be what failed: say so, keep blocking
            s.note = f"the audit log could not record the block: {_reason(exc)}"[:MAX_REASON]
            self._publish()

    async def _blocked(self, request: RotateKeyInput) -> None:
        """BLOCKED: wait for resume, abort or (blocked before the destroy) cancel-destroy; the
        validators decide which are allowed. Each is a one-shot request: if it fails again
        the rotation blocks again and waits for the next one (never a loop of retries)."""
        s = self._state
        await workflow.wait_condition(lambda: s.resume_requested or s.abort_requested or s.cancel_requested)
        phase, kind = s.blocked_in, s.blocked_kind
        cancelling = s.cancel_requested or (kind == "cancel" and s.resume_requested)
        try:
            if s.abort_requested or (kind == "abort" and s.resume_requested):
                s.abort_requested = True
                self._unblock()
                return await self._aborted()
            if cancelling:
                self._unblock()
                await self._audit("key.version.destroy_cancelled", {"versions": [v for v in s.retired if v]})
                return await self._done()
            await self._resume_blocked(request, phase, kind)
        except ActivityError as exc:
            if cancelling:
                s.cancel_requested = False
                reason = f"the cancel-destroy could not be completed: {_reason(exc)}"
                await self._block(AWAITING_DESTROY, "cancel", reason[:MAX_REASON])
                return
            await self._block(s.blocked_in or phase, s.blocked_kind or kind, _reason(exc))

    def _unblock(self) -> None:
        """Leave BLOCKED. A pause from before the block stays: it still holds the sweep, the
        commit and the destroy."""
        s = self._state
        s.blocked_in = s.blocked_reason = s.blocked_kind = ""
        s.resume_requested = s.cancel_requested = False

    async def _resume_blocked(self, request: RotateKeyInput, phase: str, kind: str) -> None:
        """Retry ``phase`` (a waiting phase waits its whole time again: a block never shortens
        a grace period or a destroy delay). Blocked by blobs on disabled versions: enable them,
        then sweep again; from the moment they are enabled the block is one of REWRAPPING, so
        a cancel-destroy can no longer leave them enabled and the rotation DONE."""
        s = self._state
        await self._audit("rotation.resumed", {"phase": phase})
        if kind == "in_use":  # blobs on disabled versions: enable them again and sweep them
            versions = [v for v in s.retired if v]
            s.reenabling = True
            await self._mutation(
                "retire_versions", RetireInput(request.key_ref, s.new_version, "enable", versions), list[int]
            )
            s.retired, s.cursor, s.reenabling = [], None, False
            s.destroy_approved = False
            s.recorded = [m for m in s.recorded if not m.startswith("disabled:")]
            s.blocked_in, s.blocked_kind = REWRAPPING, "error"
            for version in versions:
                await self._audit("key.version.enabled", {"version": version})
            phase = REWRAPPING
        elif phase == REWRAPPING:
            s.cursor = None
        self._unblock()
        await self._phase(phase)
