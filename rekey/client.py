"""The rekey Python API: start, watch and steer key rotations, and schedule them, over Temporal.

Everything the ``rekey rotate`` and ``rekey schedule`` commands do goes through this module,
so automation can do the same without the command line::

    import asyncio

    from rekey.client import AWAITING_COMMIT, DONE, RekeyClient
    from rekey.config import load_settings

    async def rotate(key_ref: str) -> None:
        client = await RekeyClient.connect(load_settings())
        rotation = await client.start_rotation(key_ref, grace="24h")
        approved = False
        async for progress in rotation.watch():  # the last one is the result
            print(progress.phase, progress.rewrapped, "/", progress.total)
            if progress.phase == AWAITING_COMMIT and not approved:
                await rotation.approve()  # our own checks passed: retire the old version now
                approved = True
        assert progress.phase == DONE  # a failed workflow raised RotationFailed instead

    asyncio.run(rotate("vault:orders"))

Ids are built and parsed here only: ``rotate:<backend>:<name>`` for the rotation of a key,
whoever starts it, and ``schedule:rotate:<backend>:<name>`` for its schedule. A schedule starts a
small launcher workflow (``launch:rotate:<backend>:<name>-<time>``) that starts the key's
rotation under its one id, or records that one is running; so a key never has two rotations at
once. Wherever a method takes an id, the bare key ref (``vault:orders``) works as well.

Status needs no worker: the workflow keeps its phase and counts in its memo and in search
attributes (``RekeyKeyRef``, ``RekeyPhase``, ``RekeyRemaining``), which Temporal returns from
``describe``. Pause, resume, abort, approve, approve-destroy and cancel-destroy are workflow
updates: the workflow's validator answers yes or no at once (`RotationRefused` says why).

Every error is a `RekeyClientError` with a one-line message and the exit code the command line
uses for it; none carries key material (the payload codec encrypts workflow inputs and results).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NoReturn

from temporalio.api.enums.v1 import PendingActivityState, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleDescription,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import (
    ActivityError,
    ChildWorkflowError,
    FailureError,
    TemporalError,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.types import DEFAULT_BATCH, DEFAULT_IN_FLIGHT, MAX_BATCH, MAX_IN_FLIGHT, TASK_QUEUE
from attestation.errors import AttestationError
from attestation.policy import parse_duration as parse_policy_duration
from audit import check_text, default_actor
from kms_adapters.keyref import InvalidKeyRef, KeyRef
from rekey.config import Settings
from sealing.store import RewrapFailure, SealedStateStore
from workflows.launcher import LaunchRotationWorkflow
from workflows.rotation import (
    ABORTED,
    AWAITING_COMMIT,
    AWAITING_DESTROY,
    BLOCKED,
    DESTROYING,
    DONE,
    MAX_WAIT_SECONDS,
    PHASES,
    PREPARING,
    RETIRING,
    REWRAPPING,
    VERIFYING,
    LaunchRotationInput,
    Progress,
    RotateKeyInput,
    RotateKeyWorkflow,
)
from workflows.rotation_state import KEY_REF_ATTRIBUTE, MEMO_PROGRESS, PHASE_ATTRIBUTE

__all__ = [
    "ABORTED",
    "AWAITING_COMMIT",
    "AWAITING_DESTROY",
    "BLOCKED",
    "DEFAULT_BATCH",
    "DEFAULT_IN_FLIGHT",
    "DESTROYING",
    "DONE",
    "LAUNCH_PREFIX",
    "MAX_BATCH",
    "MAX_IN_FLIGHT",
    "PHASES",
    "PREPARING",
    "RETIRING",
    "REWRAPPING",
    "ROTATION_PREFIX",
    "SCHEDULE_PREFIX",
    "VERIFYING",
    "Duration",
    "InvalidDuration",
    "InvalidId",
    "InvalidOption",
    "NoWorker",
    "PendingActivity",
    "Progress",
    "RekeyClient",
    "RekeyClientError",
    "RotationBlocked",
    "RotationFailed",
    "RotationHandle",
    "RotationInfo",
    "RotationNotFound",
    "RotationRefused",
    "RotationReport",
    "RotationSchedule",
    "ScheduleExists",
    "ScheduleNotFound",
    "TemporalRequestFailed",
    "TemporalUnreachable",
    "connect",
    "data_converter",
    "key_ref_of",
    "parse_duration",
    "parse_rotation_id",
    "parse_schedule_id",
    "rotation_failures",
    "rotation_id",
    "schedule_id",
    "seconds",
]

START_TOKEN: Final = "rekey.start_token"  # noqa: S105  (a memo key, not a secret)
"""Memo key: the token of the start request that created the run (tells a start from an attach)."""
ROTATION_PREFIX: Final = "rotate:"
SCHEDULE_PREFIX: Final = "schedule:rotate:"
LAUNCH_PREFIX: Final = "launch:rotate:"
UPDATE_TIMEOUT: Final = timedelta(seconds=30)
"""How long an update waits for the workflow's answer (a worker must be polling)."""
POLLER_FRESH_S: Final = 90.0
"""A worker long-polls for up to about a minute; one not seen for longer is gone."""
DEFAULT_GRACE: Final = 24 * 3600.0
"""Seconds a rotation waits before retiring the old versions, unless approved earlier."""

