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
small launcher workflow (``launch:schedule:rotate:<backend>:<name>-<time>``) that starts the key's
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
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
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
    WorkflowExecutionStatus,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import ConnectConfig, RPCError, ServiceClient

from activities.types import (
    DEFAULT_BATCH,
    DEFAULT_IN_FLIGHT,
    MAX_BATCH,
    MAX_IN_FLIGHT,
    SEARCH_ATTRIBUTES,
    TASK_QUEUE,
)
from audit import check_text, default_actor
from rekey.client.errors import (
    InvalidDuration,
    InvalidId,
    InvalidOption,
    KeyCheckFailed,
    KeyNotFound,
    MigrationFailed,
    NamespaceNotReady,
    NoWorker,
    ProgressUnreadable,
    RekeyClientError,
    RotationBlocked,
    RotationFailed,
    RotationNotFound,
    RotationRefused,
    ScheduleExists,
    ScheduleNotFound,
    TemporalRequestFailed,
    TemporalUnreachable,
    UpdateUnanswered,
    rpc_failure,
)
from rekey.client.ids import (
    LAUNCH_PREFIX,
    ROTATION_PREFIX,
    SCHEDULE_PREFIX,
    Duration,
    checked_key_ref,
    key_ref_of,
    parse_duration,
    parse_rotation_id,
    parse_schedule_id,
    rotation_id,
    schedule_id,
    seconds,
)
from rekey.client.rotations import (
    POLLER_FRESH_S,
    START_TOKEN,
    UPDATE_TIMEOUT,
    PendingActivity,
    RotationHandle,
    RotationInfo,
    RotationReport,
    check_update_id,
    memo_progress,
    rotation_failures,
    start_attributes,
    worker_polling,
)
from rekey.config import ConfigError, Settings
from workflows.launcher import LaunchRotationWorkflow
from workflows.rotation import (
    ABORTED,
    AWAITING_COMMIT,
    AWAITING_DESTROY,
    BLOCKED,
    DESTROYING,
    DONE,
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
from workflows.rotation_state import KEY_REF_ATTRIBUTE, PHASE_ATTRIBUTE

if TYPE_CHECKING:
    from kms_adapters.contract import KmsAdapter

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
    "POLLER_FRESH_S",
    "PREPARING",
    "RETIRING",
    "REWRAPPING",
    "ROTATION_PREFIX",
    "SCHEDULE_PREFIX",
    "UPDATE_TIMEOUT",
    "VERIFYING",
    "Duration",
    "InvalidDuration",
    "InvalidId",
    "InvalidOption",
    "KeyCheckFailed",
    "KeyNotFound",
    "MigrationFailed",
    "NamespaceNotReady",
    "NoWorker",
    "PendingActivity",
    "Progress",
    "ProgressUnreadable",
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
    "UpdateUnanswered",
    "check_namespace",
    "check_update_id",
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
    "worker_polling",
]

DEFAULT_GRACE: Final = 24 * 3600.0
"""Seconds a rotation waits before retiring the old versions, unless approved earlier."""


# ------------------------------------------------------------------------------- connecting


def _one_line(error: BaseException, limit: int = 300) -> str:
    return " ".join(str(error).split())[:limit]


async def check_namespace(temporal: Client) -> None:
    """`NamespaceNotReady` unless the namespace has every search attribute rotations set
    (``SEARCH_ATTRIBUTES``): without them a rotation's workflow task fails for ever."""
    try:
        answer = await temporal.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=temporal.namespace),
            retry=True,
            timeout=timedelta(seconds=10),
        )
    except RPCError as exc:
        raise TemporalRequestFailed(
            f"cannot list the search attributes of {temporal.namespace!r}: {exc.message}"
        ) from None
    have = {name: IndexedValueType.Name(kind) for name, kind in answer.custom_attributes.items()}
    missing = [
        (name, kind)
        for name, kind in SEARCH_ATTRIBUTES.items()
        if have.get(name) != f"INDEXED_VALUE_TYPE_{kind.upper()}"
    ]
    if missing:
        create = "; ".join(
            f"temporal operator search-attribute create --namespace {temporal.namespace}"
            f" --name {name} --type {kind}"
            for name, kind in missing
        )
        raise NamespaceNotReady(
            f"namespace {temporal.namespace!r} lacks the search attribute(s)"
            f" {', '.join(f'{n} ({k})' for n, k in missing)} that rotations keep their status in: {create}"
        )


def data_converter(settings: Settings) -> Any:
    """The payload converter with rekey's codec (keys under ``<home>/codec``), as the workers use:
    payloads bound to their namespace and workflow, formats older than ``codec_min_format``
    refused, schedule runs (``LAUNCH_PREFIX``) reading the input their schedule bound."""
    from rekey.codec import data_converter as codec_converter

    return codec_converter(
        settings.home, min_format=settings.codec_min_format, scheduled_prefixes=(LAUNCH_PREFIX,)
    )


