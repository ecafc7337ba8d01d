"""The rotation workflow as released before ``rotation-safety-1`` (frozen, never to be changed):
tests/replay/pre_safety/record.py records histories with it, so that the current workflow is
shown to replay runs that started before the patch, signals included.

``RotateKeyWorkflow``: two-phase rotation of one KMS key, with every stored DEK re-wrapped.

PREPARING -> REWRAPPING -> VERIFYING -> AWAITING_COMMIT -> RETIRING -> DONE (or ABORTED).
Deterministic: no I/O, no cryptography, no SDK; only ids, cursors and counts in its state.
Workflow id ``rotate:<backend>:<name>`` (built by ``rekey.client.rotation_id``), so two rotations of
one key cannot overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.types import (
        DEFAULT_BATCH,
        DEFAULT_IN_FLIGHT,
        MAX_BATCH,
        MAX_IN_FLIGHT,
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

PREPARING, REWRAPPING, VERIFYING = "PREPARING", "REWRAPPING", "VERIFYING"
AWAITING_COMMIT, RETIRING, DONE, ABORTED = "AWAITING_COMMIT", "RETIRING", "DONE", "ABORTED"
MAX_SWEEPS = 5
MAX_WAIT_SECONDS = 10 * 366 * 24 * 3600
"""Longest grace period or destroy delay: ten years. Longer waits are mistakes, and a value
beyond what timers and the audit log's integers take would stall the workflow task."""

# KMS calls are retried by the governor inside an activity; Temporal retries the activity
# after that, for as long as it takes (an outage must not fail the rotation).
KMS_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(seconds=30)
)


@dataclass
class RotationState:
    phase: str = PREPARING
    old_primary: int = 0
    new_version: int = 0
    cursor: str | None = None
    sweeps: int = 0
    total: int = 0
    rewrapped: int = 0
    conflicts: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)
    throttled_waits: int = 0
    started_at: str = ""
    updated_at: str = ""
    retired: list[int] = field(default_factory=list)
    destroyed: list[int] = field(default_factory=list)
    approved: bool = False
    paused: bool = False
    abort_requested: bool = False
    note: str = ""
    phase_started: dict[str, str] = field(default_factory=dict)  # phase -> when last entered


@dataclass
class RotateKeyInput:
    key_ref: str
    grace_seconds: float = 24 * 3600
    destroy_after_seconds: float | None = None  # None: never destroy
    batch_size: int = DEFAULT_BATCH
    batches_in_flight: int = DEFAULT_IN_FLIGHT
    verify_sample: int = 20
    started_by: str = ""
    state: RotationState | None = None  # carried over by continue-as-new


@dataclass
class Progress:
    key_ref: str
    phase: str
    old_primary: int
    new_version: int
    total: int
    rewrapped: int
    remaining: int
    conflicts: int
    failed: int
    throttled_waits: int
    current_rate: float
    paused: bool
    started_at: str
    updated_at: str
    note: str
    phase_started: dict[str, str] = field(default_factory=dict)


