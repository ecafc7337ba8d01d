"""Attested TLS on every agent connection: real ``rekey agent serve`` agents (and, where the test
counts what the server verified, an agent server in this process).

* plain HTTP to the agent's port gets no answer;
* a calling agent whose RA-TLS certificate carries debug evidence, another signer's or a lower
  SVN's is refused in the handshake, and nothing reaches the handler: the very request it
  signed is accepted afterwards over a good connection (a request that had reached the handler
  would have spent its nonce);
* a server presenting such a certificate is refused by the client before anything is sent;
* a good peer passes, and the second connection is served from the verifier's cache;
* evidence copied into a certificate for another key is refused, on either side;
* a serving agent renews its certificate (fresh key, fresh evidence) before the first one ends,
  and a client connecting after that end still gets through; a failed renewal is tried again;
* an agent of another generation than the one expected is a refusal (`AgentUntrusted`), not
  an outage (`AgentDown`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestation.ratls import OID_SIM_EVIDENCE, RatlsIdentity, RatlsVerifier, make_identity
from attestation.sim import SimVerifier
from rekey.agent_auth import AgentClient, AgentCredentialError, sign_request
from rekey.agent_peer import AgentPeer
from rekey.agent_sealer import AgentSealer
from rekey.agent_server import AgentApi, AgentHTTPServer, ServerLimits, make_handler, make_server
from rekey.ratls_transport import (
    RatlsHTTPConnection,
    RatlsRefused,
    RatlsUntrusted,
    open_socket,
    peer_verifier,
    server_expectation,
)
from sealing.agent import EnclaveAgent
from sealing.generation import GenerationManifest, parse_manifest
from sealing.migration import AgentDown, AgentRefused, AgentUntrusted
from sealing.state import EnclaveRefused
from sealing.tee.sim import EnclaveIdentity, SimHost
from tests.fixtures.agent import Agent, start_agents, stop_agents
from tests.fixtures.cli import MANIFEST

pytestmark = pytest.mark.integration

GOOD = MANIFEST | {"id": "tls-v1", "svn": 2}
BAD: dict[str, dict[str, Any]] = {
    "debug": {"debug": True},
    "other signer": {"signer": "99" * 32},
    "lower svn": {"svn": 1},
}
BAD_REASONS = {
    "debug": "debug enclave not allowed",
    "other signer": "signer",
    "lower svn": "below the minimum",
}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    started = start_agents(tmp_path_factory.mktemp("ratls-agents"), {"v1": GOOD}, Agent)
    try:
        yield started["v1"]
    finally:
        stop_agents(started)


def _host(agent: Agent) -> SimHost:
    return SimHost.load(agent.state_dir.parents[2] / "host")


def _identity(host: SimHost, **changes: Any) -> RatlsIdentity:
    """An RA-TLS certificate made by an enclave of ``GOOD`` with ``changes`` on ``host``."""
    manifest = parse_manifest(GOOD | changes)
    return make_identity("sim", host.enclave(EnclaveIdentity.from_manifest(manifest)).report)


def _copied(identity: RatlsIdentity) -> RatlsIdentity:
    """``identity``'s evidence extension in a certificate for a fresh key (not the bound one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    source = x509.load_der_x509_certificate(identity.cert_der)
    extension = next(e for e in source.extensions if e.oid == OID_SIM_EVIDENCE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "copied")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(source.not_valid_before_utc)
        .not_valid_after(source.not_valid_after_utc)
        .add_extension(extension.value, critical=False)
        .sign(key, hashes.SHA256())
    )
    return RatlsIdentity(cert.public_bytes(serialization.Encoding.DER), key, "sim", identity.not_after)


def _signed_identity_request(agent: Agent, identity: RatlsIdentity | None) -> tuple[dict[str, str], Any]:
    """GET /v1/identity signed with the agent's token, sent presenting ``identity`` (None: no
    client certificate): (the signed headers, the (status, body) answer)."""
    headers = sign_request(agent.token, "GET", "/v1/identity", endpoint=f"127.0.0.1:{agent.port}")
    assert agent.expect is not None
    connection = RatlsHTTPConnection("127.0.0.1", agent.port, verifier=agent.expect, identity=identity)
    try:
        connection.request("GET", "/v1/identity", headers=headers)
        response = connection.getresponse()
        return headers, (response.status, json.loads(response.read() or b"{}"))
    finally:
        connection.close()


