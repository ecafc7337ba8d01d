"""Attacks on the agent's connections and on its callers (issue 12, open review findings),
against real ``rekey agent serve`` processes: anonymous clients holding every connection slot,
a process that takes the port once the agent stops (port squatter), replayed, stale and
re-bodied requests."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rekey.agent_auth import AgentClient, sign_request, token_path
from rekey.ratls_transport import RatlsRefused, RatlsSocket, server_expectation
from tests.fixtures.agent import Agent, start_agents, stop_agents

pytestmark = pytest.mark.integration

BASE = {"platform": "sim", "signer": "84" * 32, "product_id": 1, "debug": False, "tcb": "UpToDate"}
SLOTS = BASE | {"id": "conn-slots", "measurement": "a1" * 32, "svn": 1}
SQUAT = BASE | {"id": "conn-squat", "measurement": "b2" * 32, "svn": 1}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    started = start_agents(tmp_path_factory.mktemp("conn-agents"), {"slots": SLOTS}, Agent)  # default limits
    try:
        yield started["slots"]
    finally:
        stop_agents(started)


def test_anonymous_connections_cannot_keep_an_authenticated_caller_out(agent: Agent) -> None:
    """64 anonymous connections against 32 slots, each kept busy with a byte every 0.5 s (so no
    idle timeout ends them): the workload still seals and unseals."""
    idle: list[RatlsSocket] = []
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            for sock in list(idle):
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        for index in range(64):
            sock = agent.tls_socket()  # past the handshake: anonymous until a signed request
            if index % 2:
                sock.sendall(b"POST /v1/unseal HTTP/1.1\r\n")  # and then a byte at a time
            idle.append(sock)
        blob = agent.call("/v1/seal", {"name": "db-key", "data": b64(b"workload secret")})["blob"]
        assert base64.b64decode(agent.call("/v1/unseal", {"blob": blob})["data"]) == b"workload secret"
    finally:
        stop.set()
        trickler.join()
        for sock in idle:
            sock.close()


def _send(agent: Agent, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    connection = agent.connection()
    try:
        connection.request(
            method, path, body=body or None, headers={"Content-Type": "application/json"} | headers
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_a_replayed_request_is_refused(agent: Agent) -> None:
    blob = agent.call("/v1/seal", {"name": "replayed", "data": b64(b"seen once")})["blob"]
    body = json.dumps({"blob": blob}).encode()
    signed = sign_request(agent.token, "POST", "/v1/unseal", body, endpoint=f"127.0.0.1:{agent.port}")
    status, answer = _send(agent, "POST", "/v1/unseal", body, signed)
    assert status == 200 and base64.b64decode(answer["data"]) == b"seen once"
    status, answer = _send(agent, "POST", "/v1/unseal", body, signed)  # recorded and sent again
    assert status == 401 and "data" not in answer


def test_stale_and_rebodied_requests_are_refused(agent: Agent) -> None:
    blob = agent.call("/v1/seal", {"name": "stale", "data": b64(b"old request")})["blob"]
    body = json.dumps({"blob": blob}).encode()
    import time

    stale = sign_request(
        agent.token, "POST", "/v1/unseal", body, endpoint=f"127.0.0.1:{agent.port}", now=time.time() - 600
    )
    assert _send(agent, "POST", "/v1/unseal", body, stale)[0] == 401
    other = json.dumps({"blob": blob[:-4] + "AAA="}).encode()
    mine = f"127.0.0.1:{agent.port}"
    signed = sign_request(agent.token, "POST", "/v1/unseal", other, endpoint=mine)  # another body
    assert _send(agent, "POST", "/v1/unseal", body, signed)[0] == 401
    wrong_path = sign_request(agent.token, "POST", "/v1/seal", body, endpoint=mine)
    assert _send(agent, "POST", "/v1/unseal", body, wrong_path)[0] == 401
    # Signed for another endpoint (a relay's port), delivered with the agent's own Host.
    elsewhere = sign_request(agent.token, "POST", "/v1/unseal", body, endpoint=f"127.0.0.1:{agent.port + 1}")
    assert _send(agent, "POST", "/v1/unseal", body, elsewhere)[0] == 401
    assert (
        _send(
            agent,
            "POST",
            "/v1/unseal",
            body,
            sign_request(agent.token, "POST", "/v1/unseal", body, endpoint=mine),
        )[0]
        == 200
    )


class _Squatter:
    """Listens on a port, records every request, answers 200 with a forged JSON body."""

    def __init__(self, port: int, answer: dict[str, Any]) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()
        self.received = b""
        self.answer = json.dumps(answer).encode()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                # A TLS client sends a ClientHello, never a request: give up on it soon (each
                # refused call waits for this, as a client would for any silent listener).
                client.settimeout(1)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        data += client.recv(65536)
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = next(
                        (
                            int(line.split(b":", 1)[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        0,
                    )
                    while len(rest) < length:
                        rest += client.recv(65536)
                    self.received += head + b"\r\n\r\n" + rest
                    client.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                        + f"Content-Length: {len(self.answer)}\r\n\r\n".encode()
                        + self.answer
                    )
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_a_port_squatter_gets_no_token_and_cannot_forge_answers(tmp_path: Path) -> None:
    started = start_agents(tmp_path, {"squat": SQUAT}, Agent)
    victim = started["squat"]
    client = victim.client()  # a workload that read its token while the agent ran
    blob = client.call("/v1/seal", {"name": "db-key", "data": b64(b"sealed before")})["blob"]
    stop_agents(started)  # a clean stop (SIGTERM)
    assert victim.process.returncode == 0
    assert not token_path(victim.state_dir).exists(), "the token outlived the agent"
    assert not list(victim.state_dir.glob("token*"))

    squatter = _Squatter(victim.port, {"data": b64(b"forged plaintext"), "blob": b64(b"forged blob")})
    try:
        # The squatter cannot show the agent's evidence: the attested TLS handshake fails before
        # any request is sent.
        with pytest.raises(RatlsRefused):
            client.call("/v1/unseal", {"blob": blob})
        with pytest.raises(RatlsRefused):
            client.call("/v1/seal", {"name": "new", "data": b64(b"x")})
        with pytest.raises(RatlsRefused):
            client.call("/v1/identity")
    finally:
        squatter.close()
    assert squatter.received.count(b"HTTP/1.1") == 0, "a request went to a squatter"
    assert blob.encode() not in squatter.received
    assert victim.token.encode() not in squatter.received, "the caller sent its token to a squatter"


def test_one_caller_filling_its_replay_window_does_not_refuse_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window of accepted request nonces (kept to refuse replays) is bounded per caller: a
    named caller sending as fast as it can gets 429 itself, never the workload."""
    import rekey.agent_server as agent_server
    from attestation.sim import SimVerifier
    from sealing.agent import EnclaveAgent
    from sealing.generation import parse_manifest
    from sealing.tee.sim import EnclaveIdentity, SimHost

    monkeypatch.setattr(agent_server, "MAX_SEEN_NONCES", 5)
    manifest = parse_manifest(SLOTS | {"id": "conn-window"})
    host = SimHost.load_or_create(tmp_path / "host")
    agent = EnclaveAgent(
        manifest, host.enclave(EnclaveIdentity.from_manifest(manifest)), SimVerifier(host.root_ca_pem())
    )
    tokens = {"w" * 43: "default", "n" * 43: "noisy"}
    server = agent_server.make_server(agent, tokens=tokens)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        expect = server_expectation(manifest, [host.root_ca_pem()])
        noisy = AgentClient(url, "n" * 43, expect=expect)
        workload = AgentClient(url, "w" * 43, expect=expect)
        statuses = []
        for _ in range(8):
            try:
                noisy.call("/v1/identity")
                statuses.append(200)
            except Exception as exc:  # AgentCallError carries the status
                statuses.append(getattr(exc, "status", 0))
        assert statuses[:5] == [200] * 5 and set(statuses[5:]) == {429}
        assert workload.call("/v1/identity")["id"] == "conn-window"
    finally:
        server.shutdown()
        server.server_close()
