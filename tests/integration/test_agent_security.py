"""Attacks on the enclave agent's HTTP API (issue 12, findings 1 and 7), against real agent processes.

Each test performs the attack and checks it gets nothing: unseal or seal without the token, a
DNS-rebinding Host, a browser's text/plain POST or foreign Origin, a negative or huge
Content-Length, a slowloris client, more connections than the agent serves, and a flood of
nonces from one caller against another caller's handoff.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rekey.agent_auth import sign_request
from sealing.agent import MAX_NONCES_PER_CALLER
from tests.fixtures.agent import Agent, AgentError, start_agents, stop_agents
from tests.fixtures.slow_client import trickle_until_dropped

pytestmark = pytest.mark.integration

SIGNER = "83" * 32
BASE = {"platform": "sim", "signer": SIGNER, "product_id": 1, "debug": False, "tcb": "UpToDate"}
V1 = BASE | {"id": "sec-v1", "measurement": "a1" * 32, "svn": 1}
V2 = BASE | {"id": "sec-v2", "measurement": "b2" * 32, "svn": 2}
BUSY = BASE | {"id": "sec-busy", "measurement": "c3" * 32, "svn": 1}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Agent]]:
    root = tmp_path_factory.mktemp("sec-agents")
    started = start_agents(
        root,
        {"v1": V1, "v2": V2},
        Agent,
        ["--caller", "flood", "--idle-timeout", "1", "--request-timeout", "2"],
    )
    try:
        started |= start_agents(
            root, {"busy": BUSY}, Agent, ["--max-connections", "2", "--idle-timeout", "120"]
        )
        yield started
    finally:
        stop_agents(started)


def raw(
    agent: Agent, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> Any:
    """One request with exactly these headers (Host and Content-Length added unless given);
    ``Authorization: sign:TOKEN`` is replaced by the headers that sign this request with TOKEN."""
    headers = dict(headers or {})
    if headers.get("Authorization", "").startswith("sign:"):
        token = headers.pop("Authorization").removeprefix("sign:")
        host = next((v for k, v in headers.items() if k.lower() == "host"), f"127.0.0.1:{agent.port}")
        headers |= sign_request(token, method, path, body, endpoint=host)
    connection = agent.connection()
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        given = {name.lower() for name in (headers or {})}
        if "host" not in given:
            connection.putheader("Host", f"127.0.0.1:{agent.port}")
        if "content-length" not in given and method == "POST":
            connection.putheader("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def json_headers(agent: Agent, token: str | None = None) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"sign:{token or agent.token}"}


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc")


def test_token_files_are_private(agents: dict[str, Agent]) -> None:
    agent = agents["v1"]
    assert stat.S_IMODE(os.stat(agent.state_dir).st_mode) == 0o700
    for path in agent.state_dir.glob("token*"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert agent.token and agent.token != agent.caller_tokens["flood"] != agents["v2"].token


def test_unseal_and_seal_without_the_token_are_refused(agents: dict[str, Agent]) -> None:
    agent = agents["v1"]
    blob = agent.call("/v1/seal", {"name": "db-key", "data": b64(b"top secret"), "policy": "mrenclave"})[
        "blob"
    ]
    body = json.dumps({"blob": blob}).encode()
    for authorization in (
        None,
        "Bearer wrong",
        f"Basic {agent.token}",
        f"Bearer {agents['v2'].token}",
        f"Bearer {agent.token}",  # the token itself, in clear, is not a credential
        "Bearer ",
        f"sign:{agents['v2'].token}",  # signed with another agent's token
        "Rekey-HMAC ",
    ):
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        status, answer = raw(agent, "POST", "/v1/unseal", body, headers)
        assert status == 401 and answer["error"]["type"] == "Unauthorized"
        assert b64(b"top secret") not in json.dumps(answer)
        seal = json.dumps({"name": "planted", "data": b64(b"attacker data")}).encode()
        assert raw(agent, "POST", "/v1/seal", seal, headers)[0] == 401
    for path in ("/v1/export", "/v1/import", "/v1/nonce", "/v1/import-nonce", "/v1/attest"):
        assert raw(agent, "POST", path, b"{}", {"Content-Type": "application/json"})[0] == 401
    assert raw(agent, "GET", "/v1/identity")[0] == 401
    status, answer = raw(agent, "POST", "/v1/unseal", body, json_headers(agent))
    assert status == 200 and base64.b64decode(answer["data"]) == b"top secret"


@pytest.mark.parametrize(
    "host", ["rebind.attacker.example:{port}", "127.0.0.1:1", "127.0.0.1", "", "[::1]:{port}"]
)
def test_dns_rebinding_host_is_refused(agents: dict[str, Agent], host: str) -> None:
    agent = agents["v1"]
    headers = json_headers(agent) | {"Host": host.format(port=agent.port)}
    status, answer = raw(agent, "POST", "/v1/unseal", b'{"blob": ""}', headers)
    assert status == 421 and answer["error"]["type"] == "MisdirectedRequest"
    assert (
        raw(agent, "GET", "/v1/identity", headers=json_headers(agent) | {"Host": f"localhost:{agent.port}"})[
            0
        ]
        == 200
    )


def test_browser_simple_post_and_foreign_origin_are_refused(agents: dict[str, Agent]) -> None:
    agent = agents["v1"]
    blob = agent.call("/v1/seal", {"name": "k", "data": b64(b"secret"), "policy": "mrenclave"})["blob"]
    body = json.dumps({"blob": blob}).encode()
    for content_type in (
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        None,
    ):
        headers = {"Authorization": f"sign:{agent.token}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        status, answer = raw(agent, "POST", "/v1/unseal", body, headers)
        assert status == 415 and "data" not in answer
    origin = json_headers(agent) | {"Origin": "http://rebind.attacker.example"}
    status, answer = raw(agent, "POST", "/v1/unseal", body, origin)
    assert status == 403 and answer["error"]["type"] == "OriginRefused"
    assert raw(agent, "POST", "/v1/unseal", body, json_headers(agent) | {"Origin": "null"})[0] == 403


@pytest.mark.parametrize("length", ["-1", "+5", "5 5", "0x10", "1e3", "\u00b2", "", "5,5"])
def test_malformed_content_length_is_refused(agents: dict[str, Agent], length: str) -> None:
    agent = agents["v1"]
    status, answer = raw(agent, "POST", "/v1/nonce", b"{}", json_headers(agent) | {"Content-Length": length})
    assert status == 400 and "Content-Length" in answer["error"]["message"]


def test_missing_content_length_and_chunked_bodies_are_refused(agents: dict[str, Agent]) -> None:
    agent = agents["v1"]
    signed = "".join(
        f"{k}: {v}\r\n"
        for k, v in sign_request(agent.token, "POST", "/v1/nonce", endpoint=f"127.0.0.1:{agent.port}").items()
    )
    with agent.tls_socket() as sock:
        sock.sendall(
            f"POST /v1/nonce HTTP/1.1\r\nHost: 127.0.0.1:{agent.port}\r\n{signed}"
            "Content-Type: application/json\r\n\r\n".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.0 411")
    headers = json_headers(agent) | {"Transfer-Encoding": "chunked", "Content-Length": "2"}
    assert raw(agent, "POST", "/v1/nonce", b"{}", headers)[0] == 400


def _flood_body(agent: Agent, length: str, size: int) -> tuple[bytes, int]:
    """Declare ``length`` and try to push ``size`` bytes; (the answer's first bytes, bytes sent)."""
    sent = 0
    chunk = b"x" * (1024 * 1024)
    with agent.tls_socket() as sock:
        sock.sendall(
            f"POST /v1/unseal HTTP/1.1\r\nHost: 127.0.0.1:{agent.port}\r\n"
            f"Authorization: Bearer {agent.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        try:
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(65536)
        except OSError:  # the agent closed the connection instead of reading the body
            answer = b""
    return answer, sent


@pytest.mark.parametrize("length", ["-1", str(10**15), str(64 * 1024 * 1024 + 1)])
def test_bodies_past_the_limit_are_not_read(agents: dict[str, Agent], length: str) -> None:
    agent = agents["v2"]
    before = peak_rss_kib(agent.process.pid)
    answer, sent = _flood_body(agent, length, 200 * 1024 * 1024)
    grown_mib = (peak_rss_kib(agent.process.pid) - before) / 1024
    assert grown_mib < 32, f"agent peak memory grew {grown_mib:.0f} MiB"
    assert sent < 64 * 1024 * 1024, f"the agent read {sent >> 20} MiB past the refusal"
    assert answer == b"" or answer.startswith((b"HTTP/1.0 400", b"HTTP/1.0 413"))
    assert agent.call("/v1/identity")["id"] == "sec-v2"  # still serving


def test_slowloris_client_is_dropped(agents: dict[str, Agent]) -> None:
    agent = agents["v1"]  # idle timeout 1 s, whole request 2 s
    request = f"POST /v1/nonce HTTP/1.1\r\nHost: 127.0.0.1:{agent.port}\r\nX-Padding: {'a' * 400}".encode()
    assert trickle_until_dropped(agent.port, request, connect=agent.tls_socket), (
        "a client trickling one header byte at a time kept its connection"
    )
    with agent.tls_socket() as sock:
        assert sock.recv(1) == b""  # a silent client is dropped at the idle timeout (recv would time out)


def test_excess_connections_get_503(agents: dict[str, Agent]) -> None:
    """Every slot busy with an authenticated request (whose body never comes): a further
    connection gets 503 at once. (Anonymous connections give their slots away instead:
    test_agent_connections.py.)"""
    agent = agents["busy"]  # at most 2 connections at once
    held = [agent.tls_socket() for _ in range(2)]
    try:
        for sock in held:
            signed = sign_request(agent.token, "POST", "/v1/nonce", b"{}", endpoint=f"127.0.0.1:{agent.port}")
            head = "".join(f"{name}: {value}\r\n" for name, value in signed.items())
            sock.sendall(
                f"POST /v1/nonce HTTP/1.1\r\nHost: 127.0.0.1:{agent.port}\r\n{head}"
                "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n".encode()
            )  # and no body
        time.sleep(0.5)  # let the agent read and authenticate both (a newcomer evicts anonymous ones)
        with agent.tls_socket() as extra:
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.0 503") and b"Busy" in answer
    finally:
        for sock in held:
            sock.close()
    for _ in range(200):  # the held slots come back once their handlers see the close
        try:
            assert agent.call("/v1/identity")["id"] == "sec-busy"
            break
        except (AgentError, OSError):
            time.sleep(0.05)
    else:
        raise AssertionError("the agent did not serve again after the held connections closed")


def test_nonce_flood_from_one_caller_does_not_block_another_callers_handoff(agents: dict[str, Agent]) -> None:
    v1, v2 = agents["v1"], agents["v2"]
    first = v1.call("/v1/nonce", {}, caller="flood")["nonce"]
    flood = 16 * MAX_NONCES_PER_CALLER  # far past what one caller may hold (each is a TLS connection)
    with ThreadPoolExecutor(8) as pool:
        nonces = list(pool.map(lambda _: v1.call("/v1/nonce", {}, caller="flood")["nonce"], range(flood)))
    assert len(set(nonces)) == flood

    blob = v1.call("/v1/seal", {"name": "db-key", "data": b64(b"handoff secret"), "policy": "mrenclave"})[
        "blob"
    ]
    nonce = v1.call("/v1/nonce", {})["nonce"]
    attestation = v2.call("/v1/attest", {"nonce": nonce})
    export = {
        "peer_evidence": attestation["evidence"],
        "peer_public_key": attestation["public_key"],
        "nonce": nonce,
        "import_nonce": v2.call("/v1/import-nonce", {})["nonce"],
        "blobs": [blob],
    }
    with pytest.raises(AgentError) as info:  # another caller cannot spend (or burn) this caller's nonce
        v1.call("/v1/export", export, caller="flood")
    assert info.value.status == 403 and info.value.type == "NonceMismatch"
    package = v1.call("/v1/export", export)
    imported = v2.call("/v1/import", {"package": package})["blobs"]
    assert base64.b64decode(v2.call("/v1/unseal", {"blob": imported[0]["blob"]})["data"]) == b"handoff secret"

    # The flooder only evicted its own oldest nonces.
    flood_attestation = v2.call("/v1/attest", {"nonce": first})
    with pytest.raises(AgentError) as info:
        v1.call(
            "/v1/export",
            {
                "peer_evidence": flood_attestation["evidence"],
                "peer_public_key": flood_attestation["public_key"],
                "nonce": first,
                "import_nonce": v2.call("/v1/import-nonce", {})["nonce"],
                "blobs": [],
            },
            caller="flood",
        )
    assert info.value.status == 403 and info.value.type == "NonceMismatch"


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rekey.cli", "--home", str(home), "agent", "call", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_call_presents_the_agents_token(agents: dict[str, Agent]) -> None:
    agent = agents["v1"]
    home = agent.state_dir.parent.parent
    expected = ("--manifest", str(home.parent / "v1.yaml"))  # no store here: the generation it must attest
    result = _cli(home, "/v1/identity", "--url", agent.url, "--generation", "sec-v1", *expected)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == "sec-v1"
    result = _cli(
        home,
        "/v1/nonce",
        "--url",
        agent.url,
        "--generation",
        "sec-v1",
        "--caller",
        "flood",
        "--body",
        "{}",
        *expected,
    )
    assert result.returncode == 0 and len(base64.b64decode(json.loads(result.stdout)["nonce"])) == 32
    wrong = _cli(
        home, "/v1/identity", "--url", agent.url, "--state-dir", str(agents["busy"].state_dir), *expected
    )
    assert wrong.returncode == 1 and "401" in wrong.stderr and agents["busy"].token not in wrong.stderr
    missing = _cli(home, "/v1/identity", "--url", agent.url, "--generation", "no-such-agent")
    assert missing.returncode == 2 and missing.stderr.startswith("error: cannot read the agent token")
    assert _cli(home, "/v1/identity", "--url", agent.url).returncode == 2
