"""Inputs and outputs of the rotation activities: plain dataclasses, shared with the workflow
(which may import this module and nothing else from ``activities``). Ids, cursors and counts
only: never key material."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASK_QUEUE = "rekey"

# Re-wrap sweep sizing. A batch is one rewrap_batch activity: it reads, re-wraps and swaps its
# blobs in pipelined chunks, so large batches cost little beyond the heartbeat that carries
# their progress; MAX_BATCH is the store's largest page (sealing.store.MAX_PAGE).
DEFAULT_BATCH = 10_000
MAX_BATCH = 10_000
DEFAULT_IN_FLIGHT = 2
MAX_IN_FLIGHT = 16

# Activities that change a key at the KMS make several governor calls of up to its 60 s budget
# each: they heartbeat between calls, and a timed-out attempt must not run beside its retry.
# They heartbeat before every attempt of every governor call and at least every
# kms_adapters.governor.PROGRESS_STEP (10 s) of its waits, so two heartbeats are at most one
# attempt apart: the SDK's connect + read timeout, 60 s at most as the adapters are configured
# (hvac 30 + 30, boto3 5 + 30, azure-core 10 + 30); tests/unit/test_rotation_activities.py
# checks MUTATION_HEARTBEAT_S against that.
MUTATION_TIMEOUT_S = 600
MUTATION_HEARTBEAT_S = 90

VERSIONS_IN_USE = "VersionsStillInUse"
"""``ApplicationError`` type of ``retire_versions`` when its census finds stored blobs still
wrapped by a version it was asked to disable or destroy (``details[0]``: how many)."""

ROTATED_ELSEWHERE = "KeyRotatedElsewhere"
"""``ApplicationError`` type (non-retryable) of ``rotate_key`` when the key's primary is neither
the ``expected_primary`` it was to rotate from nor the ``target_version``: another rotation ran
at the KMS meanwhile."""

SEARCH_ATTRIBUTES = {"RekeyKeyRef": "Keyword", "RekeyPhase": "Keyword", "RekeyRemaining": "Int"}
"""Custom search attributes the rotation workflow keeps up to date, so that status and filters
work without a worker; a Temporal namespace must have them registered (the dev stack does)."""


@dataclass
class KeyRefInput:
    key_ref: str


@dataclass
class KeyState:
    key_ref: str
    primary_version: int
    enabled_versions: list[int]


@dataclass
class RotateToInput:
    key_ref: str
    target_version: int
    expected_primary: int | None = None
    """The primary the rotation saw before creating ``target_version``: the activity rotates
    only from it (or finds ``target_version`` already made by an earlier attempt) and refuses
    anything else. None only in histories recorded before it existed."""


@dataclass
class CountInput:
    key_ref: str
    below_version: int


@dataclass
class PlanInput:
    key_ref: str
    below_version: int
    after: str | None
    size: int
    count: int


@dataclass
class RewrapBatchInput:
    key_ref: str
    below_version: int
    start: str | None
    end: str | None
    size: int


@dataclass
class RewrapBatchResult:
    rewrapped: int = 0
    conflicts: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)
    throttled: int = 0  # throttled attempts the governor absorbed during the batch


@dataclass
class VerifyInput:
    key_ref: str
    version: int
    sample: int


@dataclass
class RetireInput:
    key_ref: str
    below_version: int
    action: str  # disable | destroy | enable
    versions: list[int] = field(default_factory=list)
    """For ``enable``: the versions to enable again (a census found blobs still on them)."""
    census: bool = False
    """For disable and destroy: count the stored blobs still wrapped below ``below_version``
    first and refuse (``VERSIONS_IN_USE``) unless there are none."""


@dataclass
class AuditInput:
    event: str
    subject: str
    details: dict[str, Any]
    actor: str = ""
