"""The worker's agent tokens: ``<home>/agent/<agent id>`` when that directory exists (one per
agent: the same generation on several hosts), else ``<home>/agent/<generation>``."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rekey.agent_auth import create_tokens
from rekey.config import load_settings
from rekey.worker import agent_peers
from sealing.generation import parse_manifest
from sealing.migration import AgentDown
from sealing.store import AgentRecord, SealedStateStore
from sealing.tee.sim import SimHost
from tests.fixtures.cli import MANIFEST


def record(agent_id: str, generation: str = "payments-v1", host_id: str = "sim-0") -> AgentRecord:
    now = datetime.now(UTC)
    fields = {f.name for f in dataclasses.fields(AgentRecord)}
    values: dict[str, Any] = {
        "agent_id": agent_id,
        "host_id": host_id,
        "generation": generation,
        "endpoint": "https://127.0.0.1:1",
        "handoff_key_sha256": "00" * 32,
        "incarnation": "i",
        "state": "live",
        "refresh_seconds": 30,
        "registered_at": now,
        "started_at": now,
        "last_seen": now,
    }
    return AgentRecord(**{k: v for k, v in values.items() if k in fields})


def test_an_agents_own_token_directory_comes_first(tmp_path: Path) -> None:
    home = tmp_path / "home"
    host_id = SimHost.load_or_create(home / "sim-host").host_id
    with SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}") as store:
        store.put_generation("payments-v1", parse_manifest(MANIFEST | {"id": "payments-v1"}).canonical_json())
        peers = agent_peers(load_settings(home, environ={}), store)
        create_tokens(home / "agent" / "payments-v1.a", [])
        assert peers(record("payments-v1.a", host_id=host_id)) is not None  # its own directory
        with pytest.raises(AgentDown, match=r"agent payments-v1\.b"):
            peers(record("payments-v1.b", host_id=host_id))  # neither its own nor the generation's directory
        create_tokens(home / "agent" / "payments-v1", [])
        assert peers(record("payments-v1.b", host_id=host_id)) is not None  # the generation's directory


def test_an_agent_whose_generation_or_host_is_unknown_is_down(tmp_path: Path) -> None:
    """What the agent's certificate must show comes from the registry: without its generation's
    manifest or its host's root CA there is nothing to check it against."""
    home = tmp_path / "home"
    host_id = SimHost.load_or_create(home / "sim-host").host_id
    create_tokens(home / "agent" / "payments-v1", [])
    with SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}") as store:
        peers = agent_peers(load_settings(home, environ={}), store)
        with pytest.raises(AgentDown, match="generation payments-v1 is not registered"):
            peers(record("payments-v1.a", host_id=host_id))
        store.put_generation("payments-v1", parse_manifest(MANIFEST | {"id": "payments-v1"}).canonical_json())
        with pytest.raises(AgentDown, match="no simulated host with id sim-0"):
            peers(record("payments-v1.a"))
