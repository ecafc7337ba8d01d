"""RA-TLS certificates (attestation/ratls.py): the evidence extension round trip per platform,
the key binding, the verifier's decision and cache, and hostile certificate bytes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestation.errors import (
    AttestationError,
    ChainInvalid,
    EvidenceSignatureInvalid,
    MalformedEvidence,
    NonceMismatch,
    PolicyDenied,
)
from attestation.platform import PlatformVerifier
from attestation.policy import parse_policy
from attestation.ratls import (
    OID_CMW,
    OID_SGX_QUOTE,
    OID_SIM_EVIDENCE,
    OID_TDX_QUOTE,
    RatlsIdentity,
    RatlsVerifier,
    check_binding,
    evidence_from_certificate,
    make_identity,
    report_data_for,
)
from attestation.sim import SimVerifier
from sealing.generation import parse_manifest
from sealing.tee.sim import EnclaveIdentity, SimHost
from tests.fixtures.cli import MANIFEST

VECTORS = Path(__file__).resolve().parents[2] / "vectors"
# Real evidence of each platform, carried as opaque bytes (the extension does not interpret it).
SAMPLES = {
    "sgx": VECTORS / "sgx" / "dcapqvl_sgx_quote_v3.dat",
    "tdx": VECTORS / "tdx" / "dcapqvl_tdx_quote_v4.dat",
    "sev-snp": VECTORS / "sev-snp" / "gosevguest_milan_attestation.bin",
    "nitro": VECTORS / "nitro" / "evervault_beta_valid_attestation_doc.cbor",
}
OIDS = {"sgx": OID_SGX_QUOTE, "tdx": OID_TDX_QUOTE, "sev-snp": OID_CMW, "nitro": OID_CMW}
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _extension_oids(cert_der: bytes) -> list[x509.ObjectIdentifier]:
    return [e.oid for e in x509.load_der_x509_certificate(cert_der).extensions]


@pytest.mark.parametrize("platform", sorted(SAMPLES))
def test_real_evidence_round_trips_under_its_platforms_oid(platform: str) -> None:
    evidence = SAMPLES[platform].read_bytes()
    seen: list[bytes] = []

    def report(report_data: bytes) -> bytes:
        seen.append(report_data)
        return evidence

    identity = make_identity(platform, report, now=NOW)
    assert evidence_from_certificate(identity.cert_der) == (platform, evidence)
    assert OIDS[platform] in _extension_oids(identity.cert_der)
    spki = identity.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert seen == [report_data_for(spki)] and len(seen[0]) == 64 and seen[0][32:] == bytes(32)
    cert = x509.load_der_x509_certificate(identity.cert_der)
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert cert.not_valid_after_utc == NOW + timedelta(hours=24) == identity.not_after
    assert not cert.extensions.get_extension_for_oid(OIDS[platform]).critical
    assert "key" not in repr(identity).lower().replace("ratlsidentity", "")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> SimHost:
    return SimHost.load_or_create(tmp_path_factory.mktemp("ratls-host") / "host")


def _sim_identity(host: SimHost, **changes: object) -> RatlsIdentity:
    manifest = parse_manifest(MANIFEST | changes)
    return make_identity("sim", host.enclave(EnclaveIdentity.from_manifest(manifest)).report)


def _verifier(host: SimHost, **rule: object) -> RatlsVerifier:
    manifest = parse_manifest(MANIFEST)
    policy = parse_policy(
        {
            "id": "ratls-test",
            "rules": [
                {
                    "platform": "sim",
                    "signer": manifest.signer,
                    "product_id": manifest.product_id,
                    "min_svn": manifest.svn,
                    "nonce_required": False,
                }
                | rule
            ],
        }
    )
    sim = SimVerifier(host.root_ca_pem())

    def verifier_for(platform: str, _evidence: bytes) -> PlatformVerifier:
        if platform != "sim":
            raise ValueError(platform)
        return sim

    return RatlsVerifier(policy, verifier_for)


def test_sim_certificate_verifies_and_is_cached(host: SimHost) -> None:
    identity = _sim_identity(host)
    assert OID_SIM_EVIDENCE in _extension_oids(identity.cert_der)
    verifier = _verifier(host)
    claims = verifier.verify(identity.cert_der)
    assert claims.signer == MANIFEST["signer"] and not claims.debug
    assert verifier.verify(identity.cert_der) == claims
    assert (verifier.verifications, verifier.cache_hits) == (1, 1)
    _verifier_again = _verifier(host)  # another verifier has its own cache
    _verifier_again.verify(identity.cert_der)
    assert _verifier_again.verifications == 1


def test_cache_ends_with_the_rules_evidence_age(host: SimHost) -> None:
    identity = _sim_identity(host)
    clock = [datetime.now(UTC)]
    verifier = _verifier(host, max_evidence_age="1m")
    verifier._clock = lambda: clock[0]  # the verifier's time, moved by the test
    verifier.verify(identity.cert_der)
    clock[0] += timedelta(seconds=61)
    with pytest.raises(PolicyDenied, match="older than the maximum"):
        verifier.verify(identity.cert_der)
    assert verifier.verifications == 2 and verifier.cache_hits == 0


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"debug": True}, "debug enclave not allowed"),
        ({"signer": "99" * 32}, "signer"),
        ({"svn": 0}, "below the minimum"),
    ],
)
def test_debug_other_signer_and_lower_svn_are_denied(
    host: SimHost, changes: dict[str, object], reason: str
) -> None:
    verifier = _verifier(host)
    with pytest.raises(PolicyDenied, match=reason):
        verifier.verify(_sim_identity(host, **changes).cert_der)
    assert verifier.cache_hits == 0


def _recertify(identity: RatlsIdentity, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    """The same evidence extension in a certificate for another key (self-signed with it)."""
    other = key or ec.generate_private_key(ec.SECP256R1())
    source = x509.load_der_x509_certificate(identity.cert_der)
    extension = next(e for e in source.extensions if e.oid == OID_SIM_EVIDENCE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "copied")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(other.public_key())
        .serial_number(1)
        .not_valid_before(source.not_valid_before_utc)
        .not_valid_after(source.not_valid_after_utc)
        .add_extension(extension.value, critical=False)
        .sign(other, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_evidence_copied_into_another_keys_certificate_is_refused(host: SimHost) -> None:
    identity = _sim_identity(host)
    copied = _recertify(identity)
    assert evidence_from_certificate(copied) == evidence_from_certificate(identity.cert_der)
    verifier = _verifier(host)
    with pytest.raises(NonceMismatch, match="does not bind this certificate's key"):
        verifier.verify(copied)
    claims = verifier.verify(identity.cert_der)
    with pytest.raises(NonceMismatch):
        check_binding(copied, claims)


def test_a_certificate_not_signed_by_its_own_key_is_refused(host: SimHost) -> None:
    identity = _sim_identity(host)
    der = bytearray(identity.cert_der)
    der[-5] ^= 0x01  # inside the certificate's signature value
    with pytest.raises((EvidenceSignatureInvalid, MalformedEvidence)):
        _verifier(host).verify(bytes(der))


def test_expired_certificate_is_refused(host: SimHost) -> None:
    manifest = parse_manifest(MANIFEST)
    enclave = host.enclave(EnclaveIdentity.from_manifest(manifest))
    old = make_identity("sim", enclave.report, now=datetime.now(UTC) - timedelta(hours=25))
    with pytest.raises(ChainInvalid, match="not valid at"):
        _verifier(host).verify(old.cert_der)


def test_every_mutation_of_a_good_certificate_is_refused_with_a_typed_error(host: SimHost) -> None:
    """Every 8th byte of the DER and the bytes of the first and last 16 (the outer header, the
    signature's end), each flipped: never accepted, never anything but an AttestationError."""
    der = _sim_identity(host).cert_der
    verifier = _verifier(host)
    verifier._cache_size = 0  # every mutation verified in full
    positions = sorted({*range(0, len(der), 8), *range(16), *range(len(der) - 16, len(der))})
    for position in positions:
        mutated = bytearray(der)
        mutated[position] ^= 0x5A
        with pytest.raises(AttestationError):
            verifier.verify(bytes(mutated))


def _with_extensions(*extensions: x509.UnrecognizedExtension) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"", "the SEQUENCE is missing"),
        (b"\x30", "the SEQUENCE is missing"),
        (b"\x30\x05\x0c\x07sev", "truncated"),
        (b"\x30\x84\xff\xff\xff\xff", "truncated"),
        (b"\x30\x81\x05\x0c\x01x\x04\x00", "not minimal"),
        (b"\x30\x80\x00\x00", "bad length"),
        (b"\x30\x07\x0c\x03sgx\x04\x00", "no known platform"),  # sgx has its own OID
        (b"\x30\x07\x0c\x03xyz\x04\x00", "no known platform"),
        (b"\x30\x06\x0c\x02\xff\xfe\x04\x00", "no known platform"),
        (b"\x30\x04\x04\x02ab", "the platform name is missing"),
        (b"\x30\x05\x0c\x03sim", "the evidence is missing"),
        (b"\x30\x0c\x0c\x05nitro\x04\x02ab\x00", "unexpected fields"),
        (b"\x30\x09\x0c\x05nitro\x04\x00\x00", "trailing bytes"),
        (b"\x30\x09\x0c\x05nitro\x04\x00", "empty"),
    ],
)
def test_hostile_wrapper_bytes_are_malformed_evidence(value: bytes, message: str) -> None:
    der = _with_extensions(x509.UnrecognizedExtension(OID_CMW, value))
    with pytest.raises(MalformedEvidence, match=message):
        evidence_from_certificate(der)


def test_certificates_with_no_or_two_evidence_extensions_or_no_der_are_malformed() -> None:
    with pytest.raises(MalformedEvidence, match="no RA-TLS evidence"):
        evidence_from_certificate(_with_extensions())
    two = _with_extensions(
        x509.UnrecognizedExtension(OID_SGX_QUOTE, b"q"), x509.UnrecognizedExtension(OID_TDX_QUOTE, b"q")
    )
    with pytest.raises(MalformedEvidence, match="more than one"):
        evidence_from_certificate(two)
    for junk in (b"", b"\x30\x03\x02\x01\x00", b"\xff" * 64, b"0" * 300_000):
        with pytest.raises(MalformedEvidence):
            evidence_from_certificate(junk)


def test_evidence_of_a_platform_without_a_verifier_is_refused(host: SimHost) -> None:
    identity = make_identity("sgx", lambda _data: SAMPLES["sgx"].read_bytes())
    with pytest.raises(ChainInvalid, match="no trusted sgx verifier"):
        _verifier(host).verify(identity.cert_der)
