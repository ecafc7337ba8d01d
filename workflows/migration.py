"""``MigrateGenerationWorkflow``: sealed state moves from one enclave generation to the next.

ATTESTING -> WIDENING -> HANDING_OFF (wave k of n) -> VERIFYING -> AWAITING_COMMIT ->
NARROWING -> DONE, or ROLLED_BACK (refused at ATTESTING, aborted, or a failed wave with
``on_failure="rollback"``). Workflow id ``migrate:<from>:<to>``.

* ATTESTING: the fleet is read from the registry (the old and new agent of every host, the
  hardware-sealed blobs on it); every new agent attests over a nonce this workflow made and is
  checked against the migration policy. Any reason stops the migration here, before anything
  stored changes (``refused``).
* WIDENING: the release policies of keys wrapping old-generation state admit both generations.
* HANDING_OFF: waves over hosts (cumulative percentages, at least one host a wave); within a
  wave one activity call per host at a time (a hand-off or re-binding call moves up to
  ``batches_per_call`` batches, 10 by default), the hosts in parallel, each host's first call after a
  random delay up to ``jitter_seconds`` (a durable timer), so a wave's agents do not all attest
  at once: first its hardware-sealed blobs (old agent to new), then its share of the
  KMS-wrapped ones (a blob-id range the plan gave it), which its new agent re-binds after an
  attested release. After each wave a health gate (the
  new agents unseal a sample). A failed gate or a new agent that fails mid-wave rolls back every
  moved blob to its old copy and ends ROLLED_BACK (``rollback``), or pauses (``pause``). A host
  whose old agent does not answer stops the migration (``held``, naming the host) before
  anything on that host changes; ``resume`` tries again.
* VERIFYING: no blob of the old generation may be left, hardware-sealed on a host or
  KMS-wrapped in a host's share (else those hosts are swept again, at most MAX_SWEEPS times);
  the new agents open a sample of every host's (both kinds).
* AWAITING_COMMIT: the grace period (a durable timer) or ``approve``; a pause holds it. Then
  the old generation's blobs are counted again: writes through its agents meanwhile are swept
  (VERIFYING once more) before NARROWING.
* NARROWING: release policies admit only the new generation; the old copies are deleted.
  A rollback (abort, failed wave) takes out of the release policies what WIDENING added.
  Each release-policy change applies to the key's current policy; one changed by someone else
  since, or a key without a policy met mid-wave, holds the migration (never rolls it back).
* ATTESTING claims both generations (the fleet activity); a migration involving a generation
  another open migration holds is refused there. DONE and ROLLED_BACK release the claims.

Deterministic: no I/O, no cryptography; nonces come from ``workflow.uuid4``; only ids, cursors,
nonces and counts in its state. Activities (``activities.migration``) do the work.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from activities.migration_types import (
        MAX_HANDOFF_BATCH,
        MAX_HANDOFF_BATCHES_PER_CALL,
        NEW_AGENT_FAILED,
        OLD_AGENT_UNREACHABLE,
        RELEASE_POLICY_HELD,
        AgentNonce,
        AttestInput,
        AttestResult,
        ClaimsInput,
        FleetInput,
        FleetPlan,
        GateInput,
        GateResult,
        HandoffInput,
        HandoffResult,
        KmsRemainingInput,
        NarrowInput,
        RebindInput,
        ReleaseInput,
        RemainingInput,
        RollbackInput,
        RollbackResult,
        migration_task_queue,
    )
    from activities.types import AuditInput

from workflows.migration_controls import MigrationControls, Refused
from workflows.migration_jitter import start_delays
from workflows.migration_state import (
    ATTESTING,
    AWAITING_COMMIT,
    DONE,
    HANDING_OFF,
    HOST_ROLLED_BACK,
    MAX_JITTER_SECONDS,
    MAX_REASON,
    MAX_REASONS,
    MAX_START_DELAY_SECONDS,
    MAX_START_SKEW_SECONDS,
    MAX_SWEEPS,
    MAX_WAIT_SECONDS,
    MOVED,
    MOVING,
    NARROWING,
    ON_FAILURE,
    PATCH_SWEEP_AFTER_COMMIT,
    PENDING,
    PHASES,
    ROLLED_BACK,
    VERIFYING,
    WIDENING,
    HostCount,
    MigrateInput,
    MigrationProgress,
    MigrationState,
    WaveCount,
    migration_id,
    split_waves,
)

__all__ = [
    "PHASES",
    "MigrateGenerationWorkflow",
    "MigrateInput",
    "MigrationProgress",
    "MigrationState",
    "Refused",
    "migration_id",
]

# Store, registry and audit activities: a few minutes of retries, then the migration stops
# (held) and says why. Agent calls are not retried by Temporal when they refuse.
LOCAL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=8,
)
AGENT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=3,
)
AGENT_HEARTBEAT_S = 20
"""Heartbeat timeout of the activities that call agents (hand-off, re-binding, gate): they beat
from a background thread while a call blocks (``activities.heartbeat``), so a killed worker's
batch is retried on another worker after this, not after the batch's whole timeout."""