def test_plain_http_to_the_agent_gets_no_answer(agent: Agent) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, OSError)):
            connection.request("GET", "/v1/identity", headers={"Host": f"127.0.0.1:{agent.port}"})
            connection.getresponse()
    finally:
        connection.close()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        sock.sendall(f"GET /v1/identity HTTP/1.1\r\nHost: 127.0.0.1:{agent.port}\r\n\r\n".encode())
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                answer += chunk
        assert b"HTTP/" not in answer and b"tls-v1" not in answer  # a TLS alert at most, never HTTP
    assert agent.expect is not None
    with pytest.raises(AgentCredentialError, match=re.escape("https://127.0.0.1:PORT")):
        AgentClient(agent.url.replace("https://", "http://"), agent.token, expect=agent.expect)
    assert agent.url.startswith("https://127.0.0.1:")
    assert agent.call("/v1/identity")["id"] == "tls-v1"


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_calling_agent_with_bad_evidence_is_refused_in_the_handshake(agent: Agent, bad: str) -> None:
    host = _host(agent)
    headers = sign_request(agent.token, "GET", "/v1/identity", endpoint=f"127.0.0.1:{agent.port}")
    assert agent.expect is not None
    connection = RatlsHTTPConnection(
        "127.0.0.1", agent.port, verifier=agent.expect, identity=_identity(host, **BAD[bad])
    )
    try:
        with pytest.raises(OSError):  # the agent's alert, on the first read (TLS 1.3)
            connection.request("GET", "/v1/identity", headers=headers)
            connection.getresponse()
    finally:
        connection.close()
    # Nothing reached the handler: the same signed request (its nonce unspent) is served now.
    replay = RatlsHTTPConnection("127.0.0.1", agent.port, verifier=agent.expect)
    try:
        replay.request("GET", "/v1/identity", headers=headers)
        response = replay.getresponse()
        assert response.status == 200, response.read()
        assert json.loads(response.read())["id"] == "tls-v1"
    finally:
        replay.close()


def test_a_good_calling_agent_passes_and_so_does_one_without_a_certificate(agent: Agent) -> None:
    host = _host(agent)
    newer = _identity(host, id="tls-v2", measurement="44" * 32, svn=3)  # a patched generation
    _, (status, body) = _signed_identity_request(agent, newer)
    assert status == 200 and body["id"] == "tls-v1"
    _, (status, body) = _signed_identity_request(agent, None)  # the engine and the CLI show none
    assert status == 200 and body["id"] == "tls-v1"


def test_a_client_certificate_whose_key_is_not_the_bound_one_is_refused(agent: Agent) -> None:
    copied = _copied(_identity(_host(agent)))
    assert agent.expect is not None
    client = AgentClient(agent.url, agent.token, expect=agent.expect, identity=copied)
    with pytest.raises(OSError):
        client.call("/v1/identity")


# ----------------------------------------------------------------------------- in this process


class _Served:
    def __init__(self, server: AgentHTTPServer) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _serve(
    host: SimHost, manifest: GenerationManifest, identity: RatlsIdentity | None = None, *, peers: bool = False
) -> _Served:
    enclave_agent = EnclaveAgent(
        manifest, host.enclave(EnclaveIdentity.from_manifest(manifest)), SimVerifier(host.root_ca_pem())
    )
    verifier = peer_verifier(manifest, [host.root_ca_pem()]) if peers else None
    return _Served(
        make_server(enclave_agent, tokens={"t" * 43: "default"}, identity=identity, peer_verifier=verifier)
    )


@pytest.fixture
def sim_host(tmp_path: Path) -> SimHost:
    return SimHost.load_or_create(tmp_path / "host")


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_server_with_bad_evidence_is_refused_before_anything_is_sent(sim_host: SimHost, bad: str) -> None:
    served = _serve(sim_host, parse_manifest(GOOD | BAD[bad]))
    try:
        expect = server_expectation(parse_manifest(GOOD), [sim_host.root_ca_pem()])
        client = AgentClient(served.server.url, "t" * 43, expect=expect)
        with pytest.raises(RatlsRefused, match=BAD_REASONS[bad]):
            client.call("/v1/identity")
        assert expect.verifications == 1 and expect.cache_hits == 0
    finally:
        served.close()


def test_a_server_whose_certificate_key_is_not_the_bound_one_is_refused(sim_host: SimHost) -> None:
    manifest = parse_manifest(GOOD | {"id": "tls-copied"})
    copied = _copied(_identity(sim_host, id="tls-copied"))
    served = _serve(sim_host, manifest, copied)
    try:
        expect = server_expectation(manifest, [sim_host.root_ca_pem()])
        with pytest.raises(RatlsRefused, match="does not bind this certificate's key"):
            AgentClient(served.server.url, "t" * 43, expect=expect).call("/v1/identity")
    finally:
        served.close()


