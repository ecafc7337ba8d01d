"""One rotation: `RotationHandle` (status without a worker, watch, result, updates) and its reports."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from temporalio.api.enums.v1 import PendingActivityState, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import (
    TemporalError,
)
from temporalio.service import RPCError, RPCStatusCode

from rekey.client.errors import (
    InvalidId,
    InvalidOption,
    NoWorker,
    ProgressUnreadable,
    RekeyClientError,
    RotationBlocked,
    RotationFailed,
    RotationNotFound,
    RotationRefused,
    TemporalRequestFailed,
    UpdateUnanswered,
    cause_message,
    rpc_failure,
)
from rekey.client.ids import checked_key_ref, key_ref_of
from sealing.store import RewrapFailure, SealedStateStore
from workflows.rotation import (
    BLOCKED,
    PREPARING,
    Progress,
)
from workflows.rotation_state import KEY_REF_ATTRIBUTE, MEMO_PROGRESS, PHASE_ATTRIBUTE

START_TOKEN: Final = "rekey.start_token"  # noqa: S105  (a memo key, not a secret)
"""Memo key: the token of the start request that created the run (tells a start from an attach)."""
UPDATE_TIMEOUT: Final = timedelta(seconds=30)
"""How long an update waits for the workflow's answer (a worker must be polling)."""
POLLER_FRESH_S: Final = 90.0
"""A worker long-polls for up to about a minute; one not seen for longer is gone."""

# --------------------------------------------------------------------------------- rotations


def progress_from_memo(value: object) -> Progress | None:
    """The `Progress` the workflow last published in its memo (None before its first task);
    fields a newer workflow added and this client does not know are left out."""
    if not isinstance(value, dict):
        return None
    known = {f.name for f in fields(Progress)}
    try:
        return Progress(**{k: v for k, v in value.items() if k in known})
    except TypeError:  # not a progress this client can read
        return None


async def memo_progress(execution: WorkflowExecution, *, strict: bool = False) -> Progress | None:
    """The progress the rotation last published in its memo; None before a worker took it up.

    A memo this client cannot decode (another home's codec keys) is None too, so that a list
    shows the row without progress; with ``strict`` it is `ProgressUnreadable`, so that a
    status never passes it off as a rotation no worker has taken up."""
    try:
        return progress_from_memo((await execution.memo()).get(MEMO_PROGRESS))
    except Exception as exc:
        if strict:
            raise ProgressUnreadable(f"cannot read the progress of {execution.id}: {exc}") from None
        return None


@dataclass(frozen=True)
class RotationInfo:
    """One rotation workflow run as Temporal lists it (no worker needed)."""

    id: str
    key_ref: str
    """Empty if the id is not a rotation id (a RotateKeyWorkflow started under another id)."""
    run_id: str
    status: str
    """``RUNNING``, ``COMPLETED``, ``FAILED``, ``CANCELED``, ``TERMINATED`` or ``TIMED_OUT``."""
    started_at: datetime
    """When the rotation started (its first run, across continue-as-new)."""
    closed_at: datetime | None
    phase: str = ""
    """The rotation's phase as it last published it (empty before a worker took it up)."""
    task_queue: str = ""

    @classmethod
    def from_execution(cls, execution: WorkflowExecution, progress: Progress | None = None) -> RotationInfo:
        try:
            key_ref = key_ref_of(execution.id)
        except InvalidId:  # started by hand under another id: listed, with no key ref
            key_ref = ""
        started_at = execution.start_time
        if progress is not None and progress.started_at:
            with contextlib.suppress(ValueError):
                started_at = datetime.fromisoformat(progress.started_at)
        phase = progress.phase if progress else execution.typed_search_attributes.get(PHASE_ATTRIBUTE) or ""
        return cls(
            id=execution.id,
            key_ref=key_ref,
            run_id=execution.run_id,
            status=execution.status.name if execution.status is not None else "UNKNOWN",
            started_at=started_at,
            closed_at=execution.close_time,
            phase=phase,
            task_queue=execution.task_queue,
        )


@dataclass(frozen=True)
class PendingActivity:
    """An activity the rotation waits for, as Temporal records it (attempts and last failure)."""

    activity: str
    state: str
    attempt: int
    last_failure: str
    """One line; empty if no attempt has failed."""


@dataclass(frozen=True)
class RotationReport:
    """Everything `rekey rotate status` shows, from Temporal alone: no worker is needed."""

    info: RotationInfo
    progress: Progress
    worker_polling: bool
    """A worker polled the rotation's task queue in the last `POLLER_FRESH_S` seconds."""
    pending: tuple[PendingActivity, ...]


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return "".join(ch if ch.isprintable() else "?" for ch in line)[:limit]


