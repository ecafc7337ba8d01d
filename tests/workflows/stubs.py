"""RotateKeyWorkflow alone, on a time-skipping Temporal dev server, with stub activities.

The stubs are registered under the real activity names and answer from a small in-memory
fleet (one key's versions, the blobs' key versions); no KMS, no store. Each stub call is
recorded with the workflow time it was scheduled at, so the grace period and
``destroy_after_seconds`` are checked as timers: the server skips the virtual clock ahead
whenever the workflow only waits on a timer. A gate holds a chosen call until the test has
sent its signal; every wait has a wall-clock timeout, so a test fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.types import (
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
from rekey.client import rotation_id
from workflows.launcher import LaunchRotationWorkflow
from workflows.rotation import (
    AWAITING_COMMIT,
    DONE,
    PREPARING,
    RETIRING,
    REWRAPPING,
    VERIFYING,
    Progress,
    RotateKeyInput,
    RotateKeyWorkflow,
)

KEY_REF = "vault:fleet-key"
GRACE = timedelta(hours=24)
WAIT = 8.0  # wall seconds any single wait may take before the test fails
EVERY_PHASE = [PREPARING, REWRAPPING, VERIFYING, AWAITING_COMMIT, RETIRING, DONE]
RESWEPT = [PREPARING, REWRAPPING, VERIFYING, REWRAPPING, VERIFYING, AWAITING_COMMIT, RETIRING, DONE]


@dataclass
class Call:
    name: str
    request: Any
    at: datetime  # workflow time at which the attempt was scheduled
    run_id: str


@dataclass
class Gate:
    """Holds the calls it matches until the test releases it."""

    matches: Callable[[Any], bool]
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)


class Fleet:
    """One key and the blobs wrapped by it: versions 1 (destroyed), 2 and 3 (primary) enabled;
    blobs alternate between versions 2 and 3."""

    def __init__(self, blobs: int = 40) -> None:
        self.primary = 3
        self.versions = {1: "destroyed", 2: "enabled", 3: "enabled"}
        self.blobs = {f"blob-{i:04d}": 2 + i % 2 for i in range(blobs)}
        self.fail_once: set[str] = set()  # fail on the first attempt, re-wrap on a re-sweep
        self.conflicts: set[str] = set()  # rewritten by their owner meanwhile
        self.throttled: set[str] = set()  # cost the governor one throttled wait each
        self.fail_always: set[str] = set()  # never re-wrappable (until the test fixes them)
        self.deny_batch_once: set[str | None] = set()  # batch starts refused once (an expired token)
        self.fail_audit_once: set[str] = set()  # audit events the log refuses once
        self.fail_phase_audit_once: set[str] = set()  # phase.changed records to these phases, once
        self.calls: list[Call] = []
        self.gates: dict[str, list[Gate]] = {}

    def hold(self, name: str, matches: Callable[[Any], bool] = lambda _request: True) -> Gate:
        gate = Gate(matches)
        self.gates.setdefault(name, []).append(gate)
        return gate

    async def record(self, name: str, request: Any) -> None:
        info = activity.info()
        self.calls.append(Call(name, request, info.current_attempt_scheduled_time, info.workflow_run_id))
        for gate in self.gates.get(name, []):
            if gate.matches(request):
                gate.entered.set()
                await asyncio.wait_for(gate.released.wait(), WAIT)

    def called(self, name: str) -> list[Call]:
        return [call for call in self.calls if call.name == name]

    def retirements(self) -> list[tuple[str, datetime]]:
        return [(call.request.action, call.at) for call in self.called("retire_versions")]

    def audits(self, event: str) -> list[Call]:
        return [call for call in self.called("audit") if call.request.event == event]

    def phases(self) -> list[str]:
        return [PREPARING] + [call.request.details["to"] for call in self.audits("phase.changed")]

    def below(self, version: int, after: str | None = None) -> list[str]:
        return sorted(b for b, v in self.blobs.items() if v < version and (after is None or b > after))


class StubActivities:
    """The rotation activities by name, over a :class:`Fleet`."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    @activity.defn(name="describe_key")
    async def describe_key(self, request: KeyRefInput) -> KeyState:
        await self.fleet.record("describe_key", request)
        enabled = [v for v, state in sorted(self.fleet.versions.items()) if state == "enabled"]
        return KeyState(request.key_ref, self.fleet.primary, enabled)

    @activity.defn(name="rotate_key")
    async def rotate_key(self, request: RotateToInput) -> KeyState:
        await self.fleet.record("rotate_key", request)
        if self.fleet.primary == request.expected_primary:
            self.fleet.primary += 1
            self.fleet.versions[self.fleet.primary] = "enabled"
        if self.fleet.primary != request.target_version:
            raise ApplicationError("another rotation ran at the KMS meanwhile", non_retryable=True)
        return KeyState(request.key_ref, self.fleet.primary, [])

    @activity.defn(name="count_below")
    async def count_below(self, request: CountInput) -> int:
        await self.fleet.record("count_below", request)
        return len(self.fleet.below(request.below_version))

    @activity.defn(name="plan_batches")
    async def plan_batches(self, request: PlanInput) -> list[str]:
        await self.fleet.record("plan_batches", request)
        ids = self.fleet.below(request.below_version, request.after)
        chunks = [ids[i : i + request.size] for i in range(0, len(ids), request.size)]
        return [chunk[-1] for chunk in chunks[: request.count]]

    @activity.defn(name="rewrap_batch")
    async def rewrap_batch(self, request: RewrapBatchInput) -> RewrapBatchResult:
        await self.fleet.record("rewrap_batch", request)
        if request.start in self.fleet.deny_batch_once:
            self.fleet.deny_batch_once.discard(request.start)
            raise ApplicationError("token expired", type="PermissionDenied", non_retryable=True)
        result = RewrapBatchResult()
        in_range = [b for b in self.fleet.below(request.below_version, request.start) if b <= request.end]
        for blob in in_range[: request.size]:
            result.throttled += blob in self.fleet.throttled
            if blob in self.fleet.fail_always:
                result.failed += 1
                result.failed_ids.append(blob)
                continue
            if blob in self.fleet.fail_once:
                self.fleet.fail_once.discard(blob)
                result.failed += 1
                result.failed_ids.append(blob)
                continue
            self.fleet.blobs[blob] = request.below_version
            if blob in self.fleet.conflicts:
                result.conflicts += 1
            else:
                result.rewrapped += 1
        return result

    @activity.defn(name="verify_sample")
    async def verify_sample(self, request: VerifyInput) -> int:
        await self.fleet.record("verify_sample", request)
        return min(request.sample, sum(v == request.version for v in self.fleet.blobs.values()))

    @activity.defn(name="retire_versions")
    async def retire_versions(self, request: RetireInput) -> list[int]:
        await self.fleet.record("retire_versions", request)
        versions = self.fleet.versions
        if request.action == "enable":
            for version in request.versions:
                versions[version] = "enabled"
            return list(request.versions)
        if request.census and (found := len(self.fleet.below(request.below_version))):
            raise ApplicationError("still in use", found, type=VERSIONS_IN_USE, non_retryable=True)
        if request.action == "disable":
            targets = [v for v, s in versions.items() if v < request.below_version and s == "enabled"]
        else:
            targets = [v for v, s in versions.items() if v < request.below_version and s != "destroyed"]
        for version in targets:
            versions[version] = "disabled" if request.action == "disable" else "destroyed"
        return sorted(targets)

    @activity.defn(name="audit")
    async def audit(self, request: AuditInput) -> None:
        await self.fleet.record("audit", request)
        to = request.details.get("to") if request.event == "phase.changed" else None
        if to in self.fleet.fail_phase_audit_once:
            self.fleet.fail_phase_audit_once.discard(to)
            raise ApplicationError("the audit log refused the record", type="ValueError", non_retryable=True)
        if request.event in self.fleet.fail_audit_once:
            self.fleet.fail_audit_once.discard(request.event)
            raise ApplicationError("the audit log refused the record", type="ValueError", non_retryable=True)

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.describe_key,
            self.rotate_key,
            self.count_below,
            self.plan_batches,
            self.rewrap_batch,
            self.verify_sample,
            self.retire_versions,
            self.audit,
        ]


