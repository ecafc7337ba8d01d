"""A migration of the most hosts it takes fits Temporal's payload limit: its continue-as-new
input (the whole state) and its progress memo, encoded as the worker encodes them, with every
field at a realistic worst size; more hosts are refused when the fleet is planned."""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict

import pytest
from temporalio.converter import DataConverter

import sealing.migration as migration
from sealing.migration import MAX_MIGRATION_HOSTS
from workflows.migration_state import (
    MOVING,
    HostCount,
    MigrateInput,
    MigrationProgress,
    MigrationState,
    WaveCount,
    split_waves,
)

PAYLOAD_LIMIT = 2 * 1024 * 1024  # Temporal's default blob size limit
HEADROOM = 0.75  # the codec's envelope and the fields not modelled here stay under the rest


def full_state(hosts: int) -> MigrationState:
    """Every host mid-way: host ids and agent ids as registered (sim-<32 hex>, <gen>@<host>),
    both cursors set, every count large."""
    generation = "payments-enclave-v2-2026-12-patch-a"  # a long generation id
    ids = [f"sim-{uuid.uuid4().hex}" for _ in range(hosts)]
    state = MigrationState(phase="HANDING_OFF", started_at="2026-12-02T00:00:00+00:00")
    state.hosts = [
        HostCount(
            host,
            f"{generation}@{host}",
            f"{generation}@{host}",
            wave=4,
            total=10**6,
            moved=10**6 - 1,
            conflicts=10**4,
            state=MOVING,
            cursor=str(uuid.uuid4()),
            kms_share=True,
            kms_lo=str(uuid.uuid4()),
            kms_hi=str(uuid.uuid4()),
            kms_total=10**6,
            kms_moved=10**5,
            kms_cursor=str(uuid.uuid4()),
        )
        for host in ids
    ]
    state.waves = [WaveCount(k, wave) for k, wave in enumerate(split_waves(ids, [1, 10, 50, 100]), start=1)]
    state.reasons = ["r" * 300] * 20
    return state


def encoded_size(value: object) -> int:
    (payload,) = DataConverter.default.payload_converter.to_payloads([value])
    return payload.ByteSize()


def test_the_largest_migration_fits_the_payload_limit() -> None:
    state = full_state(MAX_MIGRATION_HOSTS)
    carried = MigrateInput("payments-enclave-v1", "payments-enclave-v2", state=state)
    assert encoded_size(carried) < PAYLOAD_LIMIT * HEADROOM
    progress = MigrationProgress(
        "v1", "v2", "HANDING_OFF", 4, 4, [], list(state.waves), 0, 0, 0, 0, 0, 0, False, "", False, [], "", ""
    )
    # The memo carries a line per host (HostProgress), smaller than the state's HostCount.
    assert encoded_size({"progress": asdict(progress)}) + encoded_size(state.hosts) < PAYLOAD_LIMIT * HEADROOM


def test_more_hosts_than_one_migration_takes_are_refused_when_planned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Store:  # the plan reads only these
        def get_generation(self, generation: str) -> str:
            old = generation == "v1"
            return json.dumps(
                {
                    "id": generation,
                    "platform": "sim",
                    "measurement": ("a" if old else "b") * 64,
                    "signer": "c" * 64,
                    "product_id": 1,
                    "svn": 1 if old else 2,
                }
            )

        def count_tee_by_host(self, _generation: str) -> dict[str, int]:
            return {f"host-{i}": 1 for i in range(4)}

        def list_agents(self, generation: str) -> list[object]:
            return [Agent(f"{generation}@host-{i}", f"host-{i}", generation) for i in range(4)]

        def count_by_generation(self) -> dict[str, int]:
            return {"v1": 4}

        def count_kms_in_shares(self, _generation: str, _shares: object) -> dict[str, int]:
            return {}

    class Agent:
        def __init__(self, agent_id: str, host_id: str, generation: str) -> None:
            self.agent_id, self.host_id, self.generation = agent_id, host_id, generation
            self.state, self.started_at = "live", "2026-12-02T00:00:00+00:00"

    assert migration.plan_fleet(Store(), "v1", "v2").reasons == []  # type: ignore[arg-type]
    monkeypatch.setattr(migration, "MAX_MIGRATION_HOSTS", 3)
    reasons = migration.plan_fleet(Store(), "v1", "v2").reasons  # type: ignore[arg-type]
    assert len(reasons) == 1 and reasons[0].startswith("4 hosts take part, more than the 3 one migration")
