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
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.types import (
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
from kms_adapters.contract import KmsAdapter
from kms_adapters.errors import KmsError
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
                self._adapters[key_ref] = self._adapter_for(key_ref)
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
        """Rotate until the primary is ``target_version`` (a retried attempt does not rotate
        twice), then prove the new version with a canary wrap and unwrap."""
        adapter = self.adapter(request.key_ref)

        def run() -> KeyState:
            info = adapter.describe()
            if info.primary_version < request.target_version:
                info = adapter.rotate()
            if info.primary_version != request.target_version:
                raise ValueError(
                    f"{request.key_ref}: primary version is {info.primary_version}, expected"
                    f" {request.target_version} (another rotation ran at the KMS meanwhile)"
                )
            canary = os.urandom(32)  # a DEK-sized canary: A256KW takes multiples of 8 bytes
            wrapped = adapter.wrap(canary)
            if wrapped.key_version != request.target_version or adapter.unwrap(wrapped.ciphertext) != canary:
                raise ValueError(
                    f"{request.key_ref}: canary wrap/unwrap with version {request.target_version} failed"
                )
            return KeyState(request.key_ref, info.primary_version, [])

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
        """Disable (or destroy) every version below ``below_version``; returns those affected."""
        adapter = self.adapter(request.key_ref)

        def run() -> list[int]:
            info = adapter.describe()
            if request.action == "disable":
                targets = [
                    v.version
                    for v in info.versions
                    if v.version < request.below_version and v.state == "enabled"
                ]
                for version in targets:
                    adapter.disable_version(version)
                return targets
            targets = [
                v.version
                for v in info.versions
                if v.version < request.below_version and v.state not in ("destroyed", "pending_deletion")
            ]
            if targets:
                adapter.destroy_below(request.below_version)
            return targets

        return _translated(run)

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
