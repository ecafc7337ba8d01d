"""A migration of KMS-wrapped state (under a real OpenBao Transit key) and hardware-sealed state
end to end: real ``rekey agent serve --register`` processes on two sim hosts (a v1 and a v2
agent each, with the home's KMS settings), the Temporal dev server and a worker with the real
activities. An abort before NARROWING leaves every blob readable by v1 and the key's release
policy as it was; a completed migration leaves every blob readable through a v2 agent
(``rekey state get --agent``) and v1's release requests refused. No plaintext is in the
workflow's history."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from attestation.platform import PlatformVerifier
from attestation.ratls import RatlsVerifier
from attestation.sim import SimVerifier
from emulators.servers import OpenBao
from rekey.agent_peer import peers_from_state_dirs
from rekey.agent_sealer import AgentSealer
from rekey.backends import adapter_for
from rekey.client.errors import MigrationOverlaps
from rekey.client.migrations import start_migration
from rekey.config import load_settings
from rekey.worker import build_worker
from sealing.state import SealedState
from sealing.store import AgentRecord, SealedStateStore
from sealing.tee.sim import ROOT_CA_CERT_FILE, host_id_of
from tests.fixtures.agent import Agent, expectations, start_agents, stop_agents
from tests.fixtures.cli import MANIFEST, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

V1 = MANIFEST | {"svn": 2}
V2 = MANIFEST | {"id": "app-v2", "measurement": "33" * 32, "svn": 3}
HOSTS = ("h1", "h2")
KMS_BLOBS, TEE_PER_HOST = 12, 3


class Fleet:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root, self.home, self.capsys = root, root / "home", capsys
        self.agents: dict[tuple[str, str], Agent] = {}
        self.host_ids: dict[str, str] = {}

    def cli(self, *args: str) -> tuple[int, str, str]:
        return run_cli(self.capsys, "--home", str(self.home), *args)

    def sealer(self, host: str, generation: str) -> AgentSealer:
        agent = self.agents[(host, generation)]
        return AgentSealer.connect(agent.client())

    def expect(self, record: AgentRecord) -> RatlsVerifier:
        """What a registered agent's certificate must show (its generation on its host)."""
        return expectations(self.root, [a.manifest for a in self.agents.values()])(record)

    def state_dir(self, record: AgentRecord) -> Path:
        host = next(h for h, i in self.host_ids.items() if i == record.host_id)
        return self.home / f"agent-{host}" / record.generation

    def verifier(self, host_id: str) -> PlatformVerifier:
        host = next(h for h, i in self.host_ids.items() if i == host_id)
        return SimVerifier((self.root / host / ROOT_CA_CERT_FILE).read_bytes())

    def get(self, name: str, host: str, generation: str) -> tuple[int, bytes, str]:
        """``rekey state get --agent`` through the agent of ``generation`` on ``host``."""
        agent = self.agents[(host, generation)]
        out = self.root / f"out-{uuid.uuid4().hex}"
        code, _, stderr = self.cli(
            "state", "get", "--namespace", "app", "--name", name, "--out", str(out),
            "--agent", agent.url, "--state-dir", str(agent.state_dir),
        )  # fmt: skip
        return code, out.read_bytes() if code == 0 else b"", stderr


@pytest.fixture
def fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str], openbao: OpenBao) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, capsys)
    fleet.home.mkdir(mode=0o700)
    (fleet.home / "rekey.toml").write_text(
        f'vault_addr = "{openbao.addr}"\nvault_token = "{openbao.token}"\n'
    )
    for manifest in (V1, V2):
        path = tmp_path / f"gen-{manifest['id']}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        code, _, stderr = fleet.cli("generation", "register", str(path))
        assert code == 0, stderr
    try:
        for host in HOSTS:
            started = start_agents(
                tmp_path,
                {"app-v1": V1, "app-v2": V2},
                Agent,
                ["--register", "--refresh-every", "1"],
                host=host,
            )
            for generation, agent in started.items():
                fleet.agents[(host, generation)] = agent
                assert agent.process.stdout is not None
                assert agent.process.stdout.readline().startswith("registered as agent ")
            root_ca = (tmp_path / host / ROOT_CA_CERT_FILE).read_bytes()
            fleet.host_ids[host] = host_id_of(root_ca)
            # What the CLI verifies a host's evidence against (<home>/hosts/*: root CAs only).
            (fleet.home / "hosts" / host).mkdir(parents=True, exist_ok=True)
            (fleet.home / "hosts" / host / ROOT_CA_CERT_FILE).write_bytes(root_ca)
        yield fleet
    finally:
        stop_agents({f"{h}/{g}": a for (h, g), a in fleet.agents.items()})


def _generations(fleet: Fleet) -> list[str]:
    code, out, stderr = fleet.cli("key", "release-policy", "show", "vault:orders", "--json")
    assert code == 0, stderr
    generations: list[str] = json.loads(out)["generations"]
    return generations


async def _wait_phase(handle: WorkflowHandle[Any, Any], phase: str) -> None:
    for _ in range(600):
        progress = await handle.query("progress")
        if progress["phase"] == phase:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the migration did not reach {phase}")