_INTERRUPTED = object()
"""A host's jittered batch that a pause or an abort stopped before it started."""


def _reason(error: BaseException) -> str:
    """One printable line for an activity failure: the innermost cause's type and message."""
    while isinstance(error, ActivityError) and error.cause is not None:
        error = error.cause
    kind = error.type if isinstance(error, ApplicationError) and error.type else type(error).__name__
    message = error.message if isinstance(error, FailureError) else str(error)
    text = " ".join(f"{kind}: {message}".split())
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:MAX_REASON]


def _is_final(error: BaseException) -> bool:
    """A failure the activity declared final (non-retryable: an agent that died or refused, a
    blob that does not check), not retries that ran out or a timeout."""
    while isinstance(error, ActivityError) and error.cause is not None:
        error = error.cause
    return isinstance(error, ApplicationError) and error.non_retryable


def _failure_type(error: BaseException) -> str:
    while isinstance(error, ActivityError) and error.cause is not None:
        error = error.cause
    if isinstance(error, ApplicationError):
        return error.type or ""
    return ""


T = TypeVar("T")


def _as(value: object, kind: type[T]) -> T:
    """``value`` as the activity's declared result type (the converter made it one)."""
    if not isinstance(value, kind):
        raise ApplicationError(
            f"activity answered {type(value).__name__}, not {kind.__name__}", non_retryable=True
        )
    return value


class _Held(Exception):
    """A step stopped the migration (``state.held`` says why); the run loop waits for resume."""