def test_a_server_of_another_host_is_refused(sim_host: SimHost, tmp_path: Path) -> None:
    other = SimHost.load_or_create(tmp_path / "other-host")
    manifest = parse_manifest(GOOD | {"id": "tls-elsewhere"})
    served = _serve(other, manifest)
    try:
        expect = server_expectation(manifest, [sim_host.root_ca_pem()])
        with pytest.raises(RatlsRefused, match="ChainInvalid"):
            AgentClient(served.server.url, "t" * 43, expect=expect).call("/v1/identity")
    finally:
        served.close()


def test_verified_peers_are_cached_on_both_sides(sim_host: SimHost) -> None:
    manifest = parse_manifest(GOOD | {"id": "tls-cache"})
    served = _serve(sim_host, manifest, peers=True)
    try:
        expect = server_expectation(manifest, [sim_host.root_ca_pem()])
        caller = _identity(sim_host, id="tls-cache-v2", svn=3)
        client = AgentClient(served.server.url, "t" * 43, expect=expect, identity=caller)
        for _ in range(3):
            assert client.call("/v1/identity")["id"] == "tls-cache"
        assert (expect.verifications, expect.cache_hits) == (1, 2)
        peers = peer_verifier(manifest, [sim_host.root_ca_pem()])  # the server's (shared) verifier
        assert (peers.verifications, peers.cache_hits) == (1, 2)
        # A refused caller is refused at every connection (refusals are not cached).
        bad = AgentClient(
            served.server.url, "t" * 43, expect=expect, identity=_identity(sim_host, debug=True)
        )
        for _ in range(2):
            with pytest.raises(OSError):
                bad.call("/v1/identity")
        assert peers.verifications == 3
        deadline = time.monotonic() + 10  # the server counts after it sent its alert
        while served.server.handshakes_refused < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.server.handshakes_refused == 2
    finally:
        served.close()


# ----------------------------------------------------------------------------- renewal, impostors


def _served_certificate(server: AgentHTTPServer, expect: RatlsVerifier) -> bytes:
    """The DER certificate a new connection to ``server`` meets (after passing ``expect``)."""
    opened = open_socket("127.0.0.1", server.server_address[1], verifier=expect, timeout=10)
    try:
        peer = opened.tls.get_peer_certificate()
        assert peer is not None
        return peer.to_cryptography().public_bytes(serialization.Encoding.DER)
    finally:
        opened.close()


def test_a_serving_agent_renews_its_certificate_before_the_first_one_ends(sim_host: SimHost) -> None:
    """Certificates of 3 s here (24 h in use), renewed every 0.5 s (half the lifetime by
    default): a client connecting after the first certificate's end still gets through, and
    meets a new certificate (fresh key, fresh evidence binding it); the first one is refused then."""
    manifest = parse_manifest(GOOD | {"id": "tls-renew"})
    expect = server_expectation(manifest, [sim_host.root_ca_pem()])
    enclave_agent = EnclaveAgent(
        manifest,
        sim_host.enclave(EnclaveIdentity.from_manifest(manifest)),
        SimVerifier(sim_host.root_ca_pem()),
    )
    served = _Served(
        make_server(
            enclave_agent, tokens={"t" * 43: "default"}, cert_lifetime=timedelta(seconds=3), renew_every=0.5
        )
    )
    try:
        first = served.server.identity
        client = AgentClient(served.server.url, "t" * 43, expect=expect)
        assert client.call("/v1/identity")["id"] == "tls-renew"
        while datetime.now(UTC) <= first.not_after + timedelta(milliseconds=200):
            time.sleep(0.05)
        claims, reason = expect.try_verify(first.cert_der)
        assert claims is None and "ChainInvalid" in reason  # the first certificate has ended
        assert client.call("/v1/identity")["id"] == "tls-renew"
        seen = _served_certificate(served.server, expect)
        assert seen != first.cert_der
        assert x509.load_der_x509_certificate(seen).not_valid_after_utc > datetime.now(UTC)
        renewed = served.server.identity
        assert renewed.key_der() != first.key_der() and served.server.renewals >= 2
    finally:
        served.close()


