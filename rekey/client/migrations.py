"""Generation migrations: `start_migration` and `MigrationHandle` (status without a worker,
watch, result, the updates that steer it)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from activities.types import TASK_QUEUE
from rekey.client.errors import (
    InvalidOption,
    MigrationFailed,
    MigrationOverlaps,
    RekeyClientError,
    RotationNotFound,
    RotationRefused,
    TemporalRequestFailed,
    UpdateUnanswered,
    cause_message,
    rpc_failure,
)
from rekey.client.ids import Duration, seconds
from rekey.client.rotations import START_TOKEN
from sealing.names import InvalidName, check_generation_id
from sealing.store import MigrationClaim, SealedStateStore
from workflows.migration import MigrateGenerationWorkflow, MigrateInput, MigrationProgress, migration_id
from workflows.migration_state import (
    DEFAULT_WAVES,
    MAX_JITTER_SECONDS,
    MEMO_PROGRESS,
    ON_FAILURE,
    WaveCount,
)

__all__ = [
    "DEFAULT_JITTER_SECONDS",
    "MAX_JITTER_SECONDS",
    "MigrateInput",
    "MigrationHandle",
    "MigrationProgress",
    "migration_request",
    "open_migrations",
    "parse_waves",
    "release_claim",
    "start_migration",
]
UPDATE_TIMEOUT = timedelta(seconds=30)
DEFAULT_JITTER_SECONDS = 2.0
"""The default bound of the random delay before each host's first batch of a wave."""


def parse_waves(text: str) -> list[int]:
    """``1,10,50,100`` -> [1, 10, 50, 100]: increasing percentages ending at 100."""
    try:
        waves = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidOption(f"--waves must be comma-separated percentages, got {text!r}") from None
    if not waves or any(not 1 <= w <= 100 for w in waves) or waves != sorted(set(waves)) or waves[-1] != 100:
        raise InvalidOption(f"--waves must be increasing percentages in 1..100 ending at 100, got {text!r}")
    return waves


def progress_from_memo(value: object) -> MigrationProgress | None:
    if not isinstance(value, dict):
        return None
    known = {f.name for f in fields(MigrationProgress)}
    try:
        progress = MigrationProgress(**{k: v for k, v in value.items() if k in known})
    except TypeError:
        return None
    from workflows.migration_state import HostProgress

    progress.hosts = [HostProgress(**h) if isinstance(h, dict) else h for h in progress.hosts]
    progress.wave_counts = [WaveCount(**w) if isinstance(w, dict) else w for w in progress.wave_counts]
    return progress


class MigrationHandle:
    def __init__(
        self, handle: WorkflowHandle[Any, Any], temporal: Client, *, started: bool | None = None
    ) -> None:
        self._handle = handle
        self._client = temporal
        self.started = started

    @property
    def id(self) -> str:
        return self._handle.id

    async def status(self) -> MigrationProgress | None:
        """The progress the migration last published in its memo (None before a worker took it
        up); no worker needed."""
        try:
            description = await self._handle.describe(rpc_timeout=timedelta(seconds=5))
        except RPCError as exc:
            rpc_failure(exc, RotationNotFound, f"no migration {self.id}", f"cannot describe {self.id}")
        return progress_from_memo((await description.memo()).get(MEMO_PROGRESS))

    async def result(self) -> MigrationProgress:
        try:
            result: MigrationProgress = await self._handle.result()
        except WorkflowFailureError as exc:
            raise MigrationFailed(self.id, cause_message(exc.cause)) from None
        except RPCError as exc:
            rpc_failure(exc, RotationNotFound, f"no migration {self.id}", f"cannot wait for {self.id}")
        return result

    async def watch(self, interval: float = 0.5) -> AsyncIterator[MigrationProgress]:
        """Progress every ``interval`` seconds from the memo while the migration runs, then its result."""
        ended = asyncio.ensure_future(self.result())
        try:
            while not ended.done():
                try:
                    progress = await self.status()
                except RekeyClientError:
                    progress = None
                if progress is not None:
                    yield progress
                await asyncio.wait({ended}, timeout=interval)
            yield ended.result()
        finally:
            if not ended.done():
                ended.cancel()
                await asyncio.gather(ended, return_exceptions=True)

    async def _update(self, name: str) -> str:
        update_id = f"{name}-{uuid.uuid4()}"
        try:
            answer = await self._handle.execute_update(
                name, id=update_id, result_type=str, rpc_timeout=UPDATE_TIMEOUT
            )
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            raise UpdateUnanswered(
                f"{name} was sent to {self.id} but not answered within {UPDATE_TIMEOUT.total_seconds():.0f}s"
                " (is a rekey worker running?)"
            ) from None
        except WorkflowUpdateFailedError as exc:
            raise RotationRefused(f"{name} refused by {self.id}: {cause_message(exc.cause)}") from None
        except RPCError as exc:
            raise TemporalRequestFailed(f"cannot {name} {self.id}: {exc.message}") from None
        return str(answer)

    async def pause(self) -> str:
        return await self._update("pause")

    async def resume(self) -> str:
        return await self._update("resume")

    async def abort(self) -> str:
        return await self._update("abort")

    async def approve(self) -> str:
        return await self._update("approve")


def migration_handle(temporal: Client, workflow_id: str) -> MigrationHandle:
    if not workflow_id.startswith("migrate:") or workflow_id.count(":") != 2:
        raise InvalidOption(f"a migration id is migrate:<from>:<to>, got {workflow_id!r}")
    return MigrationHandle(temporal.get_workflow_handle(workflow_id), temporal)