# Rotations started by schedules before the launcher had the scheduled time appended.
_SCHEDULED_SUFFIX: Final = re.compile(r"-[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z\Z")

Duration = float | int | timedelta | str
"""Seconds, a `timedelta`, or text like ``0``, ``30s``, ``15m``, ``24h``, ``7d``, ``1h30m``."""


# ----------------------------------------------------------------------------------- errors


class RekeyClientError(Exception):
    """Base of every error this module raises; ``exit_code`` is the command line's for it."""

    exit_code = 1


class TemporalUnreachable(RekeyClientError):
    """The Temporal frontend does not answer at the configured address."""


class TemporalRequestFailed(RekeyClientError):
    """Temporal refused or could not answer a request (other than for a missing rotation or schedule)."""


class InvalidId(RekeyClientError):
    """Text given as a rotation id, schedule id or key ref is none of these."""

    exit_code = 2


class InvalidDuration(RekeyClientError):
    """A duration is not one rekey can use (malformed, negative, or zero where it must not be)."""

    exit_code = 2


class InvalidOption(RekeyClientError):
    """A rotation option is out of range (batch size, batches in flight, who started it)."""

    exit_code = 2


class RotationRefused(RekeyClientError):
    """The rotation said no to a pause, resume, abort, approve, approve-destroy or cancel-destroy
    (its phase does not allow it), or it has ended; the message says why."""

    exit_code = 2


class NoWorker(RekeyClientError):
    """No rekey worker is polling the rotation's task queue, so nothing can answer a request."""


class RotationBlocked(RekeyClientError):
    """The rotation stopped in BLOCKED; ``reason`` is why. It waits for resume or abort."""

    def __init__(self, rotation_id: str, progress: Progress) -> None:
        super().__init__(
            f"rotation {rotation_id} is BLOCKED in {progress.blocked_in}: {progress.blocked_reason}"
            f" (fix the cause, then `rekey rotate resume {rotation_id}`, or abort it)"
        )
        self.rotation_id = rotation_id
        self.progress = progress


class RotationNotFound(RekeyClientError):
    """No rotation has this id (for a signal: none is running under it)."""

    exit_code = 2


class RotationFailed(RekeyClientError):
    """The rotation workflow failed; ``cause`` is what failed, as the workflow reported it."""

    def __init__(self, rotation_id: str, cause: str) -> None:
        super().__init__(f"rotation {rotation_id} failed: {cause}")
        self.rotation_id = rotation_id
        self.cause = cause


class ScheduleExists(RekeyClientError):
    """A rotation schedule for this key exists already."""

    exit_code = 2


class ScheduleNotFound(RekeyClientError):
    """No rotation schedule has this id."""

    exit_code = 2


# -------------------------------------------------------------------------- ids and durations


def _key_ref(text: str, context: str = "") -> KeyRef:
    try:
        ref = KeyRef.parse(text)
    except InvalidKeyRef as exc:
        raise InvalidId(f"{context}{exc}") from None
    if not text.isprintable():  # KeyRef.parse lets a trailing newline through (its `$`)
        raise InvalidId(f"{context}key reference {text!r}: name must be 1-128 of letters, digits, _ . / -")
    return ref


def rotation_id(key_ref: str) -> str:
    """``rotate:<backend>:<name>``, the workflow id of the rotation of ``key_ref``."""
    return f"{ROTATION_PREFIX}{_key_ref(key_ref)}"


