"""The AMD SEV-SNP verifier against the real samples of vectors/sev-snp (see its PROVENANCE.md), and
against a synthetic AMD-shaped hierarchy (tests/fixtures/sev_snp.py) for the checks that only a
second, valid signature can reach."""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from dataclasses import dataclass
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
from attestation.sev_snp import PINNED_ARK_SHA256, SevSnpVerifier, pinned_roots
from attestation.token import ResultSigner, verify_result
from attestation.verifier import Verifier, expected_report_data
from tests.fixtures.sev_snp import T0, VECTORS, hierarchy

CHECKED = datetime(2026, 11, 27, tzinfo=UTC)  # PROVENANCE: every certificate but the VLEK valid then
VLEK_TIME = datetime(2025, 6, 1, tzinfo=UTC)  # inside the VLEK's 2024-12-10 .. 2025-12-10


def read(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def pem(der: bytes) -> bytes:
    """PEM of a DER certificate without loading it (the VCEKs' serial 0 makes loading warn)."""
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


@dataclass(frozen=True)
class Sample:
    report: str
    cert: str | None
    at: datetime
    version: int
    svn: int
    policy: str
    vmpl: str
    measurement: str
    report_data: str
    reported_tcb: str
    current_tcb: str
    tcb_status: str
    debug: bool
    signer: str
    product: str
    signing_key: str
    chip_id_prefix: str
    not_before: datetime
    not_after: datetime


ZERO48 = "00" * 48
TRUSTEE_ID_KEY = (
    "0356215882a825279a85b300b0b742931d113bf7e32dde2e50ffde7ec743ca491ecdd7f336dc28a6e0b2bb57af7a44a3"
)
SAMPLES = {
    "gosevguest": Sample(
        "gosevguest_milan_attestation.bin",
        "gosevguest_milan_vcek.der",
        CHECKED,
        2,
        0,
        "0xb0000",
        "0",
        "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01",
        "0102030405" + "00" * 59,
        "0200000000000544",
        "0200000000000544",
        "UpToDate",
        True,  # policy 0xb0000 has bit 19 set
        ZERO48,
        "milan",
        "vcek",
        "3ac3fe21e13fb099",
        datetime(2022, 9, 24, 0, 55, 28, tzinfo=UTC),
        datetime(2029, 9, 24, 0, 55, 28, tzinfo=UTC),
    ),
    "virtee": Sample(
        "virtee_milan_report.bin",
        "virtee_milan_vcek.der",
        CHECKED,
        2,
        0,
        "0x30000",
        "0",
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f",
        "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0"
        "f3f8dae7b79fecb3d1cd82bd6a93ebfd",
        "0300000000000873",
        "0300000000000873",
        "UpToDate",
        False,
        ZERO48,
        "milan",
        "vcek",
        "d49554ec",
        datetime(2023, 4, 3, 19, 23, 43, tzinfo=UTC),
        datetime(2030, 4, 3, 19, 23, 43, tzinfo=UTC),
    ),
    "trustee": Sample(
        "trustee_milan_report.bin",
        "trustee_milan_vcek.der",
        CHECKED,
        2,
        4,
        "0x3001f",
        "0",
        "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c",
        "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2" + "00" * 32,
        "0300000000000873",
        "03000000000008ce",
        "OutOfDate",  # current_tcb (ucode 206) is newer than reported_tcb (ucode 115)
        False,
        TRUSTEE_ID_KEY,
        "milan",
        "vcek",
        "c38427a3",
        datetime(2023, 1, 24, 17, 58, 26, tzinfo=UTC),
        datetime(2030, 1, 24, 17, 58, 26, tzinfo=UTC),
    ),
    "trustee-vlek": Sample(
        "trustee_milan_vlek_report.bin",
        "trustee_milan_vlek.der",
        VLEK_TIME,
        3,
        0,
        "0x30000",
        "1",
        "8922ebbdd00ec2c541f36a6e7a82a8773a7accb451ed67bc94e740dbe92c93c4e8c9af857f5ceeb5a493df2a570d7bf0",
        "819770b7e6ea6df8dd8fd4dd146b073c0bf4f3ce5b0977ecac486e3a05ed1bd54e2a7ac1f5d1ca02e7d7d5ef9f73b857"
        "4fd9359e3a480d741a4478e8a7bc27ca",
        "04000000000018d9",
        "04000000000018dc",
        "OutOfDate",
        False,
        ZERO48,
        "milan",
        "vlek",
        "00000000",  # a VLEK report has an all-zero chip_id
        datetime(2024, 12, 10, 22, 14, 21, tzinfo=UTC),
        datetime(2025, 12, 10, 22, 14, 21, tzinfo=UTC),
    ),
    "trustee-e2e-genoa": Sample(
        "trustee_e2e_genoa_report.derived.bin",
        "trustee_e2e_genoa_vcek.derived.der",
        CHECKED,
        3,
        0,
        "0x30000",
        "0",
        "6a6519d757e68c2e939c9dbbbc1828498e8de35d2766dd05f1a2cca5059d0cf4ae62a36d75c837974dd50b315506e73e",
        "7e7320889600c7ac133aea7b896c51f41026002982292a7369559796999c1bf929eef3ff23c46e858f0b1982f9a92b17"
        "c51b578d958cde6b0c92978f150cf9b0",
        "0a00000000001719",
        "0a00000000001719",
        "UpToDate",
        False,
        ZERO48,
        "genoa",
        "vcek",
        "371c55d6",
        datetime(2025, 5, 27, 17, 57, 3, tzinfo=UTC),
        datetime(2032, 5, 27, 17, 57, 3, tzinfo=UTC),
    ),
    "trustee-e2e-json": Sample(
        "trustee_e2e_snp_evidence.json",
        None,  # the VCEK is in the JSON's cert_chain
        CHECKED,
        3,
        0,
        "0x30000",
        "0",
        "6a6519d757e68c2e939c9dbbbc1828498e8de35d2766dd05f1a2cca5059d0cf4ae62a36d75c837974dd50b315506e73e",
        "7e7320889600c7ac133aea7b896c51f41026002982292a7369559796999c1bf929eef3ff23c46e858f0b1982f9a92b17"
        "c51b578d958cde6b0c92978f150cf9b0",
        "0a00000000001719",
        "0a00000000001719",
        "UpToDate",
        False,
        ZERO48,
        "genoa",
        "vcek",
        "371c55d6",
        datetime(2025, 5, 27, 17, 57, 3, tzinfo=UTC),
        datetime(2032, 5, 27, 17, 57, 3, tzinfo=UTC),
    ),
    "azure": Sample(
        "azure_cvm_milan_snp_report.derived.bin",
        "azure_cvm_milan_vcek.pem",  # VCEK, ASK and ARK
        CHECKED,
        2,
        5,
        "0x3001f",
        "0",
        "9ac48fcac8a2d88aeeff8d427ad4f2be0e3917c748a18bdf52cc317e7fe20308b459d5ef1a12e0c22944eb386d17c315",
        "b3fbad6514c83caeb0380882145e49f794229ef37c421b91fc47ff93556bafac" + "00" * 32,
        "0300000000000873",
        "03000000000008d2",
        "OutOfDate",
        False,
        TRUSTEE_ID_KEY,
        "milan",
        "vcek",
        "19752a44",
        datetime(2023, 5, 2, 21, 22, 19, tzinfo=UTC),
        datetime(2030, 5, 2, 21, 22, 19, tzinfo=UTC),
    ),
}


def verifier_for(sample: Sample) -> SevSnpVerifier:
    return SevSnpVerifier(read(sample.cert) if sample.cert else None)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_verifies_with_its_claims(name: str) -> None:
    sample = SAMPLES[name]
    evidence = read(sample.report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the VCEK's serial 0 warning is handled inside
        claims = verifier_for(sample).verify(evidence, at=sample.at)
    assert claims.platform == "sev-snp"
    assert claims.measurement == sample.measurement
    assert claims.report_data == sample.report_data
    assert claims.svn == sample.svn
    assert claims.debug is sample.debug
    assert claims.signer == sample.signer
    assert claims.product_id == 0
    assert claims.tcb_status == sample.tcb_status
    assert claims.evidence_time is None
    assert claims.evidence_digest == hashlib.sha256(evidence).hexdigest()
    assert claims.detail("report_version") == str(sample.version)
    assert claims.detail("policy") == sample.policy
    assert claims.detail("vmpl") == sample.vmpl
    assert claims.detail("reported_tcb") == sample.reported_tcb
    assert claims.detail("current_tcb") == sample.current_tcb
    assert claims.detail("product") == sample.product
    assert claims.detail("signing_key") == sample.signing_key
    assert (claims.detail("chip_id") or "").startswith(sample.chip_id_prefix)
    assert [key for key, _ in claims.details] == sorted(key for key, _ in claims.details)


def test_sample_details() -> None:
    claims = verifier_for(SAMPLES["trustee"]).verify(read("trustee_milan_report.bin"), at=CHECKED)
    assert claims.detail("family_id") == "01" + "00" * 15
    assert claims.detail("image_id") == "02" + "00" * 15
    assert claims.detail("id_key_digest") == TRUSTEE_ID_KEY
    assert claims.detail("host_data") == "00" * 32
    assert claims.detail("committed_tcb") == claims.detail("launch_tcb") == "0300000000000873"
    assert claims.detail("current_fw") == "1.52.4"
    gosev = verifier_for(SAMPLES["gosevguest"]).verify(read("gosevguest_milan_attestation.bin"), at=CHECKED)
    assert gosev.detail("current_fw") == gosev.detail("committed_fw") == "1.49.3"
    assert gosev.detail("chip_id") == (
        "3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e53786184ca39e359669a2b76a1936776b564ea4"
        "64cdce40c05f63c9b610c5068b006b5d"
    )
    vlek = verifier_for(SAMPLES["trustee-vlek"]).verify(read("trustee_milan_vlek_report.bin"), at=VLEK_TIME)
    assert vlek.detail("cpuid") == "0x19/0x01/0x01"
    assert vlek.detail("platform_info") == "0x27"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_fails_outside_its_validity(name: str) -> None:
    sample = SAMPLES[name]
    verifier = verifier_for(sample)
    evidence = read(sample.report)
    chain = verifier.verify_chain(evidence, sample.at)
    assert (chain.not_before, chain.not_after) == (sample.not_before, sample.not_after)
    for at in (sample.not_before - timedelta(seconds=1), sample.not_after + timedelta(seconds=1)):
        with pytest.raises(ChainInvalid, match="not valid at"):
            verifier.verify(evidence, at=at)
        with pytest.raises(ChainInvalid, match="not valid at"):
            verifier.verify_with_chain(evidence, chain, at)


def test_vlek_expired_at_the_check_date() -> None:
    with pytest.raises(ChainInvalid, match="VLEK is not valid"):
        verifier_for(SAMPLES["trustee-vlek"]).verify(read("trustee_milan_vlek_report.bin"), at=CHECKED)


def test_turin_vcek_chains_to_ark_turin() -> None:
    """PROVENANCE: chain test only (no Turin report). Any well-formed report carries the VCEK here."""
    verifier = SevSnpVerifier()
    evidence = read("virtee_milan_report.bin") + read("virtee_turin_vcek.der")
    chain = verifier.verify_chain(evidence, CHECKED)
    assert chain.product == "Turin" and chain.signing_key == "vcek"
    assert (chain.tcb.fmc, chain.tcb.bootloader, chain.tcb.tee, chain.tcb.snp, chain.tcb.microcode) == (
        0,
        0,
        0,
        0,
        9,
    )
    assert chain.hwid == bytes.fromhex("1e550a8ee5cf9f4d")
    assert chain.not_after == datetime(2031, 11, 6, 21, 14, tzinfo=UTC)
    with pytest.raises(EvidenceSignatureInvalid):
        verifier.verify_with_chain(evidence, chain, CHECKED)


# -- the upstream negative cases (PROVENANCE "Upstream assertions") --------------------------------


def flipped(data: bytes, index: int, *, xor: int = 0, add: int = 0) -> bytes:
    out = bytearray(data)
    out[index] = ((out[index] ^ xor) + add) & 0xFF
    return bytes(out)


def test_virtee_report_bit_flip_fails() -> None:
    verifier = verifier_for(SAMPLES["virtee"])
    with pytest.raises(EvidenceSignatureInvalid):
        verifier.verify(flipped(read("virtee_milan_report.bin"), 21, xor=0x80), at=CHECKED)


def test_virtee_vcek_byte_40_fails_the_chain() -> None:
    verifier = SevSnpVerifier(flipped(read("virtee_milan_vcek.der"), 40, xor=0xFF))
    with pytest.raises((ChainInvalid, MalformedEvidence)):
        verifier.verify(read("virtee_milan_report.bin"), at=CHECKED)


@pytest.mark.parametrize("index", [42, 384])  # a signed byte; reported_tcb
def test_trustee_report_byte_plus_one_fails(index: int) -> None:
    verifier = verifier_for(SAMPLES["trustee"])
    with pytest.raises(EvidenceSignatureInvalid):
        verifier.verify(flipped(read("trustee_milan_report.bin"), index, add=1), at=CHECKED)


def test_trustee_vcek_byte_42_fails_the_chain() -> None:
    verifier = SevSnpVerifier(flipped(read("trustee_milan_vcek.der"), 42, add=1))
    with pytest.raises((ChainInvalid, MalformedEvidence)):
        verifier.verify(read("trustee_milan_report.bin"), at=CHECKED)


def test_report_signed_by_another_chips_vcek() -> None:
    # Same product and TCB (0300000000000873), other chip: only the signature can tell.
    verifier = SevSnpVerifier(read("trustee_milan_vcek.der"))
    with pytest.raises(EvidenceSignatureInvalid):
        verifier.verify(read("virtee_milan_report.bin"), at=CHECKED)


def test_vlek_report_with_a_vcek_and_back() -> None:
    with pytest.raises(EvidenceSignatureInvalid):
        SevSnpVerifier(read("virtee_milan_vcek.der")).verify(
            read("trustee_milan_vlek_report.bin"), at=CHECKED
        )
    with pytest.raises(EvidenceSignatureInvalid):
        SevSnpVerifier(read("trustee_milan_vlek.der")).verify(read("virtee_milan_report.bin"), at=VLEK_TIME)


# -- roots ---------------------------------------------------------------------------------------


def test_pinned_roots_are_the_vectors_arks() -> None:
    roots = pinned_roots()
    assert sorted(roots) == ["Genoa", "Milan", "Turin"]
    for product, der in roots.items():
        assert hashlib.sha256(der).hexdigest() == PINNED_ARK_SHA256[product]
        vector = x509.load_pem_x509_certificates(read(f"amd_{product.lower()}_ask_ark.pem"))[-1]
        assert vector.public_bytes(Encoding.DER) == der


def test_wrong_ark_is_chain_invalid() -> None:
    fake = hierarchy()
    verifier = SevSnpVerifier(read("virtee_milan_vcek.der"), roots=fake.roots)  # a fake ARK-Milan
    with pytest.raises(ChainInvalid, match="ARK-Milan"):
        verifier.verify(read("virtee_milan_report.bin"), at=CHECKED)
    # ... and the real roots refuse the fake hierarchy
    with pytest.raises(ChainInvalid):
        SevSnpVerifier().verify(fake.report() + fake.certs_der, at=T0)


def test_no_root_for_the_product() -> None:
    genoa_only = {"Genoa": pinned_roots()["Genoa"]}
    with pytest.raises(ChainInvalid, match="no trusted ARK for Milan"):
        SevSnpVerifier(read("virtee_milan_vcek.der"), roots=genoa_only).verify(
            read("virtee_milan_report.bin"), at=CHECKED
        )


def test_root_must_be_named_for_its_product() -> None:
    with pytest.raises(ValueError, match="not named ARK-Milan"):
        SevSnpVerifier(roots={"Milan": pinned_roots()["Genoa"]})


def test_evidence_carrying_another_ark() -> None:
    genoa_ark = x509.load_der_x509_certificate(pinned_roots()["Genoa"]).public_bytes(Encoding.PEM)
    milan = x509.load_pem_x509_certificates(read("amd_milan_ask_ark.pem"))
    vcek = pem(read("virtee_milan_vcek.der"))
    evidence = read("virtee_milan_report.bin") + vcek + milan[0].public_bytes(Encoding.PEM) + genoa_ark
    with pytest.raises(ChainInvalid, match="not the trusted ARK-Milan"):
        SevSnpVerifier().verify(evidence, at=CHECKED)
    good = read("virtee_milan_report.bin") + vcek + read("amd_milan_ask_ark.pem")
    assert SevSnpVerifier().verify(good, at=CHECKED).tcb_status == "UpToDate"


def test_unrelated_certificate_in_the_chain() -> None:
    genoa_ask = x509.load_pem_x509_certificates(read("amd_genoa_ask_ark.pem"))[0]
    evidence = (
        read("virtee_milan_report.bin") + read("virtee_milan_vcek.der") + genoa_ask.public_bytes(Encoding.DER)
    )
    with pytest.raises(ChainInvalid, match="not in the VCEK's chain"):
        SevSnpVerifier().verify(evidence, at=CHECKED)


# -- evidence forms --------------------------------------------------------------------------------


def test_report_with_appended_der_or_pem_equals_collateral() -> None:
    report = read("virtee_milan_report.bin")
    vcek_der = read("virtee_milan_vcek.der")
    vcek_pem = pem(vcek_der)
    base = SevSnpVerifier(vcek_der).verify(report, at=CHECKED)
    for evidence in (report + vcek_der, report + vcek_pem):
        claims = SevSnpVerifier().verify(evidence, at=CHECKED)
        assert claims.measurement == base.measurement and claims.details == base.details
    assert SevSnpVerifier(vcek_der).chain_cache_key(report) == SevSnpVerifier().chain_cache_key(
        report + vcek_pem
    )


def test_no_certificate_anywhere() -> None:
    with pytest.raises(MalformedEvidence, match="no VCEK/VLEK"):
        SevSnpVerifier().verify(read("virtee_milan_report.bin"), at=CHECKED)


def test_json_without_cert_chain_uses_collateral() -> None:
    document = json.loads(read("trustee_e2e_snp_evidence.json"))
    vcek = bytes(document.pop("cert_chain")[0]["data"])
    claims = SevSnpVerifier(vcek).verify(json.dumps(document).encode(), at=CHECKED)
    assert claims.detail("product") == "genoa"


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("attestation_report"),
        lambda d: d["attestation_report"].update(measurement=[0] * 47),
        lambda d: d["attestation_report"].update(guest_svn=-1),
        lambda d: d["attestation_report"].update(policy="0x30000"),
        lambda d: d["attestation_report"]["reported_tcb"].update(snp=256),
        lambda d: d["attestation_report"]["signature"].update(r=[256] * 72),
        lambda d: d["cert_chain"][0].update(data="MII..."),
        lambda d: d["cert_chain"][0].update(cert_type="ASK"),
        lambda d: d.update(cert_chain={"VCEK": []}),
    ],
)
def test_malformed_json_evidence(edit: object) -> None:
    document = json.loads(read("trustee_e2e_snp_evidence.json"))
    edit(document)  # type: ignore[operator]
    with pytest.raises(MalformedEvidence):
        SevSnpVerifier().verify(json.dumps(document).encode(), at=CHECKED)


