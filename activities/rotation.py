"""Rotation activities: thin wrappers over ``sealing.rotation`` and the KMS adapters.

Dependencies come in from the worker (adapter factory, store, audit sink), so this module
imports nothing from the application shell. Activities are synchronous and run in the worker's
thread pool; they heartbeat their progress and resume from it after a retry. KMS errors that
cannot succeed later become non-retryable ``ApplicationError``s; the rest are retried by
Temporal (the governor has already retried them within the call).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.types import (
    ROTATED_ELSEWHERE,
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
from kms_adapters.contract import KeyInfo, KmsAdapter
from kms_adapters.errors import AnswerLost, KmsError
from kms_adapters.governor import reporting_progress
from sealing.errors import SealingError
from sealing.rotation import RangeResult, SweepStopped, rewrap_range, verify_sample
from sealing.store import SealedStateStore, StoreError

T = TypeVar("T")
WORKER_SHUTDOWN = "WorkerShutdown"
"""``ApplicationError`` type of a ``rewrap_batch`` attempt stopped by its worker's shutdown."""
AuditSink = Callable[[str, str, dict[str, Any], str], None]


def _application_error(exc: Exception) -> ApplicationError:
    retryable = (isinstance(exc, KmsError) and exc.retryable) or isinstance(exc, StoreError)
    retry_after = getattr(exc, "retry_after", None)
    return ApplicationError(
        str(exc),
        type=type(exc).__name__,
        non_retryable=not retryable,
        next_retry_delay=None if retry_after is None else _seconds(retry_after),
    )


def _seconds(value: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=max(1.0, float(value)))


