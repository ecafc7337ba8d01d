"""Faults during a generation migration, with real processes: two sim hosts, a real v1 and v2
``rekey agent serve --register`` on each, the real Temporal dev server and a worker with the real
migration activities.

* A v2 agent SIGKILLed while its host is mid-wave: with ``on_failure="rollback"`` every moved blob
  goes back to its old copy (ROLLED_BACK, every blob read by its v1 agent); with ``"pause"`` the
  migration pauses naming the host, and once the v2 agent is back (same host dir, registered
  again) ``resume`` completes it.
* A v1 agent down before its host's wave: the migration stops (held, naming the host) before
  anything on that host changes; once it is back ``resume`` completes it.
* A writer that seals new blobs and rewrites existing ones through the v1 agents during the
  migration: whatever it wrote through the old generation before the commit (approve, or the end
  of the grace period), also after its host's hand-off, ends on v2 with its latest content. Such a
  write puts the item back on v1; VERIFYING sweeps it again, and after the commit the workflow
  counts once more and sweeps what the grace period let in before NARROWING. The raw history of
  that migration, raw and decoded with the codec, holds none of the writer's plaintexts.

The hand-off runs one or two blobs a batch, so "mid-wave" is a state the progress query shows
(part of a host moved) and the fault is injected then."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from rekey.agent_peer import peers_from_state_dirs
from rekey.backends import witness_for
from rekey.client.migrations import MigrationHandle
from rekey.codec import data_converter
from rekey.config import load_settings
from rekey.worker import build_worker
from sealing.state import SealedState
from sealing.store import SealedStateStore
from tests.fault.migration_fleet import (
    Fleet,
    manifests,
    progress,
    register_generations,
    start_migration,
    wait_for,
)
from workflows.migration import MigrationProgress
from workflows.migration_state import ATTESTING, AWAITING_COMMIT, DONE, HANDING_OFF, ROLLED_BACK, WIDENING

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

HOSTS = ("h1", "h2")
PER_HOST = 8
MARK = b"MIGRATION-FAULT-PLAINTEXT:"


class Migration:
    def __init__(self, root: Path, fleet: Fleet, client: Client, task_queue: str) -> None:
        self.root, self.fleet, self.client, self.task_queue = root, fleet, client, task_queue
        settings = load_settings(root / "home", environ={})
        self.store = SealedStateStore(settings.store_url)
        # The freshness witness the worker's hand-offs repoint, as `rekey state` uses it.
        self.state = SealedState(self.store, lambda _ref: None, witness_for(settings))  # type: ignore[arg-type,return-value]
        self.secrets: dict[str, tuple[str, bytes]] = {}  # name -> (host, latest plaintext)
        self.audit: list[tuple[str, dict[str, Any]]] = []

    def put(self, host: str, name: str, generation: str = "v1") -> None:
        secret = MARK + name.encode() + b":" + os.urandom(16).hex().encode()
        sealer = self.fleet.sealer(host, generation)
        self.state.put_sealed(namespace="app", name=name, data=secret, policy="mrenclave", sealer=sealer)
        self.secrets[name] = (host, secret)

    def fill(self, per_host: int = PER_HOST) -> None:
        for host in HOSTS:
            for i in range(per_host):
                self.put(host, f"{host}-item-{i:02d}")

    def host_rows(self, host: str) -> list[tuple[Any, ...]]:
        host_id = self.fleet.host_ids[host]
        return sorted(
            (s.blob_id, s.generation, s.row_version, self.store.get(s.blob_id).blob)
            for s in self.store.summaries()
            if self.store.get(s.blob_id).host == host_id
        )

    def assert_all_on(self, name: str) -> None:
        """Every blob is the generation ``name``'s and opens through that agent on its host."""
        generation = self.fleet.generations[name]["id"]
        assert len(self.store.summaries()) == len(self.secrets)
        for item, (host, secret) in self.secrets.items():
            record = self.store.get_by_name("app", item)
            assert (record.generation, record.host) == (generation, self.fleet.host_ids[host]), item
            assert self.state.get(namespace="app", name=item, sealer=self.fleet.sealer(host, name)) == secret

    async def start(self, **options: Any) -> WorkflowHandle[Any, MigrationProgress]:
        chosen: dict[str, Any] = {
            "waves": [50, 100],
            "gate_sample": 3,
            "batch_size": 1,
            "batches_per_call": 1,
        } | options
        return await start_migration(self.client, self.fleet.generations, self.task_queue, **chosen)

    def later_host(self) -> str:
        """The host of the second wave (waves take hosts in host-id order)."""
        return max(HOSTS, key=lambda h: self.fleet.host_ids[h])


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    generations = manifests(f"af{uuid.uuid4().hex[:8]}")
    register_generations(tmp_path, generations)
    fleet = Fleet(tmp_path, generations)
    try:
        for host in HOSTS:
            fleet.start(host, "v1", "v2")
        yield fleet
    finally:
        fleet.stop()


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, fleet: Fleet, temporal_env: WorkflowEnvironment
) -> AsyncIterator[Migration]:
    migration = Migration(tmp_path, fleet, temporal_env.client, f"migration-fault-{uuid.uuid4()}")
    worker = build_worker(
        temporal_env.client,
        load_settings(tmp_path / "home", environ={}),
        task_queue=migration.task_queue,
        adapters=lambda _ref: None,  # type: ignore[arg-type,return-value]
        store=migration.store,
        audit=lambda event, _subject, details, _who: migration.audit.append((event, details)),
        peers=peers_from_state_dirs(fleet.state_dir, fleet.expect),
        verifiers=fleet.verifier,
    )
    try:
        async with worker:
            yield migration
    finally:
        migration.store.close()