async def test_kms_and_tee_state_migrate_abort_restores_and_v1_is_refused_after_narrowing(
    fleet: Fleet, tmp_path: Path, temporal_env: WorkflowEnvironment
) -> None:
    settings = load_settings(fleet.home, environ={})
    adapter_for(settings, "vault:orders").create()
    code, _, stderr = fleet.cli("key", "release-policy", "set", "vault:orders", "--generation", "app-v1")
    assert code == 0, stderr
    assert _generations(fleet) == ["app-v1"]

    store = SealedStateStore(settings.store_url)
    state = SealedState(store, lambda ref: adapter_for(settings, ref))
    secrets: dict[str, tuple[str, bytes]] = {}  # name -> (host that reads it, plaintext)
    for i in range(KMS_BLOBS):
        name, secret = f"kms-{i:02d}", f"kms-plaintext-{uuid.uuid4().hex}".encode()
        state.put(namespace="app", name=name, data=secret, key_ref="vault:orders", generation="app-v1")
        secrets[name] = (HOSTS[i % 2], secret)
    for host in HOSTS:
        for i in range(TEE_PER_HOST):
            name, secret = f"tee-{host}-{i}", f"tee-plaintext-{uuid.uuid4().hex}".encode()
            state.put_sealed(
                namespace="app",
                name=name,
                data=secret,
                policy="mrenclave",
                sealer=fleet.sealer(host, "app-v1"),
            )
            secrets[name] = (host, secret)
    code, data, stderr = fleet.get("kms-00", "h1", "app-v1")
    assert (code, data) == (0, secrets["kms-00"][1]), stderr  # v1 reads it through its agent
    code, _, stderr = fleet.get("kms-00", "h1", "app-v2")  # the agent refuses another generation's blob
    assert code != 0 and "bound to generation app-v1, not this agent's app-v2" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1

    task_queue = f"migration-kms-{uuid.uuid4()}"
    worker = build_worker(
        temporal_env.client,
        settings,
        task_queue=task_queue,
        store=store,
        audit=lambda *_: None,
        peers=peers_from_state_dirs(fleet.state_dir, fleet.expect),
        verifiers=fleet.verifier,
    )
    histories: list[str] = []
    async with worker:
        # An abort before NARROWING: every blob goes back to v1, and the policy with it.
        migration = await start_migration(
            temporal_env.client, "app-v1", "app-v2", waves=[50, 100], grace=3600, task_queue=task_queue
        )
        handle = temporal_env.client.get_workflow_handle(migration.id)
        await _wait_phase(handle, "AWAITING_COMMIT")
        assert store.count_by_generation() == {"app-v2": KMS_BLOBS + 2 * TEE_PER_HOST}
        assert _generations(fleet) == ["app-v1", "app-v2"]
        # Both generations obtain the key's DEKs now, yet v1's agent does not open a blob bound
        # to v2 (over HTTP, through rekey state get --agent).
        code, _, stderr = fleet.get("kms-00", "h1", "app-v1")
        assert code != 0 and "bound to generation app-v2, not this agent's app-v1" in stderr, stderr
        # A second migration involving either generation is refused while this one is open.
        assert {c.generation for c in store.migration_claims()} == {"app-v1", "app-v2"}
        with pytest.raises(MigrationOverlaps, match=f"{migration.id} involves app-v1 or app-v3"):
            await start_migration(temporal_env.client, "app-v1", "app-v3", task_queue=task_queue)
        await handle.execute_update("abort")
        aborted = await asyncio.wait_for(migration.result(), 120)
        assert aborted.phase == "ROLLED_BACK", aborted
        histories.append((await handle.fetch_history()).to_json())
        assert store.count_by_generation() == {"app-v1": KMS_BLOBS + 2 * TEE_PER_HOST}
        assert _generations(fleet) == ["app-v1"]
        for name, (host, secret) in secrets.items():
            assert fleet.get(name, host, "app-v1")[1] == secret, name

        migration = await start_migration(
            temporal_env.client, "app-v1", "app-v2", waves=[50, 100], grace=0, task_queue=task_queue
        )
        result = await asyncio.wait_for(migration.result(), 180)
        histories.append(
            (await temporal_env.client.get_workflow_handle(migration.id).fetch_history()).to_json()
        )
    assert result.phase == "DONE", result
    assert (result.moved, result.kms_moved, result.kms_remaining) == (2 * TEE_PER_HOST, KMS_BLOBS, 0)
    assert sum(w.kms_moved for w in result.wave_counts) == KMS_BLOBS
    assert store.count_by_generation() == {"app-v2": KMS_BLOBS + 2 * TEE_PER_HOST}
    assert _generations(fleet) == ["app-v2"]
    for name, (host, secret) in secrets.items():
        assert fleet.get(name, host, "app-v2")[1] == secret, name
        code, _, stderr = fleet.get(name, host, "app-v1")
        assert code != 0, name
        if name.startswith("kms-"):  # v1's agent refuses a blob bound to v2 (the gate would too)
            assert "bound to generation app-v2" in stderr, stderr
    assert store.migration_claims() == []  # released at ROLLED_BACK and at DONE
    store.close()

    for history in histories:
        for _host, secret in secrets.values():
            for form in (secret.decode(), base64.b64encode(secret).decode(), secret.hex()):
                assert form not in history