@workflow.defn(name="MigrateGenerationWorkflow")
class MigrateGenerationWorkflow(MigrationControls):
    """The phases (this class) over the query, memo, updates and validators it inherits."""

    # ------------------------------------------------------------------------- helpers

    def _now(self) -> str:
        return workflow.now().isoformat()

    async def _activity(
        self,
        name: str,
        arg: object,
        result_type: type | None = None,
        *,
        timeout: float = 300,
        heartbeat: float | None = None,
        retry: RetryPolicy = LOCAL_RETRY,
    ) -> Any:
        return await workflow.execute_activity(
            name,
            arg,
            result_type=result_type,
            task_queue=migration_task_queue(workflow.info().task_queue),
            start_to_close_timeout=timedelta(seconds=timeout),
            heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None,
            retry_policy=retry,
        )

    async def _audit(self, event: str, details: dict[str, Any]) -> None:
        request = self._request
        subject = migration_id(request.from_generation, request.to_generation)
        await self._activity(
            "audit",
            AuditInput(event, subject, details, request.started_by or workflow.info().workflow_id),
        )

    async def _phase(self, phase: str) -> None:
        if phase in (DONE, ROLLED_BACK):  # its generations are free for the next migration
            await self._activity("migration_release_claims", ClaimsInput(self._id), int)
        previous, self._state.phase = self._state.phase, phase
        self._state.updated_at = self._state.phase_started[phase] = self._now()
        self._publish()
        await self._audit("migration.phase", {"from": previous, "to": phase})

    async def _checkpoint(self) -> bool:
        """Wait while paused or held; True if an abort was requested (an abort overrides a
        pause, never a hold: a held abort waits for resume to try it again)."""
        s = self._state
        await workflow.wait_condition(lambda: not s.held and (not s.paused or s.abort_requested))
        return s.abort_requested

    def _hold(self, reason: str) -> None:
        s = self._state
        s.held = reason[:MAX_REASON]
        s.updated_at = self._now()
        self._publish()

    def _add_reason(self, reason: str) -> None:
        s = self._state
        if len(s.reasons) < MAX_REASONS:
            s.reasons.append(reason[:MAX_REASON])

    @property
    def _request(self) -> MigrateInput:
        if self._input is None:  # pragma: no cover - run() sets it first
            raise ApplicationError("the migration has no input", non_retryable=True)
        return self._input

    @property
    def _id(self) -> str:
        return migration_id(self._request.from_generation, self._request.to_generation)

    # ----------------------------------------------------------------------------- run

    @workflow.run
    async def run(self, request: MigrateInput) -> MigrationProgress:
        await self._start(request)
        s = self._state
        steps = {
            ATTESTING: self._attest,
            WIDENING: self._widen,
            HANDING_OFF: self._hand_off,
            VERIFYING: self._verify,
            AWAITING_COMMIT: self._await_commit,
            NARROWING: self._narrow,
        }
        while s.phase not in (DONE, ROLLED_BACK):
            try:
                aborted = await self._checkpoint()
                if s.rolling_back:  # a rollback that stopped (held) is finished, never forgotten
                    await self._rollback_all(s.rolling_back)
                    continue
                if aborted and s.phase != NARROWING:
                    await self._rollback_all("aborted by an operator")
                    continue
                await steps[s.phase](request)
            except _Held:
                await self._audit_held()
            except ActivityError as exc:
                self._hold(f"{s.phase}: {_reason(exc)}")
                await self._audit_held()
        return self.progress()

    async def _audit_held(self) -> None:
        with contextlib.suppress(ActivityError):  # the audit log may be what failed
            await self._audit("migration.held", {"phase": self._state.phase, "reason": self._state.held})

    async def _start(self, request: MigrateInput) -> None:
        """Refuse a bad input before any activity; take over a carried-over state, or record
        the start of a new migration."""
        self._input = request
        problems = []
        waves = list(request.waves)
        if (
            not waves
            or any(not 1 <= w <= 100 for w in waves)
            or waves != sorted(set(waves))
            or waves[-1] != 100
        ):
            problems.append(f"waves must be increasing percentages in 1..100 ending at 100, got {waves}")
        if not 0 <= request.grace_seconds <= MAX_WAIT_SECONDS:  # NaN fails it too
            problems.append(
                f"grace_seconds must be 0..{MAX_WAIT_SECONDS} (ten years), got {request.grace_seconds}"
            )
        if request.on_failure not in ON_FAILURE:
            problems.append(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {request.on_failure!r}")
        if not 0 <= request.gate_sample <= 1000:
            problems.append(f"gate_sample must be 0..1000, got {request.gate_sample}")
        if not 0 <= request.jitter_seconds <= MAX_JITTER_SECONDS:
            problems.append(f"jitter_seconds must be 0..{MAX_JITTER_SECONDS}, got {request.jitter_seconds}")
        if not 1 <= request.batch_size <= MAX_HANDOFF_BATCH:
            problems.append(f"batch_size must be 1..{MAX_HANDOFF_BATCH}, got {request.batch_size}")
        if not 1 <= request.batches_per_call <= MAX_HANDOFF_BATCHES_PER_CALL:
            problems.append(
                f"batches_per_call must be 1..{MAX_HANDOFF_BATCHES_PER_CALL}, got {request.batches_per_call}"
            )
        if request.from_generation == request.to_generation:
            problems.append("from and to are the same generation")
        if ":" in request.from_generation or ":" in request.to_generation:
            # migrate:<from>:<to> would be ambiguous (a:b -> c and a -> b:c).
            problems.append("generation ids with ':' cannot be migrated")
        if workflow.info().workflow_id != migration_id(request.from_generation, request.to_generation):
            problems.append("the workflow id must be migrate:<from>:<to>")
        if problems:
            raise ApplicationError("; ".join(problems), type="InvalidMigration", non_retryable=True)
        if request.state is None:
            self._refuse_replayed_start(request.requested_at)
        elif workflow.info().continued_run_id is None:
            raise ApplicationError(
                "a migration's carried-over state is accepted only from continue-as-new",
                type="InvalidStart",
                non_retryable=True,
            )
        else:
            self._state = request.state
        s = self._state
        if not s.started_at:
            s.started_at = s.updated_at = s.phase_started[ATTESTING] = self._now()
            self._publish()
            await self._audit(
                "migration.started",
                {
                    "from": request.from_generation,
                    "to": request.to_generation,
                    "waves": list(request.waves),
                    "grace_seconds": int(request.grace_seconds),
                    "on_failure": request.on_failure,
                    "gate_sample": request.gate_sample,
                    "allow_same_svn": request.allow_same_svn,
                    "jitter_ms": round(request.jitter_seconds * 1000),  # the audit log takes no floats
                },
            )

    @staticmethod
    def _refuse_replayed_start(requested_at: str) -> None:
        """A recorded start input started again under the same id is refused (see the rotation)."""
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
        age = (workflow.info().workflow_start_time - requested).total_seconds()
        if not -MAX_START_SKEW_SECONDS <= age <= MAX_START_DELAY_SECONDS:
            raise ApplicationError(
                f"start request dated {requested_at} is {int(age)} s from this run's start"
                f" (allowed: -{MAX_START_SKEW_SECONDS}..{MAX_START_DELAY_SECONDS}): a replayed start"
                " input is refused; start the migration again",
                type="StaleStartRequest",
                non_retryable=True,
            )

    # ------------------------------------------------------------------------ ATTESTING

    async def _attest(self, request: MigrateInput) -> None:
        s = self._state
        if not s.planned:
            fleet = await self._activity(
                "migration_fleet", FleetInput(request.from_generation, request.to_generation), FleetPlan
            )
            fleet = _as(fleet, FleetPlan)
            await self._audit("migration.diff", {"diff": fleet.diff, "kms_blobs": fleet.kms_blobs})
            if fleet.reasons:
                return await self._refuse(fleet.reasons)
            hosts = sorted(fleet.hosts, key=lambda h: h.host_id)
            s.hosts = [
                HostCount(
                    h.host_id,
                    h.old_agent,
                    h.new_agent,
                    total=h.tee_blobs,
                    kms_share=h.kms_share,
                    kms_lo=h.kms_lo,
                    kms_hi=h.kms_hi,
                    kms_total=h.kms_blobs,
                )
                for h in hosts
            ]
            s.waves = []
            for k, ids in enumerate(split_waves([h.host_id for h in hosts], list(request.waves)), start=1):
                s.waves.append(WaveCount(k, ids))
                for host in s.hosts:
                    if host.host_id in ids:
                        host.wave = k
            s.kms_blobs = fleet.kms_blobs
            s.planned = True
            self._publish()
        agents = sorted({h.new_agent for h in s.hosts if h.new_agent})
        # 32 bytes per agent from the workflow's deterministic randomness: fresh in every run.
        nonces = [AgentNonce(a, workflow.uuid4().hex + workflow.uuid4().hex) for a in agents]
        result = await self._activity(
            "migration_attest",
            AttestInput(request.from_generation, request.to_generation, nonces, request.allow_same_svn),
            AttestResult,
            retry=AGENT_RETRY,
        )
        result = _as(result, AttestResult)
        s.attestations += result.attested
        if result.reasons:
            return await self._refuse(result.reasons)
        await self._audit("migration.attested", {"agents": len(agents), "attestations": result.attested})
        await self._phase(WIDENING)

    async def _refuse(self, reasons: list[str]) -> None:
        s = self._state
        s.refused = True
        for reason in reasons:
            self._add_reason(reason)
        await self._audit("migration.refused", {"reasons": list(s.reasons)})
        await self._phase(ROLLED_BACK)

    # ------------------------------------------------------------------------- WIDENING

    async def _widen(self, request: MigrateInput) -> None:
        s = self._state
        if not s.widened:
            keys = await self._activity(
                "migration_release",
                ReleaseInput(request.from_generation, request.to_generation, "widen"),
                int,
            )
            s.widened = True
            # "release_policies", not "keys": the audit log refuses detail names that look like key material.
            await self._audit("migration.widened", {"release_policies": int(keys), "kms_blobs": s.kms_blobs})
        await self._phase(HANDING_OFF)

    # ---------------------------------------------------------------------- HANDING_OFF

    async def _hand_off(self, request: MigrateInput) -> None:
        s = self._state
        while s.wave < len(s.waves):
            wave = s.waves[s.wave]
            wave.state = MOVING
            hosts = [h for h in s.hosts if h.host_id in wave.hosts]
            for host in hosts:
                if host.state == PENDING:
                    host.state = MOVING
            self._publish()
            if not await self._move(request, hosts, wave):
                return
            checked = await self._gate(request, hosts)
            if checked is None:
                return
            wave.gate, wave.gate_checked, wave.state = "passed", checked, MOVED
            await self._audit(
                "migration.wave",
                {
                    "wave": wave.wave,
                    "of": len(s.waves),
                    "hosts": list(wave.hosts),
                    "moved": wave.moved,
                    "kms_moved": wave.kms_moved,
                    "conflicts": wave.conflicts,
                    "attestations": wave.attestations,
                    "gate_checked": checked,
                },
            )
            s.wave += 1
            self._publish()
        await self._phase(VERIFYING)

    async def _move(self, request: MigrateInput, hosts: list[HostCount], wave: WaveCount | None) -> bool:
        """Hand off every host in ``hosts`` still MOVING, one activity call per host at a time,
        the hosts in parallel. False when the migration stopped (held, paused by a failure, or
        rolled back); continues as new (raises) when the history asks for it. In a wave, each
        host's first call waits its jitter (`start_delays`) first."""
        s = self._state
        fresh = [
            h.host_id
            for h in hosts
            if h.state == MOVING
            and h.cursor is None
            and not h.moved
            and h.kms_cursor is None
            and not h.kms_moved
        ]
        delays = start_delays(fresh, request.jitter_seconds, workflow.random()) if wave is not None else {}
        while True:
            for host in hosts:
                if host.state == MOVING and not host.next_step():
                    host.state = MOVED
            moving = [h for h in hosts if h.state == MOVING]
            if not moving:
                return True
            if await self._checkpoint():
                await self._rollback_all("aborted by an operator")
                return False
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(MigrateInput(**{**request.__dict__, "state": s}))
            steps = [h.next_step() for h in moving]
            results = await asyncio.gather(
                *(
                    # the first batch only waits its jitter
                    self._step(request, h, step, delay=delays.get(h.host_id, 0.0))
                    for h, step in zip(moving, steps, strict=True)
                ),
                return_exceptions=True,
            )
            unreachable: list[str] = []
            failed: list[str] = []
            stalled: list[str] = []
            for host, step, result in zip(moving, steps, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, ActivityError):
                        raise result
                    if _failure_type(result) in (OLD_AGENT_UNREACHABLE, RELEASE_POLICY_HELD):
                        unreachable.append(f"host {host.host_id}: {_reason(result)}")
                    elif _is_final(result):
                        failed.append(f"host {host.host_id}: {_reason(result)}")
                    else:  # retries ran out (the store down, workers killed): not the agents' fault
                        stalled.append(f"host {host.host_id}: {_reason(result)}")
                    continue
                if result is _INTERRUPTED:  # paused or aborted in its jitter: it waits again later
                    continue
                delays.pop(host.host_id, None)
                result = _as(result, HandoffResult)
                s.attestations += result.attestations
                if wave is not None:
                    wave.attestations += result.attestations
                if step == "kms":
                    host.kms_moved += result.moved
                    host.kms_conflicts += result.conflicts
                    host.kms_total = max(host.kms_moved, host.kms_total - result.skipped)
                    host.kms_cursor = result.cursor
                    if wave is not None:
                        wave.kms_moved += result.moved
                    if result.done:
                        host.kms_done = True
                        host.kms_total = max(host.kms_total, host.kms_moved)
                else:
                    host.moved += result.moved
                    host.conflicts += result.conflicts
                    # Written by the new generation meanwhile: nothing left to move for those.
                    host.total = max(host.moved, host.total - result.skipped)
                    host.cursor = result.cursor
                    if wave is not None:
                        wave.moved += result.moved
                        wave.conflicts += result.conflicts
                    if result.done:
                        host.tee_done = True
                        host.total = max(host.total, host.moved)
                if not host.next_step():
                    host.state = MOVED
            s.updated_at = self._now()
            self._publish()
            if failed:
                await self._failed(request, "; ".join(failed))
                return False
            if unreachable:
                self._hold(
                    "; ".join(unreachable)
                    + ": nothing on that host was changed; resume once its old agent is back"
                    " (or the key's release policy is set)"
                )
                raise _Held
            if stalled:
                self._hold("; ".join(stalled) + ": nothing was rolled back; resume once the cause is fixed")
                raise _Held

    async def _step(self, request: MigrateInput, h: HostCount, step: str, *, delay: float = 0.0) -> Any:
        """The activity that moves the next batch of ``h``: a hand-off of hardware-sealed blobs
        (old agent to new) or a re-binding of KMS-wrapped ones (new agent). ``delay``: its jitter
        first, a durable timer that a pause or an abort cuts short (then ``_INTERRUPTED``, and
        nothing ran)."""
        if delay > 0:
            s = self._state
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: s.paused or s.abort_requested, timeout=delay)
            if s.paused or s.abort_requested:
                return _INTERRUPTED
        if step == "kms":
            return await self._activity(
                "migration_rebind",
                RebindInput(
                    self._id,
                    request.from_generation,
                    request.to_generation,
                    h.host_id,
                    h.new_agent,
                    h.kms_lo,
                    h.kms_hi,
                    h.kms_cursor,
                    request.batch_size,
                    request.batches_per_call,
                ),
                HandoffResult,
                timeout=900,
                heartbeat=AGENT_HEARTBEAT_S,
                retry=AGENT_RETRY,
            )
        return await self._activity(
            "migration_handoff",
            HandoffInput(
                self._id,
                request.from_generation,
                request.to_generation,
                h.host_id,
                h.old_agent,
                h.new_agent,
                h.cursor,
                request.batch_size,
                request.allow_same_svn,
                request.batches_per_call,
            ),
            HandoffResult,
            timeout=900,
            heartbeat=AGENT_HEARTBEAT_S,
            retry=AGENT_RETRY,
        )

    async def _gate(self, request: MigrateInput, hosts: list[HostCount]) -> int | None:
        """The new agents unseal a sample of what moved to them; None when it failed (the
        failure is handled)."""
        try:
            gate = await self._activity(
                "migration_gate",
                GateInput(self._id, request.to_generation, [h.plan() for h in hosts], request.gate_sample),
                GateResult,
                heartbeat=AGENT_HEARTBEAT_S,
                retry=AGENT_RETRY,
            )
        except ActivityError as exc:
            if _failure_type(exc) not in (NEW_AGENT_FAILED, "GateFailed"):
                raise
            await self._failed(request, f"health gate: {_reason(exc)}")
            return None
        gate = _as(gate, GateResult)
        if gate.failures:
            await self._failed(request, "health gate: " + "; ".join(gate.failures))
            return None
        return gate.checked

    async def _failed(self, request: MigrateInput, reason: str) -> None:
        """A failed gate or a new agent that failed mid-wave: roll back (and end ROLLED_BACK)
        or pause for an operator, as the migration was started."""
        s = self._state
        if s.wave < len(s.waves) and s.phase == HANDING_OFF:
            s.waves[s.wave].gate = "failed"
        if request.on_failure == "rollback":
            await self._rollback_all(reason)
            return
        s.paused = True
        self._add_reason(reason)
        s.updated_at = self._now()
        self._publish()
        await self._audit("migration.paused", {"phase": s.phase, "reason": reason[:MAX_REASON]})

    # -------------------------------------------------------------------------- rollback

    async def _rollback_all(self, reason: str) -> None:
        """Every moved blob back to its old copy, latest wave first; ends ROLLED_BACK."""
        s = self._state
        if not s.rolling_back:
            s.rolling_back = reason[:MAX_REASON]
            self._add_reason(reason)
        touched = [
            w
            for w in s.waves
            if w.state != PENDING or any(h.state != PENDING for h in s.hosts if h.host_id in w.hosts)
        ]
        for wave in reversed(touched):
            result = await self._activity(
                "migration_rollback", RollbackInput(self._id, list(wave.hosts)), RollbackResult
            )
            result = _as(result, RollbackResult)
            wave.rolled_back += result.restored
            wave.state = HOST_ROLLED_BACK
            for host in s.hosts:
                if host.host_id in wave.hosts and host.state != PENDING:
                    host.rolled_back = host.moved
                    host.state = HOST_ROLLED_BACK
            if result.kept_new:
                self._add_reason(
                    f"{result.kept_new} blobs were written by the new generation after their hand-off"
                    f" and stay on it: {', '.join(result.kept_ids[:5])}"
                )
            await self._audit(
                "migration.rollback",
                {
                    "wave": wave.wave,
                    "hosts": list(wave.hosts),
                    "restored": result.restored,
                    "already_old": result.already_old,
                    "kept_new": result.kept_new,
                    "reason": reason[:MAX_REASON],
                },
            )
        if s.widened:
            request = self._request
            await self._activity(
                "migration_release",
                ReleaseInput(request.from_generation, request.to_generation, "restore"),
                int,
            )
        s.abort_requested = False
        s.rolling_back = ""
        await self._phase(ROLLED_BACK)
        await self._audit("migration.rolled_back", {"reason": reason[:MAX_REASON]})

    # ------------------------------------------------------------------------ VERIFYING

    async def _kms_left(self, request: MigrateInput) -> dict[str, int]:
        """KMS-wrapped blobs of the old generation left in each host's share (hosts with some)."""
        sharing = [h.plan() for h in self._state.hosts if h.kms_share]
        if not sharing:
            return {}
        found = await self._activity(
            "migration_kms_remaining", KmsRemainingInput(request.from_generation, sharing), dict[str, int]
        )
        return {host: int(n) for host, n in _as(found, dict).items() if n}

    async def _verify(self, request: MigrateInput) -> None:
        s = self._state
        ids = [h.host_id for h in s.hosts]
        remaining = await self._activity(
            "migration_remaining", RemainingInput(request.from_generation, ids), dict[str, int]
        )
        remaining = _as(remaining, dict)
        unknown = sorted(set(remaining) - set(ids))
        if unknown:
            self._hold(
                f"hosts {', '.join(unknown)} hold hardware-sealed blobs of {request.from_generation} but"
                " are not in this migration (start their agents and abort, then migrate again)"
            )
            raise _Held
        left = {host: int(n) for host, n in remaining.items() if n}
        kms_left = await self._kms_left(request)
        if left or kms_left:
            s.sweeps += 1
            total = sum(left.values()) + sum(kms_left.values())
            if s.sweeps > MAX_SWEEPS:
                s.sweeps = 0
                self._hold(f"{total} blobs still on {request.from_generation} after {MAX_SWEEPS} sweeps")
                raise _Held
            hosts = [h for h in s.hosts if h.host_id in left or h.host_id in kms_left]
            for host in hosts:
                host.state = MOVING
                if host.host_id in left:
                    host.cursor, host.tee_done = None, False
                    host.total += left[host.host_id]
                if host.host_id in kms_left:
                    host.kms_cursor, host.kms_done = None, False
                    host.kms_total += kms_left[host.host_id]
            await self._audit(
                "migration.sweep",
                {"sweep": s.sweeps, "remaining": sum(left.values()), "kms_remaining": sum(kms_left.values())},
            )
            await self._move(request, hosts, None)
            return  # VERIFYING again: count once more
        checked = await self._gate(request, s.hosts)
        if checked is None:
            return
        await self._audit("migration.verified", {"remaining_on_old": 0, "gate_checked": checked})
        await self._phase(NARROWING if s.committed else AWAITING_COMMIT)

    # ------------------------------------------------------------------- AWAITING_COMMIT

    async def _await_commit(self, request: MigrateInput) -> None:
        s = self._state
        if request.grace_seconds > 0 and not s.approved:
            entered = datetime.fromisoformat(s.phase_started.get(AWAITING_COMMIT) or self._now())
            grace = max(timedelta(0), entered + timedelta(seconds=request.grace_seconds) - workflow.now())
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: s.approved or s.abort_requested, timeout=grace)
        await workflow.wait_condition(lambda: not s.paused or s.approved or s.abort_requested)
        if s.abort_requested:
            return await self._rollback_all("aborted by an operator")
        s.committed = True
        if workflow.patched(PATCH_SWEEP_AFTER_COMMIT):
            # A write through an old agent in the grace period put its item back on the old
            # generation: counted once more now, and swept (VERIFYING, then NARROWING).
            ids = [h.host_id for h in s.hosts]
            remaining = await self._activity(
                "migration_remaining", RemainingInput(request.from_generation, ids), dict[str, int]
            )
            if any(int(n) for n in _as(remaining, dict).values()) or await self._kms_left(request):
                s.sweeps = 0
                await self._phase(VERIFYING)
                return
        await self._phase(NARROWING)

    # ------------------------------------------------------------------------ NARROWING

    async def _narrow(self, request: MigrateInput) -> None:
        keys = await self._activity(
            "migration_release", ReleaseInput(request.from_generation, request.to_generation, "narrow"), int
        )
        deleted = await self._activity(
            "migration_narrow", NarrowInput(self._id, request.from_generation, request.to_generation), int
        )
        await self._audit(
            "migration.narrowed", {"release_policies": int(keys), "old_copies_deleted": int(deleted)}
        )
        await self._phase(DONE)
        s = self._state
        await self._audit(
            "migration.done",
            {
                "moved": sum(h.moved for h in s.hosts),
                "kms_moved": sum(h.kms_moved for h in s.hosts),
                "attestations": s.attestations,
            },
        )
