"""A local process or a store writer against ``--agent`` and the fleet registry, with real
agents: a relay registered as an agent's endpoint, and the error paths that must store nothing."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, insert, update

from sealing.store import SealedStateStore
from sealing.store import agents as agents_table
from tests.fixtures.agent import stop_agents
from tests.fixtures.cli import MANIFEST
from tests.integration.test_fleet import _one_error_line, _start, _state, root  # noqa: F401

pytestmark = pytest.mark.integration


class Relay:
    """A TCP relay on a free 127.0.0.1 port to ``target``, keeping every byte it forwards and
    rewriting the ``Host`` header to the target's where it can read it (the agent refuses a
    foreign Host; the request MAC names the endpoint the caller meant, the relay's). Over
    attested TLS the relay passes the agent's own handshake through but sees only ciphertext, so
    it rewrites nothing."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            mine = self.url.removeprefix("https://").encode()
            theirs = f"{self.target[0]}:{self.target[1]}".encode()
            for a, b, rewrite in ((client, upstream, (mine, theirs)), (upstream, client, None)):
                threading.Thread(target=self._pipe, args=(a, b, rewrite), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, rewrite: tuple[bytes, bytes] | None) -> None:
        try:
            while chunk := source.recv(65536):
                with self._lock:
                    self.seen += chunk
                if rewrite is not None:
                    chunk = chunk.replace(b"Host: " + rewrite[0], b"Host: " + rewrite[1])
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def relay_root(root: Path) -> Iterator[Path]:  # noqa: F811
    yield root


def test_a_relay_registered_as_an_agent_sees_no_plaintext(
    relay_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = relay_root / "secret.bin"
    secret.write_bytes(b"RELAYED-PLAINTEXT-MARKER" * 4)
    agents = _start(relay_root, {"v1": MANIFEST})
    real = agents["v1"]
    relay = Relay(("127.0.0.1", real.port))
    try:
        url = f"sqlite:///{relay_root / 'home' / 'state.db'}"
        with SealedStateStore(url) as store:
            row = store.get_agent(real.agent_id)
        engine = create_engine(url)
        now = datetime.now(UTC)
        with engine.begin() as conn:  # a forged row (register_agent refuses a twin): the relay's endpoint
            conn.execute(
                insert(agents_table).values(
                    agent_id="app-v1-spare",
                    host_id=row.host_id,
                    generation=row.generation,
                    endpoint=relay.url,
                    handoff_key_sha256=row.handoff_key_sha256,
                    incarnation="f" * 32,
                    state="live",
                    refresh_seconds=3600,
                    registered_at=now,
                    started_at=now,
                    last_seen=now,
                )
            )
        engine.dispose()
        code, out, err = _state(
            capsys, relay_root, "put", "--agent", relay.url, "--name", "db", "--in", str(secret)
        )
        # The relay forwards the signed identity request (inside the agent's own TLS session),
        # which names the relay's port: the agent refuses it, so the put fails before any
        # plaintext is sent, and stores nothing.
        assert code != 0 and out == "", err
        assert "the answer is not authenticated" in _one_error_line(err)
        assert bytes(relay.seen)  # the request did go through the relay
        assert base64.b64encode(secret.read_bytes()) not in bytes(relay.seen)
        code, out, _ = _state(capsys, relay_root, "list", "--json")
        assert code == 0 and json.loads(out) == []
    finally:
        relay.close()
        stop_agents(agents)


def test_a_missing_token_or_unknown_endpoint_is_one_line_and_stores_nothing(
    relay_root: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    secret = relay_root / "secret.bin"
    secret.write_bytes(b"never stored")
    agents = _start(relay_root, {"v1": MANIFEST})
    try:
        url = agents["v1"].url
        empty = tmp_path / "no-token"
        empty.mkdir(mode=0o700)
        for extra in (("--state-dir", str(empty)), ("--generation", "app-v2"), ("--caller", "nobody")):
            code, _, stderr = _state(
                capsys, relay_root, "put", "--agent", url, "--name", "db", "--in", str(secret), *extra
            )
            assert code != 0, extra
            _one_error_line(stderr)
        code, _, stderr = _state(
            capsys, relay_root, "put", "--agent", "https://127.0.0.1:1", "--name", "db", "--in", str(secret)
        )
        assert code == 2 and "no registered agent" in _one_error_line(stderr)
        code, stdout, _ = _state(capsys, relay_root, "list", "--json")
        assert code == 0 and json.loads(stdout) == []
    finally:
        stop_agents(agents)


def test_a_hostile_row_that_supersedes_an_agent_warns_on_one_escaped_line(
    relay_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agents = _start(relay_root, {"v1": MANIFEST})
    agent = agents["v1"]
    # A safety net only: a missing warning ends the process, and the test fails, instead of hanging.
    guard = threading.Timer(60, agent.process.kill)
    guard.start()
    try:
        engine = create_engine(f"sqlite:///{relay_root / 'home' / 'state.db'}")
        with engine.begin() as conn:  # a store writer's row: a later start, an escape sequence
            conn.execute(
                update(agents_table)
                .where(agents_table.c.agent_id == agent.agent_id)
                .values(
                    incarnation="f" * 32,
                    endpoint="http://127.0.0.1:1\x1b]0;owned\x07\n",
                    started_at=datetime.now(UTC),  # believable: after the agent's, before its refresh
                )
            )
        engine.dispose()
        assert agent.process.stderr is not None
        line = agent.process.stderr.readline()
        assert line.startswith("warning: "), line
        assert "\x1b" not in line and "\x07" not in line and "no longer refreshes" in line
    finally:
        guard.cancel()
        stop_agents(agents)


def test_an_agent_that_cannot_write_its_start_lines_cleans_up(relay_root: Path) -> None:
    """The start-up lines go to a closed pipe: the agent exits, and leaves no token and no live
    registration behind (a left token would sign a later caller's requests to whoever takes the
    port, at an endpoint the registry still lists as live)."""
    manifest = relay_root / "v1.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    state_dir = relay_root / "home" / "agent" / str(MANIFEST["id"])
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rekey.cli",
                "--home",
                str(relay_root / "home"),
                "agent",
                "serve",
                "--manifest",
                str(manifest),
                "--platform",
                "sim",
                "--host-dir",
                str(relay_root / "host"),
                "--port",
                "0",
                "--register",
            ],
            stdout=write_end,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(write_end)
    assert process.wait(timeout=60) != 0
    assert list(state_dir.glob("token*")) == []
    with SealedStateStore(f"sqlite:///{relay_root / 'home' / 'state.db'}") as store:
        assert [a.state for a in store.list_agents()] == ["stopped"]