class RotationHandle:
    """One rotation, by id: its progress, its end, and the updates that steer it.

    It always addresses the latest run, so it keeps working across continue-as-new."""

    def __init__(
        self, handle: WorkflowHandle[Any, Any], temporal: Client, *, started: bool | None = None
    ) -> None:
        self._handle = handle
        self._client = temporal
        self.started = started
        """From `RekeyClient.start_rotation`: True if this call started the rotation, False if
        it found one of the key running and attached to it (its options stay as they were)."""

    @property
    def id(self) -> str:
        return self._handle.id

    @property
    def key_ref(self) -> str:
        return key_ref_of(self._handle.id)

    async def _describe(self) -> Any:
        try:
            return await self._handle.describe(rpc_timeout=timedelta(seconds=2))
        except RPCError as exc:
            rpc_failure(exc, RotationNotFound, f"no rotation {self.id}", f"cannot describe {self.id}")

    async def status(self) -> Progress:
        """Phase and counts as the rotation last published them (no worker needed)."""
        return (await self.report()).progress

    async def describe(self) -> RotationInfo:
        """The latest run's status as Temporal records it (no worker needed)."""
        description = await self._describe()
        return RotationInfo.from_execution(description, await memo_progress(description))

    async def report(self) -> RotationReport:
        """Progress, the workflow's status, whether a worker polls, and the activities it waits
        for with their attempts: one describe and one task-queue request, no worker needed."""
        description = await self._describe()
        progress = await memo_progress(description, strict=True)
        info = RotationInfo.from_execution(description, progress)
        if progress is None:  # no worker has run its first task yet
            progress = empty_progress(info.key_ref, "waiting for a worker to take the rotation up")
        pending = tuple(
            [
                PendingActivity(
                    activity=p.activity_type.name,
                    state=PendingActivityState.Name(p.state).removeprefix("PENDING_ACTIVITY_STATE_"),
                    attempt=p.attempt,
                    last_failure=await self._failure_text(p.last_failure)
                    if p.HasField("last_failure")
                    else "",
                )
                for p in description.raw_description.pending_activities
            ]
        )
        polling = info.status != "RUNNING" or await worker_polling(self._client, info.task_queue)
        return RotationReport(info, progress, polling, pending)

    async def _failure_text(self, failure: Any) -> str:
        """One line of a recorded failure, decoded with the client's codec (the payload codec
        encrypts failure messages, so the server only holds "Encoded failure")."""
        try:
            error = await self._client.data_converter.decode_failure(failure)
        except Exception:  # a failure this client's codec cannot decode
            return _one_line(failure.message)
        return _one_line(cause_message(error))

    async def result(self) -> Progress:
        """Wait for the end: the final progress (phase ``DONE`` or ``ABORTED``).

        `RotationFailed` if the workflow failed, with the message of what failed. A BLOCKED
        rotation has not ended: this keeps waiting (`watch` stops there)."""
        try:
            result: Progress = await self._handle.result()
        except WorkflowFailureError as exc:
            raise RotationFailed(self.id, cause_message(exc.cause)) from None
        except RPCError as exc:
            rpc_failure(exc, RotationNotFound, f"no rotation {self.id}", f"cannot wait for {self.id}")
        return result

    async def watch(
        self,
        interval: float = 0.5,
        on_unavailable: Callable[[Exception], object] | None = None,
        *,
        stop_when_blocked: bool = True,
    ) -> AsyncIterator[Progress]:
        """Progress every ``interval`` seconds while the rotation runs, then its result.

        Progress comes from the workflow's memo (no worker needed, and none lost during
        continue-as-new); a describe that fails is skipped and reported to ``on_unavailable``.
        Raises what `result` raises, and `RotationBlocked` when the rotation stops in BLOCKED
        (unless ``stop_when_blocked`` is False)."""
        ended = asyncio.ensure_future(self.result())
        try:
            while not ended.done():
                try:
                    progress = await memo_progress(await self._describe(), strict=True)
                except ProgressUnreadable:
                    raise  # not for a moment: this client's codec keys will not read it later either
                except (RekeyClientError, TemporalError) as exc:
                    if on_unavailable is not None:
                        on_unavailable(exc)
                else:
                    if progress is not None:
                        yield progress
                        if progress.phase == BLOCKED and stop_when_blocked:
                            raise RotationBlocked(self.id, progress)
                await asyncio.wait({ended}, timeout=interval)
            yield ended.result()
        finally:
            if not ended.done():
                ended.cancel()
                await asyncio.gather(ended, return_exceptions=True)

    async def _update(self, name: str, update_id: str | None = None) -> str:
        """Send update ``name``; the workflow's answer (one line), or `RotationRefused` with its
        reason. Nothing is sent when no worker polls (it could not be answered)."""
        if update_id is not None:
            check_update_id(update_id)
        info = await self.describe()
        if info.status != "RUNNING":
            raise RotationRefused(
                f"cannot {name.replace('_', '-')} {self.id}: it has ended ({info.status}"
                f"{', ' + info.phase if info.phase else ''})"
            )
        if not await _worker_appears(self._client, info.task_queue):
            raise NoWorker(
                f"cannot {name.replace('_', '-')} {self.id}: no rekey worker is polling task queue"
                f" {info.task_queue!r} (start one with `rekey worker`); nothing was sent"
            )
        update_id = update_id or f"{name}-{uuid.uuid4()}"
        try:
            answer = await self._handle.execute_update(
                name, id=update_id, result_type=str, rpc_timeout=UPDATE_TIMEOUT
            )
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            raise UpdateUnanswered(
                f"{name.replace('_', '-')} was sent to {self.id} but not answered within"
                f" {UPDATE_TIMEOUT.total_seconds():.0f}s (update id {update_id}); it may still apply when"
                " a worker takes it up: check `rekey rotate status`"
            ) from None
        except WorkflowUpdateFailedError as exc:
            raise RotationRefused(
                f"{name.replace('_', '-')} refused by {self.id}: {cause_message(exc.cause)}"
            ) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RotationRefused(f"cannot {name.replace('_', '-')} {self.id}: it has ended") from None
            raise TemporalRequestFailed(f"cannot {name.replace('_', '-')} {self.id}: {exc.message}") from None
        return str(answer)

    async def pause(self, *, update_id: str | None = None) -> str:
        """Pause: the sweep stops after the batches in flight; in AWAITING_COMMIT and
        AWAITING_DESTROY the commit or destroy waits while paused. Returns the answer."""
        return await self._update("pause", update_id)

    async def resume(self, *, update_id: str | None = None) -> str:
        """Resume a paused rotation, or a BLOCKED one once its cause is fixed."""
        return await self._update("resume", update_id)

    async def abort(self, *, update_id: str | None = None) -> str:
        """Abort before retirement: every blob stays readable. Refused once disabling began."""
        return await self._update("abort", update_id)

    async def approve(self, *, update_id: str | None = None) -> str:
        """Commit now instead of waiting for the grace period (only in AWAITING_COMMIT)."""
        return await self._update("approve", update_id)

    async def approve_destroy(self, *, update_id: str | None = None) -> str:
        """Destroy the old versions now instead of after the destroy delay (only in AWAITING_DESTROY)."""
        return await self._update("approve_destroy", update_id)

    async def cancel_destroy(self, *, update_id: str | None = None) -> str:
        """Keep the old versions disabled and never destroy them (only in AWAITING_DESTROY)."""
        return await self._update("cancel_destroy", update_id)


