"""Release policies and overlapping migrations, over the real migration activities
(tests/unit/test_migration_kms.py's fleet): a second migration involving a generation of an open
one is refused at ATTESTING; each release-policy step changes the key's current policy and only
what the migration did, refuses to overwrite someone else's change, and is idempotent under a
lost answer; narrowing a signer rule keeps the sibling builds it admitted; a key first met after
WIDENING is widened before any re-binding, and one without a policy holds; an agent opens only
the KMS-wrapped blobs bound to its own generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError

from activities.migration_types import RELEASE_POLICY_HELD, ClaimsInput, FleetInput, RebindInput, ReleaseInput
from attestation.policy import parse_policy
from kms_adapters.release import ReleasePolicy
from kms_adapters.release_policies import admits
from sealing import envelope
from sealing.agent import GenerationMismatch
from sealing.generation import parse_manifest
from sealing.handoff import fingerprint
from sealing.keywrap import LocalKeyWrapper
from sealing.state import SealedState
from sealing.store import SealedStateStore
from sealing.witness import DirectoryWitness
from tests.unit.test_migration_handoff import MIGRATION, V1
from tests.unit.test_migration_kms import KEY, Fleet, KmsPort, LocalGate, fill, first_policy

V3 = {**V1, "id": "app-v3", "measurement": "44" * 32, "svn": 3}
NAMES = ("app-v1", "app-v2", "app-v3")


@pytest.fixture
def fleet(tmp_path: Path, store: SealedStateStore, wrapper: LocalKeyWrapper) -> Fleet:
    return Fleet(tmp_path, store, wrapper)


def add_v3(fleet: Fleet, store: SealedStateStore) -> None:
    v3 = parse_manifest(V3)
    store.put_generation("app-v3", v3.canonical_json())
    fleet.manifests["app-v3"] = v3
    agent = fleet.agents["app-v3"] = fleet._agent(v3)
    fleet.ports["app-v3"] = KmsPort(agent)
    store.register_agent(
        agent_id=f"app-v3@{fleet.sim.host_id}",
        host_id=fleet.sim.host_id,
        generation="app-v3",
        endpoint="http://127.0.0.1:9",
        handoff_key_sha256=fingerprint(agent.public_key),
    )


def release(fleet: Fleet, frm: str, to: str, action: str) -> int:
    return int(fleet.run(fleet.activities.release, ReleaseInput(frm, to, action)))


def admitted(fleet: Fleet, key: str = KEY) -> list[str]:
    policy = fleet.policies.get(key)
    assert policy is not None
    return [g for g in NAMES if g in fleet.manifests and admits(policy, fleet.manifests[g])]


def held(fn: Any) -> str:
    with pytest.raises(ApplicationError) as failure:
        fn()
    assert failure.value.type == RELEASE_POLICY_HELD and failure.value.non_retryable
    return str(failure.value)


# ------------------------------------------------------------------------- claims


def test_a_second_migration_of_either_generation_is_refused_at_attesting(
    fleet: Fleet, state: SealedState, store: SealedStateStore
) -> None:
    fill(state, 2)
    first_policy(fleet)
    add_v3(fleet, store)
    assert fleet.run(fleet.activities.fleet, FleetInput("app-v1", "app-v2")).reasons == []
    for frm, to in (("app-v1", "app-v3"), ("app-v2", "app-v3")):
        plan = fleet.run(fleet.activities.fleet, FleetInput(frm, to))
        assert plan.reasons, (frm, to)
        assert all(r.startswith("MigrationClaimed: generation app-v") for r in plan.reasons)
        assert f"migration {MIGRATION} (run test-run" in plan.reasons[0]
        assert f"rekey migrate release-claim {MIGRATION}" in plan.reasons[0]
    assert {c.migration_id for c in store.migration_claims()} == {
        MIGRATION
    }  # the refused ones claimed nothing
    # The same migration planning again (a retry, a new run of the same id) keeps its claims.
    assert fleet.run(fleet.activities.fleet, FleetInput("app-v1", "app-v2")).reasons == []
    assert fleet.run(fleet.activities.release_claims, ClaimsInput(MIGRATION)) == 2
    assert fleet.run(fleet.activities.fleet, FleetInput("app-v2", "app-v3")).reasons == []


# ------------------------------------------------------------- read-modify-write


def test_overlapping_migrations_never_readmit_the_narrowed_out_generation(
    fleet: Fleet, state: SealedState, store: SealedStateStore
) -> None:
    """The review's scenario, with the claims out of the way: v1->v2 in its grace period,
    v2->v3 widens, v1->v2 narrows, v2->v3 rolls back."""
    fill(state, 4)
    first_policy(fleet)
    add_v3(fleet, store)
    release(fleet, "app-v1", "app-v2", "widen")
    fleet.rebind_all(size=50)
    release(fleet, "app-v2", "app-v3", "widen")
    assert admitted(fleet) == ["app-v1", "app-v2", "app-v3"]  # v2->v3 added only its own rule
    # v1->v2 finds a policy it did not write: it holds instead of overwriting it.
    before = fleet.policies.get(KEY)
    message = held(lambda: release(fleet, "app-v1", "app-v2", "narrow"))
    assert f"key {KEY}'s release policy was changed since {MIGRATION} widened it" in message
    assert fleet.policies.get(KEY) == before
    # v2->v3 rolls back: only its own rule goes, whatever v1->v2 did.
    assert release(fleet, "app-v2", "app-v3", "restore") == 1
    assert admitted(fleet) == ["app-v1", "app-v2"]
    assert release(fleet, "app-v1", "app-v2", "narrow") == 1  # its own write is back: it narrows
    assert admitted(fleet) == ["app-v2"]
    assert release(fleet, "app-v2", "app-v3", "restore") == 0  # a retried restore changes nothing
    assert admitted(fleet) == ["app-v2"]


def test_a_narrowing_after_an_overlapping_widening_does_not_cut_the_other_migration(
    fleet: Fleet, state: SealedState, store: SealedStateStore
) -> None:
    fill(state, 2)
    first_policy(fleet)
    add_v3(fleet, store)
    release(fleet, "app-v1", "app-v2", "widen")
    release(fleet, "app-v1", "app-v3", "widen")
    assert admitted(fleet) == ["app-v1", "app-v2", "app-v3"]
    held(lambda: release(fleet, "app-v1", "app-v2", "narrow"))
    assert admitted(fleet) == ["app-v1", "app-v2", "app-v3"]  # v3's access is not cut
    assert release(fleet, "app-v1", "app-v3", "restore") == 1
    assert release(fleet, "app-v1", "app-v2", "restore") == 1
    assert admitted(fleet) == ["app-v1"]


def test_restore_takes_out_only_what_widening_added(fleet: Fleet, state: SealedState) -> None:
    fill(state, 2)
    original = first_policy(fleet)
    release(fleet, "app-v1", "app-v2", "widen")
    widened_policy = fleet.policies.get(KEY)
    assert widened_policy is not None
    # An operator adds a rule for another build meanwhile: restore keeps it.
    extra = {"platform": "sim", "measurements": ["66" * 32]}
    document = widened_policy.policy.to_dict()
    changed = ReleasePolicy(
        parse_policy({**document, "rules": [*document["rules"], extra]}),
        widened_policy.verifier_public_key_pem,
        widened_policy.audience,
    )
    fleet.policies.put(KEY, changed)
    assert release(fleet, "app-v1", "app-v2", "restore") == 1
    after = fleet.policies.get(KEY)
    assert after is not None and admitted(fleet) == ["app-v1"]
    assert [r.measurements for r in after.policy.rules] == [r.measurements for r in original.policy.rules] + [
        ("66" * 32,)
    ]


def test_a_lost_answer_never_applies_a_step_twice(
    fleet: Fleet, state: SealedState, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(state, 2)
    first_policy(fleet)
    # The widening recorded what it meant to write, then the worker died before writing it.
    put = fleet.policies.put
    monkeypatch.setattr(fleet.policies, "put", lambda *_: (_ for _ in ()).throw(RuntimeError("worker died")))
    with pytest.raises(RuntimeError):
        release(fleet, "app-v1", "app-v2", "widen")
    monkeypatch.setattr(fleet.policies, "put", put)
    assert admitted(fleet) == ["app-v1"]
    assert release(fleet, "app-v1", "app-v2", "widen") == 1  # the retry writes it
    assert release(fleet, "app-v1", "app-v2", "widen") == 0  # written, answer lost: nothing again
    policy = fleet.policies.get(KEY)
    assert policy is not None and len(policy.policy.rules) == 2
    fleet.rebind_all(size=50)
    assert release(fleet, "app-v1", "app-v2", "narrow") == 1
    assert release(fleet, "app-v1", "app-v2", "narrow") == 0
    assert admitted(fleet) == ["app-v2"]


# ------------------------------------------------------------------ signer rules


def test_narrowing_a_signer_rule_keeps_the_registered_siblings_it_admitted(
    fleet: Fleet, state: SealedState, store: SealedStateStore
) -> None:
    fill(state, 2)
    sibling = parse_manifest({**V1, "id": "app-v1-eu", "measurement": "55" * 32})  # same svn, not migrated
    store.put_generation("app-v1-eu", sibling.canonical_json())
    rule = {"platform": "sim", "signer": V1["signer"], "product_id": 1, "min_svn": 1}
    fleet.policies.put(
        KEY, ReleasePolicy(parse_policy({"id": "p", "rules": [rule]}), fleet.signer.public_pem())
    )
    release(fleet, "app-v1", "app-v2", "widen")
    fleet.rebind_all(size=50)
    release(fleet, "app-v1", "app-v2", "narrow")
    policy = fleet.policies.get(KEY)
    assert policy is not None
    assert admits(policy, sibling) and admits(policy, fleet.manifests["app-v2"])
    assert not admits(policy, fleet.manifests["app-v1"])


# --------------------------------------------------------- keys met mid-migration


def test_a_key_first_met_after_widening_is_widened_before_rebinding_and_narrowed(
    fleet: Fleet, store: SealedStateStore, wrapper: LocalKeyWrapper, witness: DirectoryWitness
) -> None:
    late = LocalKeyWrapper("vault:late")
    wrappers = {KEY: wrapper, "vault:late": late}
    state = SealedState(store, lambda ref: wrappers[ref], witness)
    fill(state, 3)
    first_policy(fleet)
    gates = {KEY: fleet.gate, "vault:late": LocalGate(late, fleet.policies)}
    for agent in fleet.agents.values():
        agent._releaser = lambda ref: gates[ref]
    release(fleet, "app-v1", "app-v2", "widen")
    widened_key = fleet.policies.get(KEY)
    first = page(fleet, None, 1)  # the share's first batch, before the other key is written
    assert first.moved == 1 and not first.done
    # Written through the old generation under another key (admitting app-v1 only) meanwhile,
    # with a blob id after the cursor: the share's next pages meet it.
    fleet.policies.put("vault:late", first_policy(fleet))
    fleet.policies.put(KEY, widened_key)
    n = 0
    while True:
        summary = state.put(
            namespace="app", name=f"late-{n}", data=b"late", key_ref="vault:late", generation="app-v1"
        )
        if summary.blob_id > first.cursor:
            break
        n += 1
    cursor, moved = first.cursor, first.moved
    while True:
        result = page(fleet, cursor, 1)
        cursor, moved = result.cursor, moved + result.moved
        if result.done:
            break
    assert store.get_by_name("app", f"late-{n}").generation == "app-v2"
    assert set(store.recorded_release_policies(MIGRATION)) == {KEY, "vault:late"}
    assert release(fleet, "app-v1", "app-v2", "narrow") == 2
    assert admitted(fleet, "vault:late") == ["app-v2"] and admitted(fleet) == ["app-v2"]


def page(fleet: Fleet, after: str | None, size: int) -> Any:
    host = fleet.sim.host_id
    return fleet.run(
        fleet.activities.rebind,
        RebindInput(MIGRATION, "app-v1", "app-v2", host, f"app-v2@{host}", None, None, after, size),
    )


def test_a_key_without_a_release_policy_met_mid_migration_holds_the_batch(
    fleet: Fleet, store: SealedStateStore, wrapper: LocalKeyWrapper, witness: DirectoryWitness
) -> None:
    late = LocalKeyWrapper("vault:late")
    wrappers = {KEY: wrapper, "vault:late": late}
    state = SealedState(store, lambda ref: wrappers[ref], witness)
    fill(state, 2)
    first_policy(fleet)
    release(fleet, "app-v1", "app-v2", "widen")
    state.put(namespace="app", name="zz-late", data=b"late", key_ref="vault:late", generation="app-v1")
    message = held(lambda: fleet.rebind_all(size=50))
    assert "key vault:late wraps KMS-wrapped blobs of app-v1 but has no release policy" in message
    assert "rekey key release-policy set vault:late --generation app-v1" in message
    assert store.count_by_generation() == {"app-v1": 3}  # nothing of the page was re-bound


# ----------------------------------------------------------------------- agents


def test_an_agent_opens_only_kms_wrapped_blobs_bound_to_its_own_generation(
    fleet: Fleet, state: SealedState, store: SealedStateStore
) -> None:
    fill(state, 2)
    first_policy(fleet)
    release(fleet, "app-v1", "app-v2", "widen")  # both generations obtain DEKs (the grace period)
    v1_blob = store.get_by_name("app", "kms-00").blob
    with pytest.raises(GenerationMismatch, match="bound to generation app-v1, not this agent's app-v2"):
        fleet.agents["app-v2"].open_kms(v1_blob, fleet.token("app-v2"))
    fleet.rebind_all(size=50)
    blob = store.get_by_name("app", "kms-00").blob
    assert envelope.parse(blob).header.generation == "app-v2"
    v1, token = fleet.agents["app-v1"], fleet.token("app-v1")
    with pytest.raises(GenerationMismatch, match="bound to generation app-v2, not this agent's app-v1"):
        v1.open_kms(blob, token)
    with pytest.raises(GenerationMismatch):
        v1.check(blob, token)
    released = fleet.gate.released
    with pytest.raises(GenerationMismatch):
        v1.open_kms(blob, token)
    assert fleet.gate.released == released  # refused before any release
    assert fleet.agents["app-v2"].check(blob, fleet.token("app-v2"))["opens"]
