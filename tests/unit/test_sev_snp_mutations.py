"""Mutations of real SEV-SNP evidence: each one must fail with an ``AttestationError`` subclass,
never another exception, and never verify.

Coverage: every byte of the signed region (0x000..0x29F, one ECDSA check each against a cached
chain) and every byte of the signature area (0x2A0..0x49F); every byte of the VCEK (TBS and
signature and the DER around them) and of the ASK and ARK when the evidence carries them; a
truncation at every report field boundary and inside the appended certificates; a wrong root;
a time outside each certificate's window; a debug report under a policy that forbids debug.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.errors import (
    AttestationError,
    ChainInvalid,
    EvidenceSignatureInvalid,
    MalformedEvidence,
    PolicyDenied,
)
from attestation.policy import parse_policy
from attestation.sev_snp import SevSnpVerifier
from attestation.sev_snp_report import FIELD_OFFSETS, REPORT_SIZE, SIGNED_SIZE
from attestation.token import ResultSigner
from attestation.verifier import Verifier, expected_report_data
from tests.fixtures.sev_snp import T0, VECTORS, hierarchy

AT = datetime(2026, 11, 27, tzinfo=UTC)
REPORT = (VECTORS / "trustee_milan_report.bin").read_bytes()
VCEK = (VECTORS / "trustee_milan_vcek.der").read_bytes()
ASK, ARK = (
    cert.public_bytes(Encoding.DER)
    for cert in x509.load_pem_x509_certificates((VECTORS / "amd_milan_ask_ark.pem").read_bytes())
)


def flips(data: bytes, positions: range | list[int], xor: int = 0x01) -> Iterator[tuple[int, bytes]]:
    for index in positions:
        out = bytearray(data)
        out[index] ^= xor
        yield index, bytes(out)


def test_the_unmutated_evidence_verifies() -> None:
    """The baseline every mutation below departs from."""
    assert SevSnpVerifier(VCEK).verify(REPORT, at=AT).measurement.startswith("a1f39304")
    assert SevSnpVerifier().verify(REPORT + VCEK + ASK + ARK, at=AT).detail("product") == "milan"


def test_every_signed_byte() -> None:
    verifier = SevSnpVerifier(VCEK)
    chain = verifier.verify_chain(REPORT, AT)
    for xor in (0x01, 0x80):
        for index, mutated in flips(REPORT, range(SIGNED_SIZE), xor):
            # The version field is read before the signature (structure); all else fails there.
            expected = (
                (MalformedEvidence, EvidenceSignatureInvalid) if index < 4 else EvidenceSignatureInvalid
            )
            with pytest.raises(expected):
                verifier.verify_with_chain(mutated, chain, AT)
            if index % 64 == 0:  # the full path (chain and signature) on a sample of positions
                with pytest.raises(AttestationError):
                    verifier.verify(mutated, at=AT)


def test_every_signature_byte() -> None:
    verifier = SevSnpVerifier(VCEK)
    chain = verifier.verify_chain(REPORT, AT)
    for _, mutated in flips(REPORT, range(SIGNED_SIZE, REPORT_SIZE)):
        with pytest.raises((EvidenceSignatureInvalid, MalformedEvidence)):
            verifier.verify_with_chain(mutated, chain, AT)


def test_signature_r_or_s_zero_or_order() -> None:
    verifier = SevSnpVerifier(VCEK)
    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
    for offset in (0x2A0, 0x2E8):
        for value in (0, order, order + 1, (1 << 384) - 1):
            mutated = bytearray(REPORT)
            mutated[offset : offset + 72] = value.to_bytes(72, "little")
            with pytest.raises(EvidenceSignatureInvalid):
                verifier.verify(bytes(mutated), at=AT)


@pytest.mark.parametrize(("name", "position"), [("VCEK", 0), ("ASK", 1), ("ARK", 2)])
def test_every_certificate_byte(name: str, position: int) -> None:
    """Every byte of the certificate (header, TBS, algorithm and signature), carried in the
    evidence; one RSA-PSS check or a parse failure each."""
    certs = [VCEK, ASK, ARK]
    verifier = SevSnpVerifier()
    for _, mutated in flips(certs[position], range(len(certs[position]))):
        chain = [*certs]
        chain[position] = mutated
        evidence = REPORT + b"".join(chain)
        with pytest.raises((ChainInvalid, MalformedEvidence)):
            verifier.verify_chain(evidence, AT)


def test_every_collateral_vcek_byte() -> None:
    for _, mutated in flips(VCEK, range(0, len(VCEK), 8)):
        try:
            verifier = SevSnpVerifier(mutated)
        except ValueError:
            continue  # no longer a certificate at all: refused as configuration
        with pytest.raises((ChainInvalid, MalformedEvidence)):
            verifier.verify(REPORT, at=AT)


def test_truncation_at_every_field_boundary() -> None:
    verifier = SevSnpVerifier(VCEK)
    for offset in FIELD_OFFSETS[:-1]:
        for cut in {offset, max(offset - 1, 0), offset + 1}:
            with pytest.raises(MalformedEvidence):
                verifier.verify(REPORT[:cut], at=AT)
    with pytest.raises(MalformedEvidence):
        verifier.verify(REPORT + b"\0", at=AT)  # a trailing byte is no certificate


def test_truncation_inside_the_appended_certificates() -> None:
    evidence = REPORT + VCEK + ASK
    verifier = SevSnpVerifier()
    for cut in range(REPORT_SIZE + 1, len(evidence), 7):
        with pytest.raises((MalformedEvidence, ChainInvalid)):
            verifier.verify(evidence[:cut], at=AT)


def test_wrong_root() -> None:
    with pytest.raises(ChainInvalid):
        SevSnpVerifier(VCEK, roots=hierarchy().roots).verify(REPORT, at=AT)


def test_time_outside_every_window() -> None:
    """A synthetic hierarchy whose ARK, ASK and VCEK windows each end first in turn, so each
    certificate's own validity check is the one that fails."""
    windows = {
        "ARK": ((-10, 10), (-20, 20), (-30, 30)),
        "ASK": ((-30, 30), (-10, 10), (-20, 20)),
        "VCEK": ((-30, 30), (-20, 20), (-10, 10)),
    }
    for name, (ark, ask, leaf) in windows.items():
        fake = hierarchy(ark_days=ark, ask_days=ask, leaf_days=leaf)
        evidence = fake.report() + fake.certs_der
        verifier = SevSnpVerifier(roots=fake.roots)
        assert verifier.verify(evidence, at=T0).tcb_status == "UpToDate"
        for days in (-11, 11):
            with pytest.raises(ChainInvalid, match=name):
                verifier.verify(evidence, at=T0 + timedelta(days=days))