def test_json_field_edit_breaks_the_signature() -> None:
    document = json.loads(read("trustee_e2e_snp_evidence.json"))
    document["attestation_report"]["reported_tcb"]["microcode"] += 1
    with pytest.raises(EvidenceSignatureInvalid):
        SevSnpVerifier().verify(json.dumps(document).encode(), at=CHECKED)


def test_deeply_nested_json_is_malformed() -> None:
    with pytest.raises(MalformedEvidence):
        SevSnpVerifier().verify(b"{" + b'"a":[' * 100_000, at=CHECKED)


# -- signed fields against the certificate (synthetic hierarchy) ---------------------------------


def test_synthetic_hierarchy_verifies() -> None:
    fake = hierarchy()
    claims = SevSnpVerifier(roots=fake.roots).verify(fake.report(guest_svn=7) + fake.certs_der, at=T0)
    assert (claims.svn, claims.tcb_status, claims.detail("product")) == (7, "UpToDate", "milan")


def test_reported_tcb_other_than_the_vceks() -> None:
    fake = hierarchy()
    newer = bytes((3, 0, 0, 0, 0, 0, 9, 115))  # snp 9, the VCEK says 8
    with pytest.raises(ChainInvalid, match="reported_tcb"):
        SevSnpVerifier(roots=fake.roots).verify(fake.report(reported_tcb=newer) + fake.certs_der, at=T0)