def schedule_id(key_ref: str) -> str:
    """``schedule:rotate:<backend>:<name>``, the id of the rotation schedule of ``key_ref``."""
    return f"{SCHEDULE_PREFIX}{_key_ref(key_ref)}"


def parse_rotation_id(text: str) -> str:
    """The rotation id ``text`` names: a rotation id (one a schedule started included) or a key ref."""
    if not text.startswith(ROTATION_PREFIX):
        return rotation_id(text)
    rest = text[len(ROTATION_PREFIX) :]
    _key_ref(_SCHEDULED_SUFFIX.sub("", rest), f"rotation id {text!r}: ")
    return text


def parse_schedule_id(text: str) -> str:
    """The schedule id ``text`` names: a schedule id or the key ref of the schedule's key."""
    if not text.startswith(SCHEDULE_PREFIX):
        return schedule_id(text)
    _key_ref(text[len(SCHEDULE_PREFIX) :], f"schedule id {text!r}: ")
    return text


def key_ref_of(rotation_or_schedule_id: str) -> str:
    """The key ref a rotation id or schedule id (or a key ref) is about."""
    text = rotation_or_schedule_id
    if text.startswith(SCHEDULE_PREFIX):
        return str(_key_ref(parse_schedule_id(text)[len(SCHEDULE_PREFIX) :]))
    if text.startswith(ROTATION_PREFIX):
        return str(_key_ref(_SCHEDULED_SUFFIX.sub("", parse_rotation_id(text)[len(ROTATION_PREFIX) :])))
    return str(_key_ref(text))


def parse_duration(text: str, name: str = "duration") -> float:
    """``0``, ``0s``, ``30s``, ``15m``, ``24h``, ``7d`` (or combinations like ``1h30m``) -> seconds.

    ``name`` starts the error message (the command line passes the option, ``--grace``)."""
    if text.strip() in ("0", "0s"):
        return 0.0
    try:
        value = parse_policy_duration(text).total_seconds()
    except OverflowError:
        value = math.inf  # refused below with the limit named
    except (AttestationError, ValueError):
        raise InvalidDuration(f"{name} {text!r} is not a duration like 30s, 15m, 24h or 7d") from None
    return _in_range(value, text, name)


def _in_range(value: float, given: object, name: str) -> float:
    if not value >= 0:  # NaN fails it too
        raise InvalidDuration(f"{name} must not be negative, got {given!r}")
    if value > MAX_WAIT_SECONDS:  # a timer the workflow could not set, or a typo
        raise InvalidDuration(f"{name} {given!r} is longer than {MAX_WAIT_SECONDS // 86400}d (ten years)")
    return value


def seconds(value: Duration, name: str = "duration") -> float:
    """A `Duration` in seconds; `InvalidDuration` if it is malformed, negative or longer than
    ten years (`MAX_WAIT_SECONDS`)."""
    if isinstance(value, str):
        return parse_duration(value, name)
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise InvalidDuration(f"{name} must be seconds, a timedelta or text like 24h, got {value!r}")
    return _in_range(value.total_seconds() if isinstance(value, timedelta) else float(value), value, name)


# ------------------------------------------------------------------------------- connecting


def data_converter(settings: Settings) -> Any:
    """The payload converter with rekey's codec (keys under ``<home>/codec``), as the workers use."""
    from rekey.codec import data_converter as codec_converter

    return codec_converter(settings.home)


async def connect(settings: Settings) -> Client:
    """A Temporal client for ``settings`` (address, namespace, payload codec)."""
    try:
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=data_converter(settings),
        )
    except ValueError as exc:  # the SDK refuses the address itself ("invalid target URL")
        raise TemporalUnreachable(
            f"cannot reach Temporal at {settings.temporal_address!r}: {str(exc).splitlines()[0]}"
            " (temporal_address must be host:port)"
        ) from None
    except RuntimeError as exc:  # the SDK's connection failure
        raise TemporalUnreachable(
            f"cannot reach Temporal at {settings.temporal_address}: {str(exc).splitlines()[0]}"
            " (start it with `rekey dev up`)"
        ) from None


def _cause_message(error: BaseException | None) -> str:
    # An activity or child-workflow error only says "Activity task failed"; what happened is
    # the message of the innermost cause.
    while isinstance(error, ActivityError | ChildWorkflowError) and error.cause is not None:
        error = error.cause
    if isinstance(error, FailureError):
        return error.message
    return str(error)


