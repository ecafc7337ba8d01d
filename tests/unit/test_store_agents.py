"""The fleet registry of the sealed-state store, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, inspect, select, update
from sqlalchemy.engine import Engine

from sealing.names import InvalidName
from sealing.store import (
    SCHEMA_VERSION,
    AgentConflict,
    AgentRecord,
    AgentSuperseded,
    RecordNotFound,
    SealedStateStore,
    agents,
    check_endpoint,
    migrate,
)

HOST_A = "sim-" + "a" * 32
HOST_B = "sim-" + "b" * 32
FP1 = "1" * 64
FP2 = "2" * 64
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture
def store(store_url: str) -> Iterator[SealedStateStore]:
    with SealedStateStore(store_url) as s:
        yield s


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    engine = create_engine(store_url)
    yield engine
    engine.dispose()


def register(store: SealedStateStore, **overrides: Any) -> AgentRecord:
    fields: dict[str, Any] = {
        "agent_id": "app-v1@" + HOST_A,
        "host_id": HOST_A,
        "generation": "app-v1",
        "endpoint": "http://127.0.0.1:4001",
        "handoff_key_sha256": FP1,
        "refresh_seconds": 5,
        "now": T0,
    }
    fields.update(overrides)
    return store.register_agent(**fields)


def test_register_then_get_and_list_round_trip(store: SealedStateStore) -> None:
    record = register(store)
    assert record == store.get_agent(record.agent_id)
    assert (record.host_id, record.generation, record.endpoint) == (HOST_A, "app-v1", "http://127.0.0.1:4001")
    assert (record.handoff_key_sha256, record.refresh_seconds, record.state) == (FP1, 5, "live")
    assert record.registered_at == record.started_at == record.last_seen == T0
    assert len(record.incarnation) == 32
    other = register(
        store, agent_id="app-v2@" + HOST_A, generation="app-v2", endpoint="http://127.0.0.1:4002"
    )
    register(store, agent_id="app-v1@" + HOST_B, host_id=HOST_B, endpoint="http://127.0.0.1:4003")
    assert [r.agent_id for r in store.list_agents()] == [
        "app-v1@" + HOST_A,
        "app-v1@" + HOST_B,
        other.agent_id,
    ]
    assert [r.agent_id for r in store.list_agents(generation="app-v2")] == [other.agent_id]
    assert [r.host_id for r in store.list_agents(generation="app-v1", host_id=HOST_B)] == [HOST_B]
    assert store.list_agents(generation="app-v3") == []


def test_status_is_live_then_stale_after_three_intervals_and_stopped_after_stop(
    store: SealedStateStore,
) -> None:
    record = register(store)
    assert record.status(T0 + timedelta(seconds=15)) == "live"
    assert record.status(T0 + timedelta(seconds=15, microseconds=1)) == "stale"
    refreshed = store.refresh_agent(record, now=T0 + timedelta(seconds=60))
    assert refreshed.last_seen == T0 + timedelta(seconds=60)
    assert refreshed.incarnation == record.incarnation
    assert refreshed.status(T0 + timedelta(seconds=70)) == "live"
    assert store.stop_agent(refreshed, now=T0 + timedelta(seconds=61)) is True
    stopped = store.get_agent(record.agent_id)
    assert stopped.state == "stopped" and stopped.status(T0 + timedelta(seconds=61)) == "stopped"


def test_a_restart_on_the_same_host_takes_its_row_over_and_the_old_process_is_superseded(
    store: SealedStateStore,
) -> None:
    first = register(store)
    second = register(
        store, endpoint="http://127.0.0.1:5001", handoff_key_sha256=FP2, now=T0 + timedelta(minutes=1)
    )
    assert second.incarnation != first.incarnation
    assert (second.endpoint, second.handoff_key_sha256) == ("http://127.0.0.1:5001", FP2)
    assert second.registered_at == T0  # first registration kept
    assert second.started_at == T0 + timedelta(minutes=1)
    with pytest.raises(AgentSuperseded, match="registered again by a process started at"):
        store.refresh_agent(first, now=T0 + timedelta(minutes=2))
    assert store.stop_agent(first) is False  # the old process cannot stop the new one's row
    assert store.get_agent(first.agent_id) == second


def test_another_host_or_generation_claiming_an_id_is_refused_and_changes_nothing(
    store: SealedStateStore,
) -> None:
    # A chosen id (one of the default form <generation>@<host> is refused for any other pair).
    record = register(store, agent_id="orders-agent")
    store.stop_agent(record, now=T0)
    before = store.get_agent(record.agent_id)
    with pytest.raises(AgentConflict, match=f"on host {HOST_A}, not for generation app-v1 on host {HOST_B}"):
        register(store, agent_id="orders-agent", host_id=HOST_B, endpoint="http://127.0.0.1:6001")
    with pytest.raises(AgentConflict, match="rekey agent remove"):
        register(store, agent_id="orders-agent", generation="app-v2")
    assert store.get_agent(record.agent_id) == before  # even a stopped row is not taken over
    store.remove_agent(record.agent_id)
    taken = register(store, agent_id="orders-agent", host_id=HOST_B, endpoint="http://127.0.0.1:6001")
    assert taken.host_id == HOST_B
    with pytest.raises(RecordNotFound):
        store.remove_agent("nobody")


def test_a_restored_older_row_does_not_take_over_a_running_agent(
    store: SealedStateStore, raw: Engine
) -> None:
    old = register(store, endpoint="http://127.0.0.1:4000", now=T0)
    running = register(store, endpoint="http://127.0.0.1:4001", now=T0 + timedelta(hours=1))
    # A restore of the store puts the older registration's row back.
    with raw.begin() as conn:
        conn.execute(
            update(agents)
            .where(agents.c.agent_id == old.agent_id)
            .values(incarnation=old.incarnation, endpoint=old.endpoint, started_at=old.started_at)
        )
    again = store.refresh_agent(running, now=T0 + timedelta(hours=2))
    assert (again.incarnation, again.endpoint) == (running.incarnation, "http://127.0.0.1:4001")
    assert again.last_seen == T0 + timedelta(hours=2)
    # A restored row of another host is left alone: the running agent stops refreshing.
    with raw.begin() as conn:
        conn.execute(update(agents).where(agents.c.agent_id == old.agent_id).values(host_id=HOST_B))
    with pytest.raises(AgentConflict, match=f"on host {HOST_B}"):
        store.refresh_agent(running, now=T0 + timedelta(hours=3))
    assert store.get_agent(old.agent_id).host_id == HOST_B
    # A row removed (or restored from before the registration) comes back at the next refresh.
    with raw.begin() as conn:
        conn.execute(delete(agents))
    back = store.refresh_agent(running, now=T0 + timedelta(hours=4))
    assert (back.incarnation, back.host_id, back.registered_at) == (running.incarnation, HOST_A, T0)


def test_concurrent_registrations_of_one_id_leave_one_row(store_url: str) -> None:
    barrier = threading.Barrier(4)
    results: list[AgentRecord] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            with SealedStateStore(store_url) as s:
                barrier.wait()
                results.append(register(s, endpoint=f"http://127.0.0.1:{7000 + i}", now=None))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    with SealedStateStore(store_url) as s:
        [row] = s.list_agents()
    assert row.incarnation in {r.incarnation for r in results}


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("agent_id", "", InvalidName),
        ("agent_id", "../x", InvalidName),
        ("agent_id", "a\nb", InvalidName),
        ("agent_id", "a" * 201, InvalidName),
        ("host_id", "SIM-UPPER", InvalidName),
        ("host_id", "", InvalidName),
        ("generation", "-g", InvalidName),
        ("endpoint", "http://user:pw@127.0.0.1:1", ValueError),
        ("endpoint", "http://127.0.0.1", ValueError),
        ("endpoint", "http://127.0.0.1:1/path", ValueError),
        ("endpoint", "http://127.0.0.1:1?q", ValueError),
        ("endpoint", "ftp://127.0.0.1:1", ValueError),
        ("endpoint", "http://127.0.0.1:99999", ValueError),
        ("endpoint", "http://127.0.0.1:1\n", ValueError),
        ("endpoint", "http://" + "a" * 300 + ":1", ValueError),
        ("handoff_key_sha256", "A" * 64, ValueError),
        ("handoff_key_sha256", "1" * 63, ValueError),
        ("refresh_seconds", 0, ValueError),
        ("refresh_seconds", True, ValueError),
        ("refresh_seconds", 3601, ValueError),
    ],
)
def test_hostile_fields_are_refused_and_nothing_is_stored(
    store: SealedStateStore, field: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        register(store, **{field: value})
    assert store.list_agents() == []


def test_lookups_refuse_hostile_ids(store: SealedStateStore) -> None:
    with pytest.raises(InvalidName):
        store.get_agent("a b")
    with pytest.raises(InvalidName):
        store.list_agents(generation="x\ny")
    with pytest.raises(RecordNotFound, match="no agent app-v9 is registered"):
        store.get_agent("app-v9")


def test_check_endpoint_accepts_plain_endpoints() -> None:
    assert check_endpoint("http://127.0.0.1:8443") == "http://127.0.0.1:8443"
    assert check_endpoint("https://agent-3.example:443/") == "https://agent-3.example:443"


def test_a_version_5_database_upgrades_to_the_registry(store_url: str, raw: Engine) -> None:
    assert migrate(store_url, target=5) == 5
    assert "agents" not in inspect(raw).get_table_names()
    raw.dispose()
    with SealedStateStore(store_url) as s:
        assert s.schema_version == SCHEMA_VERSION
        register(s)
    assert "agents" in inspect(raw).get_table_names()
    with raw.connect() as conn:
        assert conn.execute(select(agents.c.agent_id)).scalars().all() == ["app-v1@" + HOST_A]