def start_attributes(key_ref: str) -> TypedSearchAttributes:
    """Set at start, so a rotation no worker took up yet is found by key and phase."""
    return TypedSearchAttributes(
        [SearchAttributePair(KEY_REF_ATTRIBUTE, key_ref), SearchAttributePair(PHASE_ATTRIBUTE, PREPARING)]
    )


def check_update_id(update_id: str, name: str = "update_id") -> str:
    """``update_id`` if it is 1-200 printable characters; else `InvalidOption`."""
    if not (isinstance(update_id, str) and 1 <= len(update_id) <= 200 and update_id.isprintable()):
        raise InvalidOption(f"{name} must be 1-200 printable characters, got {update_id!r}")
    return update_id


def empty_progress(key_ref: str, note: str) -> Progress:
    return Progress(key_ref, PREPARING, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, False, "", "", note)


async def worker_polling(temporal: Client, task_queue: str) -> bool:
    """Whether a worker polled ``task_queue`` for workflow tasks in the last `POLLER_FRESH_S` s."""
    try:
        answer = await temporal.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=temporal.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            ),
            retry=True,
            timeout=timedelta(seconds=2),
        )
    except RPCError as exc:
        raise TemporalRequestFailed(f"cannot describe task queue {task_queue!r}: {exc.message}") from None
    now = datetime.now(UTC)
    return any(
        (now - poller.last_access_time.ToDatetime(tzinfo=UTC)).total_seconds() < POLLER_FRESH_S
        for poller in answer.pollers
    )


async def _worker_appears(temporal: Client, task_queue: str, within: float = 1.5) -> bool:
    """`worker_polling`, asked again for ``within`` seconds: a worker that has just started
    may not have sent its first poll yet."""
    deadline = asyncio.get_running_loop().time() + within
    while not await worker_polling(temporal, task_queue):
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.5)
    return True


def rotation_failures(
    store: SealedStateStore, key_ref: str, version: int, *, after: str | None = None, limit: int = 100
) -> list[RewrapFailure]:
    """The blobs of ``key_ref`` a rotation to ``version`` could not re-wrap and that are still
    below it, with why, by blob id (``after`` pages on). The store keeps every one."""
    try:
        return store.rewrap_failures(str(checked_key_ref(key_ref)), version, after=after, limit=limit)
    except ValueError as exc:  # the store's own check of version, after and limit
        raise InvalidOption(str(exc)) from None