def test_chip_id_other_than_the_vceks() -> None:
    fake = hierarchy()
    with pytest.raises(ChainInvalid, match="another chip"):
        SevSnpVerifier(roots=fake.roots).verify(fake.report(chip_id=bytes(64)) + fake.certs_der, at=T0)


def test_turin_tcb_layout_and_hwid() -> None:
    fake = hierarchy("Turin")
    verifier = SevSnpVerifier(roots=fake.roots)
    claims = verifier.verify(fake.report(version=3, cpuid=b"\x1a\x02\x01") + fake.certs_der, at=T0)
    assert claims.detail("product") == "turin"
    # The Milan layout of the same numbers is another TCB on Turin.
    milan_layout = bytes((3, 0, 0, 0, 0, 0, 8, 115))
    with pytest.raises(ChainInvalid, match="reported_tcb"):
        verifier.verify(fake.report(reported_tcb=milan_layout) + fake.certs_der, at=T0)
    with pytest.raises(ChainInvalid, match="CPUID family"):
        verifier.verify(fake.report(version=3, cpuid=b"\x19\x01\x01") + fake.certs_der, at=T0)


def test_signing_key_field_must_match_the_certificate() -> None:
    fake = hierarchy()
    with pytest.raises(ChainInvalid, match="signing key 1"):
        SevSnpVerifier(roots=fake.roots).verify(fake.report(key_info=0x4) + fake.certs_der, at=T0)
    vlek = hierarchy("Genoa", "vlek")
    with pytest.raises(ChainInvalid, match="signing key 0"):
        SevSnpVerifier(roots=vlek.roots).verify(vlek.report(key_info=0) + vlek.certs_der, at=T0)
    claims = SevSnpVerifier(roots=vlek.roots).verify(vlek.report() + vlek.certs_der, at=T0)
    assert claims.detail("signing_key") == "vlek" and claims.detail("product") == "genoa"


