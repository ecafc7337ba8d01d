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

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.types import (
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
from rekey.client import rotation_id
from workflows.rotation import (
    ABORTED,
    AWAITING_COMMIT,
    DONE,
    MAX_WAIT_SECONDS,
    PREPARING,
    RETIRING,
    REWRAPPING,
    VERIFYING,
    Progress,
    RotateKeyInput,
    RotateKeyWorkflow,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

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
        if self.fleet.primary < request.target_version:
            self.fleet.primary += 1
            self.fleet.versions[self.fleet.primary] = "enabled"
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
        result = RewrapBatchResult()
        in_range = [b for b in self.fleet.below(request.below_version, request.start) if b <= request.end]
        for blob in in_range[: request.size]:
            result.throttled += blob in self.fleet.throttled
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

    async def start(self, *, skip_time: bool = True, **options: Any) -> WorkflowHandle[Any, Progress]:
        """``skip_time=False``: the workflow's clock moves in real time, or by ``fast_forward``."""
        options.setdefault("batch_size", 10)
        options.setdefault("batches_in_flight", 2)
        request = RotateKeyInput(KEY_REF, started_by="test", **options)
        with contextlib.nullcontext() if skip_time else self.env.with_time_skipping_disabled():
            return await self.env.client.start_workflow(
                RotateKeyWorkflow.run,
                request,
                id=f"{rotation_id(KEY_REF)}:{uuid.uuid4()}",
                task_queue=self.task_queue,
            )

    async def run(self, **options: Any) -> tuple[WorkflowHandle[Any, Progress], Progress]:
        handle = await self.start(**options)
        return handle, await asyncio.wait_for(handle.result(), WAIT)


@contextlib.asynccontextmanager
async def rotating(env: WorkflowEnvironment, fleet: Fleet) -> AsyncIterator[Rotation]:
    task_queue = f"rotation-{uuid.uuid4()}"
    stubs = StubActivities(fleet).all()
    worker = Worker(env.client, task_queue=task_queue, workflows=[RotateKeyWorkflow], activities=stubs)
    async with worker:
        try:
            yield Rotation(env, fleet, task_queue)
        finally:
            for gates in fleet.gates.values():  # let held stubs return so the worker can stop
                for gate in gates:
                    gate.released.set()


@pytest_asyncio.fixture(loop_scope="session")
async def rotation(temporal_time_skipping_env: WorkflowEnvironment) -> AsyncIterator[Rotation]:
    async with rotating(temporal_time_skipping_env, Fleet()) as rotation:
        yield rotation


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


# ----------------------------------------------------------------------------- commit by timer


async def test_grace_period_expires_then_retires(rotation: Rotation) -> None:
    _, progress = await rotation.run()  # the default grace: 24 hours, no approve

    assert progress.phase == DONE
    assert counts(progress) == (40, 40, 0, 0, 0, 0, 3, 4)
    assert rotation.fleet.phases() == EVERY_PHASE
    [(action, at)] = rotation.fleet.retirements()  # no destroy without destroy_after_seconds
    assert action == "disable"
    assert started(progress) + GRACE <= at < started(progress) + GRACE + timedelta(minutes=1)
    assert [c.request.details["version"] for c in rotation.fleet.audits("key.version.disabled")] == [2, 3]
    assert rotation.fleet.versions == {1: "destroyed", 2: "disabled", 3: "disabled", 4: "enabled"}
    assert set(rotation.fleet.blobs.values()) == {4}


async def test_destroy_after_its_delay(rotation: Rotation) -> None:
    delay = timedelta(days=7)
    _, progress = await rotation.run(destroy_after_seconds=delay.total_seconds())

    assert progress.phase == DONE
    [(disable, disabled_at), (destroy, destroyed_at)] = rotation.fleet.retirements()
    assert (disable, destroy) == ("disable", "destroy")
    assert disabled_at >= started(progress) + GRACE
    assert disabled_at + delay <= destroyed_at < disabled_at + delay + timedelta(minutes=1)
    assert [c.request.details["version"] for c in rotation.fleet.audits("key.version.destroyed")] == [2, 3]
    assert rotation.fleet.versions == {1: "destroyed", 2: "destroyed", 3: "destroyed", 4: "enabled"}
    assert rotation.fleet.phases() == EVERY_PHASE


# ----------------------------------------------------------------------------------- approve


async def test_approve_commits_before_the_timer(rotation: Rotation) -> None:
    # Time runs only when the test moves it: the workflow is seen waiting, an hour passes,
    # then the approve commits at once, 23 hours before the timer would have.
    handle = await rotation.start(skip_time=False)
    await wait_phase(handle, AWAITING_COMMIT)
    assert await asyncio.wait_for(rotation.env.fast_forward(handle, timedelta(hours=1)), WAIT)
    assert (await handle.query(RotateKeyWorkflow.progress)).phase == AWAITING_COMMIT
    await handle.signal(RotateKeyWorkflow.approve)
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == DONE
    assert rotation.fleet.phases() == EVERY_PHASE
    [(action, at)] = rotation.fleet.retirements()
    assert action == "disable"
    assert started(progress) + timedelta(hours=1) <= at < started(progress) + timedelta(hours=2)


# ------------------------------------------------------------------------------------- abort


def not_retired(rotation: Rotation) -> None:
    assert rotation.fleet.retirements() == []
    assert rotation.fleet.versions[2] == rotation.fleet.versions[3] == "enabled"
    assert len(rotation.fleet.audits("rotation.aborted")) == 1
    assert rotation.fleet.audits("rotation.done") == []


async def test_abort_while_preparing_before_the_rotate(rotation: Rotation) -> None:
    gate = rotation.fleet.hold("audit", lambda request: request.event == "rotation.started")
    handle = await rotation.start()
    await entered(gate)
    await handle.signal(RotateKeyWorkflow.abort)
    gate.released.set()
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert rotation.fleet.phases() == [PREPARING, ABORTED]
    assert [call.name for call in rotation.fleet.calls if call.name != "audit"] == []
    assert rotation.fleet.primary == 3
    not_retired(rotation)


async def test_abort_while_preparing_after_the_rotate(rotation: Rotation) -> None:
    # PREPARING finishes what it started; the abort stops the sweep before its first batch.
    gate = rotation.fleet.hold("rotate_key")
    handle = await rotation.start()
    await entered(gate)
    await handle.signal(RotateKeyWorkflow.abort)
    gate.released.set()
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert (progress.old_primary, progress.new_version, progress.total) == (3, 4, 40)
    assert rotation.fleet.phases() == [PREPARING, REWRAPPING, ABORTED]
    assert rotation.fleet.called("plan_batches") == []
    not_retired(rotation)


async def test_abort_while_rewrapping(rotation: Rotation) -> None:
    # The batches in flight finish; no further batch starts.
    gate = rotation.fleet.hold("rewrap_batch", lambda request: request.start is None)
    handle = await rotation.start()
    await entered(gate)
    await handle.signal(RotateKeyWorkflow.abort)
    gate.released.set()
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert rotation.fleet.phases() == [PREPARING, REWRAPPING, ABORTED]
    assert len(rotation.fleet.called("rewrap_batch")) == 2
    assert (progress.total, progress.rewrapped, progress.remaining) == (40, 20, 20)
    not_retired(rotation)


async def test_abort_while_paused(rotation: Rotation) -> None:
    gate = rotation.fleet.hold("rewrap_batch", lambda request: request.start is None)
    handle = await rotation.start()
    await entered(gate)
    await handle.signal(RotateKeyWorkflow.pause)
    gate.released.set()
    paused = await wait_for_progress(handle, lambda p: p.paused and p.rewrapped == 20)
    assert paused.phase == REWRAPPING
    await handle.signal(RotateKeyWorkflow.abort)
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert rotation.fleet.phases() == [PREPARING, REWRAPPING, ABORTED]
    assert len(rotation.fleet.called("rewrap_batch")) == 2
    not_retired(rotation)


async def test_abort_while_verifying(rotation: Rotation) -> None:
    # VERIFYING has no checkpoint: the abort takes effect on entering AWAITING_COMMIT.
    gate = rotation.fleet.hold("verify_sample")
    handle = await rotation.start()
    await entered(gate)
    assert (await handle.query(RotateKeyWorkflow.progress)).phase == VERIFYING
    await handle.signal(RotateKeyWorkflow.abort)
    gate.released.set()
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert rotation.fleet.phases() == [PREPARING, REWRAPPING, VERIFYING, AWAITING_COMMIT, ABORTED]
    assert progress.rewrapped == 40
    not_retired(rotation)


async def test_abort_while_awaiting_commit(rotation: Rotation) -> None:
    handle = await rotation.start(skip_time=False)
    await wait_phase(handle, AWAITING_COMMIT)
    assert await asyncio.wait_for(rotation.env.fast_forward(handle, timedelta(hours=1)), WAIT)
    await handle.signal(RotateKeyWorkflow.abort)
    progress = await asyncio.wait_for(handle.result(), WAIT)

    assert progress.phase == ABORTED
    assert rotation.fleet.phases() == [PREPARING, REWRAPPING, VERIFYING, AWAITING_COMMIT, ABORTED]
    assert progress.rewrapped == 40
    not_retired(rotation)


# ------------------------------------------------------------------------------ pause, resume


async def test_pause_stops_new_batches_and_resume_continues(rotation: Rotation) -> None:
    gate = rotation.fleet.hold("rewrap_batch", lambda request: request.start is None)
    handle = await rotation.start()
    await entered(gate)
    await handle.signal(RotateKeyWorkflow.pause)
    gate.released.set()  # the two batches in flight finish

    paused = await wait_for_progress(handle, lambda p: p.paused and p.rewrapped == 20)
    await asyncio.sleep(0.5)  # room for a batch that should not start
    assert len(rotation.fleet.called("rewrap_batch")) == 2
    assert len(rotation.fleet.called("plan_batches")) == 1
    assert (paused.phase, paused.remaining) == (REWRAPPING, 20)

    await handle.signal(RotateKeyWorkflow.resume)
    progress = await asyncio.wait_for(handle.result(), WAIT)
    assert progress.phase == DONE
    assert not progress.paused
    assert counts(progress) == (40, 40, 0, 0, 0, 0, 3, 4)
    assert len(rotation.fleet.called("rewrap_batch")) == 4
    assert rotation.fleet.phases() == EVERY_PHASE


# --------------------------------------------------------------------- re-sweep and counts


async def test_failed_blobs_are_swept_again(rotation: Rotation) -> None:
    fleet = rotation.fleet
    fleet.fail_once = {"blob-0003", "blob-0031"}
    fleet.conflicts = {"blob-0010"}
    fleet.throttled = {"blob-0001", "blob-0002", "blob-0020"}
    _, progress = await rotation.run(grace_seconds=0)

    assert progress.phase == DONE
    # The two failures are counted again by the re-sweep, which re-wraps them.
    assert counts(progress) == (42, 39, 0, 1, 2, 3, 3, 4)
    assert fleet.phases() == RESWEPT
    planned_after = [call.request.after for call in fleet.called("plan_batches")]
    assert planned_after == [None, "blob-0019", "blob-0039", None, "blob-0031"]  # from the start again
    [counted] = fleet.audits("rewrap.counts")
    assert counted.request.details["failed"] == 2


# --------------------------------------------------------------------------- continue-as-new


def awkward_fleet() -> Fleet:
    fleet = Fleet(128)
    fleet.fail_once = {"blob-0007"}
    fleet.conflicts = {"blob-0100"}
    fleet.throttled = {"blob-0050", "blob-0120"}
    return fleet


async def test_continue_as_new_carries_the_state(temporal_time_skipping_env: WorkflowEnvironment) -> None:
    env = temporal_time_skipping_env
    # 16 rounds of 4 batches of 2 blobs: the history passes the lowered suggestion twice.
    async with rotating(env, awkward_fleet()) as rotation:
        handle, progress = await rotation.run(batch_size=2, batches_in_flight=4, grace_seconds=0)
    fleet = rotation.fleet
    runs = list(dict.fromkeys(call.run_id for call in fleet.calls))
    assert len(runs) >= 3
    assert runs[0] == handle.first_execution_run_id
    assert (await env.client.get_workflow_handle(handle.id).describe()).run_id == runs[-1]
    first = await env.client.get_workflow_handle(handle.id, run_id=runs[0]).fetch_history()
    assert first.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    assert {call.name for call in fleet.calls if call.run_id != runs[0]} >= {"plan_batches", "rewrap_batch"}

    # A continued run does not start the rotation again: one start, one rotate, from the first run.
    assert [call.run_id for call in fleet.audits("rotation.started")] == [runs[0]]
    assert [call.run_id for call in fleet.called("rotate_key")] == [runs[0]]
    first_task = next(e for e in first.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED)
    first_task_at = first_task.event_time.ToDatetime(tzinfo=UTC)  # truncated to microseconds
    assert abs(started(progress) - first_task_at) < timedelta(milliseconds=1)
    assert progress.phase == DONE
    assert fleet.phases() == RESWEPT  # blob-0007 failed once

    # The same fleet in two big batches needs no continue-as-new, and ends with the same counts.
    async with rotating(env, awkward_fleet()) as reference:
        _, without = await reference.run(batch_size=100, batches_in_flight=2, grace_seconds=0)
    assert len({call.run_id for call in reference.fleet.calls}) == 1
    assert counts(progress) == counts(without) == (129, 127, 0, 1, 1, 2, 3, 4)
    assert reference.fleet.phases() == fleet.phases()


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("batch_size", "batches_in_flight"),
    [(0, 2), (MAX_BATCH + 1, 2), (10, 0), (10, MAX_IN_FLIGHT + 1)],
)
async def test_out_of_range_sizing_is_refused_before_any_activity(
    rotation: Rotation, batch_size: int, batches_in_flight: int
) -> None:
    handle = await rotation.start(batch_size=batch_size, batches_in_flight=batches_in_flight)
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), WAIT)

    assert isinstance(failure.value.cause, ApplicationError)
    assert failure.value.cause.non_retryable
    assert f"got {batch_size} and {batches_in_flight}" in failure.value.cause.message
    assert rotation.fleet.calls == []


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("grace_seconds", float("inf")),
        ("grace_seconds", float("nan")),
        ("grace_seconds", -1.0),
        ("grace_seconds", MAX_WAIT_SECONDS + 1.0),
        ("destroy_after_seconds", 1e300),
    ],
)
async def test_waits_no_timer_could_take_are_refused_before_any_activity(
    rotation: Rotation, option: str, value: float
) -> None:
    # A starter other than rekey.client (which refuses these) must not leave a rotation whose
    # workflow task fails for ever: it fails at once, before anything happens.
    handle = await rotation.start(**{option: value})
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), WAIT)

    assert isinstance(failure.value.cause, ApplicationError)
    assert failure.value.cause.non_retryable
    assert failure.value.cause.message.startswith(f"{option} must be 0..{MAX_WAIT_SECONDS} (ten years)")
    assert rotation.fleet.calls == []