@dataclass
class Rotation:
    """A worker with the stubs on a fresh task queue; starts and awaits rotations."""

    env: WorkflowEnvironment
    fleet: Fleet
    task_queue: str

    async def start(
        self, *, skip_time: bool = True, workflow_id: str | None = None, **options: Any
    ) -> WorkflowHandle[Any, Progress]:
        """``skip_time=False``: the workflow's clock moves in real time, or by ``fast_forward``."""
        options.setdefault("batch_size", 10)
        options.setdefault("batches_in_flight", 2)
        options.setdefault("requested_at", datetime.now(UTC).isoformat())
        request = RotateKeyInput(KEY_REF, started_by="test", **options)
        with contextlib.nullcontext() if skip_time else self.env.with_time_skipping_disabled():
            return await self.env.client.start_workflow(
                RotateKeyWorkflow.run,
                request,
                id=workflow_id or f"{rotation_id(KEY_REF)}:{uuid.uuid4()}",
                task_queue=self.task_queue,
            )

    async def run(self, **options: Any) -> tuple[WorkflowHandle[Any, Progress], Progress]:
        handle = await self.start(**options)
        return handle, await asyncio.wait_for(handle.result(), WAIT)


@contextlib.asynccontextmanager
async def rotating(env: WorkflowEnvironment, fleet: Fleet) -> AsyncIterator[Rotation]:
    task_queue = f"rotation-{uuid.uuid4()}"
    stubs = StubActivities(fleet).all()
    worker = Worker(
        env.client,
        task_queue=task_queue,
        workflows=[RotateKeyWorkflow, LaunchRotationWorkflow],
        activities=stubs,
    )
    async with worker:
        try:
            yield Rotation(env, fleet, task_queue)
        finally:
            for gates in fleet.gates.values():  # let held stubs return so the worker can stop
                for gate in gates:
                    gate.released.set()


async def wait_for_progress(
    handle: WorkflowHandle[Any, Progress], ready: Callable[[Progress], bool]
) -> Progress:
    async with asyncio.timeout(WAIT):
        while True:
            progress = await handle.query(RotateKeyWorkflow.progress)
            if ready(progress):
                return progress
            await asyncio.sleep(0.05)


async def wait_phase(handle: WorkflowHandle[Any, Progress], phase: str) -> Progress:
    return await wait_for_progress(handle, lambda progress: progress.phase == phase)


async def entered(gate: Gate) -> None:
    await asyncio.wait_for(gate.entered.wait(), WAIT)


def started(progress: Progress) -> datetime:
    return datetime.fromisoformat(progress.started_at)


def counts(progress: Progress) -> tuple[int, ...]:
    return (
        progress.total,
        progress.rewrapped,
        progress.remaining,
        progress.conflicts,
        progress.failed,
        progress.throttled_waits,
        progress.old_primary,
        progress.new_version,
    )