def test_signature_algorithm_must_be_ecdsa_p384() -> None:
    fake = hierarchy()
    with pytest.raises(MalformedEvidence, match="signature algorithm 2"):
        SevSnpVerifier(roots=fake.roots).verify(fake.report(sig_algo=2) + fake.certs_der, at=T0)


def test_author_key_signer() -> None:
    fake = hierarchy()
    author = bytes(range(48))
    claims = SevSnpVerifier(roots=fake.roots).verify(
        fake.report(key_info=0x1, author_key_digest=author) + fake.certs_der, at=T0
    )
    assert claims.signer == author.hex() and claims.detail("author_key_en") == "true"


def test_masked_chip_key_is_unsigned() -> None:
    fake = hierarchy()
    with pytest.raises(EvidenceSignatureInvalid, match="unsigned"):
        SevSnpVerifier(roots=fake.roots).verify(fake.report(key_info=0x2) + fake.certs_der, at=T0)


def test_tcb_status_out_of_date_when_current_is_newer() -> None:
    fake = hierarchy()
    newer = bytes((3, 0, 0, 0, 0, 0, 8, 116))
    claims = SevSnpVerifier(roots=fake.roots).verify(fake.report(current_tcb=newer) + fake.certs_der, at=T0)
    assert claims.tcb_status == "OutOfDate"