def _rpc_failure(error: RPCError, not_found: type[RekeyClientError], missing: str, doing: str) -> NoReturn:
    """Raise ``not_found`` ("``missing``: ...") for a NOT_FOUND answer, else
    `TemporalRequestFailed` ("``doing``: ...", e.g. a query no worker answered in time)."""
    if error.status == RPCStatusCode.NOT_FOUND:
        raise not_found(f"{missing}: {error.message}") from None
    raise TemporalRequestFailed(f"{doing}: {error.message}") from None


# --------------------------------------------------------------------------------- rotations


def _progress_from_memo(value: object) -> Progress | None:
    """The `Progress` the workflow last published in its memo (None before its first task);
    fields a newer workflow added and this client does not know are left out."""
    if not isinstance(value, dict):
        return None
    known = {f.name for f in fields(Progress)}
    try:
        return Progress(**{k: v for k, v in value.items() if k in known})
    except TypeError:  # not a progress this client can read
        return None


async def _memo_progress(execution: WorkflowExecution) -> Progress | None:
    try:
        return _progress_from_memo((await execution.memo()).get(MEMO_PROGRESS))
    except Exception:  # a memo this client cannot decode: listed without progress
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
            _rpc_failure(exc, RotationNotFound, f"no rotation {self.id}", f"cannot describe {self.id}")

    async def status(self) -> Progress:
        """Phase and counts as the rotation last published them (no worker needed)."""
        return (await self.report()).progress

    async def describe(self) -> RotationInfo:
        """The latest run's status as Temporal records it (no worker needed)."""
        description = await self._describe()
        return RotationInfo.from_execution(description, await _memo_progress(description))

    async def report(self) -> RotationReport:
        """Progress, the workflow's status, whether a worker polls, and the activities it waits
        for with their attempts: one describe and one task-queue request, no worker needed."""
        description = await self._describe()
        progress = await _memo_progress(description)
        info = RotationInfo.from_execution(description, progress)
        if progress is None:  # no worker has run its first task yet
            progress = _empty_progress(info.key_ref, "waiting for a worker to take the rotation up")
        pending = tuple(
            PendingActivity(
                activity=p.activity_type.name,
                state=PendingActivityState.Name(p.state).removeprefix("PENDING_ACTIVITY_STATE_"),
                attempt=p.attempt,
                last_failure=_one_line(p.last_failure.message) if p.HasField("last_failure") else "",
            )
            for p in description.raw_description.pending_activities
        )
        polling = info.status != "RUNNING" or await worker_polling(self._client, info.task_queue)
        return RotationReport(info, progress, polling, pending)

    async def result(self) -> Progress:
        """Wait for the end: the final progress (phase ``DONE`` or ``ABORTED``).

        `RotationFailed` if the workflow failed, with the message of what failed. A BLOCKED
        rotation has not ended: this keeps waiting (`watch` stops there)."""
        try:
            result: Progress = await self._handle.result()
        except WorkflowFailureError as exc:
            raise RotationFailed(self.id, _cause_message(exc.cause)) from None
        except RPCError as exc:
            _rpc_failure(exc, RotationNotFound, f"no rotation {self.id}", f"cannot wait for {self.id}")
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
                    progress = await _memo_progress(await self._describe())
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

    async def _update(self, name: str) -> str:
        """Send update ``name``; the workflow's answer (one line), or `RotationRefused` with its
        reason. Nothing is sent when no worker polls (it could not be answered)."""
        info = await self.describe()
        if info.status != "RUNNING":
            raise RotationRefused(
                f"cannot {name.replace('_', '-')} {self.id}: it has ended ({info.status}"
                f"{', ' + info.phase if info.phase else ''})"
            )
        if not await worker_polling(self._client, info.task_queue):
            raise NoWorker(
                f"cannot {name.replace('_', '-')} {self.id}: no rekey worker is polling task queue"
                f" {info.task_queue!r} (start one with `rekey worker`); nothing was sent"
            )
        try:
            answer = await self._handle.execute_update(
                name, id=f"{name}-{uuid.uuid4()}", result_type=str, rpc_timeout=UPDATE_TIMEOUT
            )
        except WorkflowUpdateFailedError as exc:
            raise RotationRefused(
                f"{name.replace('_', '-')} refused by {self.id}: {_cause_message(exc.cause)}"
            ) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RotationRefused(f"cannot {name.replace('_', '-')} {self.id}: it has ended") from None
            raise TemporalRequestFailed(f"cannot {name.replace('_', '-')} {self.id}: {exc.message}") from None
        return str(answer)

    async def pause(self) -> str:
        """Pause: the sweep stops after the batches in flight; in AWAITING_COMMIT and
        AWAITING_DESTROY the commit or destroy waits while paused. Returns the answer."""
        return await self._update("pause")

    async def resume(self) -> str:
        """Resume a paused rotation, or a BLOCKED one once its cause is fixed."""
        return await self._update("resume")

    async def abort(self) -> str:
        """Abort before retirement: every blob stays readable. Refused once disabling began."""
        return await self._update("abort")

    async def approve(self) -> str:
        """Commit now instead of waiting for the grace period (only in AWAITING_COMMIT)."""
        return await self._update("approve")

    async def approve_destroy(self) -> str:
        """Destroy the old versions now instead of after the destroy delay (only in AWAITING_DESTROY)."""
        return await self._update("approve_destroy")

    async def cancel_destroy(self) -> str:
        """Keep the old versions disabled and never destroy them (only in AWAITING_DESTROY)."""
        return await self._update("cancel_destroy")


