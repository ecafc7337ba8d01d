"""Migration activities: thin wrappers over ``sealing.migration`` and the store's migration
copies. Dependencies come in from the worker: the store, how to reach a registered agent
(``peer_for``) and how to verify evidence from a host (``verifier_for``). Inputs and results
are ids, cursors, nonces and counts; the audit records go through the rotation activities'
``audit`` activity (same log)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, TypeVar, cast

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from activities.migration_types import (
    MAX_HANDOFF_BATCHES_PER_CALL,
    MIGRATION_CLAIMED,
    NEW_AGENT_FAILED,
    OLD_AGENT_UNREACHABLE,
    RELEASE_POLICY_HELD,
    AttestInput,
    AttestResult,
    ClaimsInput,
    FleetInput,
    FleetPlan,
    GateInput,
    GateResult,
    HandoffInput,
    HandoffResult,
    HostPlan,
    KmsRemainingInput,
    NarrowInput,
    RebindInput,
    ReleaseInput,
    RemainingInput,
    RollbackInput,
    RollbackResult,
)
from attestation.platform import PlatformVerifier
from attestation.token import ResultSigner
from kms_adapters.errors import KmsError
from kms_adapters.release import ReleasePolicy, ReleasePolicyStore
from kms_adapters.release_policies import added_rules, admits, narrowed, widened, without_rules
from sealing.errors import SealingError
from sealing.generation import GenerationManifest, ManifestError, parse_manifest
from sealing.kms_migration import (
    RELEASE_AUDIENCE,
    KmsAgentPort,
    ReleaseTokenRefused,
    attested_token,
    kms_gate_sample,
    rebind_batch,
)
from sealing.migration import (
    AgentDown,
    AgentPort,
    AgentRefused,
    BatchOutcome,
    attest_new_agent,
    gate_sample,
    hand_off_batch,
    manifest_of,
    new_agent_reasons,
    plan_fleet,
    roll_back,
)
from sealing.store import AgentRecord, MigrationClaim, RecordNotFound, SealedStateStore, StoreError
from sealing.witness import ResettableWitness

T = TypeVar("T")
PeerFor = Callable[[AgentRecord], AgentPort]
HEARTBEAT_EVERY = 1.0
"""Seconds between a hand-off's heartbeats (its heartbeat timeout is minutes)."""


def _throttled(
    beat: Callable[[], None], every: float, clock: Callable[[], float] = time.monotonic
) -> Callable[[], None]:
    """``beat``, passed on at most once per ``every`` seconds of ``clock``. A hand-off beats after
    every swap, and a heartbeat from an activity thread waits for the worker's event loop: once
    per blob it cost the hand-off a tenth of its time (loadtest/bench_migration.py)."""
    last: list[float] = []

    def call() -> None:
        now = clock()
        if not last or now - last[0] >= every:
            last[:] = [now]
            beat()

    return call


class ReleasePolicyHeld(SealingError):
    """A release-policy step an operator must unblock: `_translated` answers it as the
    non-retryable `RELEASE_POLICY_HELD` (its class name), which holds the migration."""


if ReleasePolicyHeld.__name__ != RELEASE_POLICY_HELD:  # pragma: no cover - the workflow branches on the type
    raise ImportError("ReleasePolicyHeld must be named as RELEASE_POLICY_HELD")


