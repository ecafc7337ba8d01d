"""KMS-wrapped state in a generation migration, over the real migration activities (in an
activity context, no server), in-process agents with a release gate over a local key, and the
store on SQLite and a real PostgreSQL: the release policy widened, narrowed and restored
(idempotent), each blob re-bound inside the new agent with compare-and-swap (a blob rewritten
meanwhile is re-bound again, never overwritten), rolled back to the old copies, and hostile
input refused (a blob of another generation, a token for another agent's key or from another
verifier, the old generation's token after narrowing)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.migration import MigrationActivities
from activities.migration_types import (
    NEW_AGENT_FAILED,
    FleetInput,
    GateInput,
    RebindInput,
    ReleaseInput,
    RollbackInput,
)
from attestation.policy import parse_policy
from attestation.sim import SimVerifier
from attestation.token import ResultSigner
from audit.format import check_details
from kms_adapters.errors import PolicyDenied
from kms_adapters.release import MemoryReleasePolicyStore, ReleaseGate, ReleasePolicy
from kms_adapters.release_policies import admits, narrowed, policy_for_generations, widened
from sealing import envelope
from sealing.agent import EnclaveAgent, GenerationMismatch, KmsUnavailable
from sealing.errors import SealingError
from sealing.generation import GenerationManifest, parse_manifest
from sealing.handoff import HandoffError, fingerprint
from sealing.keywrap import LocalKeyWrapper
from sealing.kms_migration import attested_token, kms_shares
from sealing.migration import AgentDown, AgentRefused
from sealing.state import SealedState
from sealing.store import SealedStateStore
from sealing.tee.sim import EnclaveIdentity, SimHost
from sealing.witness import DirectoryWitness
from tests.unit.test_migration_handoff import MIGRATION, V1, V2
from tests.unit.test_state_tee import InProcessSealer

KEY = "vault:orders"


class LocalGate(ReleaseGate):
    """The release gate over an in-process key (what Transit's adapter does with the KMS)."""

    def __init__(self, wrapper: LocalKeyWrapper, policies: MemoryReleasePolicyStore) -> None:
        self.wrapper, self.key_ref, self.release_store = wrapper, wrapper.key_ref, policies
        self.released = 0

    def unwrap(self, wrapped: bytes) -> bytes:
        self.released += 1
        return self.wrapper.unwrap(wrapped)

    def version_of(self, wrapped: bytes) -> int:
        return self.wrapper.version_of(wrapped)


class KmsPort:
    """`sealing.kms_migration.KmsAgentPort` (and the hand-off port's identity) over an agent."""

    def __init__(self, agent: EnclaveAgent) -> None:
        self.agent = agent
        self.before_rebind: Callable[[], None] | None = None

    def identity(self) -> dict[str, Any]:
        return self.agent.identity()

    def attest(self, nonce: bytes) -> tuple[bytes, bytes]:
        result = self.agent.attest(nonce)
        return result.evidence, result.public_key

    def _refused(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (SealingError, PolicyDenied) as exc:
            raise AgentRefused(str(exc)) from None

    def rebind(self, blobs: list[bytes], *, from_generation: str, token: str) -> list[bytes]:
        if self.before_rebind is not None:
            hook, self.before_rebind = self.before_rebind, None
            hook()
        return self._refused(lambda: self.agent.rebind(blobs, from_generation=from_generation, token=token))  # type: ignore[no-any-return]

    def check_kms(self, blob: bytes, token: str) -> bool:
        return bool(self._refused(lambda: self.agent.check(blob, token))["opens"])


class Fleet:
    def __init__(self, root: Path, store: SealedStateStore, wrapper: LocalKeyWrapper) -> None:
        self.store = store
        self.policies = MemoryReleasePolicyStore()
        self.gate = LocalGate(wrapper, self.policies)
        self.signer = ResultSigner.generate()
        self.sim = SimHost.load_or_create(root / "host")
        self.manifests = {m["id"]: parse_manifest(m) for m in (V1, V2)}
        self.agents = {gen: self._agent(m) for gen, m in self.manifests.items()}
        self.ports = {gen: KmsPort(agent) for gen, agent in self.agents.items()}
        for gen, manifest in self.manifests.items():
            store.put_generation(gen, manifest.canonical_json())
            store.register_agent(
                agent_id=f"{gen}@{self.sim.host_id}",
                host_id=self.sim.host_id,
                generation=gen,
                endpoint="http://127.0.0.1:9",
                handoff_key_sha256=fingerprint(self.agents[gen].public_key),
            )
        self.audit: list[tuple[str, dict[str, Any]]] = []
        self.activities = MigrationActivities(
            store,
            lambda record: self.ports[record.generation],  # type: ignore[arg-type,return-value]
            lambda _host: SimVerifier(self.sim.root_ca_pem()),
            release_policies=self.policies,
            token_signer=self.signer,
            # As the real audit log does: a detail it would refuse fails the test.
            audit=lambda event, _subject, details, _who: self.audit.append((event, check_details(details))),
        )
        self.env = ActivityEnvironment()

    def _agent(self, manifest: GenerationManifest, releaser: bool = True) -> EnclaveAgent:
        return EnclaveAgent(
            manifest,
            self.sim.enclave(EnclaveIdentity.from_manifest(manifest)),
            SimVerifier(self.sim.root_ca_pem()),
            releaser=(lambda _ref: self.gate) if releaser else None,
        )

    def token(
        self, generation: str, agent: EnclaveAgent | None = None, signer: ResultSigner | None = None
    ) -> str:
        agent = agent or self.agents[generation]
        port = KmsPort(agent)
        return attested_token(
            port.attest,
            SimVerifier(self.sim.root_ca_pem()),
            signer or self.signer,
            self.manifests[generation],
        )

    def run(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.env.run(fn, arg)

    def release(self, action: str) -> int:
        return int(self.run(self.activities.release, ReleaseInput("app-v1", "app-v2", action)))

    def rebind_all(self, size: int = 5) -> tuple[int, int]:
        moved = conflicts = 0
        cursor = None
        while True:
            result = self.run(
                self.activities.rebind,
                RebindInput(
                    MIGRATION,
                    "app-v1",
                    "app-v2",
                    self.sim.host_id,
                    f"app-v2@{self.sim.host_id}",
                    None,
                    None,
                    cursor,
                    size,
                ),
            )
            moved, conflicts, cursor = moved + result.moved, conflicts + result.conflicts, result.cursor
            if result.done:
                return moved, conflicts


@pytest.fixture
def fleet(tmp_path: Path, store: SealedStateStore, wrapper: LocalKeyWrapper) -> Fleet:
    return Fleet(tmp_path, store, wrapper)


@pytest.fixture
def state(store: SealedStateStore, wrapper: LocalKeyWrapper, witness: DirectoryWitness) -> SealedState:
    return SealedState(store, lambda _ref: wrapper, witness)


def fill(state: SealedState, n: int) -> dict[str, bytes]:
    secrets = {f"kms-{i:02d}": os.urandom(24) for i in range(n)}
    for name, secret in secrets.items():
        state.put(namespace="app", name=name, data=secret, key_ref=KEY, generation="app-v1")
    return secrets


def first_policy(fleet: Fleet) -> ReleasePolicy:
    policy = policy_for_generations([fleet.manifests["app-v1"]], fleet.signer.public_pem(), f"release:{KEY}")
    fleet.policies.put(KEY, policy)
    return policy


def test_kms_blobs_are_rebound_in_the_new_agent_rolled_back_and_narrowed(
    fleet: Fleet, state: SealedState, store: SealedStateStore
) -> None:
    secrets = fill(state, 12)
    before = first_policy(fleet)
    plan = fleet.run(fleet.activities.fleet, FleetInput("app-v1", "app-v2"))
    assert plan.reasons == [] and plan.kms_blobs == 12
    [host] = plan.hosts
    assert (host.kms_share, host.kms_blobs, host.kms_lo, host.kms_hi) == (True, 12, None, None)

    assert fleet.release("widen") == 1
    assert fleet.release("widen") == 0  # a retried widening changes nothing, and records nothing new
    widened_policy = fleet.policies.get(KEY)
    assert widened_policy is not None
    assert admits(widened_policy, fleet.manifests["app-v1"]) and admits(
        widened_policy, fleet.manifests["app-v2"]
    )
    assert store.recorded_release_policies(MIGRATION) == {KEY: before.to_json()}

    # The workload rewrites one blob of the first batch (through the old generation) while the
    # batch is re-bound.
    first = min(store.summaries(), key=lambda s: s.blob_id).name
    fleet.ports["app-v2"].before_rebind = lambda: state.put(
        namespace="app", name=first, data=b"rewritten", key_ref=KEY, generation="app-v1"
    )
    secrets[first] = b"rewritten"
    moved, conflicts = fleet.rebind_all()
    assert (moved, conflicts) == (12, 1)
    for name, secret in secrets.items():
        record = store.get_by_name("app", name)
        header = envelope.parse(record.blob).header
        assert record.generation == header.generation == "app-v2"
        assert (
            fleet.agents["app-v2"].open_kms(record.blob, fleet.token("app-v2")) == secret
        )  # the new agent reads it
        assert state.get(namespace="app", name=name) == secret  # and the operator's credentials still do
    gate = fleet.run(fleet.activities.gate, GateInput(MIGRATION, "app-v2", [host], 3))
    assert (gate.checked, gate.failures) == (3, [])

    rolled = fleet.run(fleet.activities.rollback, RollbackInput(MIGRATION, [host.host_id]))
    assert (rolled.restored, rolled.kept_new) == (12, 0)
    assert fleet.release("restore") == 1 and fleet.policies.get(KEY) == before
    assert fleet.release("restore") == 0 and fleet.policies.get(KEY) == before
    for name, secret in secrets.items():
        record = store.get_by_name("app", name)
        assert record.generation == "app-v1"
        assert fleet.agents["app-v1"].open_kms(record.blob, fleet.token("app-v1")) == secret
        assert state.get(namespace="app", name=name) == secret

    # Migrate again, then narrow: the old generation's release requests are refused from then on.
    assert fleet.release("widen") == 1
    assert fleet.rebind_all(size=50) == (12, 0)
    old_token = fleet.token("app-v1")  # issued while it was still admitted: narrowing still refuses it
    assert fleet.release("narrow") == 1
    assert fleet.release("narrow") == 0
    narrowed_policy = fleet.policies.get(KEY)
    assert narrowed_policy is not None and not admits(narrowed_policy, fleet.manifests["app-v1"])
    blob = store.get_by_name("app", "kms-03").blob
    with pytest.raises(GenerationMismatch, match="bound to generation app-v2, not this agent's app-v1"):
        fleet.agents["app-v1"].open_kms(blob, old_token)
    with pytest.raises(PolicyDenied, match="not in the allowlist"):  # and the key's gate refuses it too
        fleet.gate.release(envelope.parse(blob).wrapped_dek, old_token, fleet.agents["app-v1"].public_key)
    assert fleet.agents["app-v2"].open_kms(blob, fleet.token("app-v2")) == secrets["kms-03"]
    events = [e for e, _ in fleet.audit]
    assert events.count("migration.release_policy.widen") == 2 and "migration.release_policy.narrow" in events


def test_one_rebind_call_moves_several_batches_and_what_moved_before_a_failure(
    fleet: Fleet, state: SealedState, store: SealedStateStore
) -> None:
    """As a hand-off call does: up to ``batches`` batches from the cursor, one release token
    each; a new agent that fails in a later batch leaves the call answering with what moved
    before it, and the next call meets the failure first (nothing more changed)."""
    fill(state, 7)
    first_policy(fleet)
    fleet.release("widen")
    host = fleet.sim.host_id
    port = fleet.ports["app-v2"]

    def call(after: str | None, batches: int) -> Any:
        request = RebindInput(
            MIGRATION, "app-v1", "app-v2", host, f"app-v2@{host}", None, None, after, 2, batches
        )
        return fleet.run(fleet.activities.rebind, request)

    def v1_left() -> int:
        return store.count_kms_in_shares("app-v1", [(host, None, None)])[host]

    def refuse() -> None:
        raise AgentRefused("enclave crashed")

    def then_refuse() -> None:
        port.before_rebind = refuse  # the batch after this one

    first = call(None, 2)
    assert (first.moved, first.done, first.attestations) == (4, False, 2) and v1_left() == 3
    port.before_rebind = then_refuse
    second = call(first.cursor, 3)
    assert (second.moved, second.done, second.attestations) == (2, False, 1) and v1_left() == 1
    port.before_rebind = refuse
    with pytest.raises(ApplicationError) as failed:
        call(second.cursor, 3)
    assert failed.value.type == NEW_AGENT_FAILED and v1_left() == 1
    last = call(second.cursor, 3)
    assert (last.moved, last.done) == (1, True) and v1_left() == 0
    assert store.count_copies(MIGRATION) == 7
    with pytest.raises(ApplicationError, match=r"batches must be 1\.\.20"):
        call(None, 21)


def test_rebind_refuses_hostile_input(
    fleet: Fleet, state: SealedState, store: SealedStateStore, tmp_path: Path
) -> None:
    fill(state, 2)
    first_policy(fleet)
    fleet.release("widen")
    v2 = fleet.agents["app-v2"]
    token = fleet.token("app-v2")
    blob = store.get_by_name("app", "kms-00").blob
    with pytest.raises(HandoffError, match="bound to generation app-v1, not app-v0"):
        v2.rebind([blob], from_generation="app-v0", token=token)
    with pytest.raises(HandoffError, match="own generation"):
        v2.rebind([blob], from_generation="app-v2", token=token)
    tee = InProcessSealer(fleet.agents["app-v1"])
    state.put_sealed(namespace="app", name="tee", data=b"x", policy="mrenclave", sealer=tee)
    with pytest.raises(HandoffError, match="hardware-sealed"):
        v2.rebind([store.get_by_name("app", "tee").blob], from_generation="app-v1", token=token)
    # A token bound to another agent's key (another v2 enclave) releases nothing to this one.
    other = fleet._agent(fleet.manifests["app-v2"])
    with pytest.raises(PolicyDenied, match="recipient key is not the key bound"):
        v2.rebind([blob], from_generation="app-v1", token=fleet.token("app-v2", agent=other))
    # A token from a verifier the key's policy does not trust.
    with pytest.raises(PolicyDenied, match="attestation result rejected"):
        v2.rebind(
            [blob], from_generation="app-v1", token=fleet.token("app-v2", signer=ResultSigner.generate())
        )
    # A token issued for another key's policy audience is refused as well.
    elsewhere = ReleasePolicy(
        parse_policy({"id": "x", "rules": [{"platform": "sim", "measurements": ["33" * 32]}]}),
        fleet.signer.public_pem(),
        "another-kms",
    )
    fleet.policies.put(KEY, elsewhere)
    with pytest.raises(PolicyDenied, match="attestation result rejected"):
        v2.rebind([blob], from_generation="app-v1", token=token)
    # An agent without KMS settings says so.
    with pytest.raises(KmsUnavailable, match="no KMS settings"):
        fleet._agent(fleet.manifests["app-v2"], releaser=False).rebind(
            [blob], from_generation="app-v1", token=token
        )
    assert store.get_by_name("app", "kms-00").blob == blob  # nothing changed


def test_the_fleet_plan_refuses_kms_state_it_cannot_rebind(fleet: Fleet, state: SealedState) -> None:
    fill(state, 1)
    plan = fleet.run(fleet.activities.fleet, FleetInput("app-v1", "app-v2"))
    assert any(
        f"key {KEY} wraps KMS-wrapped blobs of app-v1 but has no release policy" in r for r in plan.reasons
    )
    fleet.policies.put(
        KEY, policy_for_generations([fleet.manifests["app-v1"]], ResultSigner.generate().public_pem(), "p")
    )
    plan = fleet.run(fleet.activities.fleet, FleetInput("app-v1", "app-v2"))
    assert any("does not trust this worker's release tokens" in r for r in plan.reasons)


def test_signer_rules_are_narrowed_above_the_old_svn() -> None:
    old, new = parse_manifest(V1), parse_manifest(V2)  # same signer and product, svn 1 -> 2
    signer_rule = {"platform": "sim", "signer": V1["signer"], "product_id": 1, "min_svn": 1}
    other = {"platform": "sim", "measurements": ["55" * 32]}
    before = ReleasePolicy(parse_policy({"id": "p", "rules": [signer_rule, other]}), b"pem")
    assert widened(before, old, new) == before  # the signer rule admits both already
    after = narrowed(before, old, new)
    assert admits(after, new) and not admits(after, old)
    assert [r.min_svn for r in after.policy.rules if r.kind == "signer"] == [2]
    assert any(r.measurements == ("55" * 32,) for r in after.policy.rules)  # another build's rule is kept
    assert narrowed(before, old, new) == after  # derived from the recorded policy: the same every time
    same_svn = parse_manifest(V2 | {"svn": 1})
    equal = narrowed(before, old, same_svn)
    assert admits(equal, same_svn) and not admits(equal, old)  # the signer rule gave way to a measurement


def test_kms_shares_cover_every_blob_id_once() -> None:
    shares = kms_shares(["h3", "h1", "h2"])
    assert [s[0] for s in shares] == ["h1", "h2", "h3"]
    ids = [str(__import__("uuid").uuid4()) for _ in range(300)] + ["00000000-0000-0000-0000-000000000000"]
    for blob_id in ids:
        owners = [h for h, lo, hi in shares if (lo is None or blob_id >= lo) and (hi is None or blob_id < hi)]
        assert len(owners) == 1


class DeadPort(KmsPort):
    def attest(self, nonce: bytes) -> tuple[bytes, bytes]:
        raise AgentDown("cannot reach the agent")


def test_a_dead_new_agent_is_a_new_agent_failure_at_rebind_and_at_the_gate(
    fleet: Fleet, state: SealedState, store: SealedStateStore
) -> None:
    fill(state, 3)
    first_policy(fleet)
    fleet.release("widen")
    assert fleet.rebind_all() == (3, 0)
    host = fleet.run(fleet.activities.fleet, FleetInput("app-v1", "app-v2")).hosts[0]
    fleet.ports["app-v2"] = DeadPort(fleet.agents["app-v2"])
    with pytest.raises(ApplicationError) as gate:
        fleet.run(fleet.activities.gate, GateInput(MIGRATION, "app-v2", [host], 3))
    fleet.run(fleet.activities.rollback, RollbackInput(MIGRATION, [fleet.sim.host_id]))
    with pytest.raises(ApplicationError) as rebind:
        fleet.rebind_all()
    for failure in (gate.value, rebind.value):
        assert (failure.type, failure.details) == (NEW_AGENT_FAILED, (fleet.sim.host_id,))
        assert "cannot reach the agent" in failure.message