@workflow.defn(name="RotateKeyWorkflow")
class RotateKeyWorkflow:
    def __init__(self) -> None:
        self._state = RotationState()
        self._input: RotateKeyInput | None = None
        self._rate = 0.0

    # ------------------------------------------------------------------ queries and signals

    @workflow.query
    def progress(self) -> Progress:
        s = self._state
        key_ref = self._input.key_ref if self._input else ""
        return Progress(
            key_ref,
            s.phase,
            s.old_primary,
            s.new_version,
            s.total,
            s.rewrapped,
            max(0, s.total - s.rewrapped - s.conflicts - s.failed),
            s.conflicts,
            s.failed,
            s.throttled_waits,
            self._rate,
            s.paused,
            s.started_at,
            s.updated_at,
            s.note,
            dict(s.phase_started),
        )

    @workflow.signal
    def pause(self) -> None:
        self._state.paused = True

    @workflow.signal
    def resume(self) -> None:
        self._state.paused = False

    @workflow.signal
    def approve(self) -> None:
        self._state.approved = True

    @workflow.signal
    def abort(self) -> None:
        if self._state.phase not in (RETIRING, DONE):
            self._state.abort_requested = True

    # ------------------------------------------------------------------------------- helpers

    def _now(self) -> str:
        return workflow.now().isoformat()

    async def _activity(
        self,
        name: str,
        arg: object,
        result_type: type | None = None,
        timeout: float = 120,
        heartbeat: float | None = None,
    ) -> Any:
        return await workflow.execute_activity(
            name,
            arg,
            result_type=result_type,
            start_to_close_timeout=timedelta(seconds=timeout),
            heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None,
            retry_policy=KMS_RETRY,
        )

    async def _audit(self, event: str, details: dict[str, Any]) -> None:
        assert self._input is not None
        await self._activity(
            "audit",
            AuditInput(
                event, self._input.key_ref, details, self._input.started_by or workflow.info().workflow_id
            ),
        )

    async def _phase(self, phase: str) -> None:
        previous, self._state.phase = self._state.phase, phase
        self._state.updated_at = self._state.phase_started[phase] = self._now()
        await self._audit(
            "phase.changed", {"from": previous, "to": phase, "rewrapped": self._state.rewrapped}
        )

    async def _checkpoint(self) -> bool:
        """Wait while paused; True if an abort was requested."""
        await workflow.wait_condition(lambda: not self._state.paused or self._state.abort_requested)
        return self._state.abort_requested

    async def _aborted(self) -> Progress:
        await self._phase(ABORTED)
        await self._audit(
            "rotation.aborted", {"rewrapped": self._state.rewrapped, "note": "every blob stays readable"}
        )
        return self.progress()

    # ------------------------------------------------------------------------------------ run

    @workflow.run
    async def run(self, request: RotateKeyInput) -> Progress:
        """Run each phase in turn, from the one a continued-as-new run carried over; a phase
        method returns False when an abort stopped it."""
        await self._start(request)
        s = self._state
        if s.phase == PREPARING and not await self._prepare(request):
            return await self._aborted()
        if s.phase in (REWRAPPING, VERIFYING) and not await self._rewrap_and_verify(request):
            return await self._aborted()
        if s.phase == AWAITING_COMMIT and not await self._await_commit(request):
            return await self._aborted()
        if s.phase == RETIRING:
            await self._retire(request)
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
        if request.state is not None:
            self._state = request.state
        s = self._state
        if not s.started_at:
            s.started_at = s.updated_at = s.phase_started[PREPARING] = self._now()
            await self._audit(
                "rotation.started",
                {  # the audit log takes integers only (floats have no canonical encoding)
                    "grace_seconds": int(request.grace_seconds),
                    "destroy_after_seconds": None
                    if request.destroy_after_seconds is None
                    else int(request.destroy_after_seconds),
                },
            )

    async def _prepare(self, request: RotateKeyInput) -> bool:
        """PREPARING: rotate the key to the next version and count what has to be re-wrapped."""
        s = self._state
        if await self._checkpoint():
            return False
        key = await self._activity("describe_key", KeyRefInput(request.key_ref), KeyState)
        assert isinstance(key, KeyState)
        s.old_primary = key.primary_version
        s.new_version = key.primary_version + 1
        await self._activity("rotate_key", RotateToInput(request.key_ref, s.new_version), KeyState)
        await self._audit("key.version.created", {"version": s.new_version, "previous": s.old_primary})
        total = await self._activity("count_below", CountInput(request.key_ref, s.new_version), int)
        s.total = int(total)
        await self._phase(REWRAPPING)
        return True

    async def _rewrap_and_verify(self, request: RotateKeyInput) -> bool:
        """REWRAPPING and VERIFYING, until a count finds nothing left below the new version.

        Continues as new (raises) when the history asks for it; False on abort."""
        s = self._state
        while s.phase in (REWRAPPING, VERIFYING):
            if s.phase == REWRAPPING:
                swept = await self._rewrap(request)
                if swept is None:  # continue-as-new was requested; state carried over
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    workflow.continue_as_new(RotateKeyInput(**{**request.__dict__, "state": self._state}))
                if not swept:
                    return False
                await self._phase(VERIFYING)
            await self._verify(request)
        return True

    async def _rewrap(self, request: RotateKeyInput) -> bool | None:
        """Re-wrap batches until no record is left below the new version.

        True when swept, False on abort, None when the history asks for continue-as-new."""
        s = self._state
        while True:
            if await self._checkpoint():
                return False
            if workflow.info().is_continue_as_new_suggested():
                return None
            bounds = await self._activity(
                "plan_batches",
                PlanInput(
                    request.key_ref, s.new_version, s.cursor, request.batch_size, request.batches_in_flight
                ),
                list[str],
            )
            assert isinstance(bounds, list)
            if not bounds:
                return True
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
                )
            )
            done = 0
            for result in results:
                assert isinstance(result, RewrapBatchResult)
                s.rewrapped += result.rewrapped
                s.conflicts += result.conflicts
                s.failed += result.failed
                s.throttled_waits += result.throttled
                s.failed_ids = (s.failed_ids + result.failed_ids)[:20]
                done += result.rewrapped + result.conflicts
            elapsed = (workflow.now() - started).total_seconds()
            self._rate = done / elapsed if elapsed > 0 else self._rate
            s.cursor = bounds[-1]
            s.updated_at = self._now()

    async def _verify(self, request: RotateKeyInput) -> None:
        """VERIFYING: records still below the new version (failed, or written meanwhile) send the
        rotation back to REWRAPPING from the start, at most MAX_SWEEPS times; none left, a sample
        is unwrapped and the rotation awaits its commit."""
        s = self._state
        remaining = int(await self._activity("count_below", CountInput(request.key_ref, s.new_version), int))
        if remaining:
            s.sweeps += 1
            if s.sweeps >= MAX_SWEEPS:
                raise ApplicationError(
                    f"{remaining} blobs of {request.key_ref} are still below version {s.new_version}"
                    f" after {s.sweeps} sweeps; see failed_ids",
                    non_retryable=True,
                )
            s.cursor = None
            s.total += remaining
            await self._phase(REWRAPPING)
            return
        checked = await self._activity(
            "verify_sample", VerifyInput(request.key_ref, s.new_version, request.verify_sample), int
        )
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
        await self._phase(AWAITING_COMMIT)

    async def _await_commit(self, request: RotateKeyInput) -> bool:
        """AWAITING_COMMIT: an approve, or the grace period running out, commits; False on abort."""
        s = self._state
        if request.grace_seconds > 0:
            # Expiry without an approve means commit; the timer is durable (worker restarts).
            grace = timedelta(seconds=request.grace_seconds)
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: s.approved or s.abort_requested, timeout=grace)
        if s.abort_requested:
            return False
        await self._phase(RETIRING)
        return True

    async def _retire(self, request: RotateKeyInput) -> None:
        """RETIRING: disable the old versions, destroy them after ``destroy_after_seconds`` if
        set, then DONE. Each step is skipped when a carried-over state shows it done."""
        s = self._state
        if not s.retired:
            disabled = await self._activity(
                "retire_versions", RetireInput(request.key_ref, s.new_version, "disable"), list[int]
            )
            s.retired = list(disabled) or [0]
            for version in s.retired:
                if version:
                    await self._audit("key.version.disabled", {"version": version})
        if request.destroy_after_seconds is not None and not s.destroyed:
            await workflow.sleep(timedelta(seconds=request.destroy_after_seconds))
            destroyed = await self._activity(
                "retire_versions", RetireInput(request.key_ref, s.new_version, "destroy"), list[int]
            )
            s.destroyed = list(destroyed) or [0]
            for version in s.destroyed:
                if version:
                    await self._audit("key.version.destroyed", {"version": version})
        await self._phase(DONE)
        await self._audit("rotation.done", {"new_version": s.new_version, "rewrapped": s.rewrapped})
