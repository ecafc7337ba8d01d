"""The migration workflow's phases, input, carried-over state and progress: plain data, shared
by ``workflows.migration`` and ``rekey.client``."""

from __future__ import annotations

from dataclasses import dataclass, field

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.migration_types import DEFAULT_HANDOFF_BATCH, HANDOFF_BATCHES_PER_CALL, HostPlan

ATTESTING, WIDENING, HANDING_OFF, VERIFYING = "ATTESTING", "WIDENING", "HANDING_OFF", "VERIFYING"
AWAITING_COMMIT, NARROWING = "AWAITING_COMMIT", "NARROWING"
DONE, ROLLED_BACK = "DONE", "ROLLED_BACK"
PHASES = (ATTESTING, WIDENING, HANDING_OFF, VERIFYING, AWAITING_COMMIT, NARROWING, DONE, ROLLED_BACK)
BEFORE_NARROWING = (ATTESTING, WIDENING, HANDING_OFF, VERIFYING, AWAITING_COMMIT)
ON_FAILURE = ("rollback", "pause")
DEFAULT_WAVES = (1, 10, 50, 100)
MAX_SWEEPS = 5
MAX_REASON = 300
MAX_REASONS = 50
MAX_WAIT_SECONDS = 10 * 366 * 24 * 3600
MAX_START_DELAY_SECONDS = 15 * 60
MAX_START_SKEW_SECONDS = 5 * 60
MEMO_PROGRESS = "progress"
MAX_JITTER_SECONDS = 600
"""The largest bound of the jitter before each host's first batch of a wave (ten minutes)."""
PATCH_SWEEP_AFTER_COMMIT = "migration-sweep-after-commit-1"
"""From this patch on, the commit counts the old generation's blobs again before NARROWING."""

# Host states
PENDING, MOVING, MOVED, HOST_ROLLED_BACK = "pending", "moving", "moved", "rolled_back"


@dataclass
class HostCount:
    host_id: str
    old_agent: str = ""
    new_agent: str = ""
    wave: int = 0  # 1-based wave the host moves in
    total: int = 0  # old-generation hardware-sealed blobs on it when planned (and found by sweeps)
    moved: int = 0
    conflicts: int = 0
    rolled_back: int = 0
    state: str = PENDING
    cursor: str | None = None
    tee_done: bool = False
    # The host's share of the KMS-wrapped blobs (blob ids in [kms_lo, kms_hi)), re-bound by its
    # new agent after its hardware-sealed blobs; counted apart from them.
    kms_share: bool = False
    kms_lo: str | None = None
    kms_hi: str | None = None
    kms_total: int = 0
    kms_moved: int = 0
    kms_conflicts: int = 0
    kms_cursor: str | None = None
    kms_done: bool = False

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.moved) if self.state != HOST_ROLLED_BACK else self.total

    @property
    def kms_remaining(self) -> int:
        return max(0, self.kms_total - self.kms_moved) if self.state != HOST_ROLLED_BACK else self.kms_total

    def next_step(self) -> str:
        """What the host moves next: ``tee`` (its hardware-sealed blobs, through its old agent),
        ``kms`` (its share of the KMS-wrapped blobs), or "" (nothing: it has moved)."""
        if not self.tee_done and self.old_agent:
            return "tee"
        if self.kms_share and not self.kms_done:
            return "kms"
        return ""

    def plan(self) -> HostPlan:
        return HostPlan(
            self.host_id,
            self.old_agent,
            self.new_agent,
            self.total,
            self.kms_share,
            self.kms_lo,
            self.kms_hi,
            self.kms_total,
        )


@dataclass
class WaveCount:
    wave: int  # 1-based
    hosts: list[str]
    moved: int = 0
    conflicts: int = 0
    rolled_back: int = 0
    attestations: int = 0
    gate: str = ""  # "", passed, failed
    gate_checked: int = 0
    state: str = PENDING  # pending | moving | moved | rolled_back
    kms_moved: int = 0


@dataclass
class MigrationState:
    phase: str = ATTESTING
    started_at: str = ""
    updated_at: str = ""
    phase_started: dict[str, str] = field(default_factory=dict)
    hosts: list[HostCount] = field(default_factory=list)
    waves: list[WaveCount] = field(default_factory=list)
    wave: int = 0  # index of the wave in progress (0-based); len(waves) once all moved
    sweeps: int = 0
    attestations: int = 0
    kms_blobs: int = 0
    refused: bool = False
    reasons: list[str] = field(default_factory=list)
    held: str = ""  # why the migration stopped and waits for resume (or abort)
    paused: bool = False
    abort_requested: bool = False
    approved: bool = False
    committed: bool = False
    planned: bool = False
    widened: bool = False
    note: str = ""
    rolling_back: str = ""  # why a rollback began; kept until it ends, so a held one is finished on resume


@dataclass
class MigrateInput:
    from_generation: str
    to_generation: str
    waves: list[int] = field(default_factory=lambda: list(DEFAULT_WAVES))
    """Cumulative percentages of hosts, increasing, ending at 100."""
    grace_seconds: float = 24 * 3600
    on_failure: str = "rollback"  # rollback | pause
    gate_sample: int = 5
    allow_same_svn: bool = False
    requested_at: str = ""
    started_by: str = ""
    batch_size: int = DEFAULT_HANDOFF_BATCH
    state: MigrationState | None = None  # carried over by continue-as-new
    batches_per_call: int = HANDOFF_BATCHES_PER_CALL
    """Hand-off batches one activity call moves (fewer: a pause or a fault is seen sooner)."""
    jitter_seconds: float = 0.0
    """Each host's first batch of a wave starts after a random delay up to this (0: at once).
    0 by default, so an input recorded before the field existed replays with no timer;
    ``rekey.client`` sends its own default."""


@dataclass
class HostProgress:
    host_id: str
    wave: int
    state: str
    total: int
    moved: int
    remaining: int
    conflicts: int
    rolled_back: int
    kms_total: int = 0
    kms_moved: int = 0
    kms_remaining: int = 0


@dataclass
class MigrationProgress:
    from_generation: str
    to_generation: str
    phase: str
    wave: int  # 1-based wave in progress (0 before HANDING_OFF)
    waves: int
    hosts: list[HostProgress]
    wave_counts: list[WaveCount]
    total: int
    moved: int
    remaining: int
    conflicts: int
    attestations: int
    kms_blobs: int
    paused: bool
    held: str
    refused: bool
    reasons: list[str]
    started_at: str
    updated_at: str
    phase_started: dict[str, str] = field(default_factory=dict)
    commit_due: str = ""
    grace_seconds: float = 0.0
    on_failure: str = ""
    started_by: str = ""
    note: str = ""
    kms_moved: int = 0  # KMS-wrapped blobs re-bound to the new generation
    kms_remaining: int = 0
    kms_conflicts: int = 0


def migration_id(from_generation: str, to_generation: str) -> str:
    return f"migrate:{from_generation}:{to_generation}"


def split_waves(host_ids: list[str], waves: list[int]) -> list[list[str]]:
    """Hosts per wave, in the given order: wave k takes the hosts up to ``ceil(pct_k * n / 100)``
    (cumulative), at least one host more than the wave before; waves left with none are dropped.
    Deterministic: the same hosts and percentages give the same waves."""
    n = len(host_ids)
    result: list[list[str]] = []
    taken = 0
    for pct in waves:
        upto = min(n, max(taken + 1, -(-pct * n // 100)))
        if upto > taken:
            result.append(host_ids[taken:upto])
            taken = upto
    if taken < n:  # percentages that end below 100 still move every host
        result.append(host_ids[taken:])
    return result
