"""SimVerifier: sim evidence verifies against its host's root CA; every bad byte is a typed error."""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.errors import (
    AttestationError,
    ChainInvalid,
    EvidenceSignatureInvalid,
    MalformedEvidence,
)
from attestation.platform import PlatformVerifier
from attestation.sim import SimVerifier
from sealing.tee import sim as sim_tee
from sealing.tee.sim import EnclaveIdentity, SimHost

IDENTITY = EnclaveIdentity(
    measurement=bytes.fromhex("5f" * 32), signer=bytes.fromhex("83" * 32), product_id=1, svn=3
)
REPORT_DATA = hashlib.sha512(b"nonce and key").digest()
PRODUCED = datetime(2026, 11, 27, 12, 0, 0, 250000, tzinfo=UTC)
SIGNATURE_AT = 182  # first byte of the DER signature
SIGNED_BYTES = 180


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> SimHost:
    return SimHost.load_or_create(tmp_path_factory.mktemp("sim") / "host")


@pytest.fixture(scope="module")
def other_host(tmp_path_factory: pytest.TempPathFactory) -> SimHost:
    return SimHost.load_or_create(tmp_path_factory.mktemp("sim") / "other")


@pytest.fixture(scope="module")
def verifier(host: SimHost) -> SimVerifier:
    return SimVerifier(host.root_ca_pem())


@pytest.fixture(scope="module")
def evidence(host: SimHost) -> bytes:
    return host.enclave(IDENTITY).report(REPORT_DATA, at=PRODUCED)


def _now() -> datetime:
    return datetime.now(UTC)


def _flip(data: bytes, at: int, xor: int = 0x01) -> bytes:
    return data[:at] + bytes([data[at] ^ xor]) + data[at + 1 :]


def test_is_a_platform_verifier(verifier: SimVerifier) -> None:
    as_protocol: PlatformVerifier = verifier
    assert as_protocol.platform == "sim"


def test_valid_evidence_verifies(verifier: SimVerifier, evidence: bytes) -> None:
    claims = verifier.verify(evidence, at=_now())
    assert claims.platform == "sim"
    assert claims.measurement == "5f" * 32
    assert claims.signer == "83" * 32
    assert (claims.product_id, claims.svn, claims.debug) == (1, 3, False)
    assert claims.tcb_status == "UpToDate"
    assert claims.report_data == REPORT_DATA.hex()
    assert claims.evidence_digest == hashlib.sha256(evidence).hexdigest()
    assert claims.evidence_time == PRODUCED
    assert claims.evidence_time.tzinfo is not None
    assert claims.cpu_svn == sim_tee.DEFAULT_CPU_SVN.hex()
    assert claims.nonce is None
    assert claims.to_dict()["evidence_time"] == PRODUCED.isoformat()


def test_evidence_time_defaults_to_now(host: SimHost, verifier: SimVerifier) -> None:
    before = _now().replace(microsecond=0)
    claims = verifier.verify(host.enclave(IDENTITY).report(REPORT_DATA), at=_now())
    assert claims.evidence_time is not None
    assert before <= claims.evidence_time <= _now()


def test_debug_bit_and_cpu_svn_are_reflected(host: SimHost, verifier: SimVerifier) -> None:
    debug = EnclaveIdentity(IDENTITY.measurement, IDENTITY.signer, 1, 3, debug=True, cpu_svn=bytes(range(16)))
    claims = verifier.verify(host.enclave(debug).report(REPORT_DATA), at=_now())
    assert claims.debug is True
    assert claims.cpu_svn == bytes(range(16)).hex()


def test_another_hosts_root_is_not_trusted(other_host: SimHost, evidence: bytes) -> None:
    with pytest.raises(ChainInvalid, match="not issued by the configured sim root CA"):
        SimVerifier(other_host.root_ca_pem()).verify(evidence, at=_now())


def test_flipped_signature_byte(verifier: SimVerifier, evidence: bytes) -> None:
    sig_len = struct.unpack(">H", evidence[180:182])[0]
    last_signature_byte = SIGNATURE_AT + sig_len - 1
    with pytest.raises(EvidenceSignatureInvalid):
        verifier.verify(_flip(evidence, last_signature_byte), at=_now())


@pytest.mark.parametrize(
    "offset",
    [8, 39, 40, 72, 74, 76, 92, 108, 171, 179],
    ids=[
        "measurement",
        "measurement-end",
        "signer",
        "product",
        "svn",
        "cpusvn",
        "attrs",
        "rd",
        "rd-end",
        "time",
    ],
)
def test_flipped_body_byte(verifier: SimVerifier, evidence: bytes, offset: int) -> None:
    with pytest.raises(EvidenceSignatureInvalid):
        verifier.verify(_flip(evidence, offset), at=_now())


def test_certificate_validity_is_checked_at_the_given_time(host: SimHost, verifier: SimVerifier) -> None:
    evidence = host.enclave(IDENTITY).report(REPORT_DATA)
    platform = x509.load_der_x509_certificate(host.platform_cert_der)
    verifier.verify(evidence, at=platform.not_valid_after_utc)
    with pytest.raises(ChainInvalid, match="platform certificate is not valid"):
        verifier.verify(evidence, at=platform.not_valid_after_utc + timedelta(seconds=1))
    with pytest.raises(ChainInvalid, match="is not valid at"):  # root and platform start together
        verifier.verify(evidence, at=platform.not_valid_before_utc - timedelta(seconds=1))
    with pytest.raises(ChainInvalid, match="root CA is not valid"):
        verifier.verify(evidence, at=_now() + timedelta(days=3700))
    with pytest.raises(ValueError, match="timezone"):
        verifier.verify(evidence, at=datetime(2027, 1, 1))


