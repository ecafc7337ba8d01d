"""Adversarial cases of the fleet registry and of hardware-sealed state: a store writer or a
local caller of an agent trying to redirect, hijack or forge. Cases marked xfail are open
weaknesses (the reason says which); the others pin what already holds."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, insert, inspect, text, update
from sqlalchemy.engine import Engine

from sealing import envelope
from sealing.agent import MAX_SEAL_VERSION
from sealing.envelope import MAX_BLOB_VERSION
from sealing.errors import StaleBlob, TamperedBlob
from sealing.keywrap import LocalKeyWrapper
from sealing.state import SealedState
from sealing.store import (
    SCHEMA_VERSION,
    AgentConflict,
    AgentRecord,
    AgentSuperseded,
    SealedStateStore,
    agents,
    migrate,
    schema,
    sealed_blobs,
)
from sealing.witness import DirectoryWitness
from tests.fixtures.cli import run_cli
from tests.unit.test_state_tee import InProcessSealer, _agent

HOST_A = "sim-" + "a" * 32
HOST_B = "sim-" + "b" * 32
FP_REAL = "1" * 64
FP_EVIL = "e" * 64
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _register(store: SealedStateStore, **overrides: Any) -> AgentRecord:
    fields: dict[str, Any] = {
        "agent_id": "app-v1@" + HOST_A,
        "host_id": HOST_A,
        "generation": "app-v1",
        "endpoint": "http://127.0.0.1:4001",
        "handoff_key_sha256": FP_REAL,
        "refresh_seconds": 5,
        "now": T0,
    }
    fields.update(overrides)
    return store.register_agent(**fields)


# ------------------------------------------------------------------------------- registry


def test_any_store_writer_takes_a_live_registration_over_with_public_fields(store: SealedStateStore) -> None:
    """Agent id, host id and generation are public (agent list), so a writer that registers them
    with its own endpoint and fingerprint is "the same agent restarting": the real agent's next
    refresh gives up and the row points at the writer, live. This holds by design (the registry
    is bookkeeping); it is why a migration must attest before trusting a row."""
    real = _register(store)
    _register(
        store, endpoint="http://127.0.0.1:6666", handoff_key_sha256=FP_EVIL, now=T0 + timedelta(seconds=1)
    )
    with pytest.raises(AgentSuperseded):
        store.refresh_agent(real, now=T0 + timedelta(seconds=5))
    row = store.get_agent(real.agent_id)
    assert (row.endpoint, row.handoff_key_sha256, row.status(T0 + timedelta(seconds=6))) == (
        "http://127.0.0.1:6666",
        FP_EVIL,
        "live",
    )


def test_a_hand_edited_row_with_a_future_start_does_not_take_over(
    store: SealedStateStore, raw: Engine
) -> None:
    real = _register(store)
    with raw.begin() as conn:
        conn.execute(
            update(agents).values(
                incarnation="f" * 32,
                endpoint="http://127.0.0.1:6666",
                handoff_key_sha256=FP_EVIL,
                started_at=datetime(2999, 1, 1, tzinfo=UTC),
            )
        )
    store.refresh_agent(real, now=T0 + timedelta(seconds=5))
    assert store.get_agent(real.agent_id).endpoint == real.endpoint


def test_a_last_seen_in_the_future_is_not_live(store: SealedStateStore, raw: Engine) -> None:
    _register(store)
    with raw.begin() as conn:
        conn.execute(update(agents).values(last_seen=datetime(2999, 1, 1, tzinfo=UTC)))
    [row] = store.list_agents()
    assert row.status(T0 + timedelta(days=365)) != "live"


def test_the_default_id_of_another_host_cannot_be_squatted(store: SealedStateStore) -> None:
    squatter_error: Exception | None = None
    try:
        _register(store, agent_id="app-v2@" + HOST_A, host_id=HOST_B, generation="app-v1")
    except (AgentConflict, ValueError) as exc:
        squatter_error = exc
    # Either the squat is refused, or the real agent still registers under its default id.
    if squatter_error is None:
        _register(store, agent_id="app-v2@" + HOST_A, host_id=HOST_A, generation="app-v2")


def test_a_second_live_agent_of_one_generation_on_one_host_is_refused(store: SealedStateStore) -> None:
    """One agent per generation and host: a second id for the same pair (--agent-id) is refused
    while the first is live, and registers once that one is stale."""
    _register(store)
    twin = {"agent_id": "other", "endpoint": "http://127.0.0.1:6666", "handoff_key_sha256": FP_EVIL}
    with pytest.raises(AgentConflict, match="one agent per generation and host"):
        _register(store, **twin, now=T0 + timedelta(seconds=1))
    assert [r.agent_id for r in store.list_agents()] == ["app-v1@" + HOST_A]
    _register(store, **twin, now=T0 + timedelta(minutes=5))
    rows = store.list_agents(generation="app-v1", host_id=HOST_A)
    assert [r.endpoint for r in rows] == ["http://127.0.0.1:4001", "http://127.0.0.1:6666"]


def test_the_registry_writes_the_database_clock(store: SealedStateStore, raw: Engine) -> None:
    """No writer's clock: without ``now`` the row's start and last_seen are the database's time."""
    before = store.clock()
    row = store.register_agent(
        agent_id="app-v1@" + HOST_A,
        host_id=HOST_A,
        generation="app-v1",
        endpoint="http://127.0.0.1:4001",
        handoff_key_sha256=FP_REAL,
    )
    after = store.clock()
    assert before <= row.started_at == row.last_seen <= after
    assert row.status(store.clock()) == "live"