def test_a_renewal_interval_not_shorter_than_the_lifetime_is_refused(sim_host: SimHost) -> None:
    manifest = parse_manifest(GOOD | {"id": "tls-renew-late"})
    enclave_agent = EnclaveAgent(
        manifest,
        sim_host.enclave(EnclaveIdentity.from_manifest(manifest)),
        SimVerifier(sim_host.root_ca_pem()),
    )
    for every in (2.0, 0.0):
        with pytest.raises(ValueError, match="renew_every"):
            make_server(
                enclave_agent,
                tokens={"t" * 43: "default"},
                cert_lifetime=timedelta(seconds=2),
                renew_every=every,
            )


def test_a_failed_renewal_keeps_the_current_certificate_and_is_tried_again(sim_host: SimHost) -> None:
    manifest = parse_manifest(GOOD | {"id": "tls-renew-fails"})
    enclave_agent = EnclaveAgent(
        manifest,
        sim_host.enclave(EnclaveIdentity.from_manifest(manifest)),
        SimVerifier(sim_host.root_ca_pem()),
    )
    first = enclave_agent.ratls_identity()
    attempts: list[int] = []

    def renew() -> RatlsIdentity:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("the enclave is busy")
        return enclave_agent.ratls_identity()

    handler = make_handler(AgentApi(enclave_agent), {"t" * 43: "default"}, (), ServerLimits())
    server = AgentHTTPServer(
        ("127.0.0.1", 0), handler, ServerLimits(), identity=first, renew=renew, renew_every=0.1
    )
    served = _Served(server)
    try:
        expect = server_expectation(manifest, [sim_host.root_ca_pem()])
        deadline = time.monotonic() + 10
        while server.renewals == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(attempts) >= 2 and server.renewals >= 1
        assert _served_certificate(server, expect) != first.cert_der
        assert (
            AgentClient(server.url, "t" * 43, expect=expect).call("/v1/identity")["id"] == "tls-renew-fails"
        )
    finally:
        served.close()
    stopped = len(attempts)
    time.sleep(0.3)
    assert len(attempts) == stopped  # a closed server renews no more


def test_an_agent_of_another_generation_is_a_refusal_not_an_outage(sim_host: SimHost) -> None:
    """A client expecting generation A meets an agent of generation B (same signer and product,
    other code): `AgentUntrusted`, an `AgentRefused` the migration treats as final, with a
    one-line reason; a closed port stays `AgentDown` (an outage, waited for)."""
    expected = parse_manifest(GOOD | {"id": "tls-gen-a"})
    served = _serve(sim_host, parse_manifest(GOOD | {"id": "tls-gen-b", "measurement": "55" * 32}))
    try:
        expect = server_expectation(expected, [sim_host.root_ca_pem()])
        peer = AgentPeer(AgentClient(served.server.url, "t" * 43, expect=expect))
        with pytest.raises(AgentUntrusted) as refused:
            peer.identity()
        message = str(refused.value)
        assert message.startswith(f"the agent at {served.server.url} is not the attested agent expected: ")
        assert "measurement" in message and "\n" not in message and "Errno" not in message
        assert isinstance(refused.value, AgentRefused) and not isinstance(refused.value, AgentDown)
        # Through the same handshake, without AgentPeer: the transport's own type; and for
        # `rekey state put/get --agent` (AgentSealer), a refusal too.
        with pytest.raises(RatlsUntrusted):
            AgentClient(served.server.url, "t" * 43, expect=expect).call("/v1/identity")
        with pytest.raises(EnclaveRefused, match=r"^the agent at .* is not the attested agent expected: "):
            AgentSealer.connect(AgentClient(served.server.url, "t" * 43, expect=expect))
    finally:
        served.close()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"https://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(AgentDown, match="cannot reach"):
        AgentPeer(AgentClient(closed, "t" * 43, expect=expect)).identity()


def test_the_cli_names_an_agent_of_another_generation_in_one_line(agent: Agent, tmp_path: Path) -> None:
    """``rekey agent call`` expecting another build than the real ``serve`` agent runs: exit 1
    and one error line saying so (not "cannot reach"), nothing sent."""
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps(GOOD | {"id": "tls-other", "measurement": "66" * 32}))
    home = agent.state_dir.parents[1]
    result = subprocess.run(
        [
            *(sys.executable, "-m", "rekey.cli", "--home", str(home), "agent", "call", "/v1/identity"),
            *("--url", agent.url, "--state-dir", str(agent.state_dir), "--manifest", str(other)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"the agent at {agent.url} is not the attested agent expected" in lines[0]
    assert "measurement" in lines[0] and "cannot reach" not in lines[0]
