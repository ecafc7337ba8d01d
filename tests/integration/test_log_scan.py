"""A real ``rekey worker --log-format json`` runs one rotation (OpenBao Transit) and one small
migration (sim agents, one host, v1 -> v2) with plaintexts the test chose; then its stderr and
stdout are scanned: every line is one JSON event with time, level, logger and message; the
rotation's and the migration's events carry the workflow id, the key ref or the generations,
the phase and the outcome; and no plaintext, no DEK (unwrapped by the test from the stored
wrapped keys), no Vault token, no agent caller token and no codec key appears anywhere, raw,
hex or base64."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.types import TASK_QUEUE
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey.agent_auth import read_token
from rekey.backends import witness_for
from rekey.client import RekeyClient
from rekey.codec import codec_keys_path, data_converter
from rekey.config import load_settings
from sealing import envelope
from sealing.state import SealedState
from sealing.store import SealedStateStore
from sealing.tee.sim import ROOT_CA_CERT_FILE
from tests.fault.migration_fleet import Fleet, manifests, register_generations, start_migration, wait_for
from tests.fixtures.openbao import OpenBao
from workflows.migration import MigrationProgress
from workflows.migration_state import DONE

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

BLOBS = 6
REQUIRED = ("time", "level", "logger", "message")


def forms(secret: bytes) -> set[bytes]:
    """The raw bytes and the text forms a secret could take in a log line."""
    found = {secret, secret.hex().encode(), secret.hex().upper().encode()}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        found |= {encode(secret), encode(secret).rstrip(b"=")}
    return {form for form in found if len(form) >= 8}


async def _done(handle: Any) -> Any:
    description = await handle.describe()
    if description.status is None or description.status.name == "RUNNING":
        return None
    return await handle.result()


async def test_a_rotation_and_a_migration_log_json_events_and_no_secret(
    tmp_path: Path, temporal_env: WorkflowEnvironment, openbao: OpenBao
) -> None:
    home = tmp_path / "home"
    generations = manifests(f"log{uuid.uuid4().hex[:8]}")
    register_generations(tmp_path, generations)
    fleet = Fleet(tmp_path, generations)
    address = temporal_env.client.service_client.config.target_host
    settings = load_settings(home, environ={})
    store = SealedStateStore(settings.store_url)
    name = f"logs-{secrets.token_hex(3)}"
    adapter = VaultTransitAdapter(
        openbao.client(), name, release_store=MemoryReleasePolicyStore(), governor=Governor(name)
    )
    adapter.create()
    plaintexts: list[bytes] = []
    worker: subprocess.Popen[bytes] | None = None
    stderr_path, stdout_path = tmp_path / "worker.err", tmp_path / "worker.out"
    try:
        fleet.start("host", "v1", "v2")
        (home / "hosts" / "host").mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "host" / ROOT_CA_CERT_FILE, home / "hosts" / "host" / ROOT_CA_CERT_FILE)
        # KMS-wrapped blobs for the rotation, hardware-sealed ones (v1) for the migration.
        store.put_generation("gen-kms", '{"id":"gen-kms"}')
        kms_state = SealedState(store, lambda _ref: adapter, witness_for(settings))
        for i in range(BLOBS):
            plaintexts.append(b"rotation-plaintext-" + secrets.token_bytes(16))
            kms_state.put(
                namespace="kms",
                name=f"r{i}",
                data=plaintexts[-1],
                key_ref=adapter.key_ref,
                generation="gen-kms",
            )
        sealed_state = SealedState(store, lambda _ref: None, witness_for(settings))  # type: ignore[arg-type,return-value]
        v1 = fleet.sealer("host", "v1")
        for i in range(BLOBS):
            plaintexts.append(b"migration-plaintext-" + secrets.token_bytes(16))
            sealed_state.put_sealed(
                namespace="app", name=f"m{i}", data=plaintexts[-1], policy="mrenclave", sealer=v1
            )
        deks = []
        for row in store.sweep_page(
            key_ref=adapter.key_ref, below_version=99, after=None, upto=None, limit=100
        ):
            slot = envelope.key_slot_in_head(row.head, row.length)
            assert slot is not None
            deks.append(adapter.unwrap(slot.wrapped_dek))
        assert len(deks) == BLOBS
        agent_tokens = [read_token(home / "agent" / g["id"]) for g in generations.values()]

        env = {
            "REKEY_TEMPORAL_ADDRESS": address,
            "REKEY_VAULT_ADDR": openbao.addr,
            "REKEY_VAULT_TOKEN": openbao.token,
        }
        with stderr_path.open("wb") as err, stdout_path.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "rekey.cli", "--home", str(home), "worker", "--log-format", "json"],
                env=os.environ | env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        client = await Client.connect(
            address, namespace=temporal_env.client.namespace, data_converter=data_converter(home)
        )
        rotation = await RekeyClient(client).start_rotation(adapter.key_ref, grace=0, batch_size=4)
        migration = await start_migration(
            client, generations, TASK_QUEUE, grace_seconds=0, batch_size=2, gate_sample=2
        )
        rotated = await asyncio.wait_for(rotation.result(), timeout=120)
        assert rotated.phase == "DONE" and rotated.rewrapped == BLOBS, rotated
        migrated: MigrationProgress = await wait_for(lambda: _done(migration), "the migration", timeout=120)
        assert migrated.phase == DONE and migrated.moved == BLOBS, migrated
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 60) == 0, stderr_path.read_text()
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        fleet.stop()
        store.close()

    raw = stderr_path.read_bytes() + stdout_path.read_bytes()
    events = []
    for line in raw.decode().splitlines():
        event = json.loads(line)  # every line one JSON object
        assert isinstance(event, dict) and all(key in event for key in REQUIRED), line
        assert event["time"].endswith("+00:00"), line
        events.append(event)

    def outcomes(workflow_id: str) -> list[dict[str, Any]]:
        return [e for e in events if e.get("workflow_id") == workflow_id and "outcome" in e]

    # One event per activity outcome (its step) and one per phase change (the new phase).
    rotation_events = outcomes(rotation.id)
    steps = {e["step"] for e in rotation_events if "step" in e}
    assert {"rotate", "plan_batches", "rewrap", "verify_sample", "retire", "audit"} <= steps
    assert all(e["key_ref"] == adapter.key_ref and e["run_id"] and e["outcome"] for e in rotation_events)
    phases = [e["phase"] for e in rotation_events if e["message"].startswith("phase changed")]
    assert phases[0] == "REWRAPPING" and phases[-1] == "DONE" and "RETIRING" in phases, phases
    assert all(e["outcome"] == "ok" for e in rotation_events)
    migration_events = outcomes(migration.id)
    steps = {e["step"] for e in migration_events if "step" in e}
    assert {"attest", "release", "handoff", "gate", "narrow"} <= steps
    old, new = generations["v1"]["id"], generations["v2"]["id"]
    for event in migration_events:
        assert event["run_id"] and event["outcome"] == "ok", event
        assert (event["from_generation"], event["to_generation"]) == (old, new), event
    phases = [e["phase"] for e in migration_events if e["message"].startswith("phase changed")]
    assert phases[0] == "WIDENING" and phases[-1] == DONE and "HANDING_OFF" in phases, phases
    assert any(e["logger"] == "rekey.worker" and e.get("signal") == "SIGTERM" for e in events)

    codec_keys = json.loads(codec_keys_path(home).read_text())["keys"].values()
    secrets_ = [*plaintexts, *deks, openbao.token.encode(), *(t.encode() for t in agent_tokens)]
    secrets_ += [base64.b64decode(key) for key in codec_keys]
    # Which secrets leaked, by index only: the failure message must not print them.
    leaked = [i for i, secret in enumerate(secrets_) if any(form in raw for form in forms(secret))]
    assert not leaked, f"secrets {leaked} (of {len(secrets_)}) reached the worker's log"