def _start_attributes(key_ref: str) -> TypedSearchAttributes:
    """Set at start, so a rotation no worker took up yet is found by key and phase."""
    return TypedSearchAttributes(
        [SearchAttributePair(KEY_REF_ATTRIBUTE, key_ref), SearchAttributePair(PHASE_ATTRIBUTE, PREPARING)]
    )


def _empty_progress(key_ref: str, note: str) -> Progress:
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


def rotation_failures(
    store: SealedStateStore, key_ref: str, version: int, *, after: str | None = None, limit: int = 100
) -> list[RewrapFailure]:
    """The blobs of ``key_ref`` a rotation to ``version`` could not re-wrap and that are still
    below it, with why, by blob id (``after`` pages on). The store keeps every one."""
    try:
        return store.rewrap_failures(str(_key_ref(key_ref)), version, after=after, limit=limit)
    except ValueError as exc:  # the store's own check of version, after and limit
        raise InvalidOption(str(exc)) from None


# --------------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class RotationSchedule:
    """A rotation schedule as Temporal describes it now."""

    id: str
    key_ref: str
    paused: bool
    note: str
    every_seconds: float | None
    next_runs: tuple[datetime, ...]
    """Upcoming start times, soonest first."""
    recent_launches: tuple[str, ...]
    """Workflow ids of the launchers it started most recently, oldest first (each started the
    key's rotation, ``rotate:<key>``, or recorded that one was running)."""

    @classmethod
    def from_description(cls, description: ScheduleDescription) -> RotationSchedule:
        intervals = description.schedule.spec.intervals
        return cls(
            id=description.id,
            key_ref=key_ref_of(description.id),
            paused=description.schedule.state.paused,
            note=description.schedule.state.note or "",
            every_seconds=intervals[0].every.total_seconds() if intervals else None,
            next_runs=tuple(description.info.next_action_times),
            recent_launches=tuple(
                result.action.workflow_id
                for result in description.info.recent_actions
                if isinstance(result.action, ScheduleActionExecutionStartWorkflow)
            ),
        )


# ------------------------------------------------------------------------------------ client