# ---------------------------------------------------------------- /v1/seal blob_id and version


@pytest.fixture
def tee_state(store: SealedStateStore, wrapper: LocalKeyWrapper, witness: DirectoryWitness) -> SealedState:
    return SealedState(store, lambda _ref: wrapper, witness)


@pytest.fixture
def host_a(tmp_path: Path) -> InProcessSealer:
    return InProcessSealer(_agent(tmp_path / "host-a"))


def test_a_caller_cannot_mint_a_fresh_blob_for_another_item(
    tee_state: SealedState, store: SealedStateStore, host_a: InProcessSealer, raw: Engine
) -> None:
    record = tee_state.put_sealed(
        namespace="app", name="db", data=b"genuine", policy="mrenclave", sealer=host_a
    )
    tee_state.get(namespace="app", name="db", sealer=host_a)
    forged = host_a.agent.seal(
        namespace="app",
        name="db",
        data=b"attacker's value",
        policy="mrenclave",
        blob_id=uuid.UUID(record.blob_id),
        version=2,
    )
    with raw.begin() as conn:
        conn.execute(update(sealed_blobs).values(blob=forged))
    with pytest.raises((StaleBlob, TamperedBlob)):
        tee_state.get(namespace="app", name="db", sealer=host_a)


def test_a_caller_cannot_mint_a_blob_at_the_checkpoint_version_either(
    tee_state: SealedState, store: SealedStateStore, host_a: InProcessSealer, raw: Engine
) -> None:
    """Same blob id, same version as the checkpoint: only the checkpoint's digest tells it apart."""
    record = tee_state.put_sealed(
        namespace="app", name="db", data=b"genuine", policy="mrenclave", sealer=host_a
    )
    forged = host_a.agent.seal(
        namespace="app",
        name="db",
        data=b"attacker's value",
        policy="mrenclave",
        blob_id=uuid.UUID(record.blob_id),
        version=1,
    )
    with raw.begin() as conn:
        conn.execute(update(sealed_blobs).values(blob=forged))
    with pytest.raises(StaleBlob):
        tee_state.get(namespace="app", name="db", sealer=host_a)


def test_a_maximal_version_does_not_wedge_the_item(
    tee_state: SealedState, store: SealedStateStore, host_a: InProcessSealer, raw: Engine
) -> None:
    record = tee_state.put_sealed(
        namespace="app", name="db", data=b"genuine", policy="mrenclave", sealer=host_a
    )
    blob_id = uuid.UUID(record.blob_id)
    with pytest.raises(ValueError, match="version"):
        host_a.agent.seal(
            namespace="app",
            name="db",
            data=b"x",
            policy="mrenclave",
            blob_id=blob_id,
            version=MAX_BLOB_VERSION,
        )
    forged = host_a.agent.seal(
        namespace="app", name="db", data=b"x", policy="mrenclave", blob_id=blob_id, version=MAX_SEAL_VERSION
    )
    with raw.begin() as conn:
        conn.execute(update(sealed_blobs).values(blob=forged))
    tee_state.put_sealed(namespace="app", name="db", data=b"next", policy="mrenclave", sealer=host_a)
    assert tee_state.get(namespace="app", name="db", sealer=host_a) == b"next"
    assert envelope.parse(store.get_by_name("app", "db").blob).header.version == 2


