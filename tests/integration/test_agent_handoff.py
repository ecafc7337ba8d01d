"""The patch scenario from operators' reports, with real agent processes over HTTP.

Generation v1 (svn 1) seals state; a patched v2 (new measurement, svn 2) cannot unseal the
MRENCLAVE-sealed part, can unseal the MRSIGNER-sealed part, and receives the MRENCLAVE part
through an attested export/import. Exports to a debug enclave, another signer or a lower SVN
are refused with the reason.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from attestation.sim import SimVerifier
from sealing.generation import GenerationManifest
from sealing.tee.sim import EnclaveIdentity, SimHost
from tests.fixtures.agent import Agent, AgentError, start_agents, stop_agents

pytestmark = pytest.mark.integration

SIGNER = "83" * 32
BASE = {"platform": "sim", "signer": SIGNER, "product_id": 1, "debug": False, "tcb": "UpToDate"}
GENERATIONS = {
    "v1": BASE | {"id": "v1", "measurement": "a1" * 32, "svn": 1},
    "v2": BASE | {"id": "v2", "measurement": "b2" * 32, "svn": 2},
    "v2-debug": BASE | {"id": "v2-debug", "measurement": "c3" * 32, "svn": 2, "debug": True},
    "v2-other-signer": BASE
    | {"id": "v2-other-signer", "measurement": "d4" * 32, "svn": 2, "signer": "99" * 32},
    "v0": BASE | {"id": "v0", "measurement": "e5" * 32, "svn": 0},
}


class AgentApi(Agent):
    """The agent calls of the handoff scenario, each presenting the agent's token."""

    def seal(self, name: str, data: bytes, policy: str) -> str:
        return str(self.call("/v1/seal", {"name": name, "data": b64(data), "policy": policy})["blob"])

    def unseal(self, blob: str) -> bytes:
        return base64.b64decode(self.call("/v1/unseal", {"blob": blob})["data"])

    def nonce(self) -> str:
        return str(self.call("/v1/nonce", {})["nonce"])

    def attest(self, nonce: str) -> dict[str, Any]:
        return self.call("/v1/attest", {"nonce": nonce})

    def import_nonce(self) -> str:
        return str(self.call("/v1/import-nonce", {})["nonce"])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentApi]]:
    started = start_agents(tmp_path_factory.mktemp("agents"), GENERATIONS, AgentApi)
    try:
        yield started
    finally:
        stop_agents(started)


def test_identity(agents: dict[str, AgentApi]) -> None:
    identity = agents["v2"].call("/v1/identity")
    assert identity["id"] == "v2" and identity["svn"] == 2
    assert identity["handoff_suite"].startswith("MLKEM768-X25519")


def test_patched_enclave_cannot_unseal_mrenclave_state(agents: dict[str, AgentApi]) -> None:
    blob = agents["v1"].seal("db-key", b"v1 mrenclave secret", "mrenclave")
    assert agents["v1"].unseal(blob) == b"v1 mrenclave secret"
    with pytest.raises(AgentError) as info:
        agents["v2"].unseal(blob)
    assert info.value.status == 422
    assert info.value.type in ("SealKeyMismatch", "TamperedBlob")
    assert "secret" not in info.value.message


def test_mrsigner_state_moves_up_not_down(agents: dict[str, AgentApi]) -> None:
    v1_blob = agents["v1"].seal("config", b"signer-bound secret", "mrsigner")
    assert agents["v2"].unseal(v1_blob) == b"signer-bound secret"
    v2_blob = agents["v2"].seal("config", b"v2 signer-bound secret", "mrsigner")
    with pytest.raises(AgentError) as info:
        agents["v1"].unseal(v2_blob)
    assert info.value.status == 422 and info.value.type == "SealKeyRefused"
    assert "svn 2" in info.value.message


