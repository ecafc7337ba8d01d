"""Hand-off faults found by review: who the old agent hands a host's secrets to, and what the
hand-off activity tells Temporal while it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.migration import MigrationActivities
from activities.migration_types import OLD_AGENT_UNREACHABLE, HandoffInput
from attestation.sim import SimVerifier
from sealing.agent import EnclaveAgent
from sealing.generation import parse_manifest
from sealing.migration import AgentRefused
from sealing.state import SealedState
from sealing.store import SealedStateStore
from sealing.tee.sim import EnclaveIdentity
from tests.unit.test_migration_handoff import MIGRATION, V2, Host, LocalPort, digest, fill, move
from tests.unit.test_migration_handoff import state as state  # the fixture


def test_the_hand_off_gives_secrets_only_to_an_agent_of_the_attested_generation(
    tmp_path: Path, store: SealedStateStore, state: SealedState
) -> None:
    """ATTESTING checked the new agent's measurement; the hand-off must check it again (or pin
    the attested key): the endpoint the registry names at hand-off time may be another enclave
    of the same signer, here one that calls itself app-v2 but runs other code."""
    host = Host(tmp_path / "host", store)
    fill(state, host, 3)
    before = digest(store)
    other = parse_manifest({**V2, "measurement": "55" * 32})
    impostor = EnclaveAgent(
        other, host.sim.enclave(EnclaveIdentity.from_manifest(other)), SimVerifier(host.sim.root_ca_pem())
    )
    old = LocalPort(host.v1)
    with pytest.raises(AgentRefused, match="measurement"):
        move(store, host, old, LocalPort(impostor))
    assert "export" not in old.calls  # nothing left the old agent
    assert digest(store) == before and store.count_copies(MIGRATION) == 0


def test_the_hand_off_activity_heartbeats_while_it_moves_a_batch(
    tmp_path: Path, store: SealedStateStore, state: SealedState
) -> None:
    """The workflow gives migration_handoff a 120 s heartbeat timeout: a batch (up to 500 blobs,
    three export rounds) that heartbeats only when it starts is timed out and started again
    while it still runs, and after three attempts the migration rolls back. It must beat as it
    goes (and through the real activity, check the new agent's hand-off evidence)."""
    host = Host(tmp_path / "host", store)
    fill(state, host, 4)
    agents = {host.records["v1"].agent_id: host.v1, host.records["v2"].agent_id: host.v2}
    now = [0.0]

    def clock() -> float:  # every look at the clock finds a second gone: a slow batch
        now[0] += 1.0
        return now[0]

    activities = MigrationActivities(
        store,
        lambda record: LocalPort(agents[record.agent_id]),
        lambda host_id: SimVerifier(host.sim.root_ca_pem()),
        clock=clock,
    )
    beats: list[object] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    result = env.run(activities.handoff, _handoff_input(host))
    assert (result.moved, result.done) == (4, True)
    assert len(beats) > 4  # at least once per swapped blob, besides the start


def test_a_fast_hand_off_heartbeats_at_most_once_a_second(
    tmp_path: Path, store: SealedStateStore, state: SealedState
) -> None:
    """A heartbeat from the activity's thread waits for the worker's event loop; a batch that
    moves its blobs within a second beats when it starts and once in it, not once per blob."""
    host = Host(tmp_path / "host", store)
    fill(state, host, 6)
    agents = {host.records["v1"].agent_id: host.v1, host.records["v2"].agent_id: host.v2}
    activities = MigrationActivities(
        store,
        lambda record: LocalPort(agents[record.agent_id]),
        lambda host_id: SimVerifier(host.sim.root_ca_pem()),
        clock=lambda: 100.0,  # no time passes
    )
    beats: list[object] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    result = env.run(activities.handoff, _handoff_input(host))
    assert (result.moved, result.done) == (6, True)
    assert len(beats) == 2  # the start, then the first beat of the batch


def _handoff_input(host: Host, after: str | None = None, size: int = 10, batches: int = 1) -> HandoffInput:
    return HandoffInput(
        MIGRATION,
        "app-v1",
        "app-v2",
        host.host_id,
        host.records["v1"].agent_id,
        host.records["v2"].agent_id,
        after,
        size,
        batches=batches,
    )


class _FailingExport(LocalPort):
    """Answers the first ``working`` exports, then is down."""

    def __init__(self, agent: EnclaveAgent, working: int) -> None:
        super().__init__(agent)
        self.working = working

    def export(self, **kwargs: Any) -> dict[str, Any]:
        if self.working == 0:
            self.down = True
        self.working -= 1
        return super().export(**kwargs)


def _activities(store: SealedStateStore, host: Host, old: LocalPort) -> MigrationActivities:
    ports = {host.records["v1"].agent_id: old, host.records["v2"].agent_id: LocalPort(host.v2)}
    return MigrationActivities(
        store, lambda record: ports[record.agent_id], lambda host_id: SimVerifier(host.sim.root_ca_pem())
    )


def test_one_hand_off_call_moves_several_batches_from_its_cursor(
    tmp_path: Path, store: SealedStateStore, state: SealedState
) -> None:
    host = Host(tmp_path / "host", store)
    fill(state, host, 5)
    activities = _activities(store, host, LocalPort(host.v1))
    env = ActivityEnvironment()
    first = env.run(activities.handoff, _handoff_input(host, size=2, batches=2))
    assert (first.moved, first.done, first.attestations) == (4, False, 4)
    assert store.count_tee_by_host("app-v1") == {host.host_id: 1}
    rest = env.run(activities.handoff, _handoff_input(host, after=first.cursor, size=2, batches=2))
    assert (rest.moved, rest.done) == (1, True)
    assert store.count_copies(MIGRATION) == 5
    with pytest.raises(ApplicationError, match=r"batches must be 1\.\.20"):
        env.run(activities.handoff, _handoff_input(host, batches=21))


def test_a_failure_in_a_later_batch_of_a_call_reports_what_moved_before_it(
    tmp_path: Path, store: SealedStateStore, state: SealedState
) -> None:
    """The workflow counts what a call moved from its result: a call whose second batch meets a
    down agent answers with the first batch's blobs; the next call meets the failure first and
    raises it, with nothing more changed."""
    host = Host(tmp_path / "host", store)
    fill(state, host, 5)
    activities = _activities(store, host, _FailingExport(host.v1, working=1))
    env = ActivityEnvironment()
    result = env.run(activities.handoff, _handoff_input(host, size=2, batches=3))
    assert (result.moved, result.done) == (2, False)
    assert store.count_copies(MIGRATION) == 2
    with pytest.raises(ApplicationError) as failed:
        env.run(activities.handoff, _handoff_input(host, after=result.cursor, size=2, batches=3))
    assert failed.value.type == OLD_AGENT_UNREACHABLE
    assert store.count_copies(MIGRATION) == 2


async def test_two_migrations_never_share_an_id() -> None:
    """Generation ids may contain ':', so migrate:<from>:<to> would be ambiguous (a:b -> c and
    a -> b:c share one workflow id and one migration_copies key): such a start is refused
    before anything reaches Temporal."""
    from rekey.client import InvalidOption
    from rekey.client.migrations import start_migration

    for source, target in (("a:b", "c"), ("a", "b:c")):
        with pytest.raises(InvalidOption, match="generation ids with ':' cannot be migrated"):
            await start_migration(None, source, target)  # type: ignore[arg-type] # refused first