def test_a_kms_row_flipped_to_tee_is_refused_before_it_is_sent(
    store: SealedStateStore,
    wrapper: LocalKeyWrapper,
    witness: DirectoryWitness,
    host_a: InProcessSealer,
    raw: Engine,
) -> None:
    state = SealedState(store, lambda _ref: wrapper, witness)
    state.put(namespace="app", name="k", data=b"kms", key_ref="vault:orders", generation="gen-1")
    with raw.begin() as conn:
        conn.execute(update(sealed_blobs).values(kind="tee", host=host_a.host_id))
    with pytest.raises(TamperedBlob):
        state.get(namespace="app", name="k", sealer=host_a)
    assert host_a.sent == []


# ------------------------------------------------------------------------ schema 6 and 7


def _v5_blob(i: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "blob_id": f"old-{i}",
        "namespace": "orders",
        "name": f"legacy-{i}",
        "key_ref": "vault:orders",
        "key_version": 1 + i % 3,
        "generation": "g0",
        "blob": bytes([i % 256]) * (1 + i),
        "row_version": 1 + i,
        "created_at": now,
        "updated_at": now,
    }


def test_a_version_5_store_with_data_upgrades_under_concurrent_openers(store_url: str, raw: Engine) -> None:
    """Eight processes' worth of openers race the upgrade 5 -> 7; every row survives as kms."""
    assert migrate(store_url, target=5) == 5
    with raw.begin() as conn:
        conn.execute(insert(sealed_blobs), [_v5_blob(i) for i in range(50)])
    raw.dispose()
    errors: list[BaseException] = []
    versions: list[int] = []

    def open_it() -> None:
        try:
            with SealedStateStore(store_url) as s:
                versions.append(s.schema_version)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and versions == [SCHEMA_VERSION] * 8
    with SealedStateStore(store_url) as s:
        rows = {r.blob_id: r for r in (s.get(f"old-{i}") for i in range(50))}
    for i in range(50):
        expected = _v5_blob(i)
        r = rows[f"old-{i}"]
        assert (r.kind, r.host, r.blob, r.row_version, r.key_version) == (
            "kms",
            None,
            expected["blob"],
            expected["row_version"],
            expected["key_version"],
        )


def test_a_migration_7_failing_half_way_leaves_version_6_and_retries(
    store_url: str, raw: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert migrate(store_url, target=6) == 6
    with raw.begin() as conn:
        conn.execute(insert(sealed_blobs), [_v5_blob(1)])
    raw.dispose()
    original = schema.MIGRATIONS

    def half(conn: Any) -> None:
        conn.execute(text("ALTER TABLE sealed_blobs ADD COLUMN kind VARCHAR NOT NULL DEFAULT 'kms'"))
        raise RuntimeError("crash between the two ALTERs")

    monkeypatch.setattr(schema, "MIGRATIONS", (*original[:6], half, *original[7:]))
    with pytest.raises(Exception, match="crash between"):
        migrate(store_url)
    raw.dispose()
    assert "kind" not in {c["name"] for c in inspect(raw).get_columns("sealed_blobs")}
    monkeypatch.setattr(schema, "MIGRATIONS", original)
    raw.dispose()
    with SealedStateStore(store_url) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert (s.get("old-1").kind, s.get("old-1").host) == ("kms", None)


# ---------------------------------------------------------------------------- agent list


def test_agent_list_shows_a_hostile_row_on_one_escaped_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'state.db'}"
    SealedStateStore(url).close()
    engine = create_engine(url)
    now = datetime.now(UTC)
    with engine.begin() as conn:  # a store writer's row: no field was checked
        conn.execute(
            insert(agents).values(
                agent_id="x\x1b[31mred\x1b]0;title\x07",
                host_id="h\nfake-row",
                generation="g",
                endpoint="http://127.0.0.1:1\x1b[2J",
                handoff_key_sha256="\x1b[5m",
                incarnation="i",
                state="live",
                refresh_seconds=5,
                registered_at=now,
                started_at=now,
                last_seen=now,
            )
        )
    engine.dispose()
    code, stdout, stderr = run_cli(capsys, "--home", str(home), "agent", "list")
    assert code == 0, stderr
    assert "\x1b" not in stdout and "\x07" not in stdout
    assert len(stdout.strip().splitlines()) == 2  # the header and one row
    assert "h\\nfake-row" in stdout
