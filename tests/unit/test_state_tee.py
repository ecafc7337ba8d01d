"""Hardware-sealed state in the store (kind ``tee``), on SQLite and a real PostgreSQL: sealed
through an in-process agent, bound to its host, opened only through an agent on that host."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, inspect, select, update
from sqlalchemy.engine import Engine

from attestation.sim import SimVerifier
from sealing.agent import EnclaveAgent
from sealing.errors import SealingError, StaleBlob, TamperedBlob
from sealing.generation import parse_manifest
from sealing.keywrap import LocalKeyWrapper
from sealing.names import InvalidName
from sealing.state import (
    EnclaveRefused,
    EnclaveRequired,
    EnclaveUnavailable,
    HostMismatch,
    SealedState,
    SealPolicy,
    UnknownGeneration,
)
from sealing.store import SealedStateStore, migrate, sealed_blobs
from sealing.tee.sim import EnclaveIdentity, SimHost
from sealing.witness import DirectoryWitness
from tests.fixtures.freshness import restore_row, stored_row

MANIFEST = {
    "id": "gen-1",
    "platform": "sim",
    "measurement": "11" * 32,
    "signer": "22" * 32,
    "product_id": 1,
    "svn": 2,
    "debug": False,
    "tcb": "UpToDate",
}
SECRET = b"\x00hardware-sealed secret\xff"


@dataclass
class InProcessSealer:
    """An `EnclaveSealer` over an `EnclaveAgent` without HTTP; records what it was sent."""

    agent: EnclaveAgent
    sent: list[str] = field(default_factory=list)
    fail: Exception | None = None
    answer: bytes | None = None

    @property
    def host_id(self) -> str:
        assert self.agent.host_id is not None
        return self.agent.host_id

    @property
    def generation(self) -> str:
        return self.agent.manifest.id

    @property
    def key_ref(self) -> str:
        return "tee:sim"

    @property
    def where(self) -> str:
        return "the test agent"

    def seal(
        self, *, namespace: str, name: str, data: bytes, policy: SealPolicy, blob_id: str, version: int
    ) -> bytes:
        self.sent.append("seal")
        if self.fail is not None:
            raise self.fail
        blob = self.agent.seal(
            namespace=namespace,
            name=name,
            data=data,
            policy=policy,
            blob_id=uuid.UUID(blob_id),
            version=version,
        )
        return self.answer if self.answer is not None else blob

    def unseal(self, blob: bytes) -> bytes:
        self.sent.append("unseal")
        return self.agent.unseal(blob)

    token: str = "no-token"  # what open_kms presents (a test sets a real release token)

    def open_kms(self, blob: bytes) -> bytes:
        self.sent.append("open_kms")
        try:
            return self.agent.open_kms(blob, self.token)
        except SealingError as exc:  # as the agent's transport answers: a one-line refusal
            raise EnclaveRefused(f"the test agent refused: {exc}") from None


def _agent(host_dir: Path, manifest: dict[str, Any] = MANIFEST) -> EnclaveAgent:
    host = SimHost.load_or_create(host_dir)
    parsed = parse_manifest(manifest)
    return EnclaveAgent(
        parsed, host.enclave(EnclaveIdentity.from_manifest(parsed)), SimVerifier(host.root_ca_pem())
    )


@pytest.fixture
def host_a(tmp_path: Path) -> InProcessSealer:
    return InProcessSealer(_agent(tmp_path / "host-a"))


@pytest.fixture
def host_b(tmp_path: Path) -> InProcessSealer:
    return InProcessSealer(_agent(tmp_path / "host-b"))


@pytest.fixture
def state(store: SealedStateStore, wrapper: LocalKeyWrapper, witness: DirectoryWitness) -> SealedState:
    return SealedState(store, lambda _ref: wrapper, witness)


def test_put_sealed_stores_a_tee_blob_bound_to_the_host_and_opens_only_there(
    state: SealedState, store: SealedStateStore, host_a: InProcessSealer, host_b: InProcessSealer
) -> None:
    record = state.put_sealed(namespace="app", name="db", data=SECRET, policy="mrenclave", sealer=host_a)
    assert (record.kind, record.host, record.generation, record.key_ref) == (
        "tee",
        host_a.host_id,
        "gen-1",
        "tee:sim",
    )
    assert store.get_by_name("app", "db") == record
    [summary] = store.summaries()
    assert (summary.kind, summary.host) == ("tee", host_a.host_id)
    assert state.get(namespace="app", name="db", sealer=host_a) == SECRET

    with pytest.raises(HostMismatch) as refused:
        state.get(namespace="app", name="db", sealer=host_b)
    assert host_a.host_id in str(refused.value) and host_b.host_id in str(refused.value)
    assert host_b.sent == []  # refused before anything was sent
    with pytest.raises(EnclaveRequired, match=f"hardware-sealed on host {host_a.host_id}"):
        state.get(namespace="app", name="db")


def test_a_replacing_put_keeps_the_blob_id_and_raises_the_version(
    state: SealedState, store: SealedStateStore, host_a: InProcessSealer, raw: Engine
) -> None:
    first = state.put_sealed(namespace="app", name="db", data=b"one", policy="mrsigner", sealer=host_a)
    old = stored_row(raw, "db")
    second = state.put_sealed(namespace="app", name="db", data=b"two", policy="mrenclave", sealer=host_a)
    assert second.blob_id == first.blob_id and second.row_version == 2
    assert state.get(namespace="app", name="db", sealer=host_a) == b"two"
    restore_row(raw, old)  # a backup's older row
    host_a.sent.clear()
    with pytest.raises(StaleBlob):
        state.get(namespace="app", name="db", sealer=host_a)
    assert host_a.sent == []  # refused before it went to the agent


def test_kms_and_tee_blobs_side_by_side_and_a_name_changing_kind(
    state: SealedState, store: SealedStateStore, host_a: InProcessSealer
) -> None:
    kms = state.put(namespace="app", name="k", data=b"kms", key_ref="vault:orders", generation="gen-1")
    assert (kms.kind, kms.host) == ("kms", None)
    # Through an agent, a KMS-wrapped blob goes to the release gate: this one has no KMS settings.
    with pytest.raises(EnclaveRefused, match="no KMS settings"):
        state.get(namespace="app", name="k", sealer=host_a)
    assert host_a.sent == ["open_kms"]
    host_a.sent.clear()
    moved = state.put_sealed(namespace="app", name="k", data=b"tee now", policy="mrenclave", sealer=host_a)
    assert (moved.kind, moved.host, moved.blob_id) == ("tee", host_a.host_id, kms.blob_id)
    assert state.get(namespace="app", name="k", sealer=host_a) == b"tee now"
    back = state.put(namespace="app", name="k", data=b"kms again", key_ref="vault:orders", generation="gen-1")
    assert (back.kind, back.host) == ("kms", None)
    assert state.get(namespace="app", name="k") == b"kms again"


def test_a_failed_or_wrong_seal_stores_nothing(
    state: SealedState, store: SealedStateStore, host_a: InProcessSealer, tmp_path: Path
) -> None:
    host_a.fail = EnclaveUnavailable("cannot reach the agent")
    with pytest.raises(EnclaveUnavailable):
        state.put_sealed(namespace="app", name="db", data=SECRET, policy="mrenclave", sealer=host_a)
    host_a.fail = None
    other = _agent(tmp_path / "host-a").seal(namespace="app", name="other", data=b"x", policy="mrenclave")
    host_a.answer = other
    with pytest.raises(TamperedBlob, match="another blob than the one asked for"):
        state.put_sealed(namespace="app", name="db", data=SECRET, policy="mrenclave", sealer=host_a)
    host_a.answer = b"not a blob"
    with pytest.raises(TamperedBlob, match="not a sealed blob"):
        state.put_sealed(namespace="app", name="db", data=SECRET, policy="mrenclave", sealer=host_a)
    assert store.summaries() == []


def test_hostile_names_and_unregistered_generations_are_refused(
    state: SealedState, store: SealedStateStore, tmp_path: Path
) -> None:
    sealer = InProcessSealer(_agent(tmp_path / "host-a"))
    for namespace, name in (("app", "../x"), ("a b", "db"), ("app", "x\n")):
        with pytest.raises(InvalidName):
            state.put_sealed(namespace=namespace, name=name, data=SECRET, policy="mrenclave", sealer=sealer)
    unregistered = InProcessSealer(_agent(tmp_path / "host-a", MANIFEST | {"id": "gen-9"}))
    with pytest.raises(UnknownGeneration):
        state.put_sealed(namespace="app", name="db", data=SECRET, policy="mrenclave", sealer=unregistered)
    assert sealer.sent == unregistered.sent == []
    assert store.summaries() == []


def test_a_row_whose_kind_was_changed_is_refused(
    state: SealedState, host_a: InProcessSealer, raw: Engine
) -> None:
    state.put_sealed(namespace="app", name="db", data=SECRET, policy="mrenclave", sealer=host_a)
    with raw.begin() as conn:
        conn.execute(update(sealed_blobs).values(kind="kms", host=None))
    with pytest.raises(TamperedBlob, match="not of the kind its store record says"):
        state.get(namespace="app", name="db")


def test_the_store_refuses_kinds_and_hosts_that_do_not_go_together(store: SealedStateStore) -> None:
    base: dict[str, Any] = {"namespace": "a", "name": "b", "key_version": 1, "generation": "g", "blob": b"x"}
    for key_ref, kind, host in (
        ("tee:sim", "tee", None),
        ("tee:sim", "tee", "Bad Host"),
        ("vault:k", "tee", "sim-1"),
        ("tee:sim", "kms", None),
        ("vault:k", "kms", "sim-1"),
        ("vault:k", "hsm", None),
    ):
        with pytest.raises(ValueError):
            store.insert(key_ref=key_ref, kind=kind, host=host, **base)
    record = store.insert(key_ref="vault:k", **base)
    with pytest.raises(ValueError):
        store.compare_and_swap(record.blob_id, 1, blob=b"y", key_version=1, kind="tee", host="sim-1")
    with pytest.raises(ValueError):
        store.compare_and_swap(record.blob_id, 1, blob=b"y", key_version=1, host="sim-1")
    assert store.get(record.blob_id) == record


def test_a_version_6_database_reads_its_rows_as_kms(store_url: str, raw: Engine) -> None:
    assert migrate(store_url, target=6) == 6
    assert "kind" not in {c["name"] for c in inspect(raw).get_columns("sealed_blobs")}
    with raw.begin() as conn:
        conn.execute(
            insert(sealed_blobs).values(
                blob_id="old-1",
                namespace="orders",
                name="legacy",
                key_ref="vault:orders",
                key_version=1,
                generation="g0",
                blob=b"legacy",
                row_version=2,
                created_at=stored_at(),
                updated_at=stored_at(),
            )
        )
    raw.dispose()
    with SealedStateStore(store_url) as s:
        old = s.get("old-1")
        assert (old.kind, old.host, old.row_version) == ("kms", None, 2)
        assert [(x.kind, x.host) for x in s.summaries()] == [("kms", None)]
    with raw.connect() as conn:
        assert conn.execute(select(sealed_blobs.c.kind)).scalars().all() == ["kms"]


def stored_at() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_state_list_json_shape_is_plain_json(store: SealedStateStore) -> None:
    store.insert(
        namespace="a",
        name="b",
        key_ref="tee:sim",
        key_version=1,
        generation="g",
        blob=b"x",
        kind="tee",
        host="sim-1",
    )
    [summary] = store.summaries()
    assert json.loads(json.dumps({"kind": summary.kind, "host": summary.host})) == {
        "kind": "tee",
        "host": "sim-1",
    }
