"""Refusals at ATTESTING with real agents and the real Temporal dev server: a v2 agent with debug
on, with another signer, with another product id, with a lower svn, one answering with stale
evidence, one replaying evidence over an earlier nonce. Each migration stops ROLLED_BACK,
refused, with its reason, and every row of every table of the store is as it was.

The agents run on one sim host, registered once for the module (refreshing hourly, so that the
registry rows stay put). Stale and replayed evidence come from the real v2 agent through the
worker's agent port: the stale one is the agent's answer re-made with the host's attestation
key as of ten minutes ago (an agent whose clock, or cache, is behind); the replayed one is the
agent's own answer to an earlier nonce."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from rekey.agent_peer import peers_from_state_dirs
from rekey.config import load_settings
from rekey.worker import build_worker
from sealing.generation import parse_manifest
from sealing.handoff import report_data_for
from sealing.migration import AgentPort
from sealing.state import SealedState
from sealing.store import AgentRecord, SealedStateStore
from sealing.tee.sim import EnclaveIdentity, SimHost
from tests.fault.migration_fleet import Fleet, manifests, register_generations, start_migration, store_digest
from workflows.migration_state import ROLLED_BACK

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

HOST = "h1"
CHANGED: dict[str, tuple[dict[str, Any], str]] = {
    "debug": ({"debug": True}, "debug enclave not allowed"),
    "signer": ({"signer": "44" * 32}, "signer"),
    "product": ({"product_id": 2}, "product id 2 is not 1"),
    "svn": ({"svn": 1}, "svn 1 is below"),
}
TAMPERED = {
    "stale": "evidence is older than 300s",
    "replay": "evidence does not bind the migration's nonce",
}


class TamperingPorts:
    """The worker's agent ports; ``mode`` makes the v2 agent's attestation stale or replayed."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.real = peers_from_state_dirs(fleet.state_dir, fleet.expect)
        self.mode = ""
        self.earlier: dict[str, tuple[bytes, bytes]] = {}
        self.tampered = 0

    def __call__(self, record: AgentRecord) -> AgentPort:
        return _Port(self, record, self.real(record))


class _Port:
    def __init__(self, ports: TamperingPorts, record: AgentRecord, port: AgentPort) -> None:
        self._ports, self._record, self._port = ports, record, port

    def __getattr__(self, name: str) -> Any:
        return getattr(self._port, name)

    def attest(self, nonce: bytes) -> tuple[bytes, bytes]:
        ports, generation = self._ports, self._record.generation
        if generation not in ports.earlier:
            ports.earlier[generation] = self._port.attest(b"an earlier nonce".ljust(32, b"."))
        evidence, public_key = self._port.attest(nonce)
        if ports.mode == "replay":
            ports.tampered += 1
            return ports.earlier[generation]
        if ports.mode == "stale":
            ports.tampered += 1
            manifest = parse_manifest(ports.fleet.generations["v2"])
            enclave = SimHost.load(ports.fleet.root / HOST).enclave(EnclaveIdentity.from_manifest(manifest))
            ten_minutes_ago = datetime.now(UTC) - timedelta(minutes=10)
            return enclave.report(report_data_for(nonce, public_key), at=ten_minutes_ago), public_key
        return evidence, public_key


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("refusals")
    generations = manifests(f"rf{uuid.uuid4().hex[:8]}")
    generations |= {
        name: generations["v2"] | {"id": f"{generations['v2']['id']}-{name}", **change}
        for name, (change, _reason) in CHANGED.items()
    }
    register_generations(root, generations)
    fleet = Fleet(root, generations, refresh_every=3600)
    try:
        fleet.start(HOST, *generations)
        store = SealedStateStore(load_settings(root / "home", environ={}).store_url)
        state = SealedState(store, lambda _ref: None)  # type: ignore[arg-type,return-value]
        sealer = fleet.sealer(HOST, "v1")
        for i in range(3):
            state.put_sealed(
                namespace="app", name=f"item-{i}", data=b"sealed by v1", policy="mrenclave", sealer=sealer
            )
        store.close()
        yield fleet
    finally:
        fleet.stop()


@pytest.mark.parametrize("case", [*CHANGED, *TAMPERED])
async def test_a_refused_new_agent_stops_at_attesting_with_nothing_stored_changed(
    fleet: Fleet, temporal_env: WorkflowEnvironment, case: str
) -> None:
    settings = load_settings(fleet.root / "home", environ={})
    ports = TamperingPorts(fleet)
    ports.mode = case if case in TAMPERED else ""
    target = case if case in CHANGED else "v2"
    expected = CHANGED[case][1] if case in CHANGED else TAMPERED[case]
    audit: list[str] = []
    task_queue = f"refusals-{uuid.uuid4()}"
    store = SealedStateStore(settings.store_url)
    before = store_digest(settings.store_url)
    try:
        async with build_worker(
            temporal_env.client,
            settings,
            task_queue=task_queue,
            adapters=lambda _ref: None,  # type: ignore[arg-type,return-value]
            store=store,
            audit=lambda event, _subject, _details, _who: audit.append(event),
            peers=ports,
            verifiers=fleet.verifier,
        ):
            handle = await start_migration(
                temporal_env.client, fleet.generations, task_queue, to=target, grace_seconds=0
            )
            result = await handle.result()
    finally:
        store.close()
    assert result.phase == ROLLED_BACK and result.refused, result
    assert result.reasons and all(r.startswith(f"{fleet.generations[target]['id']}@") for r in result.reasons)
    assert any(expected in r for r in result.reasons), result.reasons
    assert ports.tampered == (1 if case in TAMPERED else 0)
    assert "migration.refused" in audit and "migration.widened" not in audit, audit
    assert store_digest(settings.store_url) == before
