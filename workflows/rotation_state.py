"""The rotation workflow's phases, input, carried-over state and progress: plain data, shared
by ``workflows.rotation``, the launcher and ``rekey.client``."""

from __future__ import annotations

from dataclasses import dataclass, field

from temporalio import workflow
from temporalio.common import SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from activities.types import DEFAULT_BATCH, DEFAULT_IN_FLIGHT

PREPARING, REWRAPPING, VERIFYING = "PREPARING", "REWRAPPING", "VERIFYING"
AWAITING_COMMIT, RETIRING = "AWAITING_COMMIT", "RETIRING"
AWAITING_DESTROY, DESTROYING = "AWAITING_DESTROY", "DESTROYING"
DONE, ABORTED, BLOCKED = "DONE", "ABORTED", "BLOCKED"
PHASES = (
    PREPARING,
    REWRAPPING,
    VERIFYING,
    AWAITING_COMMIT,
    RETIRING,
    AWAITING_DESTROY,
    DESTROYING,
    DONE,
    ABORTED,
    BLOCKED,
)
BEFORE_RETIREMENT = (PREPARING, REWRAPPING, VERIFYING, AWAITING_COMMIT)
MAX_SWEEPS = 5
MAX_REASON = 300
MAX_WAIT_SECONDS = 10 * 366 * 24 * 3600
MAX_START_DELAY_SECONDS = 15 * 60
"""A start request (``RotateKeyInput.requested_at``) older than this when its run starts is
refused: it is a recorded start input replayed under the same workflow id (the payload codec
binds a ciphertext to its workflow id, not to its run)."""
MAX_START_SKEW_SECONDS = 5 * 60
"""How far in the future of the run's start a request may be dated (client clock skew)."""
PATCH_FRESH_LAUNCH = "launch-fresh-request"
PATCH_START_CHECK = "rotation-start-check"
"""Runs started since this patch refuse a start input without a fresh ``requested_at``, and a
carried-over ``state`` anywhere but in a continue-as-new successor."""
"""Longest grace period or destroy delay: ten years. Longer waits are mistakes, and a value
beyond what timers and the audit log's integers take would stall the workflow task."""

PATCH_SAFETY = "rotation-safety-1"
"""Memo and search attributes, the destroy phases and BLOCKED. Histories recorded before it
(tests/replay/rotation_done.json) replay without them."""

MEMO_PROGRESS = "progress"
KEY_REF_ATTRIBUTE = SearchAttributeKey.for_keyword("RekeyKeyRef")
PHASE_ATTRIBUTE = SearchAttributeKey.for_keyword("RekeyPhase")
REMAINING_ATTRIBUTE = SearchAttributeKey.for_int("RekeyRemaining")


@dataclass
class RotationState:
    phase: str = PREPARING
    old_primary: int = 0
    new_version: int = 0
    cursor: str | None = None
    sweeps: int = 0
    total: int = 0
    rewrapped: int = 0
    conflicts: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)
    throttled_waits: int = 0
    started_at: str = ""
    updated_at: str = ""
    retired: list[int] = field(default_factory=list)
    destroyed: list[int] = field(default_factory=list)
    approved: bool = False
    paused: bool = False
    abort_requested: bool = False
    note: str = ""
    phase_started: dict[str, str] = field(default_factory=dict)  # phase -> when last entered
    # Added with PATCH_SAFETY (defaults keep older carried-over states valid):
    rate: float = 0.0
    version_created: bool = False
    committed: bool = False  # the grace period ended or was approved; never waited for again
    blocked_in: str = ""
    blocked_reason: str = ""
    blocked_kind: str = ""  # error | in_use
    resume_requested: bool = False
    cancel_requested: bool = False  # a cancel-destroy sent while BLOCKED (one shot)
    reenabling: bool = False  # a resume is enabling old versions again (blocked by blobs on them)
    recorded: list[str] = field(default_factory=list)  # "disabled:2", "destroyed:2": audited
    destroy_approved: bool = False
    destroy_cancelled: bool = False


@dataclass
class RotateKeyInput:
    key_ref: str
    grace_seconds: float = 24 * 3600
    destroy_after_seconds: float | None = None  # None: never destroy
    batch_size: int = DEFAULT_BATCH
    batches_in_flight: int = DEFAULT_IN_FLIGHT
    verify_sample: int = 20
    started_by: str = ""
    state: RotationState | None = None  # carried over by continue-as-new
    # When the client (or a schedule's launcher) asked for this run, ISO 8601 with offset; ""
    # for inputs recorded before it existed (not checked). See MAX_START_DELAY_SECONDS.
    requested_at: str = ""


@dataclass
class Progress:
    key_ref: str
    phase: str
    old_primary: int
    new_version: int
    total: int
    rewrapped: int
    remaining: int
    conflicts: int
    failed: int
    throttled_waits: int
    current_rate: float
    paused: bool
    started_at: str
    updated_at: str
    note: str
    phase_started: dict[str, str] = field(default_factory=dict)
    sweeps: int = 0
    blocked_in: str = ""
    blocked_reason: str = ""
    commit_due: str = ""
    """When the grace period ends (ISO time), while AWAITING_COMMIT."""
    destroy_due: str = ""
    """When the old versions are destroyed (ISO time), while AWAITING_DESTROY."""
    disabled: list[int] = field(default_factory=list)
    destroyed: list[int] = field(default_factory=list)
    destroy_cancelled: bool = False
    grace_seconds: float = 0.0
    destroy_after_seconds: float | None = None
    started_by: str = ""


@dataclass
class LaunchRotationInput:
    rotation_id: str
    request: RotateKeyInput
