"""sealing.migration over in-process agents (no HTTP) and the store's migration copies, on
SQLite and a real PostgreSQL: the fleet plan, attestation against the migration policy, a
host's hand-off with compare-and-swap (a blob rewritten meanwhile is handed off again, never
overwritten), the gate, rollback to the old copies and narrowing."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.migration import MigrationActivities
from activities.migration_types import NEW_AGENT_FAILED, GateInput, HandoffInput, HostPlan
from attestation.sim import SimVerifier
from sealing.agent import EnclaveAgent
from sealing.errors import StaleBlob
from sealing.generation import parse_manifest
from sealing.handoff import fingerprint
from sealing.keywrap import LocalKeyWrapper
from sealing.migration import (
    AgentDown,
    attest_new_agent,
    gate_sample,
    hand_off_batch,
    manifest_of,
    new_agent_reasons,
    plan_fleet,
    roll_back,
)
from sealing.state import EnclaveRefused, SealedState
from sealing.store import AgentRecord, SealedStateStore
from sealing.tee.sim import EnclaveIdentity, SimHost
from sealing.witness import DirectoryWitness
from tests.unit.test_state_tee import InProcessSealer

V1 = {
    "id": "app-v1",
    "platform": "sim",
    "measurement": "11" * 32,
    "signer": "22" * 32,
    "product_id": 1,
    "svn": 1,
    "debug": False,
    "tcb": "UpToDate",
}
V2 = {**V1, "id": "app-v2", "measurement": "33" * 32, "svn": 2}
MIGRATION = "migrate:app-v1:app-v2"


class LocalPort:
    """`sealing.migration.AgentPort` straight over an `EnclaveAgent`."""

    def __init__(self, agent: EnclaveAgent, before_export: Callable[[], None] | None = None) -> None:
        self.agent = agent
        self.down = False
        self.before_export = before_export
        self.calls: list[str] = []

    def _check(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise AgentDown("cannot reach the agent")

    def identity(self) -> dict[str, Any]:
        self._check("identity")
        return self.agent.identity()

    def nonce(self) -> bytes:
        self._check("nonce")
        return self.agent.new_nonce()

    def import_nonce(self) -> bytes:
        self._check("import_nonce")
        return self.agent.new_import_nonce()

    def attest(self, nonce: bytes) -> tuple[bytes, bytes]:
        self._check("attest")
        result = self.agent.attest(nonce)
        return result.evidence, result.public_key

    def export(self, **kwargs: Any) -> dict[str, Any]:
        self._check("export")
        if self.before_export is not None:
            hook, self.before_export = self.before_export, None
            hook()
        return self.agent.export(**kwargs)

    def import_package(self, package: dict[str, Any]) -> list[tuple[str, str, bytes]]:
        self._check("import")
        return self.agent.import_package(package)

    def unseal(self, blob: bytes) -> bytes:
        self._check("unseal")
        return self.agent.unseal(blob)

    def check(self, blob: bytes) -> bool:
        self._check("check")
        return bool(self.agent.check(blob)["opens"])


class Host:
    def __init__(self, directory: Path, store: SealedStateStore, v2: dict[str, Any] = V2) -> None:
        self.sim = SimHost.load_or_create(directory)
        self.v1 = self._agent(V1)
        self.v2 = self._agent(v2)
        self.records = {
            gen: store.register_agent(
                agent_id=f"{agent.manifest.id}@{self.sim.host_id}",
                host_id=self.sim.host_id,
                generation=agent.manifest.id,
                endpoint="http://127.0.0.1:9",
                handoff_key_sha256=fingerprint(agent.public_key),
            )
            for gen, agent in (("v1", self.v1), ("v2", self.v2))
        }

    def _agent(self, manifest: dict[str, Any]) -> EnclaveAgent:
        parsed = parse_manifest(manifest)
        return EnclaveAgent(
            parsed,
            self.sim.enclave(EnclaveIdentity.from_manifest(parsed)),
            SimVerifier(self.sim.root_ca_pem()),
        )

    @property
    def host_id(self) -> str:
        return self.sim.host_id


@pytest.fixture
def state(store: SealedStateStore, wrapper: LocalKeyWrapper, witness: DirectoryWitness) -> SealedState:
    for manifest in (V1, V2):
        store.put_generation(manifest["id"], parse_manifest(manifest).canonical_json())
    return SealedState(store, lambda _ref: wrapper, witness)


def digest(store: SealedStateStore) -> str:
    rows = sorted(
        (r.blob_id, r.generation, r.row_version, store.get(r.blob_id).blob) for r in store.summaries()
    )
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def fill(state: SealedState, host: Host, n: int) -> dict[str, bytes]:
    secrets = {f"item-{i:02d}": os.urandom(24) for i in range(n)}
    for name, secret in secrets.items():
        state.put_sealed(
            namespace="app", name=name, data=secret, policy="mrenclave", sealer=InProcessSealer(host.v1)
        )
    return secrets


def admit_for(store: SealedStateStore, host: Host) -> Callable[[bytes, bytes, bytes], list[str]]:
    """The migration policy over the new agent's hand-off evidence, as the activity applies it."""
    return lambda evidence, public_key, nonce: new_agent_reasons(
        evidence,
        public_key,
        nonce,
        SimVerifier(host.sim.root_ca_pem()),
        old=manifest_of(store, "app-v1"),
        new=manifest_of(store, "app-v2"),
        allow_same_svn=False,
        expected_key_sha256=host.records["v2"].handoff_key_sha256,
    )