async def test_debug_report_denied_by_policy() -> None:
    fake = hierarchy()
    nonce, key = b"nonce-debug", b"key"
    evidence = (
        fake.report(policy=0x30000 | 1 << 19, report_data=expected_report_data(nonce, key)) + fake.certs_der
    )
    verifier = SevSnpVerifier(roots=fake.roots)
    measurement = verifier.verify(evidence, at=T0).measurement
    policy = parse_policy(
        {"id": "no-debug", "rules": [{"platform": "sev-snp", "measurements": [measurement]}]}
    )
    async with Verifier({"sev-snp": verifier}, ResultSigner.generate(), clock=lambda: T0) as core:
        with pytest.raises(PolicyDenied, match="debug enclave not allowed"):
            await core.verify(
                evidence,
                platform="sev-snp",
                expected_nonce=nonce,
                policy=policy,
                audience="a",
                cnf_public_key=key,
            )


def test_real_debug_sample_denied_by_policy() -> None:
    """gosevguest's report has policy 0xb0000 (DEBUG set)."""
    claims = SevSnpVerifier((VECTORS / "gosevguest_milan_vcek.der").read_bytes()).verify(
        (VECTORS / "gosevguest_milan_attestation.bin").read_bytes(), at=AT
    )
    rule = {"platform": "sev-snp", "measurements": [claims.measurement], "nonce_required": False}
    assert (
        not parse_policy({"id": "p", "rules": [rule]}).evaluate(claims, now=AT, nonce_checked=False).allowed
    )
    allowed = parse_policy({"id": "p", "rules": [{**rule, "debug_allowed": True}]})
    assert allowed.evaluate(claims, now=AT, nonce_checked=False).allowed