def test_chain_cache_key_is_the_platform_certificate(
    host: SimHost, other_host: SimHost, verifier: SimVerifier, evidence: bytes
) -> None:
    other_enclave = host.enclave(EnclaveIdentity(bytes(32), bytes(32), 9, 9))
    assert verifier.chain_cache_key(evidence) == host.platform_cert_der
    assert verifier.chain_cache_key(other_enclave.report(bytes(64))) == host.platform_cert_der
    assert verifier.chain_cache_key(other_host.enclave(IDENTITY).report(bytes(64))) != host.platform_cert_der
    with pytest.raises(MalformedEvidence):
        verifier.chain_cache_key(evidence[:100])


def test_malformed_evidence(verifier: SimVerifier, evidence: bytes) -> None:
    cases = {
        "empty": b"",
        "bad magic": b"XXXX" + evidence[4:],
        "version 2": evidence[:4] + b"\x00\x02" + evidence[6:],
        "reserved": evidence[:6] + b"\x00\x01" + evidence[8:],
        "truncated": evidence[:-1],
        "trailing": evidence + b"\x00",
        "no certificate": evidence[: SIGNATURE_AT + evidence[181]] + b"\x00\x00",
        "certificate not DER": evidence[: SIGNATURE_AT + evidence[181]] + b"\x00\x04" + b"\x30\x02\x01\x00",
    }
    for label, case in cases.items():
        with pytest.raises(MalformedEvidence):
            print(label)
            verifier.verify(case, at=_now())


def _reissue(
    host: SimHost,
    evidence: bytes,
    *,
    ca: bool = False,
    usage: bool = True,
    curve: ec.EllipticCurve | None = None,
) -> bytes:
    """The same signed body, signed again by a new platform key whose certificate the host's root
    issues with the given (bad) properties."""
    root_key = serialization.load_pem_private_key(
        (host.host_dir / sim_tee.ROOT_CA_KEY_FILE).read_bytes(), password=None
    )
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    root = x509.load_pem_x509_certificate(host.root_ca_pem())
    key = ec.generate_private_key(curve or ec.SECP256R1())
    now = datetime.now(UTC) - timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "rogue")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(usage, False, False, False, False, not usage, False, False, False), critical=True
        )
        .sign(root_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    signed = evidence[:SIGNED_BYTES]
    signature = key.sign(signed, ec.ECDSA(hashes.SHA256()))
    return signed + struct.pack(">H", len(signature)) + signature + struct.pack(">H", len(cert)) + cert


def test_certificate_constraints(host: SimHost, verifier: SimVerifier, evidence: bytes) -> None:
    assert verifier.verify(_reissue(host, evidence), at=_now()).svn == 3  # the helper is sound
    with pytest.raises(ChainInvalid, match="CA certificate"):
        verifier.verify(_reissue(host, evidence, ca=True), at=_now())
    with pytest.raises(ChainInvalid, match="digital signatures"):
        verifier.verify(_reissue(host, evidence, usage=False), at=_now())
    with pytest.raises(ChainInvalid, match="P-256"):
        verifier.verify(_reissue(host, evidence, curve=ec.SECP384R1()), at=_now())


def test_root_must_be_a_ca(host: SimHost) -> None:
    platform_pem = x509.load_der_x509_certificate(host.platform_cert_der).public_bytes(
        serialization.Encoding.PEM
    )
    with pytest.raises(ValueError):
        SimVerifier(platform_pem)
    with pytest.raises(ValueError):
        SimVerifier(b"not a certificate")


def test_a_certificate_with_padded_signature_bits_is_refused(tmp_path: Path) -> None:
    # The unused-bits byte of the signature BIT STRING changed 0 -> 1: the parser still reads
    # the same signature when its last bit is 0, so the changed certificate used to verify.
    for attempt in range(40):
        host = SimHost.load_or_create(tmp_path / f"host-{attempt}")
        cert_der = host.platform_cert_der
        signature = x509.load_der_x509_certificate(cert_der).signature
        if signature[-1] % 2 == 0:
            break
    else:
        pytest.fail("no host with an even last signature byte in 40 tries")
    unused_bits = len(cert_der) - len(signature) - 1
    assert cert_der[unused_bits] == 0
    padded = _flip(cert_der, unused_bits)
    assert x509.load_der_x509_certificate(padded).signature == signature  # the parser's view
    evidence = host.enclave(IDENTITY).report(REPORT_DATA)
    tampered = evidence.replace(cert_der, padded)
    verifier = SimVerifier(host.root_ca_pem())
    verifier.verify(evidence, at=_now())
    with pytest.raises(ChainInvalid, match="not a whole number of bytes"):
        verifier.verify(tampered, at=_now())


# A flipped serial number parses with a deprecation warning today (an error in later releases).
@pytest.mark.filterwarnings("ignore:Parsed a serial number")
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_truncations_and_byte_changes_raise_only_attestation_errors(
    verifier: SimVerifier, evidence: bytes, data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(["truncate", "flip", "flip-many"]), label="kind")
    if kind == "truncate":
        mutated = evidence[: data.draw(st.integers(0, len(evidence) - 1), label="length")]
    else:
        mutated = evidence
        for _ in range(1 if kind == "flip" else data.draw(st.integers(2, 8), label="count")):
            at = data.draw(st.integers(0, len(evidence) - 1), label="offset")
            mutated = _flip(mutated, at, data.draw(st.integers(1, 255), label="xor"))
    try:
        verifier.verify(mutated, at=_now())
    except AttestationError:
        return
    # Flips that cancel out (the same byte changed back) leave valid evidence.
    assert mutated == evidence