class RekeyClient:
    """Rotations and rotation schedules on one Temporal namespace.

    Build it with `connect` from settings, or around a connected ``temporalio`` client (whose
    data converter must use rekey's payload codec, as `data_converter` makes it). ``task_queue``
    is where rotations it starts (and its schedules' rotations) run: a rekey worker must poll it."""

    def __init__(self, temporal: Client, *, task_queue: str = TASK_QUEUE) -> None:
        self.temporal = temporal
        self.task_queue = task_queue

    @classmethod
    async def connect(cls, settings: Settings, *, task_queue: str = TASK_QUEUE) -> RekeyClient:
        """Connect to the Temporal of ``settings``; `TemporalUnreachable` if it does not answer."""
        return cls(await connect(settings), task_queue=task_queue)

    def _request(
        self,
        key_ref: str,
        *,
        grace: Duration,
        destroy_after: Duration | None,
        batch_size: int,
        in_flight: int,
        started_by: str,
    ) -> RotateKeyInput:
        # What the workflow would refuse, or could not even decode, is refused here, before a
        # rotation starts that could never run.
        for option, value, top in (
            ("batch_size", batch_size, MAX_BATCH),
            ("in_flight", in_flight, MAX_IN_FLIGHT),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise InvalidOption(f"{option} must be an integer from 1 to {top}, got {value!r}")
        if started_by:
            try:
                check_text("started_by", started_by)
            except ValueError as exc:
                raise InvalidOption(str(exc)) from None
        return RotateKeyInput(
            str(_key_ref(key_ref)),
            grace_seconds=seconds(grace, "grace"),
            destroy_after_seconds=None if destroy_after is None else seconds(destroy_after, "destroy_after"),
            batch_size=batch_size,
            batches_in_flight=in_flight,
            started_by=started_by,
        )

    # ------------------------------------------------------------------------- rotations

    async def start_rotation(
        self,
        key_ref: str,
        *,
        grace: Duration = DEFAULT_GRACE,
        destroy_after: Duration | None = None,
        batch_size: int = DEFAULT_BATCH,
        in_flight: int = DEFAULT_IN_FLIGHT,
        started_by: str | None = None,
    ) -> RotationHandle:
        """Start rotating ``key_ref``: new version, every stored DEK re-wrapped, old versions
        disabled after ``grace`` (or on `RotationHandle.approve`) and destroyed ``destroy_after``
        that (never if None). ``batch_size`` blobs per re-wrap activity, ``in_flight`` of them
        at once (the workflow refuses sizes out of range). ``started_by`` defaults to `actor`.

        A key has one rotation at a time: while one runs (started by anyone, or by a schedule)
        this attaches to it instead, and the handle's ``started`` is False."""
        request = self._request(
            key_ref,
            grace=grace,
            destroy_after=destroy_after,
            batch_size=batch_size,
            in_flight=in_flight,
            started_by=default_actor() if started_by is None else started_by,
        )
        workflow_id = rotation_id(key_ref)
        token = uuid.uuid4().hex
        try:
            # One rotation per key, atomically: the server starts it, or returns the running one.
            # (Update-with-start would do the same but needs a worker to answer the update, so
            # a start with no worker running would hang.)
            handle = await self.temporal.start_workflow(
                RotateKeyWorkflow.run,
                request,
                id=workflow_id,
                task_queue=self.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                memo={START_TOKEN: token},
                search_attributes=_start_attributes(request.key_ref),
            )
            description = await handle.describe()
            started = (await description.memo()).get(START_TOKEN) == token
        except RPCError as exc:
            raise TemporalRequestFailed(f"cannot start {workflow_id}: {exc.message}") from None
        return RotationHandle(
            self.temporal.get_workflow_handle_for(RotateKeyWorkflow.run, workflow_id),
            self.temporal,
            started=started,
        )

    def rotation(self, rotation_id_or_key_ref: str) -> RotationHandle:
        """The rotation with this id (or of this key ref); no request is made yet."""
        workflow_id = parse_rotation_id(rotation_id_or_key_ref)
        return RotationHandle(
            self.temporal.get_workflow_handle_for(RotateKeyWorkflow.run, workflow_id), self.temporal
        )

    async def list_rotations(
        self, *, running_only: bool = False, key_ref: str | None = None, phase: str | None = None
    ) -> list[RotationInfo]:
        """Rotation runs, newest first (a run that continued as new is shown by its successor),
        optionally only of ``key_ref`` and in ``phase`` (through the search attributes).

        Temporal's list is eventually consistent: a rotation started a moment ago may be missing."""
        query = f"WorkflowType = '{RotateKeyWorkflow.__name__}'"
        if running_only:
            query += " AND ExecutionStatus = 'Running'"
        if key_ref is not None:
            query += f" AND {KEY_REF_ATTRIBUTE.name} = '{_key_ref(key_ref)}'"  # its alphabet has no quote
        if phase is not None:
            if phase not in PHASES:
                raise InvalidOption(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
            query += f" AND {PHASE_ATTRIBUTE.name} = '{phase}'"
        rows: list[RotationInfo] = []
        try:
            async for execution in self.temporal.list_workflows(query):
                if execution.status != WorkflowExecutionStatus.CONTINUED_AS_NEW:
                    rows.append(RotationInfo.from_execution(execution, await _memo_progress(execution)))
        except RPCError as exc:
            raise TemporalRequestFailed(f"cannot list rotations: {exc.message}") from None
        return rows

    # ------------------------------------------------------------------------- schedules

    async def create_schedule(
        self,
        key_ref: str,
        *,
        every: Duration,
        jitter: Duration = 0,
        grace: Duration = DEFAULT_GRACE,
        destroy_after: Duration | None = None,
        batch_size: int = DEFAULT_BATCH,
        in_flight: int = DEFAULT_IN_FLIGHT,
        started_by: str | None = None,
    ) -> str:
        """Rotate ``key_ref`` every ``every`` (plus up to ``jitter``), with the rotation options
        of `start_rotation`. Each run starts a launcher that starts the key's rotation, or records
        (audit ``rotation.skipped``) that one is running, whoever started it. Returns the
        schedule id. ``started_by`` defaults to "schedule by <actor>". `ScheduleExists` if the
        key has a schedule."""
        interval = seconds(every, "every")
        if interval <= 0:
            raise InvalidDuration("every must be longer than 0s")
        request = self._request(
            key_ref,
            grace=grace,
            destroy_after=destroy_after,
            batch_size=batch_size,
            in_flight=in_flight,
            started_by=f"schedule by {default_actor()}" if started_by is None else started_by,
        )
        schedule = Schedule(
            action=ScheduleActionStartWorkflow(
                LaunchRotationWorkflow.run,
                LaunchRotationInput(rotation_id(key_ref), request),
                id=f"{LAUNCH_PREFIX}{request.key_ref}",
                task_queue=self.task_queue,
            ),
            spec=ScheduleSpec(
                intervals=[ScheduleIntervalSpec(every=timedelta(seconds=interval))],
                jitter=timedelta(seconds=seconds(jitter, "jitter")),
            ),
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        )
        id_ = schedule_id(key_ref)
        try:
            await self.temporal.create_schedule(id_, schedule)
        except ScheduleAlreadyRunningError:
            raise ScheduleExists(f"a schedule for {request.key_ref} exists already ({id_})") from None
        except RPCError as exc:
            raise TemporalRequestFailed(f"cannot create {id_}: {exc.message}") from None
        return id_

    async def describe_schedule(self, schedule_id_or_key_ref: str) -> RotationSchedule:
        """One rotation schedule, as it is now."""
        id_ = parse_schedule_id(schedule_id_or_key_ref)
        try:
            return RotationSchedule.from_description(await self.temporal.get_schedule_handle(id_).describe())
        except RPCError as exc:
            _rpc_failure(exc, ScheduleNotFound, f"no schedule {id_}", f"cannot describe {id_}")

    async def list_schedules(self) -> list[RotationSchedule]:
        """Every rotation schedule, by id.

        The listing is eventually consistent (a schedule created a moment ago may be missing);
        each schedule's state is then read from its description, so a pause shows at once."""
        try:
            ids = sorted([entry.id async for entry in await self.temporal.list_schedules()])
        except RPCError as exc:
            raise TemporalRequestFailed(f"cannot list schedules: {exc.message}") from None
        rows: list[RotationSchedule] = []
        for id_ in ids:
            if not id_.startswith(SCHEDULE_PREFIX):
                continue
            try:
                rows.append(await self.describe_schedule(id_))
            except (ScheduleNotFound, InvalidId):  # deleted meanwhile, or not one of ours
                continue
        return rows

    async def _schedule_action(self, verb: str, schedule_id_or_key_ref: str) -> str:
        id_ = parse_schedule_id(schedule_id_or_key_ref)
        handle: ScheduleHandle = self.temporal.get_schedule_handle(id_)
        try:
            await getattr(handle, verb)()
        except RPCError as exc:
            _rpc_failure(exc, ScheduleNotFound, f"cannot {verb} {id_}", f"cannot {verb} {id_}")
        return id_

    async def pause_schedule(self, schedule_id_or_key_ref: str) -> str:
        """Stop starting rotations from this schedule; returns its id."""
        return await self._schedule_action("pause", schedule_id_or_key_ref)

    async def unpause_schedule(self, schedule_id_or_key_ref: str) -> str:
        """Start rotations from this schedule again; returns its id."""
        return await self._schedule_action("unpause", schedule_id_or_key_ref)

    async def trigger_schedule(self, schedule_id_or_key_ref: str) -> str:
        """Start a rotation now, even while paused (skipped if one is running); returns its id."""
        return await self._schedule_action("trigger", schedule_id_or_key_ref)

    async def delete_schedule(self, schedule_id_or_key_ref: str) -> str:
        """Delete the schedule (rotations it started go on); returns its id."""
        return await self._schedule_action("delete", schedule_id_or_key_ref)