def migration_request(
    from_generation: str,
    to_generation: str,
    *,
    waves: Sequence[int] = DEFAULT_WAVES,
    grace: Duration = 24 * 3600,
    on_failure: str = "rollback",
    gate_sample: int = 5,
    allow_same_svn: bool = False,
    jitter: Duration = DEFAULT_JITTER_SECONDS,
    started_by: str = "",
) -> MigrateInput:
    """The checked start input of ``migrate:<from>:<to>``; `InvalidOption` or `InvalidDuration`
    for a bad one (nothing is sent)."""
    try:
        check_generation_id(from_generation)
        check_generation_id(to_generation)
    except InvalidName as exc:
        raise InvalidOption(str(exc)) from None
    if from_generation == to_generation:
        raise InvalidOption("--from and --to must be different generations")
    if ":" in from_generation or ":" in to_generation:
        raise InvalidOption(
            "generation ids with ':' cannot be migrated: migrate:<from>:<to> would name two"
            " migrations (a:b -> c and a -> b:c); register the generation under an id without ':'"
        )
    if on_failure not in ON_FAILURE:
        raise InvalidOption(f"--on-failure must be one of {', '.join(ON_FAILURE)}")
    if isinstance(gate_sample, bool) or not 0 <= gate_sample <= 1000:
        raise InvalidOption("--gate-sample must be 0..1000")
    jitter_seconds = seconds(jitter, "jitter")
    if jitter_seconds > MAX_JITTER_SECONDS:
        raise InvalidOption(f"--jitter must be at most {MAX_JITTER_SECONDS // 60}m, got {jitter_seconds:g}s")
    return MigrateInput(
        from_generation,
        to_generation,
        waves=parse_waves(",".join(str(w) for w in waves)),
        grace_seconds=seconds(grace, "grace"),
        on_failure=on_failure,
        gate_sample=gate_sample,
        allow_same_svn=allow_same_svn,
        requested_at=datetime.now(UTC).isoformat(),
        started_by=started_by,
        jitter_seconds=jitter_seconds,
    )


def _generations_of(workflow_id: str) -> tuple[str, str] | None:
    parts = workflow_id.split(":")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "migrate" else None


async def open_migrations(temporal: Client, *generations: str) -> list[str]:
    """Ids of the running migrations that move state from or to any of ``generations``
    (Temporal's visibility; the workflow's own claim at ATTESTING catches a racing start)."""
    wanted, found = set(generations), []
    query = f"WorkflowType = '{MigrateGenerationWorkflow.__name__}' AND ExecutionStatus = 'Running'"
    try:
        async for execution in temporal.list_workflows(query):
            pair = _generations_of(execution.id)
            if pair is not None and wanted & set(pair):
                found.append(execution.id)
    except RPCError as exc:
        raise TemporalRequestFailed(f"cannot list the running migrations: {exc.message}") from None
    return sorted(set(found))


async def release_claim(temporal: Client, store: SealedStateStore, workflow_id: str) -> list[MigrationClaim]:
    """Release the generation claims of migration ``workflow_id`` whose workflow is no longer
    running (an operator terminated it, so it could not release them itself); the claims
    released. `MigrationOverlaps` while it runs: abort it instead (its rollback releases them)."""
    if _generations_of(workflow_id) is None:
        raise InvalidOption(f"a migration id is migrate:<from>:<to>, got {workflow_id!r}")
    try:
        description = await temporal.get_workflow_handle(workflow_id).describe()
        running = description.status == WorkflowExecutionStatus.RUNNING
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise TemporalRequestFailed(f"cannot describe {workflow_id}: {exc.message}") from None
        running = False
    if running:
        raise MigrationOverlaps(
            f"{workflow_id} is still running: its claims are released when it ends"
            f" (rekey migrate abort {workflow_id} rolls it back)"
        )
    claims = [c for c in store.migration_claims() if c.migration_id == workflow_id]
    store.release_claims(workflow_id)
    return claims


async def start_migration(
    temporal: Client,
    from_generation: str,
    to_generation: str,
    *,
    waves: Sequence[int] = DEFAULT_WAVES,
    grace: Duration = 24 * 3600,
    on_failure: str = "rollback",
    gate_sample: int = 5,
    allow_same_svn: bool = False,
    jitter: Duration = DEFAULT_JITTER_SECONDS,
    started_by: str = "",
    task_queue: str = TASK_QUEUE,
) -> MigrationHandle:
    """Start ``migrate:<from>:<to>``, or attach to the one running: the handle's ``started`` is
    False then. Two starts at once start one workflow (the id's conflict policy).
    `MigrationOverlaps` (nothing started) while another migration involving either generation
    runs (``migrate:<from>:<x>``, ``migrate:<x>:<to>``, ...)."""
    request = migration_request(
        from_generation,
        to_generation,
        waves=waves,
        grace=grace,
        on_failure=on_failure,
        gate_sample=gate_sample,
        allow_same_svn=allow_same_svn,
        jitter=jitter,
        started_by=started_by,
    )
    workflow_id = migration_id(from_generation, to_generation)
    overlapping = [
        m for m in await open_migrations(temporal, from_generation, to_generation) if m != workflow_id
    ]
    if overlapping:
        raise MigrationOverlaps(
            f"cannot start {workflow_id}: {', '.join(overlapping)} involves {from_generation} or"
            f" {to_generation} and has not ended (wait for it to end DONE or ROLLED_BACK, or abort it)"
        )
    token = uuid.uuid4().hex
    try:
        handle = await temporal.start_workflow(
            MigrateGenerationWorkflow.run,
            request,
            id=workflow_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            memo={START_TOKEN: token},
        )
        description = await handle.describe()
        started = (await description.memo()).get(START_TOKEN) == token
    except RPCError as exc:
        raise TemporalRequestFailed(f"cannot start {workflow_id}: {exc.message}") from None
    return MigrationHandle(handle, temporal, started=started)
