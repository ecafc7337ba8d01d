"""MigrateGenerationWorkflow alone, on the time-skipping Temporal dev server, with stub
activities under the real names over a small in-memory fleet: hosts, each with an old and a new
agent and some hardware-sealed blobs; copies kept per moved blob; faults chosen per host."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.migration_types import (
    NEW_AGENT_FAILED,
    OLD_AGENT_UNREACHABLE,
    AttestInput,
    AttestResult,
    FleetInput,
    FleetPlan,
    GateInput,
    GateResult,
    HandoffInput,
    HandoffResult,
    HostPlan,
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
from audit.format import check_details
from workflows.migration import MigrateGenerationWorkflow, MigrateInput, MigrationProgress, migration_id

OLD, NEW = "app-v1", "app-v2"
WAIT = 8.0


@dataclass
class Call:
    name: str
    request: Any
    at: datetime
    run_id: str


@dataclass
class MigrationFleet:
    """``blobs``: blob id -> (host, generation); ``copies``: blob id -> host of a kept old copy."""

    hosts: list[str]
    blobs: dict[str, tuple[str, str]] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)
    kms: dict[str, tuple[str, str]] = field(default_factory=dict)
    """KMS-wrapped blobs: blob id -> (the host whose share it is in, generation)."""
    attest_reasons: list[str] = field(default_factory=list)
    fleet_reasons: list[str] = field(default_factory=list)
    old_down: set[str] = field(default_factory=set)
    new_fails: set[str] = field(default_factory=set)
    store_down: set[str] = field(default_factory=set)  # hosts whose hand-offs fail retryably (the store)
    gate_fails: set[str] = field(default_factory=set)
    gate_dead: set[str] = field(default_factory=set)  # hosts whose new agent is dead at the gate
    rewrite_once: set[str] = field(default_factory=set)  # blob ids the workload rewrites mid-hand-off
    late: list[tuple[str, str]] = field(default_factory=list)  # (blob, host) sealed by the old agent late
    calls: list[Call] = field(default_factory=list)
    audit: list[AuditInput] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    hold: asyncio.Event | None = None  # set: the first hand-off waits for it
    rollback_fails: int = 0  # how many rollback calls fail (non-retryable) before they work

    @classmethod
    def of(cls, hosts: int, per_host: int) -> MigrationFleet:
        fleet = cls([f"host-{i:02d}" for i in range(hosts)])
        for host in fleet.hosts:
            for n in range(per_host):
                fleet.blobs[f"{host}-b{n:03d}"] = (host, OLD)
        return fleet

    def record(self, name: str, request: Any) -> None:
        info = activity.info()
        self.calls.append(Call(name, request, info.scheduled_time, info.workflow_run_id or ""))

    def named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    def kms_in(self, host: str, generation: str) -> list[str]:
        return sorted(b for b, (h, g) in self.kms.items() if h == host and g == generation)

    def on(self, host: str, generation: str) -> list[str]:
        return sorted(b for b, (h, g) in self.blobs.items() if h == host and g == generation)


class StubMigrationActivities:
    def __init__(self, fleet: MigrationFleet) -> None:
        self.fleet = fleet

    @activity.defn(name="migration_fleet")
    async def fleet_plan(self, request: FleetInput) -> FleetPlan:
        self.fleet.record("migration_fleet", request)
        hosts = [
            HostPlan(
                h,
                f"{OLD}@{h}",
                f"{NEW}@{h}",
                len(self.fleet.on(h, request.from_generation)),
                kms_share=True,  # as the real plan: every host with a new agent has a share
                kms_lo=h,
                kms_blobs=len(self.fleet.kms_in(h, request.from_generation)),
            )
            for h in reversed(self.fleet.hosts)  # the workflow orders them itself
        ]
        kms = sum(h.kms_blobs for h in hosts)
        return FleetPlan(hosts, list(self.fleet.fleet_reasons), {"svn": [1, 2]}, kms)

    @activity.defn(name="migration_attest")
    async def attest(self, request: AttestInput) -> AttestResult:
        self.fleet.record("migration_attest", request)
        return AttestResult(len(request.agents), list(self.fleet.attest_reasons))

    @activity.defn(name="migration_release")
    async def release(self, request: ReleaseInput) -> int:
        self.fleet.record("migration_release", request)
        self.fleet.release.append(request.action)
        return 0

    @activity.defn(name="migration_handoff")
    async def handoff(self, request: HandoffInput) -> HandoffResult:
        self.fleet.record("migration_handoff", request)
        if self.fleet.hold is not None:
            await asyncio.wait_for(self.fleet.hold.wait(), WAIT)
        host = request.host_id
        if host in self.fleet.old_down:
            raise ApplicationError(
                f"old agent on {host} unreachable", host, type=OLD_AGENT_UNREACHABLE, non_retryable=True
            )
        if host in self.fleet.store_down:
            raise ApplicationError("the store is unreachable", type="StoreUnavailable")
        if host in self.fleet.new_fails:
            raise ApplicationError(
                f"new agent on {host} died", host, type=NEW_AGENT_FAILED, non_retryable=True
            )
        todo = [
            b
            for b in self.fleet.on(host, request.from_generation)
            if request.after is None or b > request.after
        ]
        batch = todo[: request.size]
        result = HandoffResult(attestations=2 if batch else 0)
        for blob in batch:
            if blob in self.fleet.rewrite_once:  # rewritten by the workload: handed off again
                self.fleet.rewrite_once.discard(blob)
                result.conflicts += 1
            self.fleet.blobs[blob] = (host, request.to_generation)
            self.fleet.copies[blob] = host
            result.moved += 1
        result.cursor = batch[-1] if batch else request.after
        result.done = len(todo) <= request.size
        return result

    @activity.defn(name="migration_rebind")
    async def rebind(self, request: RebindInput) -> HandoffResult:
        self.fleet.record("migration_rebind", request)
        host = request.host_id
        if host in self.fleet.new_fails:
            raise ApplicationError(
                f"new agent on {host} died", host, type=NEW_AGENT_FAILED, non_retryable=True
            )
        assert request.kms_lo == host  # the share the plan gave it
        todo = [
            b
            for b in self.fleet.kms_in(host, request.from_generation)
            if request.after is None or b > request.after
        ]
        batch = todo[: request.size]
        for blob in batch:
            self.fleet.kms[blob] = (host, request.to_generation)
            self.fleet.copies[blob] = host
        return HandoffResult(
            moved=len(batch),
            attestations=1 if batch else 0,
            cursor=batch[-1] if batch else request.after,
            done=len(todo) <= request.size,
        )

    @activity.defn(name="migration_kms_remaining")
    async def kms_remaining(self, request: KmsRemainingInput) -> dict[str, int]:
        self.fleet.record("migration_kms_remaining", request)
        return {
            h.host_id: len(self.fleet.kms_in(h.host_id, request.from_generation))
            for h in request.hosts
            if self.fleet.kms_in(h.host_id, request.from_generation)
        }

    @activity.defn(name="migration_gate")
    async def gate(self, request: GateInput) -> GateResult:
        self.fleet.record("migration_gate", request)
        for host in request.hosts:
            if host.host_id in self.fleet.gate_dead:  # as the real gate answers a dead new agent
                raise ApplicationError(
                    f"new agent on {host.host_id} died",
                    host.host_id,
                    type=NEW_AGENT_FAILED,
                    non_retryable=True,
                )
        failures = [
            f"{h.host_id}: sample did not open" for h in request.hosts if h.host_id in self.fleet.gate_fails
        ]
        return GateResult(sum(min(request.sample, 1) for _ in request.hosts), failures)

    @activity.defn(name="migration_rollback")
    async def rollback(self, request: RollbackInput) -> RollbackResult:
        self.fleet.record("migration_rollback", request)
        if self.fleet.rollback_fails > 0:
            self.fleet.rollback_fails -= 1
            raise ApplicationError("the store is unreachable", type="StoreUnavailable", non_retryable=True)
        result = RollbackResult()
        for blob, host in list(self.fleet.copies.items()):
            if host in request.host_ids:
                if blob in self.fleet.kms:
                    self.fleet.kms[blob] = (host, OLD)
                else:
                    self.fleet.blobs[blob] = (host, OLD)
                del self.fleet.copies[blob]
                result.restored += 1
        return result

    @activity.defn(name="migration_remaining")
    async def remaining(self, request: RemainingInput) -> dict[str, int]:
        self.fleet.record("migration_remaining", request)
        for blob, host in self.fleet.late:  # written through the old agent after its host moved
            self.fleet.blobs[blob] = (host, OLD)
        self.fleet.late.clear()
        counts: dict[str, int] = {}
        for host, generation in self.fleet.blobs.values():
            if generation == request.from_generation:
                counts[host] = counts.get(host, 0) + 1
        return counts

    @activity.defn(name="migration_narrow")
    async def narrow(self, request: NarrowInput) -> int:
        self.fleet.record("migration_narrow", request)
        deleted = len(self.fleet.copies)
        self.fleet.copies.clear()
        return deleted

    @activity.defn(name="audit")
    async def audit(self, request: AuditInput) -> None:
        self.fleet.record("audit", request)
        try:
            check_details(request.details)  # what the real audit log refuses, refused here too
        except (TypeError, ValueError) as exc:
            raise ApplicationError(str(exc), type=type(exc).__name__, non_retryable=True) from None
        self.fleet.audit.append(request)

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.fleet_plan,
            self.attest,
            self.release,
            self.handoff,
            self.rebind,
            self.kms_remaining,
            self.gate,
            self.rollback,
            self.remaining,
            self.narrow,
            self.audit,
        ]


@dataclass
class Migration:
    env: WorkflowEnvironment
    fleet: MigrationFleet
    task_queue: str

    async def start(
        self, *, skip_time: bool = True, **options: Any
    ) -> WorkflowHandle[Any, MigrationProgress]:
        """``skip_time=False``: the workflow's clock moves in real time, or by ``fast_forward``."""
        source = options.pop("from_generation", OLD)
        target = options.pop("to_generation", f"{NEW}-{uuid.uuid4().hex[:8]}")
        request = MigrateInput(source, target, requested_at=datetime.now(UTC).isoformat(), **options)
        with contextlib.nullcontext() if skip_time else self.env.with_time_skipping_disabled():
            return await self.env.client.start_workflow(
                MigrateGenerationWorkflow.run,
                request,
                id=migration_id(source, target),
                task_queue=self.task_queue,
            )


@asynccontextmanager
async def migrating(env: WorkflowEnvironment, fleet: MigrationFleet) -> AsyncIterator[Migration]:
    task_queue = f"migration-{uuid.uuid4()}"
    # As rekey's worker: the workflow on its queue, its activities on the migration queue.
    worker = Worker(env.client, task_queue=task_queue, workflows=[MigrateGenerationWorkflow])
    activities = Worker(
        env.client,
        task_queue=migration_task_queue(task_queue),
        activities=StubMigrationActivities(fleet).all(),
    )
    async with worker, activities:
        try:
            yield Migration(env, fleet, task_queue)
        finally:
            if fleet.hold is not None:
                fleet.hold.set()


async def wait_for(
    handle: WorkflowHandle[Any, MigrationProgress], ready: Callable[[MigrationProgress], bool]
) -> MigrationProgress:
    async with asyncio.timeout(WAIT):
        while True:
            progress = await handle.query(MigrateGenerationWorkflow.progress)
            if ready(progress):
                return progress
            await asyncio.sleep(0.05)