def _translated(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (KmsError, SealingError, StoreError, ValueError) as exc:
        raise _application_error(exc) from None


def _beat() -> None:
    activity.heartbeat()


def _enabled(info: KeyInfo) -> list[int]:
    return [v.version for v in info.versions if v.state == "enabled"]


def _mutate(
    adapter: KmsAdapter,
    mutation: Callable[[], KeyInfo],
    *,
    still_to_do: Callable[[KeyInfo], bool],
    beat: Callable[[], None] = _beat,
) -> KeyInfo:
    """Run a KMS mutation that must not apply twice. If its answer was lost, read the key:
    ``still_to_do(info)`` says the mutation did not apply, and only then is it sent once more (a
    second lost answer fails the attempt, retryable: the next attempt reads the key first)."""
    try:
        return mutation()
    except AnswerLost:
        beat()
        info = adapter.describe()
        if not still_to_do(info):
            return info  # it applied (or the key moved on: the caller checks which)
        beat()
        return mutation()


_RETIRED: dict[str, tuple[str, ...]] = {
    "disable": ("disabled", "pending_deletion", "destroyed"),
    "destroy": ("pending_deletion", "destroyed"),
}


def _in_state(version: int, states: tuple[str, ...], info: KeyInfo) -> bool:
    return info.state_of(version) in states


def _switched_on(version: int, before: KeyInfo, after: KeyInfo) -> bool:
    return before.state_of(version) != "enabled" and after.state_of(version) == "enabled"


def _rotated_elsewhere(request: RotateToInput, primary: int) -> ApplicationError:
    expected = "" if request.expected_primary is None else f" or {request.expected_primary}"
    return ApplicationError(
        f"{request.key_ref}: primary version is {primary}, expected {request.target_version}{expected}"
        " (another rotation ran at the KMS meanwhile)",
        type=ROTATED_ELSEWHERE,
        non_retryable=True,
    )


class RotationActivities:
    def __init__(
        self, adapter_for: Callable[[str], KmsAdapter], store: SealedStateStore, audit: AuditSink
    ) -> None:
        self._adapter_for = adapter_for
        self._store = store
        self._audit = audit
        self._adapters: dict[str, KmsAdapter] = {}
        self._lock = threading.Lock()

    def adapter(self, key_ref: str) -> KmsAdapter:
        with self._lock:
            if key_ref not in self._adapters:
                # An unknown or unsafe key ref (InvalidKeyRef) fails for good, in every activity.
                self._adapters[key_ref] = _translated(lambda: self._adapter_for(key_ref))
            return self._adapters[key_ref]

    @activity.defn(name="describe_key")
    def describe_key(self, request: KeyRefInput) -> KeyState:
        info = _translated(lambda: self.adapter(request.key_ref).describe())
        return KeyState(
            request.key_ref,
            info.primary_version,
            [v.version for v in info.versions if v.state == "enabled"],
        )

    @activity.defn(name="rotate_key")
    def rotate_key(self, request: RotateToInput) -> KeyState:
        """Make ``target_version`` the primary, rotating at most once however often the attempt
        is retried, then prove it with a canary wrap and unwrap.

        The key is read first: ``target_version`` already primary means an earlier attempt
        rotated; the primary still ``expected_primary`` means rotate now; anything else means
        another rotation ran at the KMS meanwhile (non-retryable ``ROTATED_ELSEWHERE``). A
        rotate whose answer was lost (``AnswerLost``) is resent only if reading the key again
        shows it did not apply. Returns the primary the KMS actually has."""
        adapter = self.adapter(request.key_ref)
        target, expected = request.target_version, request.expected_primary

        def not_yet_rotated(info: KeyInfo) -> bool:
            if expected is None:  # histories from before expected_primary: the old rule
                return info.primary_version < target
            return info.primary_version == expected

        def run() -> KeyState:
            info = adapter.describe()
            if info.primary_version != target:
                if not not_yet_rotated(info):
                    raise _rotated_elsewhere(request, info.primary_version)
                _beat()
                info = _mutate(adapter, adapter.rotate, still_to_do=not_yet_rotated)
            if info.primary_version != target:
                raise _rotated_elsewhere(request, info.primary_version)
            _beat()
            canary = os.urandom(32)  # a DEK-sized canary: A256KW takes multiples of 8 bytes
            wrapped = adapter.wrap(canary)
            _beat()
            if wrapped.key_version != target or adapter.unwrap(wrapped.ciphertext) != canary:
                raise ValueError(f"{request.key_ref}: canary wrap/unwrap with version {target} failed")
            return KeyState(request.key_ref, info.primary_version, _enabled(info))

        with reporting_progress(_beat):
            return _translated(run)

    @activity.defn(name="count_below")
    def count_below(self, request: CountInput) -> int:
        counts = _translated(lambda: self._store.count_by_key_version(request.key_ref))
        return sum(n for version, n in counts.items() if version < request.below_version)

    @activity.defn(name="plan_batches")
    def plan_batches(self, request: PlanInput) -> list[str]:
        return _translated(
            lambda: self._store.boundaries(
                key_ref=request.key_ref,
                below_version=request.below_version,
                after=request.after,
                size=request.size,
                count=request.count,
            )
        )

    @activity.defn(name="rewrap_batch")
    def rewrap_batch(self, request: RewrapBatchInput) -> RewrapBatchResult:
        adapter = self.adapter(request.key_ref)
        info = activity.info()
        result = RangeResult()
        start = request.start
        if info.heartbeat_details:  # resume where the previous attempt got to
            saved = info.heartbeat_details[0]
            result = RangeResult(
                saved["rewrapped"], saved["conflicts"], saved["failed"], saved["failed_ids"], saved["last_id"]
            )
            start = result.last_id or start
        throttled_before = adapter.governor.snapshot().throttled

        def heartbeat(progress: RangeResult) -> None:
            activity.heartbeat(
                {
                    "rewrapped": progress.rewrapped,
                    "conflicts": progress.conflicts,
                    "failed": progress.failed,
                    "failed_ids": progress.failed_ids,
                    "last_id": progress.last_id,
                }
            )

        try:
            done = _translated(
                lambda: rewrap_range(
                    self._store,
                    adapter,
                    below_version=request.below_version,
                    start=start,
                    end=request.end,
                    limit=request.size,
                    progress=heartbeat,
                    result=result,
                    should_stop=activity.is_worker_shutdown,
                )
            )
        except SweepStopped as stopped:
            # The worker is shutting down: fail this attempt at a chunk boundary so that the
            # retry, on another worker, resumes from the heartbeat just sent. The SDK sends a
            # throttled heartbeat's details before it reports a failed attempt (verified by
            # tests/fault/test_worker_sigterm.py).
            heartbeat(stopped.result)
            raise ApplicationError(
                f"worker shutting down: {stopped}",
                type=WORKER_SHUTDOWN,
                next_retry_delay=_seconds(1),
            ) from None
        throttled = adapter.governor.snapshot().throttled - throttled_before
        return RewrapBatchResult(
            done.rewrapped, done.conflicts, done.failed, done.failed_ids, max(0, throttled)
        )

    @activity.defn(name="verify_sample")
    def verify_sample(self, request: VerifyInput) -> int:
        adapter = self.adapter(request.key_ref)
        return _translated(
            lambda: verify_sample(self._store, adapter, version=request.version, sample=request.sample)
        )

    @activity.defn(name="retire_versions")
    def retire_versions(self, request: RetireInput) -> list[int]:
        """Disable (or destroy) every version below ``below_version``, or enable
        ``request.versions`` again; returns the versions this request changed (including those an
        earlier attempt of it changed, carried in the heartbeat details).

        Versions already in the requested state are skipped, so a retried attempt never
        repeats a mutation. With ``census``, disable and destroy first count the stored blobs
        still wrapped below ``below_version``, immediately before the first KMS mutation, and
        refuse (non-retryable ``VERSIONS_IN_USE``, the count in ``details[0]``) without changing
        anything if there are any. A mutation whose answer was lost is resent only if reading
        the key shows it did not apply."""
        adapter = self.adapter(request.key_ref)
        saved = activity.info().heartbeat_details
        done: list[int] = []
        if saved and isinstance(saved[0], dict):
            done = [int(v) for v in saved[0].get("done", [])]

        def beat() -> None:
            activity.heartbeat({"done": sorted(done)})

        def record(changed: list[int]) -> None:
            done.extend(v for v in changed if v not in done)
            beat()

        def run() -> list[int]:
            if request.action not in ("disable", "destroy", "enable"):
                raise ApplicationError(
                    f"unknown retire action {request.action!r} (disable, destroy or enable)",
                    type="InvalidRetireAction",
                    non_retryable=True,
                )
            info = adapter.describe()
            if request.action == "enable":
                for version in sorted(set(request.versions)):
                    if info.state_of(version) == "enabled":
                        continue
                    beat()
                    after = _mutate(
                        adapter,
                        partial(adapter.enable_version, version),
                        still_to_do=partial(_in_state, version, ("disabled",)),
                        beat=beat,
                    )
                    # Transit enables every version from ``version`` on: report each one it enabled.
                    record([v for v in request.versions if _switched_on(v, info, after)])
                    info = after
                return sorted(done)
            retired = _RETIRED[request.action]
            targets = [
                v.version
                for v in info.versions
                if v.version < request.below_version and v.state not in retired
            ]
            if not targets:
                return sorted(done)
            if request.census:
                beat()
                self._census(request)
            beat()
            if request.action == "disable":
                for version in targets:
                    if info.state_of(version) in retired:  # Transit disables every version up to N
                        continue
                    info = _mutate(
                        adapter,
                        partial(adapter.disable_version, version),
                        still_to_do=partial(_in_state, version, ("enabled",)),
                        beat=beat,
                    )
                    record([version])
                return sorted(done)

            def not_all_destroyed(now: KeyInfo) -> bool:
                return any(now.state_of(v) not in retired for v in targets)

            destroy = partial(adapter.destroy_below, request.below_version)
            _mutate(adapter, destroy, still_to_do=not_all_destroyed, beat=beat)
            record(targets)
            return sorted(done)

        with reporting_progress(beat):
            return _translated(run)

    def _census(self, request: RetireInput) -> None:
        counts = self._store.count_by_key_version(request.key_ref)
        in_use = sum(n for version, n in counts.items() if version < request.below_version)
        if in_use:
            raise ApplicationError(
                f"{request.key_ref}: {in_use} stored blobs are still wrapped by versions below"
                f" {request.below_version}; refusing to {request.action} them",
                in_use,
                type=VERSIONS_IN_USE,
                non_retryable=True,
            )

    @activity.defn(name="audit")
    def audit(self, request: AuditInput) -> None:
        try:
            self._audit(request.event, request.subject, request.details, request.actor)
        except (ValueError, TypeError) as exc:  # a record the log refuses never becomes valid
            raise _application_error(exc) from None

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