@dataclass
class _Progress:
    """A migration's last change to one key's release policy: its step (widen, narrow), the
    policy it read, the one it wrote, and the rules widening added (what restore takes out)."""

    step: str
    read: str
    wrote: str
    added: list[dict[str, Any]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> _Progress:
        data = json.loads(text)
        return cls(str(data["step"]), str(data["read"]), str(data["wrote"]), list(data["added"]))


def claim_message(claim: MigrationClaim) -> str:
    """Why a migration involving ``claim.generation`` cannot start, and the ways out."""
    return (
        f"{MIGRATION_CLAIMED}: generation {claim.generation} is in migration {claim.migration_id}"
        f" (run {claim.run_id}, claimed {claim.claimed_at.isoformat(timespec='seconds')}), which has"
        " not ended DONE or ROLLED_BACK: wait for it, or abort it (rekey migrate abort"
        f" {claim.migration_id}); if that workflow was terminated, release its claim with"
        f" rekey migrate release-claim {claim.migration_id}"
    )


def _check_batches(batches: int) -> None:
    """How many batches one hand-off or re-binding call may move (non-retryable otherwise)."""
    if not 1 <= batches <= MAX_HANDOFF_BATCHES_PER_CALL:
        raise ApplicationError(
            f"batches must be 1..{MAX_HANDOFF_BATCHES_PER_CALL}, got {batches}", non_retryable=True
        )


def _translated(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except StoreError as exc:  # retried: the store may come back
        raise ApplicationError(str(exc), type=type(exc).__name__) from None
    except (SealingError, ValueError) as exc:
        raise ApplicationError(str(exc), type=type(exc).__name__, non_retryable=True) from None


class _SideFailed(Exception):
    """Not a SealingError: `_translated` lets it through to the activity, which names the side."""

    def __init__(self, side: str, error: SealingError) -> None:
        super().__init__(str(error))
        self.side, self.error = side, error


class _Side:
    """An agent port whose failures say which side (old or new) failed."""

    def __init__(self, port: AgentPort, side: str) -> None:
        self._port, self._side = port, side

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._port, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except (AgentDown, AgentRefused) as exc:
                raise _SideFailed(self._side, exc) from None

        return call


class MigrationActivities:
    def __init__(
        self,
        store: SealedStateStore,
        peer_for: PeerFor,
        verifier_for: Callable[[str], PlatformVerifier],
        witness: ResettableWitness | None = None,
        *,
        release_policies: ReleasePolicyStore | None = None,
        token_signer: ResultSigner | None = None,
        audit: Callable[[str, str, dict[str, Any], str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``release_policies``: where the keys' release policies are kept (the KMS adapters'
        store); ``token_signer``: the verifier key that signs the new agents' release tokens
        (the key the release policies trust). Without them a migration refuses KMS-wrapped
        state at ATTESTING. ``audit``: records each release-policy change."""
        self._store = store
        self._peer_for = peer_for
        self._verifier_for = verifier_for
        self._witness = witness
        self._release_policies = release_policies
        self._token_signer = token_signer
        self._audit = audit
        self._clock = clock

    def _peer(self, agent_id: str, host: str, side: str) -> AgentPort:
        try:
            record = self._store.get_agent(agent_id)
        except RecordNotFound:
            raise self._failure(side, host, f"agent {agent_id} is no longer registered") from None
        try:
            return self._peer_for(record)
        except AgentDown as exc:
            raise self._failure(side, host, str(exc)) from None

    @staticmethod
    def _failure(side: str, host: str, message: str) -> ApplicationError:
        if side == "old":
            return ApplicationError(
                f"the old generation's agent on host {host} is unreachable: {message}",
                host,
                type=OLD_AGENT_UNREACHABLE,
                non_retryable=True,
            )
        return ApplicationError(
            f"the new generation's agent on host {host} failed: {message}",
            host,
            type=NEW_AGENT_FAILED,
            non_retryable=True,
        )

    @activity.defn(name="migration_fleet")
    def fleet(self, request: FleetInput) -> FleetPlan:
        view = _translated(lambda: plan_fleet(self._store, request.from_generation, request.to_generation))
        reasons = list(view.reasons)
        if view.kms_blobs:
            reasons += _translated(lambda: self._release_reasons(request.from_generation))
        if not reasons:  # both generations are this migration's until it ends, or it is refused
            migration = f"migrate:{request.from_generation}:{request.to_generation}"
            held = _translated(
                lambda: self._store.claim_generations(
                    migration,
                    activity.info().workflow_run_id or "",
                    [request.from_generation, request.to_generation],
                )
            )
            reasons += [claim_message(claim) for claim in held]
        return FleetPlan(
            [
                HostPlan(
                    h.host_id,
                    h.old_agent.agent_id if h.old_agent else "",
                    h.new_agent.agent_id if h.new_agent else "",
                    h.tee_blobs,
                    h.kms_share,
                    h.kms_lo,
                    h.kms_hi,
                    h.kms_blobs,
                )
                for h in view.hosts
            ],
            reasons,
            view.diff(),
            view.kms_blobs,
        )

    def _release_reasons(self, old_generation: str) -> list[str]:
        """Why the old generation's KMS-wrapped state cannot be re-bound: a key without a
        release policy, or one whose tokens this worker cannot issue."""
        if self._release_policies is None or self._token_signer is None:
            return [
                f"{old_generation} has KMS-wrapped blobs, and this worker has no release-policy store"
                " or token signer"
            ]
        reasons = []
        trusted = self._token_signer.public_pem()
        for key_ref in self._store.kms_keys(old_generation):
            try:
                policy = self._release_policies.get(key_ref)
            except KmsError as exc:
                reasons.append(f"key {key_ref}: {exc}")
                continue
            if policy is None:
                reasons.append(
                    f"key {key_ref} wraps KMS-wrapped blobs of {old_generation} but has no release policy"
                    f" (rekey key release-policy set {key_ref} --generation {old_generation})"
                )
            elif (
                policy.audience != RELEASE_AUDIENCE
                or policy.verifier_public_key_pem.strip() != trusted.strip()
            ):
                reasons.append(
                    f"key {key_ref}'s release policy does not trust this worker's release tokens"
                    f" (verifier key and audience {RELEASE_AUDIENCE}): set it again with"
                    " rekey key release-policy set"
                )
        return reasons

    @activity.defn(name="migration_attest")
    def attest(self, request: AttestInput) -> AttestResult:
        old = _translated(lambda: manifest_of(self._store, request.from_generation))
        new = _translated(lambda: manifest_of(self._store, request.to_generation))
        result = AttestResult()
        for agent in request.agents:
            try:
                record = self._store.get_agent(agent.agent_id)
                port = self._peer_for(record)
                reasons = attest_new_agent(
                    port,
                    record,
                    bytes.fromhex(agent.nonce_hex),
                    self._verifier_for(record.host_id),
                    old=old,
                    new=new,
                    allow_same_svn=request.allow_same_svn,
                )
                result.attested += 1
            except RecordNotFound:
                reasons = ["is no longer registered"]
            except (AgentDown, AgentRefused, SealingError, ValueError) as exc:
                reasons = [str(exc)]
            result.reasons += [f"{agent.agent_id}: {reason}" for reason in reasons]
            activity.heartbeat()
        return result

    @activity.defn(name="migration_release")
    def release(self, request: ReleaseInput) -> int:
        """The release policies of the keys wrapping the old generation's KMS-wrapped state,
        each changed on its current policy and only as far as this migration is concerned:
        ``widen`` adds a rule admitting the new generation (recording the policy it read, the
        one it wrote and the rule); ``narrow`` takes the old generation's admission out;
        ``restore`` takes out what widening added. A policy changed by anyone else since this
        migration last wrote it is not overwritten: the step holds (`RELEASE_POLICY_HELD`),
        as for a key without a release policy. A retry (an answer lost after the write) finds
        its own write and changes nothing. How many policies were changed."""
        if request.action not in ("widen", "narrow", "restore"):
            raise ApplicationError(f"unknown release action {request.action!r}", non_retryable=True)
        migration = f"migrate:{request.from_generation}:{request.to_generation}"
        if self._release_policies is None:
            return 0  # no KMS-wrapped state can be planned without one (see _release_reasons)
        if request.action == "widen":
            return _translated(lambda: self._widen(migration, request.from_generation, request.to_generation))
        return _translated(
            lambda: self._narrow_or_restore(
                migration, request.from_generation, request.to_generation, request.action
            )
        )

    @activity.defn(name="migration_release_claims")
    def release_claims(self, request: ClaimsInput) -> int:
        """Let the generations of ``request.migration_id`` go (it ended); how many claims."""
        return _translated(lambda: self._store.release_claims(request.migration_id))

    def _policies(self) -> ReleasePolicyStore:
        if self._release_policies is None:
            raise SealingError("this worker has no release-policy store")
        return self._release_policies

    def _write(self, migration: str, key_ref: str, action: str, policy: ReleasePolicy) -> bool:
        """Write ``policy`` for ``key_ref`` unless it is there already; audited."""
        store = self._policies()
        if store.get(key_ref) == policy:
            return False
        store.put(key_ref, policy)
        if self._audit is not None:
            self._audit(
                f"migration.release_policy.{action}",
                migration,
                {"key_ref": key_ref, "policy": policy.id, "digest": policy.policy.digest},
                "",
            )
        return True

    @staticmethod
    def _changed_since(key_ref: str, migration: str, what: str) -> ReleasePolicyHeld:
        return ReleasePolicyHeld(
            f"key {key_ref}'s release policy was changed since {migration} {what} it (by another"
            " migration or rekey key release-policy set): it was not overwritten; put back the"
            f" policy {migration} wrote, or make it admit what this step needs yourself, then resume"
        )

    def _widen(self, migration: str, old_generation: str, new_generation: str) -> int:
        old, new = manifest_of(self._store, old_generation), manifest_of(self._store, new_generation)
        changed = 0
        for key_ref in self._store.kms_keys(old_generation):
            changed += self._widen_key(migration, key_ref, old, new)
        return changed

    def _widen_page(
        self, migration: str, old: GenerationManifest, new: GenerationManifest, key_refs: list[str]
    ) -> None:
        for key_ref in sorted(set(key_refs)):
            self._widen_key(migration, key_ref, old, new)

    def _widen_key(
        self, migration: str, key_ref: str, old: GenerationManifest, new: GenerationManifest
    ) -> bool:
        """Widen ``key_ref``'s current policy for ``new`` once per migration: the first time
        records the policy read, the one to write and the rule added (one transaction), then
        writes it; again (a retry, or a later batch meeting the key) writes it only if the
        first write was lost."""
        current = self._policies().get(key_ref)
        record = self._store.release_record(migration, key_ref)
        if record is None or record.progress is None:
            base = current if record is None else ReleasePolicy.from_json(record.before)
            if base is None:
                raise ReleasePolicyHeld(
                    f"key {key_ref} wraps KMS-wrapped blobs of {old.id} but has no release policy:"
                    f" set one (rekey key release-policy set {key_ref} --generation {old.id}), then resume"
                )
            after = widened(base, old, new)
            progress = _Progress("widen", base.to_json(), after.to_json(), added_rules(base, after))
            self._store.record_release_policy(migration, key_ref, base.to_json(), progress.to_json())
        progress = self._progress(migration, key_ref)  # the one recorded (maybe by a racing batch)
        if progress.step != "widen":
            raise ReleasePolicyHeld(
                f"key {key_ref}'s release policy was {progress.step}ed by {migration} already"
            )
        wrote = ReleasePolicy.from_json(progress.wrote)
        if current is not None and (current == wrote or admits(current, new)):
            return False  # written (a retry), or admitting the new generation already
        if current is not None and current == ReleasePolicy.from_json(progress.read):
            return self._write(migration, key_ref, "widen", wrote)
        raise self._changed_since(key_ref, migration, "widened")

    def _progress(self, migration: str, key_ref: str) -> _Progress:
        record = self._store.release_record(migration, key_ref)
        if record is None or record.progress is None:
            raise ReleasePolicyHeld(
                f"{migration} has no record of its change to key {key_ref}'s release policy"
            )
        return _Progress.from_json(record.progress)

    def _narrow_or_restore(
        self, migration: str, old_generation: str, new_generation: str, action: str
    ) -> int:
        old, new = manifest_of(self._store, old_generation), manifest_of(self._store, new_generation)
        changed = 0
        registered = self._registered() if action == "narrow" else []
        for key_ref in self._store.recorded_release_policies(migration):
            if action == "narrow":
                changed += self._narrow_key(migration, key_ref, old, new, registered)
            else:
                changed += self._restore_key(migration, key_ref)
        return changed

    def _registered(self) -> list[GenerationManifest]:
        found = []
        for _generation, document, _at in self._store.list_generations():
            try:
                found.append(parse_manifest(json.loads(document)))
            except (ValueError, ManifestError):
                continue  # not one this worker can read: it cannot be admitted by a rule it judges
        return found

    def _narrow_key(
        self,
        migration: str,
        key_ref: str,
        old: GenerationManifest,
        new: GenerationManifest,
        registered: list[GenerationManifest],
    ) -> bool:
        """Take ``old``'s admission out of ``key_ref``'s current policy, which must be the one
        this migration last wrote (or already admit ``new`` and not ``old``: narrowed by an
        operator, or by a lost answer's write)."""
        current = self._policies().get(key_ref)
        progress = self._progress(migration, key_ref)
        if current is not None and admits(current, new) and not admits(current, old):
            if progress.step != "narrow":
                self._store.set_release_progress(
                    migration,
                    key_ref,
                    _Progress("narrow", current.to_json(), current.to_json(), progress.added).to_json(),
                )
            return False
        if progress.step == "narrow":
            if current is not None and current == ReleasePolicy.from_json(progress.read):
                return self._write(migration, key_ref, "narrow", ReleasePolicy.from_json(progress.wrote))
            raise self._changed_since(key_ref, migration, "narrowed")
        if current is None or current != ReleasePolicy.from_json(progress.wrote):
            raise self._changed_since(key_ref, migration, "widened")
        after = narrowed(current, old, new, registered)
        self._store.set_release_progress(
            migration,
            key_ref,
            _Progress("narrow", current.to_json(), after.to_json(), progress.added).to_json(),
        )
        return self._write(migration, key_ref, "narrow", after)

    def _restore_key(self, migration: str, key_ref: str) -> bool:
        """Take what widening added out of ``key_ref``'s current policy (only ever less
        access, so it applies over anyone's later change); after a narrowing, only over the
        policy this migration wrote (the old generation's admission is put back then)."""
        current = self._policies().get(key_ref)
        progress = self._progress(migration, key_ref)
        if current is None:
            changed = False  # nothing admits anything: nothing to take out
        elif progress.step == "narrow":
            if current != ReleasePolicy.from_json(progress.wrote):
                raise self._changed_since(key_ref, migration, "narrowed")
            before = without_rules(ReleasePolicy.from_json(progress.read), progress.added)
            changed = self._write(migration, key_ref, "restore", before)
        else:
            changed = self._write(migration, key_ref, "restore", without_rules(current, progress.added))
        self._store.forget_release_policy(migration, key_ref)
        return changed

    def _token(self, port: KmsAgentPort, agent_id: str, host: str, generation: str) -> str:
        """A release token for the new agent ``agent_id`` on ``host`` (fresh evidence)."""
        if self._token_signer is None:
            raise SealingError("this worker has no release-token signer")
        record = self._store.get_agent(agent_id)
        if record.host_id != host:
            raise SealingError(f"agent {agent_id} is registered on another host than {host}")
        return attested_token(
            port.attest,
            self._verifier_for(host),
            self._token_signer,
            manifest_of(self._store, generation),
            expected_key_sha256=record.handoff_key_sha256,
        )

    @activity.defn(name="migration_rebind")
    def rebind(self, request: RebindInput) -> HandoffResult:
        """Up to ``batches`` batches of a host's share of KMS-wrapped blobs, one after the other,
        re-bound by its new agent with one release token each (attestations: one a batch, none
        for an empty page), heartbeating as a hand-off does. A failure after the first batch
        reports what moved before it; the next call meets it first."""
        _check_batches(request.batches)
        with heartbeating():  # beats while an agent call blocks: a killed worker is seen in seconds
            return self._rebind(request)

    def _rebind(self, request: RebindInput) -> HandoffResult:
        activity.heartbeat()
        new = _Side(self._peer(request.new_agent, request.host_id, "new"), "new")
        old = _translated(lambda: manifest_of(self._store, request.from_generation))
        new_manifest = _translated(lambda: manifest_of(self._store, request.to_generation))
        token_for = partial(self._token, new, request.new_agent, request.host_id, request.to_generation)
        beat = _throttled(activity.heartbeat, HEARTBEAT_EVERY, self._clock)
        done = BatchOutcome(cursor=request.after)
        for number in range(request.batches):
            rebind = partial(
                rebind_batch,
                self._store,
                new,
                token_for,
                migration_id=request.migration_id,
                old_generation=request.from_generation,
                new_generation=request.to_generation,
                share=(request.host_id, request.kms_lo, request.kms_hi),
                after=done.cursor,
                size=request.size,
                beat=beat,
                # Every page: a key first met since WIDENING (a blob written meanwhile under
                # another key) is widened, and recorded for NARROWING and restore, first.
                prepare=partial(self._widen_page, request.migration_id, old, new_manifest),
            )
            try:
                batch = _translated(rebind)
            except (_SideFailed, ApplicationError) as exc:
                if number > 0:
                    break  # what moved is reported; the next call meets the failure first
                if isinstance(exc, _SideFailed):
                    raise self._failure("new", request.host_id, str(exc.error)) from None
                raise
            done.moved += batch.moved
            done.conflicts += batch.conflicts
            done.skipped += batch.skipped
            done.attestations += batch.attestations
            done.cursor, done.done = batch.cursor, batch.done
            if done.done:
                break
        return HandoffResult(
            done.moved, done.conflicts, done.skipped, done.cursor, done.done, done.attestations
        )

    @activity.defn(name="migration_kms_remaining")
    def kms_remaining(self, request: KmsRemainingInput) -> dict[str, int]:
        """How many KMS-wrapped blobs of the old generation each host's share still holds."""
        shares = [(h.host_id, h.kms_lo, h.kms_hi) for h in request.hosts if h.kms_share]
        return _translated(lambda: self._store.count_kms_in_shares(request.from_generation, shares))

    @activity.defn(name="migration_handoff")
    def handoff(self, request: HandoffInput) -> HandoffResult:
        _check_batches(request.batches)
        with heartbeating():  # beats while an agent call blocks: a killed worker is seen in seconds
            return self._handoff(request)

    def _handoff(self, request: HandoffInput) -> HandoffResult:
        activity.heartbeat()
        old = _Side(self._peer(request.old_agent, request.host_id, "old"), "old")
        new = _Side(self._peer(request.new_agent, request.host_id, "new"), "new")
        admit = _translated(lambda: self._admit(request))
        beat = _throttled(activity.heartbeat, HEARTBEAT_EVERY, self._clock)
        done = BatchOutcome(cursor=request.after)
        try:
            for number in range(request.batches):
                hand_off = partial(
                    hand_off_batch,
                    self._store,
                    old,
                    new,
                    migration_id=request.migration_id,
                    old_generation=request.from_generation,
                    new_generation=request.to_generation,
                    host=request.host_id,
                    after=done.cursor,
                    size=request.size,
                    admit=admit,
                    beat=beat,
                    witness=self._witness,
                )
                try:
                    batch = _translated(hand_off)
                except (_SideFailed, ApplicationError):
                    if number == 0:
                        raise
                    break  # what moved is reported; the next call meets the failure first
                done.moved += batch.moved
                done.conflicts += batch.conflicts
                done.skipped += batch.skipped
                done.attestations += batch.attestations
                done.cursor, done.done = batch.cursor, batch.done
                if done.done:
                    break
        except _SideFailed as failed:
            if failed.side == "old" and isinstance(failed.error, AgentRefused):
                raise ApplicationError(
                    f"the old generation's agent on host {request.host_id} refused the hand-off:"
                    f" {failed.error}",
                    request.host_id,
                    type="HandoffRefused",
                    non_retryable=True,
                ) from None
            raise self._failure(failed.side, request.host_id, str(failed.error)) from None
        return HandoffResult(
            done.moved, done.conflicts, done.skipped, done.cursor, done.done, done.attestations
        )

    def _admit(self, request: HandoffInput) -> Callable[[bytes, bytes, bytes], list[str]]:
        """The migration policy over the new agent's hand-off evidence, verified on its
        registered host: the old agent exports only to the generation ATTESTING admitted."""
        old = manifest_of(self._store, request.from_generation)
        new = manifest_of(self._store, request.to_generation)
        record = self._store.get_agent(request.new_agent)
        if record.host_id != request.host_id:
            raise SealingError(
                f"agent {request.new_agent} is registered on another host than {request.host_id}"
            )
        verifier = self._verifier_for(request.host_id)
        return partial(
            new_agent_reasons,
            verifier=verifier,
            old=old,
            new=new,
            allow_same_svn=request.allow_same_svn,
            expected_key_sha256=record.handoff_key_sha256,
        )

    @activity.defn(name="migration_gate")
    def gate(self, request: GateInput) -> GateResult:
        with heartbeating():  # beats while an agent call blocks: a killed worker is seen in seconds
            return self._gate(request)

    def _gate(self, request: GateInput) -> GateResult:
        result = GateResult()
        for host in request.hosts:
            new = self._peer(host.new_agent, host.host_id, "new")
            try:
                checked, failures = _translated(partial(self._gate_one, new, request, host))
            except _SideFailed as failed:
                raise self._failure("new", host.host_id, str(failed.error)) from None
            result.checked += checked
            result.failures += failures
        return result

    def _gate_one(self, new: AgentPort, request: GateInput, host: HostPlan) -> tuple[int, list[str]]:
        """One host's sample. A new agent that does not answer (or, for the KMS-wrapped share,
        whose release token is refused) raises `_SideFailed`, which `_translated` lets through:
        the workflow rolls back (or pauses) on it instead of holding on a bare AgentDown."""
        try:
            checked, failures = self._gate_host(new, request, host)
            if host.kms_share:
                kms_checked, kms_failures = self._gate_kms(cast(KmsAgentPort, new), request, host)
                checked, failures = checked + kms_checked, failures + kms_failures
        except (AgentDown, AgentRefused, ReleaseTokenRefused) as exc:
            raise _SideFailed("new", exc) from None
        return checked, failures

    def _gate_kms(self, new: KmsAgentPort, request: GateInput, host: HostPlan) -> tuple[int, list[str]]:
        if not self._store.copies(request.migration_id, host.host_id, 1, kind="kms"):
            return 0, []  # nothing re-bound in this share: no attestation needed
        token = self._token(new, host.new_agent, host.host_id, request.to_generation)
        return kms_gate_sample(
            self._store,
            new,
            token,
            migration_id=request.migration_id,
            new_generation=request.to_generation,
            host=host.host_id,
            sample=request.sample,
        )

    def _gate_host(self, new: AgentPort, request: GateInput, host: HostPlan) -> tuple[int, list[str]]:
        return gate_sample(
            self._store,
            new,
            migration_id=request.migration_id,
            new_generation=request.to_generation,
            host=host.host_id,
            sample=request.sample,
        )

    @activity.defn(name="migration_rollback")
    def rollback(self, request: RollbackInput) -> RollbackResult:
        done = _translated(
            lambda: roll_back(self._store, self._witness, request.migration_id, list(request.host_ids))
        )
        return RollbackResult(done.restored, done.already_old, len(done.kept_new), done.kept_new[:20])

    @activity.defn(name="migration_remaining")
    def remaining(self, request: RemainingInput) -> dict[str, int]:
        return _translated(lambda: self._store.count_tee_by_host(request.from_generation))

    @activity.defn(name="migration_narrow")
    def narrow(self, request: NarrowInput) -> int:
        return _translated(lambda: self._store.delete_copies(request.migration_id))

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.fleet,
            self.attest,
            self.release,
            self.release_claims,
            self.handoff,
            self.rebind,
            self.kms_remaining,
            self.gate,
            self.rollback,
            self.remaining,
            self.narrow,
        ]
