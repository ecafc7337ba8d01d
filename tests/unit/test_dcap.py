"""The SGX DCAP and TDX verifiers against the real quotes of vectors/sgx and vectors/tdx, at the
times their PROVENANCE.md gives."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from attestation import dcap
from attestation.claims import Claims
from attestation.dcap import (
    INTEL_SGX_ROOT_CA_SHA256,
    DcapChain,
    SgxDcapVerifier,
    TdxVerifier,
    intel_sgx_root_ca_der,
)
from attestation.dcap_quote import TdReport, parse_quote
from attestation.errors import (
    ChainInvalid,
    EvidenceSignatureInvalid,
    MalformedEvidence,
    NonceMismatch,
    PolicyDenied,
)
from attestation.policy import Policy, parse_policy
from attestation.token import ResultSigner, verify_result
from attestation.verifier import CachingPlatformVerifier, Verifier, expected_report_data
from tests.unit.dcap_vectors import (
    SGX,
    SGX_QVL,
    TDX,
    TDX_GO,
    TDX_QVL,
    TDX_QVL_V5,
    VERIFIABLE,
    Sample,
    at,
)

SECOND = timedelta(seconds=1)


def verifier_for(sample: Sample, **options: bytes) -> SgxDcapVerifier | TdxVerifier:
    assert sample.collateral is not None
    cls = SgxDcapVerifier if sample.platform == "sgx" else TdxVerifier
    return cls(sample.collateral, **options)


# -- the pinned root ---------------------------------------------------------------------------


def test_the_packaged_root_is_the_intel_sgx_root_ca_of_the_vectors() -> None:
    der = intel_sgx_root_ca_der()
    assert hashlib.sha256(der).hexdigest() == INTEL_SGX_ROOT_CA_SHA256
    assert der == (SGX / "intel_sgx_root_ca.der").read_bytes() == (TDX / "intel_sgx_root_ca.der").read_bytes()
    root = x509.load_der_x509_certificate(der)
    assert root.subject.rfc4514_string().endswith("CN=Intel SGX Root CA")


def test_the_pinned_root_is_dcap_qvls_embedded_default() -> None:
    """dcap-qvl embeds the Intel SGX Root CA as its default anchor; the verifiers pass the pinned
    copy explicitly, and it is the same certificate."""
    native = Path(dcap_qvl.__file__).parent
    binaries = [path.read_bytes() for path in native.iterdir() if path.suffix in (".so", ".pyd")]
    assert binaries and any(intel_sgx_root_ca_der() in binary for binary in binaries)


def test_a_tampered_packaged_root_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "roots").mkdir()
    (tmp_path / "roots" / "intel_sgx_root_ca.der").write_bytes(_self_signed_root())
    monkeypatch.setattr(dcap, "resources", SimpleNamespace(files=lambda _package: tmp_path))
    with pytest.raises(RuntimeError, match="pinned SHA-256"):
        SgxDcapVerifier(SGX_QVL.collateral or "")


# -- the samples that verify -------------------------------------------------------------------


def test_sgx_dcapqvl_sample_verifies_with_its_provenance_claims() -> None:
    claims = verifier_for(SGX_QVL).verify(SGX_QVL.evidence, at=SGX_QVL.at)
    assert claims.platform == "sgx"
    assert claims.measurement == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert claims.signer == "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    assert (claims.product_id, claims.svn, claims.debug) == (0, 0, False)
    assert claims.cpu_svn == "0b0b1a18ffff04000000000000000000"
    assert claims.report_data == (b"Hello, world!".ljust(64, b"\0")).hex()
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert claims.evidence_digest == "f8b81014b6e443609746822194910f5dc1c92c322fa0584298d1e33e505ca3b5"
    assert claims.evidence_time is None
    assert claims.detail("attributes") == "0500000000000000e700000000000000"
    assert claims.detail("fmspc") == "00a067110000"
    assert (claims.detail("qe_svn"), claims.detail("pce_svn")) == ("10", "15")
    assert [name for name, _ in claims.details] == sorted(name for name, _ in claims.details)


def test_tdx_dcapqvl_v4_sample_verifies_with_its_provenance_claims() -> None:
    claims = verifier_for(TDX_QVL).verify(TDX_QVL.evidence, at=TDX_QVL.at)
    zero48 = "00" * 48
    assert claims.platform == "tdx"
    assert claims.measurement == (
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
    )
    assert claims.signer == zero48  # MROWNER
    assert (claims.product_id, claims.svn, claims.debug) == (0, 0, False)
    assert claims.tcb_status == "UpToDate"
    assert claims.advisories == ()
    assert claims.report_data == (
        "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
        "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"
    )
    # The buffer carries 70 bytes of padding after the signature data: accepted, digest of all.
    assert claims.evidence_digest == "c42f9164325024bca2757bc8819b11879a0a369132ea4e2b7c85df4805ea72db"
    assert claims.cpu_svn == claims.detail("tee_tcb_svn") == "06010300000000000000000000000000"
    assert claims.detail("mrseam") == (
        "5b38e33a6487958b72c3c12a938eaa5e3fd4510c51aeeab58c7d5ecee41d7c436489d6c8e4f92f160b7cad34207b00c1"
    )
    assert claims.detail("td_attributes") == "0000001000000000"
    assert claims.detail("xfam") == "e702060000000000"
    assert claims.detail("rtmr0") == (
        "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0"
    )
    assert claims.detail("rtmr1") == (
        "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7aea8c323c173019b3093d54e579e9378"
    )
    assert claims.detail("rtmr2") == (
        "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3ba80b70870d7330733642e01d48c3132"
    )
    for name in ("rtmr3", "mrconfigid", "mrowner", "mrownerconfig"):
        assert claims.detail(name) == zero48, name
    assert claims.detail("fmspc") == "b0c06f000000"


@pytest.mark.parametrize("sample", VERIFIABLE, ids=lambda s: s.name)
def test_the_chain_window_is_the_provenance_window(sample: Sample) -> None:
    chain = verifier_for(sample).verify_chain(sample.evidence, sample.at)
    assert isinstance(chain, DcapChain)
    assert (chain.not_before, chain.not_after) == (sample.not_before, sample.not_after)


@pytest.mark.parametrize("sample", (*VERIFIABLE, TDX_QVL_V5), ids=lambda s: s.name)
def test_outside_its_window_a_sample_fails_naming_what_expired(sample: Sample) -> None:
    assert sample.not_before is not None and sample.not_after is not None
    verifier = verifier_for(sample)
    with pytest.raises(ChainInvalid, match=r"^the .* expired at ") as late:
        verifier.verify(sample.evidence, at=sample.not_after + SECOND)
    assert "\n" not in str(late.value)
    with pytest.raises(ChainInvalid, match=r"^the .* is not yet valid at "):
        verifier.verify(sample.evidence, at=sample.not_before - SECOND)


def test_the_go_tdx_guest_sample_fails_in_2053_on_an_expiry() -> None:
    with pytest.raises(ChainInvalid, match="expired at"):
        verifier_for(TDX_GO).verify(TDX_GO.evidence, at=at("2053-07-01T01:00:00Z"))


def test_a_cached_chain_past_its_window_is_refused() -> None:
    verifier = verifier_for(TDX_QVL)
    chain = verifier.verify_chain(TDX_QVL.evidence, TDX_QVL.at)
    assert chain.not_after is not None
    with pytest.raises(ChainInvalid, match="expired at"):
        verifier.verify_with_chain(TDX_QVL.evidence, chain, chain.not_after + SECOND)
    with pytest.raises(ChainInvalid, match="not valid before"):
        verifier.verify_with_chain(TDX_QVL.evidence, chain, chain.not_before - SECOND)


# -- the negative samples ----------------------------------------------------------------------


@pytest.mark.parametrize("sample", (TDX_QVL_V5, TDX_GO), ids=lambda s: s.name)
def test_tdx_samples_without_a_matching_tcb_level_are_refused(sample: Sample) -> None:
    with pytest.raises(ChainInvalid, match=r"TCB level not supported"):
        verifier_for(sample).verify(sample.evidence, at=sample.at)


def test_the_v5_sample_parses_as_a_td15_body() -> None:
    quote = parse_quote(TDX_QVL_V5.evidence)
    report = quote.report
    assert (quote.version, quote.body_type, len(quote.body)) == (5, 3, 648)
    assert isinstance(report, TdReport)
    assert report.mr_td.hex() == (
        "273828c46252fcbdd8ad2dd907130222b03466d52a2911d70c1a5950895d6bd1ae451d382d5a9b1b4c0ed0e5ae9a3dbd"
    )
    assert report.tee_tcb_svn2 is not None and report.tee_tcb_svn2.hex().startswith("0d010300")
    assert (
        report.report_data.hex()
        == "d2142b643598eb5fae2bc8529dd79a558b29f868ccbb6531cb28dab9dce47728" + "00" * 32
    )


def test_the_go_tdx_guest_sample_parses_with_its_deep_check_values() -> None:
    quote = parse_quote(TDX_GO.evidence)
    report = quote.report
    assert isinstance(report, TdReport)
    assert quote.trailing == 39
    assert quote.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    assert report.tee_tcb_svn.hex() == "03000400000000000000000000000000"
    assert report.td_attributes.hex() == "0000004000000000" and not report.debug
    assert report.xfam.hex() == "e71a060000000000"
    assert report.mr_td.hex() == (
        "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb"
    )
    assert report.report_data.hex() == (
        "6c62dec1b8191749a31dab490be532a35944dea47caef1f980863993d9899545"
        "eb7406a38d1eed313b987a467dacead6f0c87a6d766c66f6f29f8acb281f1113"
    )


def test_collateral_of_another_fmspc_is_refused() -> None:
    with pytest.raises(ChainInvalid, match="FMSPC 50806f000000 is not the collateral's b0c06f000000"):
        verifier_for(TDX_QVL).verify(TDX_GO.evidence, at=TDX_QVL.at)


# -- roots, platforms and collateral -------------------------------------------------------------


def _self_signed_root() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Not Intel SGX Root CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2018, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2049, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


@pytest.mark.parametrize("sample", VERIFIABLE, ids=lambda s: s.name)
def test_another_root_is_chain_invalid(sample: Sample) -> None:
    verifier = verifier_for(sample, root_ca_der=_self_signed_root())
    with pytest.raises(ChainInvalid, match="trusted root"):
        verifier.verify(sample.evidence, at=sample.at)


def test_the_explicit_intel_root_is_the_default() -> None:
    verifier = verifier_for(SGX_QVL, root_ca_der=(SGX / "intel_sgx_root_ca.der").read_bytes())
    assert verifier.verify(SGX_QVL.evidence, at=SGX_QVL.at).tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_a_quote_of_the_other_platform_is_malformed() -> None:
    with pytest.raises(MalformedEvidence, match="is not sgx evidence"):
        verifier_for(SGX_QVL).verify(TDX_QVL.evidence, at=TDX_QVL.at)
    with pytest.raises(MalformedEvidence, match="is not tdx evidence"):
        verifier_for(TDX_QVL).verify(SGX_QVL.evidence, at=SGX_QVL.at)


def test_unusable_collateral_is_refused_when_the_verifier_is_built() -> None:
    assert SGX_QVL.collateral is not None and TDX_QVL.collateral is not None
    with pytest.raises(ValueError, match="not JSON"):
        SgxDcapVerifier("{")
    with pytest.raises(ValueError, match="lacks one of"):
        SgxDcapVerifier("{}")
    with pytest.raises(ValueError, match="'SGX' version 3"):
        SgxDcapVerifier(TDX_QVL.collateral)
    with pytest.raises(ValueError, match="'TDX' version 3"):
        TdxVerifier(SGX_QVL.collateral.encode())
    with pytest.raises(ValueError, match="self-signed"):
        SgxDcapVerifier(SGX_QVL.collateral, root_ca_der=b"\x30\x03\x02\x01\x00")


def test_a_naive_time_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verifier_for(SGX_QVL).verify(SGX_QVL.evidence, at=SGX_QVL.at.replace(tzinfo=None))


# -- the chain cache contract -------------------------------------------------------------------


def test_the_cache_key_ignores_the_report_and_trailing_bytes_but_not_the_qe_report() -> None:
    verifier = verifier_for(TDX_QVL)
    evidence = TDX_QVL.evidence
    key = verifier.chain_cache_key(evidence)
    quote = parse_quote(evidence)
    assert verifier.chain_cache_key(evidence + b"padding") == key
    report_data_at = 48 + 520
    other_td = bytearray(evidence)
    other_td[report_data_at] ^= 1  # TD report data: not part of the chain
    assert verifier.chain_cache_key(bytes(other_td)) == key
    other_svn = bytearray(evidence)
    other_svn[48] ^= 1  # TEE_TCB_SVN: the TCB appraisal reads it
    assert verifier.chain_cache_key(bytes(other_svn)) != key
    qe_at = evidence.index(quote.qe_report)
    other_qe = bytearray(evidence)
    other_qe[qe_at + 10] ^= 1
    assert verifier.chain_cache_key(bytes(other_qe)) != key
    cert_at = evidence.index(quote.cert_data)
    other_cert = bytearray(evidence)
    other_cert[cert_at + 500] ^= 1
    assert verifier.chain_cache_key(bytes(other_cert)) != key


def test_verify_with_chain_checks_the_quote_against_the_given_chain() -> None:
    tdx = verifier_for(TDX_QVL)
    sgx = verifier_for(SGX_QVL)
    tdx_chain = tdx.verify_chain(TDX_QVL.evidence, TDX_QVL.at)
    sgx_chain = sgx.verify_chain(SGX_QVL.evidence, SGX_QVL.at)
    with pytest.raises(ChainInvalid, match="not a verified tdx"):
        tdx.verify_with_chain(TDX_QVL.evidence, sgx_chain, TDX_QVL.at)
    with pytest.raises(ChainInvalid, match="not a verified tdx"):
        tdx.verify_with_chain(TDX_QVL.evidence, object(), TDX_QVL.at)
    quote = parse_quote(TDX_QVL.evidence)
    other_ak = bytearray(TDX_QVL.evidence)
    other_ak[TDX_QVL.evidence.index(quote.attestation_key) + 3] ^= 1
    with pytest.raises(ChainInvalid, match="another attestation key"):
        tdx.verify_with_chain(bytes(other_ak), tdx_chain, TDX_QVL.at)
    other_qe = bytearray(TDX_QVL.evidence)
    other_qe[TDX_QVL.evidence.index(quote.qe_report) + 3] ^= 1
    with pytest.raises(ChainInvalid, match="differ from the verified chain"):
        tdx.verify_with_chain(bytes(other_qe), tdx_chain, TDX_QVL.at)
    assert tdx.verify_with_chain(TDX_QVL.evidence + b"\0", tdx_chain, TDX_QVL.at).measurement.startswith(
        "91eb"
    )


def test_the_verifiers_implement_the_caching_protocol() -> None:
    verifiers: list[CachingPlatformVerifier] = [verifier_for(SGX_QVL), verifier_for(TDX_QVL)]
    assert [v.platform for v in verifiers] == ["sgx", "tdx"]


# -- the verifier core ---------------------------------------------------------------------------

NONCE = b"fresh nonce from the relying party"
CNF_KEY = b"the enclave's confirmation key"


def _rebound(claims: Claims) -> Claims:
    return replace(claims, report_data=expected_report_data(NONCE, CNF_KEY).hex())


class _Rebound(TdxVerifier):
    """The real quotes bind report data of their own, not this test's nonce and key. This verifier
    verifies them unchanged and then replaces the claims' report data with the expected binding,
    so the core's chain cache and token issuing can be exercised with real quotes."""

    def verify_with_chain(self, evidence: bytes, chain: object, at: datetime) -> Claims:
        return _rebound(super().verify_with_chain(evidence, chain, at))