# -- with the verifier core ------------------------------------------------------------------------


SNP_POLICY = {
    "id": "snp-test",
    "rules": [
        {
            "platform": "sev-snp",
            "measurements": [SAMPLES["azure"].measurement],
            "tcb_statuses": ["OutOfDate"],
            "nonce_required": False,
        }
    ],
}


def azure_runtime_data() -> bytes:
    """PROVENANCE sample 6: report_data[0:32] is SHA-256 of the HCL variable data (1110 bytes at
    0x4D4), the rest zero: exactly ``expected_report_data(None, runtime_data)``."""
    return read("azure_cvm_milan_hcl_report.bin")[0x4D4 : 0x4D4 + 1110]


async def test_core_issues_a_token_and_reuses_the_chain() -> None:
    signer = ResultSigner.generate()
    pem = read("azure_cvm_milan_vcek.pem")
    report = read("azure_cvm_milan_snp_report.derived.bin")
    runtime = azure_runtime_data()
    assert expected_report_data(None, runtime).hex() == SAMPLES["azure"].report_data
    policy = parse_policy(SNP_POLICY)
    async with Verifier({"sev-snp": SevSnpVerifier(pem)}, signer, clock=lambda: CHECKED) as core:
        first = await core.verify(
            report,
            platform="sev-snp",
            expected_nonce=None,
            policy=policy,
            audience="a",
            cnf_public_key=runtime,
        )
        # Other evidence bytes (the same certificates appended), the same chain: a cache hit.
        second = await core.verify(
            report + pem,
            platform="sev-snp",
            expected_nonce=None,
            policy=policy,
            audience="a",
            cnf_public_key=runtime,
        )
        stats = core.stats()
    assert stats["chain_cache_misses"] == 1 and stats["chain_cache_hits"] == 1
    assert stats["verified"] == 2
    for token in (first, second):
        result = verify_result(token, public_key=signer.public_key, audience="a", policy_id=None, now=CHECKED)
        assert result.claims.platform == "sev-snp"
        assert result.claims.measurement == SAMPLES["azure"].measurement
        assert result.claims.detail("product") == "milan"


