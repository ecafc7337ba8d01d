"""Inputs and outputs of the migration activities: plain dataclasses, shared with the workflow
(which may import this module and ``activities.types``, nothing else from ``activities``).
Ids, endpoints, cursors, nonces the workflow made and counts only: never a secret, a sealed
blob or an attestation's evidence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OLD_AGENT_UNREACHABLE = "OldAgentUnreachable"
"""``ApplicationError`` type (non-retryable) of a hand-off whose host's old-generation agent does
not answer: nothing on that host was changed (``details[0]``: the host id)."""
NEW_AGENT_FAILED = "NewAgentFailed"
"""``ApplicationError`` type (non-retryable) of a hand-off or gate whose new-generation agent
died or refused mid-wave (``details[0]``: the host id)."""


def migration_task_queue(task_queue: str) -> str:
    """The task queue of a migration's activities (the audit one included): the workflow's own
    queue with ``-migration`` after it, polled only by workers that have them
    (`rekey.worker.build_worker`). In a rolling upgrade an older worker on the workflow's
    queue never receives them, so it cannot answer NotFoundError and spend their retries:
    they wait on this queue until an upgraded worker takes them."""
    return f"{task_queue}-migration"


RELEASE_POLICY_HELD = "ReleasePolicyHeld"
"""``ApplicationError`` type (non-retryable) of a release-policy step that changed nothing
because an operator must act first: a key without a release policy, or one whose policy was
changed since this migration last wrote it. The migration holds (it never rolls back for it);
``resume`` tries again."""
MIGRATION_CLAIMED = "MigrationClaimed"
"""The reason prefix of a migration refused at ATTESTING because another open migration holds
one of its generations."""

DEFAULT_HANDOFF_BATCH = 50
MAX_HANDOFF_BATCH = 500
HANDOFF_BATCHES_PER_CALL = 10
"""Batches one ``migration_handoff`` or ``migration_rebind`` call moves, one after the other:
each round of a wave waits for its slowest host and a workflow task, so fewer, longer calls keep
the agents busier (measured with loadtest/bench_migration.py). A pause or abort takes effect
between calls."""
MAX_HANDOFF_BATCHES_PER_CALL = 20


@dataclass
class FleetInput:
    from_generation: str
    to_generation: str


@dataclass
class ClaimsInput:
    """The claims of migration ``migration_id`` on its generations, released when it ends."""

    migration_id: str


@dataclass
class HostPlan:
    """One host of the migration: its old- and new-generation agents (registry ids) and how
    many hardware-sealed blobs of the old generation it holds."""

    host_id: str
    old_agent: str = ""
    new_agent: str = ""
    tee_blobs: int = 0
    kms_share: bool = False
    """The host's new agent re-binds the old generation's KMS-wrapped blobs with
    ``kms_lo <= blob id < kms_hi`` (None: unbounded); ``kms_blobs`` of them when planned."""
    kms_lo: str | None = None
    kms_hi: str | None = None
    kms_blobs: int = 0


@dataclass
class FleetPlan:
    hosts: list[HostPlan] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    """Why the fleet cannot migrate (a host with old-generation state and no new agent, ...)."""
    diff: dict[str, Any] = field(default_factory=dict)
    """The generation diff, field -> [old, new] (public manifest fields only)."""
    kms_blobs: int = 0


@dataclass
class AgentNonce:
    agent_id: str
    nonce_hex: str  # made by the workflow (workflow.uuid4), fresh per migration run


@dataclass
class AttestInput:
    from_generation: str
    to_generation: str
    agents: list[AgentNonce]
    allow_same_svn: bool = False


@dataclass
class AttestResult:
    attested: int = 0
    reasons: list[str] = field(default_factory=list)  # "<agent id>: <reason>", every one


@dataclass
class ReleaseInput:
    from_generation: str
    to_generation: str
    action: str  # widen | narrow | restore


@dataclass
class RebindInput:
    """Batches of a host's share of KMS-wrapped blobs, re-bound by its new agent."""

    migration_id: str
    from_generation: str
    to_generation: str
    host_id: str
    new_agent: str
    kms_lo: str | None = None
    kms_hi: str | None = None
    after: str | None = None
    size: int = DEFAULT_HANDOFF_BATCH
    batches: int = 1  # batches of up to ``size`` blobs this call re-binds, one after the other


@dataclass
class KmsRemainingInput:
    from_generation: str
    hosts: list[HostPlan]  # those with a share


@dataclass
class HandoffInput:
    migration_id: str
    from_generation: str
    to_generation: str
    host_id: str
    old_agent: str
    new_agent: str
    after: str | None = None
    size: int = DEFAULT_HANDOFF_BATCH
    allow_same_svn: bool = False  # the migration policy the new agent's hand-off evidence must pass
    batches: int = 1  # batches of up to ``size`` blobs this call hands off, one after the other


@dataclass
class HandoffResult:
    moved: int = 0
    conflicts: int = 0  # rewritten meanwhile and handed off again (still counted once here)
    skipped: int = 0  # rewritten meanwhile by the new generation: nothing to move
    cursor: str | None = None
    done: bool = False
    attestations: int = 0


@dataclass
class GateInput:
    migration_id: str
    to_generation: str
    hosts: list[HostPlan]
    sample: int


@dataclass
class GateResult:
    checked: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class RollbackInput:
    migration_id: str
    host_ids: list[str]


@dataclass
class RollbackResult:
    restored: int = 0
    already_old: int = 0
    kept_new: int = 0  # written by the new generation after the swap: left on it
    kept_ids: list[str] = field(default_factory=list)


@dataclass
class RemainingInput:
    from_generation: str
    host_ids: list[str]


@dataclass
class NarrowInput:
    migration_id: str
    from_generation: str
    to_generation: str
