"""Hand-off faults found by review: who the old agent hands a host's secrets to, and what the
hand-off activity tells Temporal while it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.migration import MigrationActivities
from activities.migration_types import HandoffInput
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
    activities = MigrationActivities(
        store,
        lambda record: LocalPort(agents[record.agent_id]),
        lambda host_id: SimVerifier(host.sim.root_ca_pem()),
    )
    beats: list[object] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    result = env.run(
        activities.handoff,
        HandoffInput(
            MIGRATION,
            "app-v1",
            "app-v2",
            host.host_id,
            host.records["v1"].agent_id,
            host.records["v2"].agent_id,
            None,
            10,
        ),
    )
    assert (result.moved, result.done) == (4, True)
    assert len(beats) > 4  # at least once per swapped blob, besides the start


async def test_two_migrations_never_share_an_id() -> None:
    """Generation ids may contain ':', so migrate:<from>:<to> would be ambiguous (a:b -> c and
    a -> b:c share one workflow id and one migration_copies key): such a start is refused
    before anything reaches Temporal."""
    from rekey.client import InvalidOption
    from rekey.client.migrations import start_migration

    for source, target in (("a:b", "c"), ("a", "b:c")):
        with pytest.raises(InvalidOption, match="generation ids with ':' cannot be migrated"):
            await start_migration(None, source, target)  # type: ignore[arg-type] # refused first
