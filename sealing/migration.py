"""Moving hardware-sealed state from one generation's agents to the next one's, host by host.

The steps a migration's activities call, over the store and two agents of one host
(`AgentPort`: the transport lives in ``rekey``):

* `plan_fleet`: the old and new agent of every host and the hardware-sealed blobs of the old
  generation it holds, with every reason the fleet cannot migrate;
* `attest_new_agent`: the new agent attests over the migration's nonce; the claims must be
  the new generation's and pass the migration policy against the old one;
* `hand_off_batch`: the old agent exports a batch of its host's blobs to the new agent (which
  it attests itself, HPKE to the attested key); the new agent imports and reseals (same blob id
  and version); the store swaps each blob by compare-and-swap and keeps the old copy
  (`sealing.store.migrations`). A blob rewritten meanwhile is handed off again, never
  overwritten. Nothing on a host changes before its old agent has answered;
* `gate_sample`: the new agent opens a sample of what moved to it.

No plaintext leaves an agent here except in `gate_sample`, which lets the opened value go at
once (it is never returned, logged or compared).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from attestation.errors import AttestationError
from attestation.platform import PlatformVerifier
from attestation.policy import CLOCK_SKEW
from sealing import envelope
from sealing.agent import migration_reasons
from sealing.errors import SealedBlobError, SealingError
from sealing.generation import GenerationManifest, details_reasons, diff, parse_manifest
from sealing.handoff import fingerprint, report_data_for
from sealing.state import BLOB_KIND, blob_subject
from sealing.store import AgentRecord, RecordNotFound, SealedStateStore
from sealing.store.migrations import Restored
from sealing.witness import ResettableWitness

__all__ = [
    "AgentDown",
    "AgentPort",
    "AgentRefused",
    "AgentUntrusted",
    "BatchOutcome",
    "FleetHost",
    "FleetView",
    "attest_new_agent",
    "gate_sample",
    "hand_off_batch",
    "new_agent_reasons",
    "plan_fleet",
]

MAX_AGE = timedelta(minutes=5)
SWAP_ATTEMPTS = 3


class AgentDown(SealingError):
    """The agent did not answer (or did not prove its answer); nothing was changed."""


class AgentRefused(SealingError):
    """The agent refused the request; its one-line reason (never a secret)."""


class AgentUntrusted(AgentRefused):
    """What answers at the agent's endpoint is not the attested agent expected (its RA-TLS
    certificate shows another build, another host, or no binding): a refusal, not an outage."""


class AgentPort(Protocol):
    """One agent, as a migration uses it. Every method raises `AgentDown` or `AgentRefused`."""

    def identity(self) -> dict[str, Any]: ...

    def nonce(self) -> bytes: ...

    def import_nonce(self) -> bytes: ...

    def attest(self, nonce: bytes) -> tuple[bytes, bytes]:
        """(evidence, handoff public key)."""
        ...

    def export(
        self,
        *,
        peer_evidence: bytes,
        peer_public_key: bytes,
        nonce: bytes,
        import_nonce: bytes,
        blobs: list[bytes],
    ) -> dict[str, Any]: ...

    def import_package(self, package: dict[str, Any]) -> list[tuple[str, str, bytes]]: ...

    def unseal(self, blob: bytes) -> bytes: ...

    def check(self, blob: bytes) -> bool:
        """Whether the agent opens ``blob``, answered without the plaintext (`/v1/check`)."""
        ...


@dataclass
class FleetHost:
    host_id: str
    old_agent: AgentRecord | None = None
    new_agent: AgentRecord | None = None
    tee_blobs: int = 0
    kms_share: bool = False  # the host's new agent re-binds the KMS-wrapped blobs in [kms_lo, kms_hi)
    kms_lo: str | None = None
    kms_hi: str | None = None
    kms_blobs: int = 0


@dataclass
class FleetView:
    old: GenerationManifest
    new: GenerationManifest
    hosts: list[FleetHost] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    kms_blobs: int = 0

    def diff(self) -> dict[str, Any]:
        return diff(self.old, self.new).to_dict()


Share = tuple[str, str | None, str | None]
"""A host's share of the KMS-wrapped blobs: (host id, lowest blob id, first blob id past the
share); None: unbounded."""


def kms_shares(host_ids: list[str]) -> list[Share]:
    """The blob-id range of each host (sorted): the 128-bit UUID space in equal parts, the
    first from nothing, the last to nothing, so that every blob id is in exactly one."""
    hosts = sorted(host_ids)
    n = len(hosts)
    bounds: list[str | None] = [None]
    bounds += [str(uuid.UUID(int=(k << 128) // n)) for k in range(1, n)]
    bounds.append(None)
    return [(host, bounds[i], bounds[i + 1]) for i, host in enumerate(hosts)]


def in_share(blob_id: str, lo: str | None, hi: str | None) -> bool:
    return (lo is None or blob_id >= lo) and (hi is None or blob_id < hi)


def manifest_of(store: SealedStateStore, generation: str) -> GenerationManifest:
    try:
        return parse_manifest(json.loads(store.get_generation(generation)), generation)
    except RecordNotFound:
        raise SealingError(f"generation {generation} is not registered") from None


def _latest(records: list[AgentRecord]) -> AgentRecord | None:
    live = [r for r in records if r.state == "live"] or records
    return max(live, key=lambda r: r.started_at) if live else None


MAX_MIGRATION_HOSTS = 2000
"""Hosts one migration takes: its state carries a line per host into every continue-as-new
input (about 0.6 KiB a host) and its progress memo (about 0.2 KiB), under Temporal's 2 MB
payload limit with room to spare."""


def plan_fleet(store: SealedStateStore, old_generation: str, new_generation: str) -> FleetView:
    """Every host with an agent of either generation or old-generation hardware-sealed blobs:
    its (most recently started) old and new agent and its blob count; ``reasons`` lists every
    host that cannot migrate (blobs but no agent of one generation, no new agent at all).

    When the old generation has KMS-wrapped blobs, every host with a new agent takes part and
    gets a share of them (`sealing.kms_migration.kms_shares`)."""
    view = FleetView(manifest_of(store, old_generation), manifest_of(store, new_generation))
    counts = store.count_tee_by_host(old_generation)
    olds = store.list_agents(generation=old_generation)
    news = store.list_agents(generation=new_generation)
    host_ids = sorted({*counts, *(a.host_id for a in olds), *(a.host_id for a in news)})
    kms = max(0, store.count_by_generation().get(old_generation, 0) - sum(counts.values()))
    for host in host_ids:
        entry = FleetHost(
            host,
            _latest([a for a in olds if a.host_id == host]),
            _latest([a for a in news if a.host_id == host]),
            counts.get(host, 0),
        )
        if entry.tee_blobs and entry.new_agent is None:
            view.reasons.append(
                f"host {host} holds {entry.tee_blobs} hardware-sealed blobs of {old_generation} but runs no"
                f" registered agent of {new_generation}"
            )
        if entry.tee_blobs and entry.old_agent is None:
            view.reasons.append(
                f"host {host} holds {entry.tee_blobs} hardware-sealed blobs of {old_generation} but no agent"
                f" of {old_generation} is registered there to hand them off"
            )
        if entry.tee_blobs or (entry.old_agent and entry.new_agent) or (kms and entry.new_agent):
            view.hosts.append(entry)
    if not any(h.new_agent for h in view.hosts):
        view.reasons.append(f"no agent of {new_generation} is registered")
    if len(view.hosts) > MAX_MIGRATION_HOSTS:
        view.reasons.append(
            f"{len(view.hosts)} hosts take part, more than the {MAX_MIGRATION_HOSTS} one migration can"
            " carry (its progress and continue-as-new state hold every host)"
        )
    # Every host with a new agent gets a share, KMS-wrapped blobs or not yet: one written
    # through the old generation during the migration is in some share, and swept.
    view.kms_blobs = kms
    sharing = [h for h in view.hosts if h.new_agent is not None]
    if kms and not sharing:
        view.reasons.append(
            f"{kms} KMS-wrapped blobs of {old_generation} need an agent of {new_generation} to"
            " re-bind them, and none is registered"
        )
    if sharing:
        by_host = {h.host_id: h for h in sharing}
        shares = kms_shares(list(by_host))
        found = store.count_kms_in_shares(old_generation, shares)
        for host_id, lo, hi in shares:
            entry = by_host[host_id]
            entry.kms_share, entry.kms_lo, entry.kms_hi = True, lo, hi
            entry.kms_blobs = found.get(host_id, 0)
    return view


def attest_new_agent(
    port: AgentPort,
    record: AgentRecord,
    nonce: bytes,
    verifier: PlatformVerifier,
    *,
    old: GenerationManifest,
    new: GenerationManifest,
    allow_same_svn: bool,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    max_age: timedelta = MAX_AGE,
) -> list[str]:
    """Why ``record``'s agent may not take ``old``'s state (empty: it may). Its evidence must
    bind ``nonce`` and the handoff key the registry recorded, verify on its host, carry the new
    generation's measurement, and pass the migration policy (same platform, signer and
    product, SVN not lower, equal only with ``allow_same_svn``, not debug, TCB up to date,
    fresh)."""
    evidence, public_key = port.attest(nonce)
    return new_agent_reasons(
        evidence,
        public_key,
        nonce,
        verifier,
        old=old,
        new=new,
        allow_same_svn=allow_same_svn,
        expected_key_sha256=record.handoff_key_sha256,
        now=now,
        max_age=max_age,
    )


def new_agent_reasons(
    evidence: bytes,
    public_key: bytes,
    nonce: bytes,
    verifier: PlatformVerifier,
    *,
    old: GenerationManifest,
    new: GenerationManifest,
    allow_same_svn: bool,
    expected_key_sha256: str,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    max_age: timedelta = MAX_AGE,
) -> list[str]:
    """Why the enclave behind ``evidence`` (over ``nonce`` and ``public_key``) may not take
    ``old``'s state as ``new`` (empty: it may); see `attest_new_agent`. The hand-off asks it
    again of the evidence the new agent gives the old one, so the secrets go only to the
    attested generation, whatever the registry says by then."""
    at = now()
    try:
        claims = verifier.verify(evidence, at=at)
    except AttestationError as exc:
        return [f"evidence does not verify: {exc}"]
    reasons: list[str] = []
    if not hmac.compare_digest(bytes.fromhex(claims.report_data), report_data_for(nonce, public_key)):
        reasons.append("evidence does not bind the migration's nonce and the agent's handoff key")
    if fingerprint(public_key) != expected_key_sha256:
        reasons.append("handoff key is not the one the fleet registry recorded for this agent")
    if claims.measurement != new.measurement:
        reasons.append(f"measurement {claims.measurement[:16]}… is not {new.id}'s {new.measurement[:16]}…")
    reasons += details_reasons(new, claims)
    reasons += migration_reasons(old, claims, peer_is_newer=True)
    if claims.svn == old.svn and not allow_same_svn:
        reasons.append(
            f"svn {claims.svn} is not above {old.id}'s svn {old.svn} (allow it with --allow-same-svn)"
        )
    if claims.evidence_time is not None:
        if at - claims.evidence_time > max_age:
            reasons.append(f"evidence is older than {int(max_age.total_seconds())}s")
        if claims.evidence_time - at > CLOCK_SKEW:
            reasons.append("evidence is dated in the future")
    return reasons


@dataclass
class BatchOutcome:
    moved: int = 0
    conflicts: int = 0
    skipped: int = 0
    cursor: str | None = None
    done: bool = False
    attestations: int = 0


Admit = Callable[[bytes, bytes, bytes], list[str]]
"""(evidence, public key, nonce) -> why that enclave may not take the hand-off (`new_agent_reasons`)."""


def _handed(
    port_new: AgentPort, port_old: AgentPort, blobs: list[bytes], admit: Admit, host: str
) -> list[tuple[str, str, bytes]]:
    nonce = port_old.nonce()
    evidence, public_key = port_new.attest(nonce)
    reasons = admit(evidence, public_key, nonce)
    if reasons:  # checked before the old agent exports anything
        raise AgentRefused(f"the new agent on host {host} may not take the hand-off: {'; '.join(reasons)}")
    import_nonce = port_new.import_nonce()
    package = port_old.export(
        peer_evidence=evidence,
        peer_public_key=public_key,
        nonce=nonce,
        import_nonce=import_nonce,
        blobs=blobs,
    )
    return port_new.import_package(package)


def _check_resealed(new_blob: bytes, old_blob: bytes, new_generation: str) -> int:
    """The resealed blob's key version, once its header is the old one's but for the generation."""
    try:
        new_header, old_parsed = envelope.parse(new_blob), envelope.parse(old_blob)
    except SealedBlobError:
        raise AgentRefused("the new agent answered with something that is not a sealed blob") from None
    a, b = new_header.header, old_parsed.header
    if (a.blob_id, a.namespace, a.name, a.version, a.policy, a.key_ref, a.generation) != (
        b.blob_id,
        b.namespace,
        b.name,
        b.version,
        b.policy,
        b.key_ref,
        new_generation,
    ):
        raise AgentRefused(
            f"the new agent resealed {b.namespace}/{b.name} as another blob than the one handed off"
        )
    return new_header.key_version


def _repoint(
    witness: ResettableWitness | None, namespace: str, name: str, from_sha256: str, to_blob: bytes
) -> None:
    """Point the freshness checkpoint of ``namespace``/``name`` from the blob with SHA-256
    ``from_sha256`` to ``to_blob`` (same version: a hand-off and its rollback keep the version,
    sealing.state's `_check_tee` reads a tee blob only if its checkpoint names it). A checkpoint
    that names another blob (a put moved it on meanwhile) is left alone, as is an item without
    one (trust on first use)."""
    if witness is None:
        return
    subject = blob_subject(namespace, name)
    current = witness.latest(BLOB_KIND, subject)
    if current is None or current.body.get("sha256") != from_sha256:
        return
    header = envelope.parse(to_blob).header
    witness.reset(
        BLOB_KIND,
        subject,
        current.order,
        {"blob_id": str(header.blob_id), "generation": header.generation, "sha256": _sha256(to_blob)},
    )


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def roll_back(
    store: SealedStateStore, witness: ResettableWitness | None, migration_id: str, hosts: list[str]
) -> Restored:
    """Put this migration's old copies on ``hosts`` back (`SealedStateStore.restore_copies`) and
    point each restored item's freshness checkpoint back at its old copy."""
    restored = store.restore_copies(migration_id, hosts)
    for namespace, name, replaced_sha256, old_blob in restored.put_back:
        _repoint(witness, namespace, name, replaced_sha256, old_blob)
    return restored


def hand_off_batch(
    store: SealedStateStore,
    old: AgentPort,
    new: AgentPort,
    *,
    migration_id: str,
    old_generation: str,
    new_generation: str,
    host: str,
    after: str | None,
    size: int,
    admit: Admit,
    beat: Callable[[], None] = lambda: None,
    witness: ResettableWitness | None = None,
) -> BatchOutcome:
    """Hand off up to ``size`` of ``host``'s old-generation blobs after ``after`` (see the module).

    The old agent is asked who it is first: `AgentDown` from it means nothing on the host was
    changed. A blob rewritten during the hand-off (its swap lost) is read again and handed off
    again, up to `SWAP_ATTEMPTS` times; a blob the new generation wrote meanwhile is skipped.
    ``admit`` checks the new agent's hand-off evidence before each export (`AgentRefused`);
    ``beat`` is called after each export round and each swap (the activity's heartbeat).
    ``witness``: each swapped item's freshness checkpoint is pointed at its new blob."""
    old.identity()
    outcome = BatchOutcome()
    records = store.tee_page(generation=old_generation, host=host, after=after, limit=size)
    if not records:
        outcome.cursor, outcome.done = after, True
        return outcome
    pending = records
    for attempt in range(SWAP_ATTEMPTS):
        resealed = _handed(new, old, [r.blob for r in pending], admit, host)
        beat()
        outcome.attestations += 2  # the exporter verifies the importer, and the importer the exporter
        by_name = {(ns, name): blob for ns, name, blob in resealed}
        lost = []
        for record in pending:
            blob = by_name.get((record.namespace, record.name))
            if blob is None:
                raise AgentRefused(f"the new agent did not return {record.namespace}/{record.name}")
            key_version = _check_resealed(blob, record.blob, new_generation)
            if store.swap_keeping_copy(
                migration_id, record, blob=blob, generation=new_generation, key_version=key_version
            ):
                _repoint(witness, record.namespace, record.name, _sha256(record.blob), blob)
                outcome.moved += 1
            else:
                lost.append(record)
            beat()
        pending = []
        for record in lost:
            if attempt == 0:
                outcome.conflicts += 1
            try:
                current = store.get(record.blob_id)
            except RecordNotFound:
                continue  # deleted meanwhile: nothing to move
            if current.generation == old_generation and current.kind == "tee" and current.host == host:
                pending.append(current)
            else:
                outcome.skipped += 1
        if not pending:
            break
    # Anything still losing its swap stays on the old generation: VERIFYING sweeps it again.
    outcome.cursor = records[-1].blob_id
    outcome.done = len(records) < size
    return outcome


def gate_sample(
    store: SealedStateStore, new: AgentPort, *, migration_id: str, new_generation: str, host: str, sample: int
) -> tuple[int, list[str]]:
    """The new agent opens up to ``sample`` of the blobs this migration moved on ``host`` (and
    that are still the new generation's): (how many opened, why the others did not)."""
    failures: list[str] = []
    checked = 0
    for blob_id in store.copies(migration_id, host, sample, kind="tee"):
        try:
            record = store.get(blob_id)
        except RecordNotFound:
            continue
        if record.generation != new_generation:
            continue  # rewritten through the old generation since: VERIFYING sweeps it
        try:
            new.check(record.blob)  # opened inside the agent: no plaintext reaches the worker
        except AgentRefused as exc:
            failures.append(f"{record.namespace}/{record.name} on {host} does not open: {exc}")
            continue
        checked += 1
    return checked, failures
