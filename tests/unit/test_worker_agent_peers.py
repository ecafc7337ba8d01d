"""The worker's agent tokens: ``<home>/agent/<agent id>`` when that directory exists (one per
agent: the same generation on several hosts), else ``<home>/agent/<generation>``."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rekey.agent_auth import create_tokens
from rekey.config import load_settings
from rekey.worker import agent_peers
from sealing.migration import AgentDown
from sealing.store import AgentRecord


def record(agent_id: str, generation: str = "payments-v1") -> AgentRecord:
    now = datetime.now(UTC)
    fields = {f.name for f in dataclasses.fields(AgentRecord)}
    values = {
        "agent_id": agent_id,
        "host_id": "sim-0",
        "generation": generation,
        "endpoint": "http://127.0.0.1:1",
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
    peers = agent_peers(load_settings(home, environ={}))
    create_tokens(home / "agent" / "payments-v1.a", [])
    assert peers(record("payments-v1.a")) is not None  # its own directory
    with pytest.raises(AgentDown, match=r"agent payments-v1\.b"):
        peers(record("payments-v1.b"))  # neither its own nor the generation's directory
    create_tokens(home / "agent" / "payments-v1", [])
    assert peers(record("payments-v1.b")) is not None  # the generation's directory
