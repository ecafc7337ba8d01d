"""`rotate start` and `schedule create` check the key on its backend before anything starts
(issue 13): a key that does not exist is one ``error:`` line naming the key and its backend,
exit 2, and no workflow or schedule; a backend that cannot answer starts nothing either. A
rotation that blocks shows why in `rotate start --wait` and `rotate status`, not only in the
worker's log. Real Temporal dev server, OpenBao, moto and the Azure emulator."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey.client import (
    KeyCheckFailed,
    KeyNotFound,
    RekeyClient,
    RotationNotFound,
    ScheduleNotFound,
)
from rekey.config import load_settings
from rekey.worker import build_worker
from sealing.store import SealedStateStore
from tests.fixtures.azure import AzureKeyVault
from tests.fixtures.cli import run_cli
from tests.fixtures.openbao import OpenBao
from tests.fixtures.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

Run = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def rekey(
    temporal_env: WorkflowEnvironment,
    temporal_home: Path,
    openbao: OpenBao,
    moto_server: str,
    azure_keyvault: AzureKeyVault,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Run:
    monkeypatch.setenv("REKEY_HOME", str(temporal_home))  # the codec keys the test server's clients use
    monkeypatch.setenv("REKEY_TEMPORAL_ADDRESS", temporal_env.client.service_client.config.target_host)
    monkeypatch.setenv("REKEY_VAULT_ADDR", openbao.addr)
    monkeypatch.setenv("REKEY_VAULT_TOKEN", openbao.token)
    monkeypatch.setenv("REKEY_AWS_ENDPOINT", moto_server)
    monkeypatch.setenv("REKEY_AZURE_VAULT_URL", azure_keyvault.url)
    monkeypatch.setenv("REKEY_AZURE_CA_FILE", azure_keyvault.ca_file)
    monkeypatch.setenv("COLUMNS", "200")

    async def run(*args: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(run_cli, capsys, *args)

    return run


def one_error(result: tuple[int, str, str], code: int, *texts: str) -> str:
    got, out, err = result
    lines = err.strip().splitlines()
    assert got == code, (got, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


async def nothing_started(temporal_env: WorkflowEnvironment, key_ref: str) -> None:
    client = RekeyClient(temporal_env.client)
    with pytest.raises(RotationNotFound):
        await client.rotation(key_ref).describe()
    with pytest.raises(ScheduleNotFound):
        await client.describe_schedule(key_ref)


@pytest.mark.parametrize("backend", ["vault", "aws", "azure"])
async def test_a_missing_key_starts_nothing(
    backend: str, rekey: Run, temporal_env: WorkflowEnvironment
) -> None:
    key_ref = f"{backend}:absent-{secrets.token_hex(4)}"
    named = (f"key {key_ref} does not exist on backend {backend}", f"rekey key create {key_ref}")
    one_error(await rekey("rotate", "start", key_ref), 2, *named)
    one_error(await rekey("rotate", "start", key_ref, "--wait", "--grace", "0s"), 2, *named)
    one_error(await rekey("schedule", "create", key_ref, "--every", "30d"), 2, *named)
    await nothing_started(temporal_env, key_ref)

    # Once the key exists, the same commands start (and the schedule is deleted again).
    assert (await rekey("key", "create", key_ref))[0] == 0
    code, out, err = await rekey("schedule", "create", key_ref, "--every", "30d")
    assert code == 0 and out.startswith(f"created schedule:rotate:{key_ref}"), err
    assert (await rekey("schedule", "delete", key_ref))[0] == 0


async def test_the_client_api_checks_the_key(
    rekey: Run, temporal_env: WorkflowEnvironment, temporal_home: Path
) -> None:
    client = await RekeyClient.connect(load_settings())
    key_ref = f"vault:absent-{secrets.token_hex(4)}"
    with pytest.raises(KeyNotFound, match=f"^key {key_ref} does not exist on backend vault "):
        await client.start_rotation(key_ref, grace=0)
    with pytest.raises(KeyNotFound):
        await client.create_schedule(key_ref, every="30d")
    await nothing_started(temporal_env, key_ref)


async def test_a_backend_the_cli_cannot_reach_warns_and_starts(
    rekey: Run, temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker may reach the KMS (or hold credentials) where the operator's CLI does not:
    a check that gets no answer is a warning and the start goes on; the library API without a
    warning callback refuses (KeyCheckFailed) and starts nothing."""
    monkeypatch.setenv("REKEY_VAULT_ADDR", f"http://127.0.0.1:{free_port()}")  # nothing listens
    key_ref = f"vault:unreachable-{secrets.token_hex(4)}"
    with pytest.raises(KeyCheckFailed, match=r"\(nothing was started\)$"):
        await (await RekeyClient.connect(load_settings())).start_rotation(key_ref)
    await nothing_started(temporal_env, key_ref)
    client = RekeyClient(temporal_env.client)
    try:
        for args in (("rotate", "start", key_ref), ("schedule", "create", key_ref, "--every", "1d")):
            code, _out, err = await rekey(*args)
            assert code == 0, err
            assert err.startswith(f"warning: cannot check key {key_ref} on backend vault: "), err
            assert "cannot reach OpenBao/Vault" in err and "starting anyway" in err
        assert (await client.rotation(key_ref).describe()).status == "RUNNING"
        assert (await client.describe_schedule(key_ref)).key_ref == key_ref
    finally:
        await client.delete_schedule(key_ref)
        await temporal_env.client.get_workflow_handle(f"rotate:{key_ref}").terminate("test cleanup")


async def test_wait_and_status_show_why_a_rotation_blocked(
    rekey: Run, openbao: OpenBao, temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """The key exists where the command checks it, but the worker's Transit key is gone (as if
    deleted after the start): the rotation blocks in PREPARING and both commands say why."""
    name = f"blocked-{secrets.token_hex(4)}"
    key_ref = f"vault:{name}"
    assert (await rekey("key", "create", key_ref))[0] == 0
    gone = VaultTransitAdapter(
        openbao.client(),
        f"gone-{secrets.token_hex(4)}",
        release_store=MemoryReleasePolicyStore(),
        governor=Governor(f"gone-{uuid.uuid4()}"),
    )
    store = SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}")
    worker = build_worker(  # on the CLI's task queue, `rekey`
        temporal_env.client,
        load_settings(tmp_path, environ={}),
        adapters=lambda _ref: gone,
        store=store,
        audit=lambda *_: None,
    )
    try:
        async with worker:
            code, _out, err = await rekey("rotate", "start", key_ref, "--wait", "--grace", "0s")
            assert code == 1 and "Traceback" not in err and "internal error" not in err, err
            line = err.strip().splitlines()[-1]  # after the progress bar's last frame
            assert line.startswith(f"error: rotation rotate:{key_ref} is BLOCKED in PREPARING: NotFound: ")
            assert "does not exist" in line and "Activity task failed" not in line

            code, out, err = await rekey("rotate", "status", key_ref)
            assert code == 0, err
            assert "phase BLOCKED" in out and "blocked in: PREPARING: NotFound: transit key" in out
            assert "rekey rotate resume" in out
            code, out, err = await rekey("rotate", "status", key_ref, "--json")
            status = json.loads(out)
            assert (status["phase"], status["blocked_in"]) == ("BLOCKED", "PREPARING")
            assert "does not exist" in status["blocked_reason"]

            code, out, err = await rekey("rotate", "abort", key_ref)
            assert code == 0, err
            assert (await RekeyClient(temporal_env.client).rotation(key_ref).result()).phase == "ABORTED"
    finally:
        store.close()
