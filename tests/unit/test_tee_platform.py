"""The enclave interface (sealing.tee.platform): a platform module writes only its own parts.

Two toy platforms show it: ``toy`` has a sealing key (its whole module is identity, evidence and
key derivation; seal and unseal are the interface's), ``nokey`` has none (like TDX and Nitro) and
still attests through the agent while sealing refuses with a typed error.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import ClassVar

import pytest

from attestation.claims import Claims
from sealing import envelope
from sealing.agent import EnclaveAgent
from sealing.envelope import SealingPolicy
from sealing.errors import SealingError
from sealing.generation import parse_manifest
from sealing.tee.platform import (
    Enclave,
    PlatformIdentity,
    SealingUnsupported,
    SealKeyMismatch,
    SealKeyRefused,
    SealPolicyName,
    check_report_data,
)
from sealing.tee.sim import EnclaveIdentity, SimHost

SECRET = b"toy state"
SIM_IDENTITY = EnclaveIdentity(b"\x11" * 32, b"\xaa" * 32, 3, 1)
HARDWARE_SECRET = os.urandom(32)


@dataclass(frozen=True)
class ToyIdentity(PlatformIdentity):
    platform: ClassVar[str] = "toy"


@dataclass(frozen=True)
class ToyKeyRequest:
    policy: SealPolicyName
    svn: int

    def encode(self) -> bytes:
        return self.policy.encode() + b"|%d" % self.svn

    @classmethod
    def decode(cls, raw: bytes) -> ToyKeyRequest:
        policy, _, svn = raw.partition(b"|")
        if policy not in (b"mrenclave", b"mrsigner") or not svn.isdigit():
            raise ValueError("not a toy key request")
        return cls("mrenclave" if policy == b"mrenclave" else "mrsigner", int(svn))


class ToyEnclave(Enclave[ToyKeyRequest]):
    """Everything a sealing platform writes: identity, evidence, key requests and derivation."""

    can_seal: ClassVar[bool] = True

    def __init__(self, identity: ToyIdentity) -> None:
        self._identity = identity

    @property
    def identity(self) -> ToyIdentity:
        return self._identity

    def report(self, report_data: bytes) -> bytes:
        check_report_data(report_data)
        return b"TOY" + self._identity.measurement + report_data

    def new_key_request(self, policy: SealPolicyName) -> ToyKeyRequest:
        return ToyKeyRequest(policy, self._identity.svn)

    def decode_key_request(self, raw: bytes) -> ToyKeyRequest:
        return ToyKeyRequest.decode(raw)

    def seal_key(self, request: ToyKeyRequest) -> bytes:
        if request.svn > self._identity.svn:
            raise SealKeyRefused(f"key request for svn {request.svn} is above this enclave's svn")
        ident = self._identity
        bound = ident.measurement if request.policy == "mrenclave" else ident.signer
        return hmac.digest(HARDWARE_SECRET, request.encode() + bound + bytes([ident.debug]), "sha256")


class NoKeyEnclave(Enclave[ToyKeyRequest]):
    """A platform without a hardware sealing key (TDX, Nitro): identity and evidence only."""

    def __init__(self, identity: ToyIdentity) -> None:
        self._identity = identity

    @property
    def identity(self) -> ToyIdentity:
        return self._identity

    def report(self, report_data: bytes) -> bytes:
        check_report_data(report_data)
        return b"NOKEY" + report_data


V1 = ToyIdentity(measurement=b"\x11" * 48, signer=b"\xaa" * 48, product_id=3, svn=1)
V2 = ToyIdentity(measurement=b"\x22" * 48, signer=b"\xaa" * 48, product_id=3, svn=2)


def _seal(enclave: Enclave[ToyKeyRequest], policy: SealPolicyName) -> bytes:
    return enclave.seal(SECRET, policy, namespace="ns", name="item", generation="gen-1")


def test_a_platform_module_gets_sealing_from_the_interface() -> None:
    blob = _seal(ToyEnclave(V1), "mrsigner")
    parsed = envelope.parse(blob)
    assert parsed.header.key_ref == "tee:toy" and parsed.header.policy is SealingPolicy.TEE_MRSIGNER
    assert parsed.header.key_request == b"mrsigner|1" and parsed.wrapped_dek.startswith(b"tee:v1:")
    assert SECRET not in blob
    assert ToyEnclave(V1).unseal(blob) == SECRET
    assert ToyEnclave(V2).unseal(blob) == SECRET  # same signer, higher svn


def test_the_shared_unseal_reports_identity_and_refusal_errors() -> None:
    with pytest.raises(SealKeyMismatch, match="mrenclave policy: another measurement"):
        ToyEnclave(V2).unseal(_seal(ToyEnclave(V1), "mrenclave"))
    with pytest.raises(SealKeyRefused):
        ToyEnclave(V1).unseal(_seal(ToyEnclave(V2), "mrsigner"))
    debug = ToyIdentity(V1.measurement, V1.signer, V1.product_id, V1.svn, debug=True)
    with pytest.raises(SealKeyMismatch):
        ToyEnclave(debug).unseal(_seal(ToyEnclave(V1), "mrenclave"))


def test_blobs_do_not_cross_platforms(tmp_path: Path) -> None:
    sim = SimHost.load_or_create(tmp_path / "host").enclave(SIM_IDENTITY)
    with pytest.raises(SealingError):
        ToyEnclave(V1).unseal(sim.seal(SECRET, "mrsigner", namespace="n", name="x", generation="g"))
    with pytest.raises(SealingError):
        sim.unseal(_seal(ToyEnclave(V1), "mrsigner"))


def test_a_platform_without_a_sealing_key_attests_but_does_not_seal() -> None:
    enclave = NoKeyEnclave(V1)
    assert not enclave.can_seal and enclave.platform == "toy"
    for call in (
        lambda: _seal(enclave, "mrsigner"),
        lambda: enclave.unseal(_seal(ToyEnclave(V1), "mrsigner")),
        lambda: enclave.seal_key(ToyKeyRequest("mrsigner", 1)),
    ):
        with pytest.raises(SealingUnsupported, match="no hardware sealing key"):
            call()
    assert issubclass(SealingUnsupported, SealingError)

    manifest = parse_manifest(
        {
            "id": "nokey-v1",
            "platform": "tdx",
            "measurement": "11" * 48,
            "signer": "aa" * 48,
            "product_id": 3,
            "svn": 1,
        }
    )
    agent = EnclaveAgent(manifest, enclave, _NoVerifier())
    attestation = agent.attest(b"nonce")
    assert attestation.evidence.startswith(b"NOKEY") and len(attestation.evidence) == 5 + 64
    with pytest.raises(SealingUnsupported):
        agent.seal(namespace="ns", name="item", data=SECRET, policy="mrsigner")


class _NoVerifier:
    platform = "tdx"

    def verify(self, evidence: bytes, *, at: datetime) -> Claims:
        raise AssertionError("not called")

    def chain_cache_key(self, evidence: bytes) -> bytes:
        return hashlib.sha256(evidence).digest()


@pytest.mark.parametrize("report_data", [b"", bytes(63), bytes(65), "x" * 64])
def test_report_data_is_64_bytes(report_data: object) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        check_report_data(report_data)
    check_report_data(bytes(64))


def test_the_sim_is_one_implementation(tmp_path: Path) -> None:
    enclave = SimHost.load_or_create(tmp_path / "host").enclave(SIM_IDENTITY)
    assert isinstance(enclave, Enclave) and enclave.can_seal and enclave.platform == "sim"
    assert isinstance(enclave.identity, PlatformIdentity) and enclave.identity.platform == "sim"


def test_a_sealing_key_must_be_32_bytes() -> None:
    class ShortKeyEnclave(ToyEnclave):
        def seal_key(self, request: ToyKeyRequest) -> bytes:
            return super().seal_key(request)[:16]  # e.g. a raw 16-byte SGX key

    with pytest.raises(SealingError, match="16-byte sealing key"):
        _seal(ShortKeyEnclave(V1), "mrsigner")


def test_identity_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="measurement"):
        ToyIdentity(measurement=b"", signer=b"\xaa", product_id=1, svn=1)
    with pytest.raises(ValueError, match="svn"):
        ToyIdentity(measurement=b"\x11", signer=b"\xaa", product_id=1, svn=-1)
    with pytest.raises(ValueError, match="debug"):
        ToyIdentity(measurement=b"\x11", signer=b"\xaa", product_id=1, svn=1, debug=1)  # type: ignore[arg-type]
