"""MigrateGenerationWorkflow end to end: real ``rekey agent serve --register`` processes (two sim
hosts, a v1 and a v2 agent on each), the real Temporal dev server and a worker with the real
activities. The hardware-sealed state moves to v2 and reads back through the v2 agent on its
host, v1 can no longer read it after NARROWING. Refusals at ATTESTING are in
tests/fault/test_migration_refusals.py, faults during the migration in tests/fault/."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.testing import WorkflowEnvironment

from attestation.platform import PlatformVerifier
from attestation.ratls import RatlsVerifier
from attestation.sim import SimVerifier
from rekey.agent_peer import peers_from_state_dirs
from rekey.agent_sealer import AgentSealer
from rekey.client.migrations import start_migration
from rekey.config import load_settings
from rekey.worker import build_worker
from sealing.state import EnclaveRefused, SealedState
from sealing.store import AgentRecord, SealedStateStore
from sealing.tee.sim import ROOT_CA_CERT_FILE, host_id_of
from tests.fixtures.agent import Agent, expectations, start_agents, stop_agents
from tests.fixtures.cli import MANIFEST, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

V1 = MANIFEST | {"svn": 2}
V2 = MANIFEST | {"id": "app-v2", "measurement": "33" * 32, "svn": 3}
HOSTS = ("h1", "h2")
PER_HOST = 15


def _register(root: Path, capsys: pytest.CaptureFixture[str], manifest: dict[str, Any]) -> None:
    path = root / f"gen-{manifest['id']}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    code, _, stderr = run_cli(capsys, "--home", str(root / "home"), "generation", "register", str(path))
    assert code == 0, stderr


def _start(root: Path, manifests: dict[str, dict[str, Any]], host: str) -> dict[str, Agent]:
    agents = start_agents(root, manifests, Agent, ["--register", "--refresh-every", "1"], host=host)
    for agent in agents.values():
        assert agent.process.stdout is not None
        line = agent.process.stdout.readline().strip()
        assert line.startswith("registered as agent "), line
    return agents


class Fleet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.agents: dict[tuple[str, str], Agent] = {}
        self.host_ids = {host: host_id_of((root / host / ROOT_CA_CERT_FILE).read_bytes()) for host in HOSTS}

    def sealer(self, host: str, name: str) -> AgentSealer:
        agent = self.agents[(host, name)]
        return AgentSealer.connect(agent.client())

    def expect(self, record: AgentRecord) -> RatlsVerifier:
        """What a registered agent's certificate must show (its generation on its host)."""
        return expectations(self.root, [a.manifest for a in self.agents.values()])(record)

    def state_dir(self, record: AgentRecord) -> Path:
        host = next(h for h, i in self.host_ids.items() if i == record.host_id)
        return self.root / "home" / f"agent-{host}" / record.generation

    def verifier(self, host_id: str) -> PlatformVerifier:
        host = next(h for h, i in self.host_ids.items() if i == host_id)
        return SimVerifier((self.root / host / ROOT_CA_CERT_FILE).read_bytes())


@pytest.fixture
def fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Fleet]:
    manifests = {"v1": V1, "v2": V2}
    for manifest in manifests.values():
        _register(tmp_path, capsys, manifest)
    started: dict[tuple[str, str], Agent] = {}
    try:
        for host in HOSTS:
            for name, agent in _start(tmp_path, manifests, host).items():
                started[(host, name)] = agent
        fleet = Fleet(tmp_path)
        fleet.agents = started
        yield fleet
    finally:
        stop_agents({f"{h}/{n}": a for (h, n), a in started.items()})


async def test_hardware_sealed_state_moves_to_v2_in_waves(
    fleet: Fleet, tmp_path: Path, temporal_env: WorkflowEnvironment
) -> None:
    store = SealedStateStore(f"sqlite:///{tmp_path / 'home' / 'state.db'}")
    state = SealedState(store, lambda _ref: None)  # type: ignore[arg-type,return-value]
    secrets: dict[str, tuple[str, bytes]] = {}
    for host in HOSTS:
        v1 = fleet.sealer(host, "v1")
        for i in range(PER_HOST):
            name, secret = f"{host}-item-{i:02d}", os.urandom(32)
            state.put_sealed(namespace="app", name=name, data=secret, policy="mrenclave", sealer=v1)
            secrets[name] = (host, secret)
    audit: list[tuple[str, dict[str, Any]]] = []
    task_queue = f"migration-{uuid.uuid4()}"
    worker = build_worker(
        temporal_env.client,
        load_settings(tmp_path / "home", environ={}),
        task_queue=task_queue,
        adapters=lambda _ref: None,  # type: ignore[arg-type,return-value]
        store=store,
        audit=lambda event, _subject, details, _who: audit.append((event, details)),
        peers=peers_from_state_dirs(fleet.state_dir, fleet.expect),
        verifiers=fleet.verifier,
    )
    async with worker:
        migration = await start_migration(
            temporal_env.client,
            "app-v1",
            "app-v2",
            waves=[50, 100],
            grace=0,
            gate_sample=3,
            task_queue=task_queue,
        )
        result = await asyncio.wait_for(migration.result(), 120)
    assert result.phase == "DONE", result
    assert (result.moved, result.remaining, result.total) == (2 * PER_HOST, 0, 2 * PER_HOST)
    assert [w.hosts for w in result.wave_counts] == [[i] for i in sorted(fleet.host_ids.values())]
    assert result.attestations >= 2 + 2 * 2  # two new agents, then two per batch and host
    assert store.count_copies("migrate:app-v1:app-v2") == 0

    for name, (host, secret) in secrets.items():
        record = store.get_by_name("app", name)
        assert (record.generation, record.host) == ("app-v2", fleet.host_ids[host])
        assert state.get(namespace="app", name=name, sealer=fleet.sealer(host, "v2")) == secret
        with pytest.raises(EnclaveRefused):
            state.get(namespace="app", name=name, sealer=fleet.sealer(host, "v1"))
    events = [event for event, _ in audit]
    for event in (
        "migration.started",
        "migration.diff",
        "migration.wave",
        "migration.narrowed",
        "migration.done",
    ):
        assert event in events
    diff = next(d for e, d in audit if e == "migration.diff" and d["diff"]["new"] == "app-v2")
    assert diff["diff"]["measurement_changed"]
    store.close()