def move(
    store: SealedStateStore,
    host: Host,
    old: LocalPort,
    new: LocalPort,
    size: int = 4,
    witness: DirectoryWitness | None = None,
) -> tuple[int, int]:
    moved = conflicts = 0
    cursor = None
    while True:
        outcome = hand_off_batch(
            store,
            old,
            new,
            migration_id=MIGRATION,
            old_generation="app-v1",
            new_generation="app-v2",
            host=host.host_id,
            after=cursor,
            size=size,
            admit=admit_for(store, host),
            witness=witness,
        )
        moved, conflicts, cursor = moved + outcome.moved, conflicts + outcome.conflicts, outcome.cursor
        if outcome.done:
            return moved, conflicts


def test_a_host_hands_off_rolls_back_and_narrows(
    tmp_path: Path, store: SealedStateStore, state: SealedState, witness: DirectoryWitness
) -> None:
    host = Host(tmp_path / "host", store)
    secrets = fill(state, host, 10)
    plan = plan_fleet(store, "app-v1", "app-v2")
    assert plan.reasons == [] and [(h.host_id, h.tee_blobs) for h in plan.hosts] == [(host.host_id, 10)]
    assert plan.diff()["measurement_changed"]

    assert move(store, host, LocalPort(host.v1), LocalPort(host.v2), witness=witness) == (10, 0)
    assert store.count_tee_by_host("app-v1") == {} and store.count_copies(MIGRATION) == 10
    for name, secret in secrets.items():
        record = store.get_by_name("app", name)
        assert (record.generation, record.host) == ("app-v2", host.host_id)
        assert state.get(namespace="app", name=name, sealer=InProcessSealer(host.v2)) == secret
        with pytest.raises(EnclaveRefused):
            state.get(namespace="app", name=name, sealer=RefusingSealer(host.v1))
    gate = LocalPort(host.v2)
    checked, failures = gate_sample(
        store,
        gate,
        migration_id=MIGRATION,
        new_generation="app-v2",
        host=host.host_id,
        sample=3,
    )
    assert (checked, failures) == (3, [])
    assert gate.calls == ["check"] * 3  # opened in the agent: no plaintext came back to the worker

    restored = roll_back(store, witness, MIGRATION, [host.host_id])
    assert (restored.restored, restored.already_old, restored.kept_new) == (10, 0, [])
    for name, secret in secrets.items():  # the old generation reads every blob again
        assert state.get(namespace="app", name=name, sealer=InProcessSealer(host.v1)) == secret
    assert store.count_copies(MIGRATION) == 0

    move(store, host, LocalPort(host.v1), LocalPort(host.v2), witness=witness)
    assert store.delete_copies(MIGRATION) == 10 and store.count_copies(MIGRATION) == 0


class RefusingSealer(InProcessSealer):
    def unseal(self, blob: bytes) -> bytes:
        try:
            return self.agent.unseal(blob)
        except Exception as exc:
            raise EnclaveRefused(str(exc)) from None