def test_handoff_moves_mrenclave_state_to_the_patched_generation(agents: dict[str, AgentApi]) -> None:
    v1, v2 = agents["v1"], agents["v2"]
    secrets_ = {"db-key": b"\x00\x01 sealed by v1", "tls-key": b"-----BEGIN KEY----- v1"}
    blobs = [v1.seal(name, data, "mrenclave") for name, data in secrets_.items()]
    nonce = v1.nonce()
    attestation = v2.attest(nonce)
    package = v1.call(
        "/v1/export",
        {
            "peer_evidence": attestation["evidence"],
            "peer_public_key": attestation["public_key"],
            "nonce": nonce,
            "import_nonce": v2.import_nonce(),
            "blobs": blobs,
        },
    )
    text = json.dumps(package)
    for data in secrets_.values():
        assert b64(data) not in text and data.decode(errors="ignore") not in text
    imported = v2.call("/v1/import", {"package": package})["blobs"]
    assert [item["name"] for item in imported] == list(secrets_)
    for item, data in zip(imported, secrets_.values(), strict=True):
        assert v2.unseal(item["blob"]) == data
        with pytest.raises(AgentError):
            v1.unseal(item["blob"])  # resealed under v2's MRENCLAVE

    # The nonce was single use: replaying the same evidence is refused.
    with pytest.raises(AgentError) as info:
        v1.call(
            "/v1/export",
            {
                "peer_evidence": attestation["evidence"],
                "peer_public_key": attestation["public_key"],
                "nonce": nonce,
                "import_nonce": v2.import_nonce(),
                "blobs": blobs,
            },
        )
    assert info.value.status == 403 and info.value.type == "NonceMismatch"


@pytest.mark.parametrize(
    ("peer", "reason"),
    [
        ("v2-debug", "debug enclave not allowed"),
        ("v2-other-signer", "signer"),
        ("v0", "svn 0 is below this enclave's svn 1"),
    ],
)
def test_export_refused_with_reason(agents: dict[str, AgentApi], peer: str, reason: str) -> None:
    v1 = agents["v1"]
    blob = v1.seal("db-key", b"never leaves", "mrenclave")
    nonce = v1.nonce()
    attestation = agents[peer].attest(nonce)
    with pytest.raises(AgentError) as info:
        v1.call(
            "/v1/export",
            {
                "peer_evidence": attestation["evidence"],
                "peer_public_key": attestation["public_key"],
                "nonce": nonce,
                "import_nonce": agents[peer].import_nonce(),
                "blobs": [blob],
            },
        )
    assert info.value.status == 403 and info.value.type == "PolicyDenied"
    assert any(reason in r for r in info.value.reasons), info.value.reasons


def test_evidence_bound_to_another_key_is_refused(agents: dict[str, AgentApi]) -> None:
    v1, v2 = agents["v1"], agents["v2"]
    nonce = v1.nonce()
    attestation = v2.attest(nonce)
    impostor_key = agents["v2-debug"].attest(v1.nonce())["public_key"]
    with pytest.raises(AgentError) as info:
        v1.call(
            "/v1/export",
            {
                "peer_evidence": attestation["evidence"],
                "peer_public_key": impostor_key,
                "nonce": nonce,
                "import_nonce": v2.import_nonce(),
                "blobs": [],
            },
        )
    assert info.value.status == 403 and info.value.type == "NonceMismatch"


def test_import_refuses_a_package_for_another_agent(agents: dict[str, AgentApi]) -> None:
    v1, v2 = agents["v1"], agents["v2"]
    nonce = v1.nonce()
    attestation = v2.attest(nonce)
    package = v1.call(
        "/v1/export",
        {
            "peer_evidence": attestation["evidence"],
            "peer_public_key": attestation["public_key"],
            "nonce": nonce,
            "import_nonce": v2.import_nonce(),
            "blobs": [v1.seal("x", b"y", "mrenclave")],
        },
    )
    with pytest.raises(AgentError) as info:
        agents["v2-other-signer"].call("/v1/import", {"package": package})
    assert info.value.status == 422 and "another agent" in info.value.message
    tampered = json.loads(json.dumps(package))
    tampered["items"][0]["name"] = "renamed"
    with pytest.raises(AgentError) as info:
        v2.call("/v1/import", {"package": tampered})
    assert info.value.status in (403, 422)


def _handoff_package(
    agents: dict[str, AgentApi], import_nonce: str, data: bytes = b"handoff me"
) -> dict[str, Any]:
    """v1 exports one MRENCLAVE-sealed secret to v2, binding ``import_nonce``."""
    v1, v2 = agents["v1"], agents["v2"]
    nonce = v1.nonce()
    attestation = v2.attest(nonce)
    return v1.call(
        "/v1/export",
        {
            "peer_evidence": attestation["evidence"],
            "peer_public_key": attestation["public_key"],
            "nonce": nonce,
            "import_nonce": import_nonce,
            "blobs": [v1.seal("replayed", data, "mrenclave")],
        },
    )


def test_a_recorded_package_imports_only_once(agents: dict[str, AgentApi]) -> None:
    """Issue 12 finding 8: replaying a recorded package must not reseal its secrets again."""
    v2 = agents["v2"]
    package = _handoff_package(agents, v2.import_nonce(), b"old secret")
    imported = v2.call("/v1/import", {"package": package})["blobs"]
    assert v2.unseal(imported[0]["blob"]) == b"old secret"
    with pytest.raises(AgentError) as info:
        v2.call("/v1/import", {"package": package})
    assert info.value.status == 403 and info.value.type == "NonceMismatch"
    assert "already used" in info.value.message