async def test_core_denies_debug_by_policy() -> None:
    fake = hierarchy()
    nonce, key = b"nonce-1234", b"enclave key"
    bound = expected_report_data(nonce, key)
    debug_report = fake.report(policy=0x30000 | (1 << 19), report_data=bound) + fake.certs_der
    claims = SevSnpVerifier(roots=fake.roots).verify(debug_report, at=T0)
    assert claims.debug
    policy = parse_policy(
        {"id": "p", "rules": [{"platform": "sev-snp", "measurements": [claims.measurement]}]}
    )
    signer = ResultSigner.generate()
    async with Verifier({"sev-snp": SevSnpVerifier(roots=fake.roots)}, signer, clock=lambda: T0) as core:
        with pytest.raises(PolicyDenied, match="debug"):
            await core.verify(
                debug_report,
                platform="sev-snp",
                expected_nonce=nonce,
                policy=policy,
                audience="a",
                cnf_public_key=key,
            )
        token = await core.verify(
            fake.report(report_data=bound) + fake.certs_der,
            platform="sev-snp",
            expected_nonce=nonce,
            policy=policy,
            audience="a",
            cnf_public_key=key,
        )
    assert (
        verify_result(token, public_key=signer.public_key, audience="a", policy_id=None, now=T0).claims.nonce
        == nonce.hex()
    )


def test_errors_are_attestation_errors() -> None:
    for bad in (b"", b"\0" * 1183, b"{}", b"[]", b"\xff" * 2000):
        with pytest.raises(AttestationError):
            SevSnpVerifier(read("virtee_milan_vcek.der")).verify(bad, at=CHECKED)