def test_a_blob_rewritten_during_its_hand_off_is_handed_off_again_never_overwritten(
    tmp_path: Path, store: SealedStateStore, state: SealedState, witness: DirectoryWitness
) -> None:
    host = Host(tmp_path / "host", store)
    fill(state, host, 3)

    def rewrite() -> None:  # the workload writes a new value through the old agent mid-export
        state.put_sealed(
            namespace="app",
            name="item-01",
            data=b"fresh",
            policy="mrenclave",
            sealer=InProcessSealer(host.v1),
        )

    old = LocalPort(host.v1, before_export=rewrite)
    moved, conflicts = move(store, host, old, LocalPort(host.v2), witness=witness)
    assert (moved, conflicts) == (3, 1)
    assert state.get(namespace="app", name="item-01", sealer=InProcessSealer(host.v2)) == b"fresh"
    # Its kept copy is the value it replaced (the fresh one), so a rollback loses nothing either.
    roll_back(store, witness, MIGRATION, [host.host_id])
    assert state.get(namespace="app", name="item-01", sealer=InProcessSealer(host.v1)) == b"fresh"


def test_a_rollback_leaves_a_blob_the_new_generation_rewrote(
    tmp_path: Path, store: SealedStateStore, state: SealedState, witness: DirectoryWitness
) -> None:
    host = Host(tmp_path / "host", store)
    fill(state, host, 2)
    move(store, host, LocalPort(host.v1), LocalPort(host.v2), witness=witness)
    state.put_sealed(
        namespace="app", name="item-00", data=b"v2 wrote", policy="mrenclave", sealer=InProcessSealer(host.v2)
    )
    restored = roll_back(store, witness, MIGRATION, [host.host_id])
    assert restored.restored == 1 and restored.kept_new == [store.get_by_name("app", "item-00").blob_id]
    assert state.get(namespace="app", name="item-00", sealer=InProcessSealer(host.v2)) == b"v2 wrote"


def test_an_unreachable_old_agent_changes_nothing_on_its_host(
    tmp_path: Path, store: SealedStateStore, state: SealedState, witness: DirectoryWitness
) -> None:
    host = Host(tmp_path / "host", store)
    fill(state, host, 3)
    before = digest(store)
    old, new = LocalPort(host.v1), LocalPort(host.v2)
    old.down = True
    with pytest.raises(AgentDown):
        move(store, host, old, new, witness=witness)
    assert digest(store) == before and new.calls == []


@pytest.mark.parametrize(
    ("change", "allow_same_svn", "expected"),
    [
        ({}, False, []),
        ({"debug": True}, False, ["debug enclave not allowed"]),
        ({"signer": "44" * 32}, False, ["signer"]),
        ({"product_id": 2}, False, ["product id 2 is not 1"]),
        ({"svn": 0}, False, ["svn 0 is below"]),
        ({"svn": 1}, False, ["svn 1 is not above"]),
        ({"svn": 1}, True, []),
    ],
)
def test_attestation_checks_the_migration_policy(
    tmp_path: Path,
    store: SealedStateStore,
    state: SealedState,
    change: dict[str, Any],
    allow_same_svn: bool,
    expected: list[str],
) -> None:
    host = Host(tmp_path / "host", store, {**V2, **change})
    record: AgentRecord = host.records["v2"]
    reasons = attest_new_agent(
        LocalPort(host.v2),
        record,
        os.urandom(32),
        SimVerifier(host.sim.root_ca_pem()),
        old=manifest_of(store, "app-v1"),
        new=parse_manifest({**V2, **change}),
        allow_same_svn=allow_same_svn,
    )
    assert len(reasons) == len(expected)
    for reason, part in zip(reasons, expected, strict=True):
        assert part in reason


