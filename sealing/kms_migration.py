"""Moving KMS-wrapped state from one generation to the next: the new generation's agents
re-bind each blob to their generation after an attested release.

KMS-wrapped state is not bound to a host: the release policy of its key decides which
generations may obtain its DEKs. A migration still moves it host by host, so that each wave's
new agents take a share and a failed wave rolls back with the rest of it:

* `kms_shares`: each host with a new agent gets a blob-id range (the UUID space cut into equal
  parts over the sorted host ids), deterministic for a given set of hosts;
* `attested_token`: the new agent attests over a fresh nonce binding its recipient key (its
  handoff key); the evidence is verified on its host and must be the generation's; the result
  token (ES256, ``cnf`` = the key's SHA-256) is what the key's release gate accepts. A token is
  not a secret; one serves a whole batch;
* `rebind_batch`: the new agent re-binds a page of its share inside the enclave (its DEKs are
  released to it encrypted to its key; it re-encrypts each body under the same DEK and a header
  naming its generation); the store swaps each blob by compare-and-swap and keeps the old copy.
  A blob rewritten meanwhile is re-bound again, never overwritten;
* `kms_gate_sample`: the new agent opens a sample of what it re-bound, answering only that it did.

The worker (which calls these) never holds a DEK or a plaintext: it passes blobs and tokens.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from attestation.errors import AttestationError
from attestation.platform import PlatformVerifier
from attestation.policy import TCB_STATUSES, Policy, Rule, parse_policy
from attestation.token import ResultSigner
from sealing import envelope
from sealing.envelope import SealingPolicy
from sealing.errors import SealedBlobError, SealingError
from sealing.generation import GenerationManifest
from sealing.handoff import fingerprint, report_data_for
from sealing.migration import SWAP_ATTEMPTS, AgentRefused, BatchOutcome, Share, in_share, kms_shares
from sealing.store import RecordNotFound, SealedStateStore

__all__ = [
    "RELEASE_AUDIENCE",
    "KmsAgentPort",
    "ReleaseTokenRefused",
    "Share",
    "attested_token",
    "generation_policy",
    "generation_rule",
    "in_share",
    "kms_gate_sample",
    "kms_shares",
    "rebind_batch",
    "rule_admits",
]

RELEASE_AUDIENCE = "rekey-kms"
"""The audience of the release tokens rekey issues (`kms_adapters.release.ReleasePolicy`'s default)."""


class ReleaseTokenRefused(SealingError):
    """The agent's evidence did not earn a release token (does not verify, binds another nonce
    or key, or is not the generation's)."""


class KmsAgentPort(Protocol):
    """A new-generation agent, as re-binding uses it (`rekey.agent_peer.AgentPeer` is one).
    Every method raises `sealing.migration.AgentDown` or `sealing.migration.AgentRefused`."""

    def attest(self, nonce: bytes) -> tuple[bytes, bytes]: ...

    def rebind(self, blobs: list[bytes], *, from_generation: str, token: str) -> list[bytes]: ...

    def check_kms(self, blob: bytes, token: str) -> bool: ...


# -------------------------------------------------------------------- generation rules


def generation_rule(manifest: GenerationManifest) -> dict[str, Any]:
    """A release-policy rule that admits exactly ``manifest``'s build: its measurement and
    details, its debug flag and its TCB level (an unknown level admits UpToDate only), a fresh
    nonce."""
    tcb = manifest.tcb if manifest.tcb in TCB_STATUSES else "UpToDate"
    rule: dict[str, Any] = {
        "platform": manifest.platform,
        "measurements": [manifest.measurement],
        "debug_allowed": manifest.debug,
        "tcb_statuses": [tcb],
        "nonce_required": True,
    }
    if manifest.details:  # the rest of the build's identity (TDX RTMRs, Nitro PCR1/2, ...)
        rule["details"] = dict(manifest.details)
    return rule


def generation_policy(manifest: GenerationManifest) -> Policy:
    """The policy a release token is issued under: the evidence is ``manifest``'s generation.
    Whether that generation gets a key's DEKs is the key's own release policy's decision."""
    return parse_policy({"id": f"generation:{manifest.id}", "rules": [generation_rule(manifest)]})


def rule_admits(rule: Rule, manifest: GenerationManifest) -> bool:
    """Whether ``rule`` admits the identity ``manifest`` describes (the per-request conditions,
    evidence age and nonce, aside)."""
    if rule.platform != manifest.platform:
        return False
    if manifest.debug and not rule.debug_allowed:
        return False
    if manifest.tcb not in rule.tcb_statuses:
        return False
    if any(manifest.details.get(name) != value for name, value in (rule.details or {}).items()):
        return False
    if rule.measurements is not None:
        return manifest.measurement in rule.measurements
    return (
        rule.signer == manifest.signer
        and rule.product_id == manifest.product_id
        and (rule.min_svn is None or manifest.svn >= rule.min_svn)
    )


# ------------------------------------------------------------------------------ tokens


def attested_token(
    attest: Callable[[bytes], tuple[bytes, bytes]],
    verifier: PlatformVerifier,
    signer: ResultSigner,
    manifest: GenerationManifest,
    *,
    expected_key_sha256: str | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> str:
    """A release token for the agent behind ``attest``: it attests over a fresh nonce, its
    evidence must verify, bind the nonce and the key it answered with (the recipient of any
    release; ``expected_key_sha256``: the key the fleet registry recorded), and be
    ``manifest``'s generation. `ReleaseTokenRefused` otherwise."""
    nonce = secrets.token_bytes(32)
    evidence, public_key = attest(nonce)
    at = now()
    try:
        claims = verifier.verify(evidence, at=at)
    except AttestationError as exc:
        raise ReleaseTokenRefused(f"evidence does not verify: {exc}") from None
    if not hmac.compare_digest(bytes.fromhex(claims.report_data), report_data_for(nonce, public_key)):
        raise ReleaseTokenRefused("evidence does not bind the release nonce and the agent's key")
    if expected_key_sha256 is not None and fingerprint(public_key) != expected_key_sha256:
        raise ReleaseTokenRefused("the agent's key is not the one the fleet registry recorded")
    claims = replace(claims, nonce=nonce.hex())
    policy = generation_policy(manifest)
    decision = policy.evaluate(claims, now=at, nonce_checked=True)
    if not decision.allowed:
        raise ReleaseTokenRefused(f"evidence is not {manifest.id}'s: {'; '.join(decision.reasons)}")
    return signer.issue(
        claims,
        policy_id=policy.id,
        policy_digest=policy.digest,
        cnf_key_hash=fingerprint(public_key),
        audience=RELEASE_AUDIENCE,
        now=at,
    )


# ---------------------------------------------------------------------------- re-binding


def _check_rebound(new_blob: bytes, old_blob: bytes, new_generation: str) -> int:
    """The re-bound blob's key version, once it is the old one but for its generation."""
    try:
        new, old = envelope.parse(new_blob), envelope.parse(old_blob)
    except SealedBlobError:
        raise AgentRefused("the new agent answered with something that is not a sealed blob") from None
    a, b = new.header, old.header
    if (
        a.blob_id,
        a.namespace,
        a.name,
        a.version,
        a.key_ref,
        a.created_at,
        a.generation,
        new.key_version,
        new.wrapped_dek,
    ) != (
        b.blob_id,
        b.namespace,
        b.name,
        b.version,
        b.key_ref,
        b.created_at,
        new_generation,
        old.key_version,
        old.wrapped_dek,
    ) or a.policy is not SealingPolicy.KMS:
        raise AgentRefused(f"the new agent re-bound {b.namespace}/{b.name} as another blob than the one sent")
    return new.key_version


def rebind_batch(
    store: SealedStateStore,
    new: KmsAgentPort,
    token_for: Callable[[], str],
    *,
    migration_id: str,
    old_generation: str,
    new_generation: str,
    share: Share,
    after: str | None,
    size: int,
    beat: Callable[[], None] = lambda: None,
    prepare: Callable[[list[str]], None] = lambda _key_refs: None,
) -> BatchOutcome:
    """Re-bind up to ``size`` of the share's old-generation KMS-wrapped blobs after ``after``
    (see the module). A blob whose swap lost (rewritten meanwhile) is read again and re-bound
    again, up to `SWAP_ATTEMPTS` times; one the new generation wrote meanwhile, or deleted, is
    skipped. Old copies are kept under the share's host. ``token_for`` gives the new agent's
    release token: asked for (one attestation) only when the page holds something to re-bind.
    ``prepare`` is given the key refs of every blob about to be re-bound first (the caller makes
    sure each key's release policy admits the new generation)."""
    host, lo, hi = share
    outcome = BatchOutcome()
    records = store.kms_page(generation=old_generation, lo=lo, hi=hi, after=after, limit=size)
    if not records:
        outcome.cursor, outcome.done = after, True
        return outcome
    token = token_for()
    outcome.attestations = 1
    pending = records
    for attempt in range(SWAP_ATTEMPTS):
        prepare([r.key_ref for r in pending])
        rebound = new.rebind([r.blob for r in pending], from_generation=old_generation, token=token)
        beat()
        if len(rebound) != len(pending):
            raise AgentRefused(f"the new agent re-bound {len(rebound)} blobs of {len(pending)}")
        lost = []
        for record, blob in zip(pending, rebound, strict=True):
            key_version = _check_rebound(blob, record.blob, new_generation)
            if store.swap_keeping_copy(
                migration_id,
                record,
                blob=blob,
                generation=new_generation,
                key_version=key_version,
                copy_host=host,
            ):
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
                continue
            if current.generation == old_generation and current.kind == "kms":
                pending.append(current)
            else:
                outcome.skipped += 1
        if not pending:
            break
    outcome.cursor = records[-1].blob_id
    outcome.done = len(records) < size
    return outcome


def kms_gate_sample(
    store: SealedStateStore,
    new: KmsAgentPort,
    token: str,
    *,
    migration_id: str,
    new_generation: str,
    host: str,
    sample: int,
) -> tuple[int, list[str]]:
    """The new agent opens up to ``sample`` of the KMS-wrapped blobs this migration re-bound
    in ``host``'s share: (how many opened, why the others did not)."""
    failures: list[str] = []
    checked = 0
    for blob_id in store.copies(migration_id, host, sample, kind="kms"):
        try:
            record = store.get(blob_id)
        except RecordNotFound:
            continue
        if record.generation != new_generation:
            continue
        try:
            new.check_kms(record.blob, token)
        except AgentRefused as exc:
            failures.append(f"{record.namespace}/{record.name} (KMS-wrapped) does not open on {host}: {exc}")
            continue
        checked += 1
    return checked, failures