def test_a_package_must_bind_a_nonce_the_importer_issued(agents: dict[str, AgentApi]) -> None:
    v2 = agents["v2"]
    # A nonce v2 never issued (an attacker's own, or one from another agent) does not import.
    foreign = _handoff_package(agents, agents["v2-debug"].import_nonce())
    with pytest.raises(AgentError) as info:
        v2.call("/v1/import", {"package": foreign})
    assert info.value.status == 403 and info.value.type == "NonceMismatch"
    # Swapping a fresh, genuine import nonce into a recorded package breaks the exporter's evidence.
    recorded = _handoff_package(agents, v2.import_nonce())
    v2.call("/v1/import", {"package": recorded})
    relabelled = recorded | {"import_nonce": v2.import_nonce()}
    with pytest.raises(AgentError) as info:
        v2.call("/v1/import", {"package": relabelled})
    assert info.value.status == 403 and info.value.type == "NonceMismatch"
    assert "does not bind" in info.value.message
    # A package without an import nonce (the version 1 format) is refused.
    legacy = {k: v for k, v in recorded.items() if k != "import_nonce"} | {"version": 1}
    with pytest.raises(AgentError) as info:
        v2.call("/v1/import", {"package": legacy})
    assert info.value.status == 422 and "version 2" in info.value.message
    with pytest.raises(AgentError) as info:
        agents["v1"].call(
            "/v1/export",
            {"peer_evidence": "", "peer_public_key": "", "nonce": agents["v1"].nonce(), "blobs": []},
        )
    assert info.value.status == 400 and "import_nonce" in info.value.message


def _forge_exporter_evidence(agent: AgentApi, genuine: bytes, at: datetime) -> bytes:
    """Evidence from the same (simulated) host and the same enclave identity as ``genuine``, over
    the same report data, but dated ``at``: what a pre-recorded future-dated package would carry."""
    args = [str(arg) for arg in agent.process.args]  # type: ignore[union-attr]
    host = SimHost.load_or_create(Path(args[args.index("--host-dir") + 1]))
    claims = SimVerifier(host.root_ca_pem()).verify(genuine, at=datetime.now(UTC))
    manifest = GenerationManifest.model_validate(GENERATIONS["v1"])
    enclave = host.enclave(EnclaveIdentity.from_manifest(manifest))
    return enclave.report(bytes.fromhex(claims.report_data), at=at)


@pytest.mark.parametrize(("ahead", "accepted"), [(timedelta(0), True), (timedelta(hours=1), False)])
def test_future_dated_exporter_evidence_is_refused(
    agents: dict[str, AgentApi], ahead: timedelta, accepted: bool
) -> None:
    v2 = agents["v2"]
    package = _handoff_package(agents, v2.import_nonce())
    genuine = base64.b64decode(package["exporter_evidence"])
    forged = _forge_exporter_evidence(agents["v1"], genuine, datetime.now(UTC) + ahead)
    package["exporter_evidence"] = b64(forged)
    if accepted:  # the forgery itself is sound: only its date is refused
        assert len(v2.call("/v1/import", {"package": package})["blobs"]) == 1
        return
    with pytest.raises(AgentError) as info:
        v2.call("/v1/import", {"package": package})
    assert info.value.status == 403 and info.value.type == "PolicyDenied"
    assert any("future" in reason for reason in info.value.reasons), info.value.reasons


def test_bad_requests_are_typed(agents: dict[str, AgentApi]) -> None:
    v1 = agents["v1"]
    with pytest.raises(AgentError) as info:
        v1.call("/v1/unseal", {"blob": "not base64!"})
    assert info.value.status == 400
    with pytest.raises(AgentError) as info:
        v1.call("/v1/unseal", {"blob": b64(b"RKSB\x01")})
    assert info.value.status == 422 and info.value.type == "TruncatedBlob"
    with pytest.raises(AgentError) as info:
        v1.call("/v1/seal", {"name": "x", "data": b64(b"d"), "policy": "none"})
    assert info.value.status == 400
    for field, bad in (("name", "a\nb"), ("name", "x" * 1000), ("namespace", "../etc"), ("name", "..")):
        with pytest.raises(AgentError) as info:
            v1.call("/v1/seal", {"name": "x", field: bad, "data": b64(b"d")})
        assert (info.value.status, info.value.type) == (400, "InvalidName")
    with pytest.raises(AgentError) as info:
        v1.call("/v1/nowhere", {})
    assert info.value.status == 404