class _ReboundSgx(SgxDcapVerifier):
    """As ``_Rebound``, for SGX."""

    def verify_with_chain(self, evidence: bytes, chain: object, at: datetime) -> Claims:
        return _rebound(super().verify_with_chain(evidence, chain, at))


def test_the_core_issues_a_token_and_reuses_the_verified_chain() -> None:
    signer = ResultSigner.generate()
    measurement = (
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
    )
    policy = parse_policy(
        {"id": "tdx-release", "rules": [{"platform": "tdx", "measurements": [measurement]}]}
    )

    async def run() -> tuple[list[str], dict[str, int]]:
        verifier = Verifier({"tdx": _Rebound(TDX_QVL.collateral or "")}, signer, clock=lambda: TDX_QVL.at)
        async with verifier:
            tokens = [
                await verifier.verify(
                    evidence,
                    platform="tdx",
                    expected_nonce=NONCE,
                    policy=policy,
                    audience="kms",
                    cnf_public_key=CNF_KEY,
                )
                # Two evidences with one chain: the second carries padding after its signature data.
                for evidence in (TDX_QVL.evidence, TDX_QVL.evidence + b"\0" * 8)
            ]
            # A third quote of the same platform, with a changed TD report: the cached chain's
            # attestation key does not verify it.
            tampered = bytearray(TDX_QVL.evidence)
            tampered[48 + 136] ^= 1  # MRTD
            with pytest.raises(EvidenceSignatureInvalid):
                await verifier.verify(
                    bytes(tampered),
                    platform="tdx",
                    expected_nonce=NONCE,
                    policy=policy,
                    audience="kms",
                    cnf_public_key=CNF_KEY,
                )
            return tokens, verifier.stats()

    tokens, stats = asyncio.run(run())
    assert stats["chain_cache_misses"] == 1
    assert stats["chain_cache_hits"] == 2
    assert stats["verified"] == 2
    assert stats["failed"] == 1
    result = verify_result(
        tokens[1], public_key=signer.public_key, audience="kms", policy_id="tdx-release", now=TDX_QVL.at
    )
    assert result.claims.measurement == measurement
    assert result.claims.tcb_status == "UpToDate"


