"""The fleet registry with real ``rekey agent serve --register`` processes: register, list,
refresh, restart (the host id stays), stop, and the ids another host may not take."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sealing.store import SealedStateStore
from tests.fixtures.agent import Agent, start_agents, stop_agents
from tests.fixtures.cli import MANIFEST, run_cli

pytestmark = pytest.mark.integration

V2 = MANIFEST | {"id": "app-v2", "measurement": "33" * 32, "svn": 3}


class Registered(Agent):
    agent_id: str = ""
    host_id: str = ""


def _register_generations(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for manifest in (MANIFEST, V2):
        path = root / f"gen-{manifest['id']}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        code, _, stderr = run_cli(capsys, "--home", str(root / "home"), "generation", "register", str(path))
        assert code == 0, stderr


def _start(root: Path, manifests: dict[str, dict[str, Any]], host: str = "host") -> dict[str, Registered]:
    agents = start_agents(root, manifests, Registered, ["--register", "--refresh-every", "1"], host=host)
    for agent in agents.values():
        assert agent.process.stdout is not None
        line = agent.process.stdout.readline().strip()
        assert line.startswith("registered as agent "), line
        words = line.split()
        agent.agent_id, agent.host_id = words[3], words[-1]
    return agents


def _listed(root: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict[str, Any]]:
    code, stdout, stderr = run_cli(capsys, "--home", str(root / "home"), "agent", "list", "--json", *extra)
    assert code == 0, stderr
    listed: list[dict[str, Any]] = json.loads(stdout)
    return listed


@pytest.fixture
def root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Path]:
    _register_generations(tmp_path, capsys)
    yield tmp_path


def test_agents_register_list_refresh_and_stop(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    agents = _start(root, {"v1": MANIFEST, "v2": V2})
    other = _start(root, {"v1": MANIFEST}, host="host-b")
    try:
        v1, v2, b1 = agents["v1"], agents["v2"], other["v1"]
        assert v1.host_id == v2.host_id != b1.host_id
        assert v1.agent_id == f"app-v1@{v1.host_id}"
        listed = {a["agent_id"]: a for a in _listed(root, capsys)}
        assert set(listed) == {v1.agent_id, v2.agent_id, b1.agent_id}
        for agent in (v1, v2, b1):
            row = listed[agent.agent_id]
            identity = agent.call("/v1/identity")
            assert row["endpoint"] == agent.url
            assert row["host"] == agent.host_id == identity["host_id"]
            assert row["handoff_key_sha256"] == identity["handoff_key_sha256"]
            assert row["state"] == "live"
        assert [a["agent_id"] for a in _listed(root, capsys, "--generation", "app-v2")] == [v2.agent_id]

        # last seen moves on while the agent runs (refreshed every second).
        first = listed[v1.agent_id]["last_seen"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = {a["agent_id"]: a for a in _listed(root, capsys)}[v1.agent_id]
            if now["last_seen"] != first:
                break
            time.sleep(0.2)
        assert now["last_seen"] > first
        assert now["started_at"] == listed[v1.agent_id]["started_at"]

        code, table, _ = run_cli(capsys, "--home", str(root / "home"), "agent", "list")
        assert code == 0
        assert v1.agent_id in table and "live" in table and v1.url in table
    finally:
        stop_agents(agents)
        stop_agents(other)
    states = {a["agent_id"]: a["state"] for a in _listed(root, capsys)}
    assert set(states.values()) == {"stopped"}


def test_a_restart_keeps_its_host_id_and_takes_its_registration_over(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _start(root, {"v1": MANIFEST})
    before = _listed(root, capsys)[0]
    stop_agents(first)
    again = _start(root, {"v1": MANIFEST})
    try:
        agent = again["v1"]
        assert agent.host_id == first["v1"].host_id
        [row] = _listed(root, capsys)
        assert row["agent_id"] == before["agent_id"] and row["state"] == "live"
        assert row["endpoint"] == agent.url
        assert row["handoff_key_sha256"] == agent.call("/v1/identity")["handoff_key_sha256"]
        assert row["handoff_key_sha256"] != before["handoff_key_sha256"]  # a fresh key per start
        assert row["started_at"] > before["started_at"]
        assert row["registered_at"] == before["registered_at"]
    finally:
        stop_agents(again)


def _serve(root: Path, *args: str, host: str = "host-b") -> subprocess.CompletedProcess[str]:
    path = root / "v1.yaml"
    path.write_text(yaml.safe_dump(MANIFEST))
    command = [sys.executable, "-m", "rekey.cli", "--home", str(root / "home"), "agent", "serve"]
    command += ["--manifest", str(path), "--host-dir", str(root / host), "--register", *args]
    command += ["--state-dir", str(root / "home" / f"agent-{host}")]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_another_host_claiming_a_registered_id_is_refused(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agents = _start(root, {"v1": MANIFEST})
    try:
        taken = agents["v1"].agent_id
        refused = _serve(root, "--agent-id", taken)
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: agent id"), refused.stderr
        assert agents["v1"].host_id in lines[0] and "rekey agent remove" in lines[0]
        assert "listening" not in refused.stdout
        [row] = _listed(root, capsys)
        assert (row["host"], row["endpoint"], row["state"]) == (
            agents["v1"].host_id,
            agents["v1"].url,
            "live",
        )
        assert agents["v1"].call("/v1/identity")["host_id"] == agents["v1"].host_id
    finally:
        stop_agents(agents)


def test_registering_needs_the_generation_registered_with_the_same_manifest(tmp_path: Path) -> None:
    no_store = _serve(tmp_path)
    assert no_store.returncode == 2 and no_store.stderr.count("\n") == 1, no_store.stderr
    assert "no store" in no_store.stderr
    assert not (tmp_path / "home" / "state.db").exists()
    with SealedStateStore(f"sqlite:///{tmp_path / 'home' / 'state.db'}") as s:
        s.put_generation("app-v1", json.dumps(MANIFEST | {"svn": 9}, sort_keys=True))
    other = _serve(tmp_path)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "registered with another manifest" in other.stderr
    with SealedStateStore(f"sqlite:///{tmp_path / 'home' / 'state.db'}") as s:
        assert s.list_agents() == []
    assert list((tmp_path / "home" / "agent" / "app-v1").glob("token*")) == []


def test_hostile_agent_ids_are_refused_before_anything_starts(tmp_path: Path) -> None:
    for hostile in ("../x", "a b", "-x", "x" * 201, "a\nb"):
        refused = _serve(tmp_path, "--agent-id", hostile)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().startswith("error:") and refused.stderr.count("\n") == 1
    assert not (tmp_path / "home" / "agent").exists()


# ------------------------------------------------------------------ hardware-sealed state


def _state(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "--home", str(root / "home"), "state", *args)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_tee_put_and_get_through_agents_bound_to_the_host(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = root / "secret.bin"
    secret.write_bytes(b"\x00hardware sealed\xff" * 10)
    agents = _start(root, {"v1": MANIFEST})
    other = _start(root, {"v1": MANIFEST}, host="host-b")
    try:
        a, b = agents["v1"], other["v1"]
        code, stdout, stderr = _state(
            capsys, root, "put", "--agent", a.url, "--name", "db", "--in", str(secret)
        )
        assert code == 0, stderr
        assert a.host_id in stdout
        code, stdout, stderr = _state(
            capsys, root, "put", "--agent", a.url, "--seal", "mrsigner", "--name", "cfg", "--in", str(secret)
        )
        assert code == 0, stderr
        code, stdout, _ = _state(capsys, root, "list", "--json")
        listed = {i["name"]: i for i in json.loads(stdout)}
        for name in ("db", "cfg"):
            assert (listed[name]["kind"], listed[name]["host"], listed[name]["generation"]) == (
                "tee",
                a.host_id,
                "app-v1",
            )
        code, table, _ = _state(capsys, root, "list")
        assert "tee" in table and a.host_id in table

        out = root / "out.bin"
        code, _, stderr = _state(capsys, root, "get", "--name", "db", "--out", str(out), "--agent", a.url)
        assert code == 0, stderr
        assert out.read_bytes() == secret.read_bytes()

        # Another host's agent: refused before the blob is sent, naming both hosts.
        refused = root / "refused.bin"
        code, _, stderr = _state(
            capsys,
            root,
            "get",
            "--name",
            "db",
            "--out",
            str(refused),
            "--agent",
            b.url,
            "--state-dir",
            str(b.state_dir),
        )
        line = _one_error_line(stderr)
        assert code == 2 and a.host_id in line and b.host_id in line
        assert not refused.exists()
        # Without an agent: a hardware-sealed blob does not open.
        code, _, stderr = _state(capsys, root, "get", "--name", "db", "--out", str(refused))
        assert code == 2 and "--agent" in _one_error_line(stderr)
    finally:
        stop_agents(agents)
        stop_agents(other)

    # The agent restarted on the same host directory keeps its host id and opens the blobs.
    again = _start(root, {"v1": MANIFEST})
    try:
        a2 = again["v1"]
        assert a2.host_id == agents["v1"].host_id and a2.url != ""
        for name in ("db", "cfg"):
            out = root / f"{name}.again"
            code, _, stderr = _state(
                capsys, root, "get", "--name", name, "--out", str(out), "--agent", a2.url
            )
            assert code == 0, stderr
            assert out.read_bytes() == secret.read_bytes()
    finally:
        stop_agents(again)


def test_a_put_to_a_down_or_hostile_agent_stores_nothing(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = root / "secret.bin"
    secret.write_bytes(b"never stored")
    agents = _start(root, {"v1": MANIFEST})
    down = agents["v1"].url
    agents["v1"].process.kill()  # a crash: its token stays behind, nothing answers at its port
    agents["v1"].process.wait()
    code, _, stderr = _state(
        capsys, root, "put", "--agent", down, "--generation", "app-v1", "--name", "db", "--in", str(secret)
    )
    assert code == 1 and "cannot reach the agent" in _one_error_line(stderr)
    stopped = _start(root, {"v1": MANIFEST})
    stopped_url = stopped["v1"].url
    stop_agents(stopped)  # a clean stop deletes the token: nothing is sent at all
    code, _, stderr = _state(
        capsys,
        root,
        "put",
        "--agent",
        stopped_url,
        "--generation",
        "app-v1",
        "--name",
        "db",
        "--in",
        str(secret),
    )
    assert code == 2 and "cannot read the agent token" in _one_error_line(stderr)
    for hostile in (
        "http://evil.example:80",
        "https://127.0.0.1:1/v1/seal",
        "http://127.0.0.1:1",  # plain HTTP to an agent is gone
        "file:///etc/passwd",
        "127.0.0.1:1",
    ):
        code, _, stderr = _state(capsys, root, "put", "--agent", hostile, "--name", "db", "--in", str(secret))
        assert code == 2 and "--agent" in _one_error_line(stderr), hostile
    code, _, stderr = _state(
        capsys,
        root,
        "put",
        "--agent",
        "https://127.0.0.1:1",
        "--key",
        "vault:k",
        "--name",
        "db",
        "--in",
        str(secret),
    )
    assert code == 2 and "either --key" in _one_error_line(stderr)
    code, stdout, _ = _state(capsys, root, "list", "--json")
    assert code == 0 and json.loads(stdout) == []