async def _mid_wave(handle: WorkflowHandle[Any, MigrationProgress], host_id: str) -> MigrationProgress:
    """Once ``host_id`` has moved at least two blobs and not all of them."""

    async def partly_moved() -> MigrationProgress | None:
        now = await progress(handle)
        host = next((h for h in now.hosts if h.host_id == host_id), None)
        return now if host is not None and 2 <= host.moved < host.total else None

    return await wait_for(partly_moved, f"host {host_id} mid-wave", every=0.02)


async def _finished(handle: WorkflowHandle[Any, MigrationProgress]) -> MigrationProgress:
    return await asyncio.wait_for(handle.result(), 180)


# ---------------------------------------------------------------------------- a v2 agent dies


async def test_a_v2_agent_killed_mid_wave_rolls_every_moved_blob_back(
    tmp_path: Path, fleet: Fleet, temporal_env: WorkflowEnvironment
) -> None:
    async with running(tmp_path, fleet, temporal_env) as migration:
        migration.fill()
        later = migration.later_host()
        handle = await migration.start(grace_seconds=3600)
        await _mid_wave(handle, fleet.host_ids[later])
        fleet.kill(later, "v2")
        result = await _finished(handle)
        assert result.phase == ROLLED_BACK and not result.refused, result
        # It failed mid-wave on that host's new agent (not at a gate), and both waves went back.
        assert any(
            f"host {fleet.host_ids[later]}" in r and "new generation's agent" in r for r in result.reasons
        ), result.reasons
        moved = {h.host_id: h for h in result.hosts}
        assert moved[fleet.host_ids[later]].moved < PER_HOST
        assert all(h.state == "rolled_back" and h.rolled_back == h.moved > 0 for h in result.hosts), (
            result.hosts
        )
        migration.assert_all_on("v1")
        assert migration.store.count_copies(handle.id) == 0
        assert "migration.rolled_back" in [event for event, _ in migration.audit]


async def test_a_v2_agent_killed_mid_wave_pauses_and_resumes_once_it_is_back(
    tmp_path: Path, fleet: Fleet, temporal_env: WorkflowEnvironment
) -> None:
    async with running(tmp_path, fleet, temporal_env) as migration:
        migration.fill()
        later = migration.later_host()
        handle = await migration.start(grace_seconds=0, on_failure="pause")
        await _mid_wave(handle, fleet.host_ids[later])
        fleet.kill(later, "v2")

        async def paused() -> MigrationProgress | None:
            now = await progress(handle)
            return now if now.paused else None

        stopped = await wait_for(paused, "the migration to pause")
        assert stopped.phase == "HANDING_OFF" and not stopped.held
        assert any(f"host {fleet.host_ids[later]}" in r for r in stopped.reasons), stopped.reasons
        on_later = next(h for h in stopped.hosts if h.host_id == fleet.host_ids[later])
        assert 0 < on_later.moved < PER_HOST  # partly moved, and it stays so while paused

        fleet.start(later, "v2")  # same host dir and state dir: it takes its registration over
        answer = await MigrationHandle(handle, migration.client).resume()
        assert answer.startswith("resumed in HANDING_OFF"), answer
        result = await _finished(handle)
        assert result.phase == DONE, result
        assert (result.moved, result.remaining) == (2 * PER_HOST, 0)
        migration.assert_all_on("v2")


# ---------------------------------------------------------------------------- a v1 agent is down


async def test_a_v1_agent_down_holds_before_its_host_changes_and_resume_completes(
    tmp_path: Path, fleet: Fleet, temporal_env: WorkflowEnvironment
) -> None:
    async with running(tmp_path, fleet, temporal_env) as migration:
        migration.fill()
        later = migration.later_host()
        fleet.kill(later, "v1")
        before = migration.host_rows(later)
        handle = await migration.start(grace_seconds=0, batch_size=3)

        async def held() -> MigrationProgress | None:
            now = await progress(handle)
            return now if now.held else None

        stopped = await wait_for(held, "the migration to hold")
        assert fleet.host_ids[later] in stopped.held and "old generation's agent" in stopped.held, (
            stopped.held
        )
        assert "nothing on that host was changed" in stopped.held
        assert migration.host_rows(later) == before
        first = next(h for h in stopped.hosts if h.host_id != fleet.host_ids[later])
        assert (first.state, first.moved) == ("moved", PER_HOST)

        fleet.start(later, "v1")
        await MigrationHandle(handle, migration.client).resume()
        result = await _finished(handle)
        assert result.phase == DONE, result
        assert (result.moved, result.remaining) == (2 * PER_HOST, 0)
        migration.assert_all_on("v2")