def test_the_core_refuses_the_real_quote_for_another_binding() -> None:
    signer = ResultSigner.generate()
    policy = parse_policy({"id": "sgx-release", "rules": [{"platform": "sgx", "measurements": ["00" * 32]}]})

    async def run() -> None:
        async with Verifier({"sgx": verifier_for(SGX_QVL)}, signer, clock=lambda: SGX_QVL.at) as verifier:
            await verifier.verify(
                SGX_QVL.evidence,
                platform="sgx",
                expected_nonce=NONCE,
                policy=policy,
                audience="kms",
                cnf_public_key=CNF_KEY,
            )

    with pytest.raises(NonceMismatch):
        asyncio.run(run())


def test_the_core_appraises_the_sgx_tcb_status_and_carries_the_advisories() -> None:
    signer = ResultSigner.generate()
    rule = {
        "platform": "sgx",
        "signer": "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6",
        "product_id": 0,
        "min_svn": 0,
    }
    strict = parse_policy({"id": "sgx-strict", "rules": [rule]})
    lenient = parse_policy(
        {"id": "sgx-lenient", "rules": [{**rule, "tcb_statuses": ["ConfigurationAndSWHardeningNeeded"]}]}
    )

    async def attest(policy: Policy) -> str:
        async with Verifier(
            {"sgx": _ReboundSgx(SGX_QVL.collateral or "")}, signer, clock=lambda: SGX_QVL.at
        ) as v:
            return await v.verify(
                SGX_QVL.evidence,
                platform="sgx",
                expected_nonce=NONCE,
                policy=policy,
                audience="kms",
                cnf_public_key=CNF_KEY,
            )

    with pytest.raises(PolicyDenied, match="TCB status ConfigurationAndSWHardeningNeeded is not allowed"):
        asyncio.run(attest(strict))
    token = asyncio.run(attest(lenient))
    result = verify_result(
        token, public_key=signer.public_key, audience="kms", policy_id="sgx-lenient", now=SGX_QVL.at
    )
    assert result.claims.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert result.claims.detail("fmspc") == "00a067110000"