def test_attestation_refuses_evidence_over_another_nonce_or_key(
    tmp_path: Path, store: SealedStateStore, state: SealedState
) -> None:
    host = Host(tmp_path / "host", store)

    class Replaying(LocalPort):
        def attest(self, nonce: bytes) -> tuple[bytes, bytes]:
            return super().attest(b"an earlier nonce")

    reasons = attest_new_agent(
        Replaying(host.v2),
        host.records["v2"],
        os.urandom(32),
        SimVerifier(host.sim.root_ca_pem()),
        old=manifest_of(store, "app-v1"),
        new=manifest_of(store, "app-v2"),
        allow_same_svn=False,
    )
    assert reasons == ["evidence does not bind the migration's nonce and the agent's handoff key"]


def test_an_old_copy_restored_after_the_hand_off_is_refused(
    tmp_path: Path, store: SealedStateStore, state: SealedState, witness: DirectoryWitness
) -> None:
    """The hand-off points each item's checkpoint at the new generation's blob, so the old
    generation's blob put back by a store writer (a backup, after NARROWING) no longer reads,
    even through a running old-generation agent."""
    host = Host(tmp_path / "host", store)
    fill(state, host, 2)
    before = {r.name: r for r in (store.get_by_name("app", f"item-{i:02d}") for i in range(2))}
    move(store, host, LocalPort(host.v1), LocalPort(host.v2), witness=witness)
    old = before["item-00"]
    now = store.get_by_name("app", "item-00")
    store.compare_and_swap(
        now.blob_id,
        now.row_version,
        blob=old.blob,
        key_version=old.key_version,
        key_ref=old.key_ref,
        generation=old.generation,
        kind="tee",
        host=old.host,
    )
    with pytest.raises(StaleBlob):
        state.get(namespace="app", name="item-00", sealer=InProcessSealer(host.v1))
    assert state.get(namespace="app", name="item-01", sealer=InProcessSealer(host.v2))


# ------------------------------------------------- the real activities over a dead new agent


def activities_over(
    store: SealedStateStore, host: Host, ports: dict[str, LocalPort], witness: DirectoryWitness
) -> MigrationActivities:
    return MigrationActivities(
        store,
        lambda record: ports[record.generation],  # type: ignore[arg-type,return-value]
        lambda _host: SimVerifier(host.sim.root_ca_pem()),
        witness,
    )


def failure_of(fn: Callable[..., Any], arg: Any) -> ApplicationError:
    with pytest.raises(ApplicationError) as raised:
        ActivityEnvironment().run(fn, arg)
    return raised.value


def test_a_dead_new_agent_at_the_gate_is_a_new_agent_failure_naming_its_host(
    tmp_path: Path, store: SealedStateStore, state: SealedState, witness: DirectoryWitness
) -> None:
    """Not the AgentDown that the workflow would hold on: the gate's failure rolls back."""
    host = Host(tmp_path / "host", store)
    fill(state, host, 4)
    old, new = LocalPort(host.v1), LocalPort(host.v2)
    move(store, host, old, new, witness=witness)
    activities = activities_over(store, host, {"app-v1": old, "app-v2": new}, witness)
    plan = HostPlan(host.host_id, host.records["v1"].agent_id, host.records["v2"].agent_id, 4)
    request = GateInput(MIGRATION, "app-v2", [plan], 2)
    assert ActivityEnvironment().run(activities.gate, request).checked == 2

    new.down = True
    failure = failure_of(activities.gate, request)
    assert (failure.type, failure.non_retryable, failure.details) == (NEW_AGENT_FAILED, True, (host.host_id,))
    assert host.host_id in failure.message and "cannot reach the agent" in failure.message


def test_a_new_agent_dying_mid_hand_off_is_a_new_agent_failure_and_changes_nothing(
    tmp_path: Path, store: SealedStateStore, state: SealedState, witness: DirectoryWitness
) -> None:
    host = Host(tmp_path / "host", store)
    fill(state, host, 4)
    old, new = LocalPort(host.v1), LocalPort(host.v2)
    activities = activities_over(store, host, {"app-v1": old, "app-v2": new}, witness)
    before = digest(store)
    old.before_export = lambda: setattr(new, "down", True)  # dies after attesting, before the import
    request = HandoffInput(
        MIGRATION, "app-v1", "app-v2", host.host_id, host.records["v1"].agent_id, host.records["v2"].agent_id
    )
    failure = failure_of(activities.handoff, request)
    assert (failure.type, failure.details) == (NEW_AGENT_FAILED, (host.host_id,))
    assert digest(store) == before