async def connect(settings: Settings) -> Client:
    """A Temporal client for ``settings`` (address, namespace, payload codec).

    The connection comes first and the codec's keyring (created on first use) second, so a
    command that cannot reach Temporal leaves the home directory as it was."""
    try:
        service = await ServiceClient.connect(ConnectConfig(target_host=settings.temporal_address))
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
    return Client(service, namespace=settings.temporal_namespace, data_converter=data_converter(settings))


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
    is where rotations it starts (and its schedules' rotations) run: a rekey worker must poll it.

    ``adapters`` (key ref -> KMS adapter; `connect` passes ``rekey.backends.adapter_for`` of the
    settings) is how `start_rotation` and `create_schedule` check that the key exists on its
    backend before anything starts (`KeyNotFound`); without it they do not check."""

    def __init__(
        self,
        temporal: Client,
        *,
        task_queue: str = TASK_QUEUE,
        adapters: Callable[[str], KmsAdapter] | None = None,
        on_unchecked_key: Callable[[str], object] | None = None,
    ) -> None:
        self.temporal = temporal
        self.task_queue = task_queue
        self.adapters = adapters
        self.on_unchecked_key = on_unchecked_key
        """Where a key check that could not get an answer goes (a warning), when the start
        should go on: the worker may hold credentials or a route to the KMS that this client
        lacks. None: that check is `KeyCheckFailed` and nothing starts. A key the backend
        says does not exist is `KeyNotFound` either way."""

    @classmethod
    async def connect(
        cls,
        settings: Settings,
        *,
        task_queue: str = TASK_QUEUE,
        on_unchecked_key: Callable[[str], object] | None = None,
    ) -> RekeyClient:
        """Connect to the Temporal of ``settings``; `TemporalUnreachable` if it does not answer.
        Keys are checked on the backends of ``settings`` before a rotation or schedule starts
        (``on_unchecked_key`` as for the constructor)."""
        from rekey.backends import adapter_for

        return cls(
            await connect(settings),
            task_queue=task_queue,
            adapters=lambda key_ref: adapter_for(settings, key_ref),
            on_unchecked_key=on_unchecked_key,
        )

    async def check_key(self, key_ref: str) -> None:
        """Describe ``key_ref`` on its backend (through ``adapters``): `KeyNotFound` if the key
        does not exist there, `KeyCheckFailed` if the backend cannot say. A rotation of a missing
        key could only block in its first activity, with the cause in the worker's log."""
        ref = checked_key_ref(key_ref)
        if self.adapters is None:
            return
        from sealing.errors import KeyWrapError, UnknownKey

        adapters = self.adapters

        def describe() -> None:
            adapters(str(ref)).describe()

        try:
            await asyncio.to_thread(describe)
        except UnknownKey as exc:
            raise KeyNotFound(
                f"key {ref} does not exist on backend {ref.backend} ({_one_line(exc)}): nothing was"
                f" started (create it with `rekey key create {ref}`)"
            ) from None
        except (KeyWrapError, ConfigError) as exc:  # no answer, or no credentials here to ask with
            cause = f"cannot check key {ref} on backend {ref.backend}: {type(exc).__name__}: {_one_line(exc)}"
            if self.on_unchecked_key is None:
                raise KeyCheckFailed(f"{cause} (nothing was started)") from None
            self.on_unchecked_key(f"{cause}; starting anyway (the worker uses its own credentials)")

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
            str(checked_key_ref(key_ref)),
            grace_seconds=seconds(grace, "grace"),
            destroy_after_seconds=None if destroy_after is None else seconds(destroy_after, "destroy_after"),
            batch_size=batch_size,
            batches_in_flight=in_flight,
            started_by=started_by,
            requested_at=datetime.now(UTC).isoformat(),
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
        await self.check_key(key_ref)
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
                search_attributes=start_attributes(request.key_ref),
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
            query += (
                f" AND {KEY_REF_ATTRIBUTE.name} = '{checked_key_ref(key_ref)}'"  # its alphabet has no quote
            )
        if phase is not None:
            if phase not in PHASES:
                raise InvalidOption(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
            query += f" AND {PHASE_ATTRIBUTE.name} = '{phase}'"
        rows: list[RotationInfo] = []
        try:
            async for execution in self.temporal.list_workflows(query):
                if execution.status != WorkflowExecutionStatus.CONTINUED_AS_NEW:
                    rows.append(RotationInfo.from_execution(execution, await memo_progress(execution)))
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
        await self.check_key(key_ref)
        schedule = Schedule(
            action=ScheduleActionStartWorkflow(
                LaunchRotationWorkflow.run,
                LaunchRotationInput(rotation_id(key_ref), request),
                id=f"{LAUNCH_PREFIX}{schedule_id(key_ref)}",
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
            rpc_failure(exc, ScheduleNotFound, f"no schedule {id_}", f"cannot describe {id_}")

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
            rpc_failure(exc, ScheduleNotFound, f"cannot {verb} {id_}", f"cannot {verb} {id_}")
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