# ------------------------------------------------------------------- writes during the migration


async def _true(value: bool) -> bool:
    return value


def _payloads_in(message: Message) -> Iterator[Payload]:
    if isinstance(message, Payload):
        yield message
        return
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            items = [v for v in value.values() if isinstance(v, Message)]
        elif descriptor.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            yield from _payloads_in(item)


def _assert_none_in(data: bytes, secrets: list[bytes], what: str) -> None:
    for secret in secrets:
        for form in (secret, base64.b64encode(secret), secret.hex().encode(), MARK):
            assert form not in data, f"a plaintext is in the {what}"


async def test_writes_through_v1_during_the_migration_all_end_on_v2_with_their_latest_content(
    tmp_path: Path, fleet: Fleet, temporal_env: WorkflowEnvironment, temporal_home: Path
) -> None:
    async with running(tmp_path, fleet, temporal_env) as migration:
        migration.fill(4)
        old_generation = fleet.generations["v1"]["id"]
        first = next(h for h in HOSTS if h != migration.later_host())
        stop = asyncio.Event()
        writes: list[str] = []  # the phase each write round saw just before it wrote
        handle = await migration.start(grace_seconds=3600, batch_size=1)
        control = MigrationHandle(handle, migration.client)

        async def write_round(round_: int) -> None:
            phase = (await progress(handle)).phase
            for host in HOSTS:
                await asyncio.to_thread(migration.put, host, f"{host}-new-{round_:03d}")
                names = sorted(n for n, (h, _) in migration.secrets.items() if h == host)
                await asyncio.to_thread(migration.put, host, names[round_ % len(names)])
            writes.append(phase)

        async def writer() -> None:
            # Writes through v1 while the hand-off runs (a writer that never stops would keep
            # VERIFYING sweeping until it holds: a workload moves to v2 at some point).
            round_ = 0
            while not stop.is_set() and (await progress(handle)).phase in (ATTESTING, WIDENING, HANDING_OFF):
                await write_round(round_)
                round_ += 1

        task = asyncio.ensure_future(writer())
        try:
            # The first host handed off: pause there, so that writes surely hit its v1 agent after
            # its hand-off (and the other host's before or during its own), then go on.
            async def first_moved() -> bool:
                now = await progress(handle)
                return any(h.host_id == fleet.host_ids[first] and h.state == "moved" for h in now.hosts)

            await wait_for(first_moved, f"host {first} handed off", every=0.02)
            await control.pause()
            rounds = len(writes)
            await wait_for(lambda: _true(len(writes) >= rounds + 2), "writes while paused")
            await control.resume()

            async def committing() -> MigrationProgress | None:
                now = await progress(handle)
                return now if now.phase == AWAITING_COMMIT else None

            await wait_for(committing, "AWAITING_COMMIT")
        finally:
            stop.set()
            await task
        # And writes in the grace period, after the last sweep, every host long handed off.
        await write_round(len(writes))
        await write_round(len(writes))
        assert writes.count(HANDING_OFF) >= 2 and writes[-2:] == [AWAITING_COMMIT] * 2, writes
        assert migration.store.count_tee_by_host(old_generation)  # the late writes are on v1
        await control.approve()
        result = await _finished(handle)
        assert result.phase == DONE, result
        assert migration.store.count_tee_by_host(old_generation) == {}
        migration.assert_all_on("v2")
        assert len(migration.secrets) > 2 * 4 + 2 * 4

        # The finished migration's raw history, and decoded with the project's codec.
        raw = Client(temporal_env.client.service_client, namespace=temporal_env.client.namespace)
        history = await raw.get_workflow_handle(handle.id).fetch_history()
        plaintexts = [secret for _host, secret in migration.secrets.values()]
        _assert_none_in(b"".join(e.SerializeToString() for e in history.events), plaintexts, "raw history")
        codec = data_converter(temporal_home).payload_codec
        assert codec is not None
        # Search attributes are never encoded (the server indexes them): they are in the raw check.
        payloads = [
            p
            for e in history.events
            for p in _payloads_in(e)
            if p.metadata.get("encoding") == b"binary/encrypted"
        ]
        assert len(payloads) > 20
        decoded = await codec.decode(payloads)
        assert any(b"HostCount" in p.data or b"host_id" in p.data for p in decoded)  # it did decode
        _assert_none_in(b"".join(p.SerializeToString() for p in decoded), plaintexts, "decoded history")
