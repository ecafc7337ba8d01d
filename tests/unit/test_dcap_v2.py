"""SGX DCAP quotes against collateral whose TCB info is version 2 (``attestation.dcap_appraisal_v2``):
samples 2 (dcap-rs) and 3 (trustee Occlum) of vectors/sgx at the time their PROVENANCE.md gives,
the derived collateral file, the policy on the debug sample, and the CLI.

The windows, the wrong root and the byte mutations of these samples are in test_dcap.py and
test_dcap_mutations.py (both samples are in ``VERIFIABLE``); the appraisal's decisions on
collateral Intel never signed (re-signed under a test root) are in test_dcap_v2_forged.py."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from attestation import dcap_appraisal_v2, dcap_pck_extension
from attestation.dcap import DcapChain, SgxDcapVerifier, TdxVerifier
from attestation.dcap_quote import parse_quote
from attestation.errors import ChainInvalid, EvidenceSignatureInvalid, PolicyDenied
from attestation.policy import parse_policy
from tests.fixtures.cli import run_cli
from tests.unit.dcap_vectors import SGX, SGX_DCAPRS, SGX_OCCLUM, SGX_QVL, TCB_INFO_V2, Sample, pem_chain

ROOT = Path(__file__).resolve().parents[2]
SECOND = timedelta(seconds=1)
DCAPRS_MRENCLAVE = "a4f45c39dac622cb1dd32ddb35a52ec92db41d0fa88a1c911c49e59c534f61cd"
DCAPRS_MRSIGNER = "1bda23eb3a807dfe735ddcebbfa2eac05e04a00df2804296612f770b594180ba"
OCCLUM_MRENCLAVE = "8f173e4613ff05c52aaf04162d234edae8c9977eae47eb2299ae16a553011c68"
OCCLUM_MRSIGNER = "83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e"


def verifier(sample: Sample = SGX_DCAPRS) -> SgxDcapVerifier:
    assert sample.collateral is not None
    return SgxDcapVerifier(sample.collateral)


# -- the derived collateral --------------------------------------------------------------------


def test_the_derived_collateral_is_what_the_script_rebuilds_byte_for_byte() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "derive_dcap_collateral.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "signature verifies over 4710 bytes" in result.stderr  # the tcbInfo text, cut out raw


def test_the_derived_collateral_carries_the_exact_signed_pcs_texts() -> None:
    document = json.loads((SGX / "dcaprs_collateral_v2.derived.json").read_text())
    tcb_body = (SGX / "dcaprs_tcbinfo_sgx_v2_00606a000000.json").read_text()
    qe_body = (SGX / "dcaprs_qeidentity_qe_v2.json").read_text()
    assert (
        '{"tcbInfo":' + document["tcb_info"] + ',"signature":"' + document["tcb_info_signature"] in tcb_body
    )
    assert (
        '{"enclaveIdentity":' + document["qe_identity"] + ',"signature":"' + document["qe_identity_signature"]
        in qe_body
    )
    assert document["root_ca_crl"] == (SGX / "dcaprs_intel_root_ca_crl.der").read_bytes().hex()
    assert document["pck_crl"] == (SGX / "dcaprs_pck_platform_crl.der").read_bytes().hex()
    assert document["tcb_info_issuer_chain"] == (SGX / "dcaprs_tcb_signing_chain.pem").read_text()
    tcb_info = json.loads(document["tcb_info"])
    assert (tcb_info["version"], tcb_info["fmspc"], "id" in tcb_info) == (2, "00606a000000", False)


def test_tcb_info_v2_is_sgx_only() -> None:
    with pytest.raises(ValueError, match="expected 'TDX' version 3"):
        TdxVerifier(SGX_DCAPRS.collateral or "")


# -- sample 2: the dcap-rs quote -----------------------------------------------------------------


def test_the_dcaprs_sample_verifies_out_of_date_with_its_provenance_claims() -> None:
    claims = verifier().verify(SGX_DCAPRS.evidence, at=SGX_DCAPRS.at)
    assert claims.platform == "sgx"
    assert claims.tcb_status == "OutOfDate"
    assert claims.advisories == ()  # TCB info v2 has none
    assert claims.measurement == DCAPRS_MRENCLAVE
    assert claims.signer == DCAPRS_MRSIGNER
    assert (claims.product_id, claims.svn, claims.debug) == (0, 0, False)
    assert claims.report_data == "00" * 64
    assert claims.cpu_svn == "0c0c100fffff01000000000000000000"
    assert claims.evidence_digest == "b69ac41b2c5ee52302d90042fb0270468ee50e76a06f62e69036af75071fc250"
    assert claims.detail("fmspc") == "00606a000000"
    assert (claims.detail("qe_svn"), claims.detail("pce_svn")) == ("9", "14")
    assert claims.detail("attributes") == "0500000000000000e700000000000000"


@pytest.mark.parametrize(
    ("sample", "tcb_date", "comp_svns", "pce_svn"),
    [
        (SGX_DCAPRS, "2023-08-09T00:00:00Z", (12, 12, 3, 3, 255, 255, 1), 13),
        (SGX_OCCLUM, "2021-11-10T00:00:00Z", (4, 4, 3, 3, 255, 255, 0), 11),
    ],
    ids=lambda value: value.name if isinstance(value, Sample) else None,
)
def test_the_appraisal_picks_the_provenance_tcb_level_and_qe_status(
    sample: Sample, tcb_date: str, comp_svns: tuple[int, ...], pce_svn: int
) -> None:
    assert sample.collateral is not None
    certs = [x509.load_pem_x509_certificate(pem) for pem in pem_chain(sample.evidence)]
    extension = dcap_pck_extension.parse_sgx_extension(certs[0])
    assert extension.comp_svns == (*comp_svns, *([0] * 9))
    assert (extension.pce_svn, extension.pce_id, extension.fmspc.hex()) == (pce_svn, b"\0\0", "00606a000000")
    collateral = dcap_appraisal_v2.load_collateral(json.loads(sample.collateral))
    appraisal = dcap_appraisal_v2.appraise(parse_quote(sample.evidence), certs, certs[2], collateral)
    assert appraisal == dcap_appraisal_v2.Appraisal(
        fmspc="00606a000000",
        tcb_status="OutOfDate",
        advisories=(),
        platform_status="OutOfDate",
        tcb_date=tcb_date,
        qe_status="UpToDate",
    )


@pytest.mark.parametrize("sample", TCB_INFO_V2, ids=lambda s: s.name)
def test_the_chain_is_cached_and_verify_with_chain_is_the_quote_signature(sample: Sample) -> None:
    v = verifier(sample)
    chain = v.verify_chain(sample.evidence, sample.at)
    assert isinstance(chain, DcapChain)
    assert (chain.tcb_status, chain.advisories, chain.fmspc) == ("OutOfDate", (), "00606a000000")
    assert chain.key_digest != verifier(SGX_QVL).chain_cache_key(SGX_QVL.evidence)
    assert v.verify_with_chain(sample.evidence, chain, sample.at) == v.verify(sample.evidence, at=sample.at)
    tampered = bytearray(sample.evidence)
    tampered[48 + 64] ^= 1  # MRENCLAVE: not part of the chain, covered by the quote signature
    assert v.chain_cache_key(bytes(tampered)) == v.chain_cache_key(sample.evidence)
    with pytest.raises(EvidenceSignatureInvalid):
        v.verify_with_chain(bytes(tampered), chain, sample.at)
    other = SGX_OCCLUM if sample is SGX_DCAPRS else SGX_DCAPRS
    with pytest.raises(ChainInvalid, match="another attestation key"):
        v.verify_with_chain(other.evidence, chain, sample.at)


@pytest.mark.parametrize("sample", TCB_INFO_V2, ids=lambda s: s.name)
def test_outside_the_collateral_window_is_a_one_line_chain_invalid(sample: Sample) -> None:
    v = verifier(sample)
    assert sample.not_before is not None and sample.not_after is not None
    cases = {
        sample.not_after + SECOND: r"^the TCB info expired at 2025-03-15T03:29:42\+00:00 ",
        sample.not_before - SECOND: r"^the PCK CRL is not yet valid at ",
    }
    for when, message in cases.items():
        with pytest.raises(ChainInvalid, match=message) as error:
            v.verify(sample.evidence, at=when)
        assert "\n" not in str(error.value)
    chain = v.verify_chain(sample.evidence, sample.at)
    with pytest.raises(ChainInvalid, match="expired at"):
        v.verify_with_chain(sample.evidence, chain, sample.not_after + SECOND)


def test_the_v2_quotes_against_v3_collateral_of_another_fmspc_are_refused_on_the_fmspc() -> None:
    """The v3 path (dcap-qvl) is unchanged: the same quotes against sample 1's collateral."""
    for sample in TCB_INFO_V2:
        with pytest.raises(ChainInvalid, match="FMSPC 00606a000000 is not the collateral's 00a067110000"):
            verifier(SGX_QVL).verify(sample.evidence, at=SGX_QVL.at)
    assert verifier(SGX_QVL).verify(SGX_QVL.evidence, at=SGX_QVL.at).tcb_status == (
        "ConfigurationAndSWHardeningNeeded"
    )


# -- sample 3: the Occlum quote, DEBUG ----------------------------------------------------------


def _rule(**extra: object) -> dict[str, object]:
    return {
        "platform": "sgx",
        "measurements": [OCCLUM_MRENCLAVE],
        "tcb_statuses": ["OutOfDate"],
        "nonce_required": False,  # a published quote: its report data binds no nonce of ours
        **extra,
    }


def test_the_occlum_sample_verifies_out_of_date_and_debug() -> None:
    claims = verifier(SGX_OCCLUM).verify(SGX_OCCLUM.evidence, at=SGX_OCCLUM.at)
    assert (claims.tcb_status, claims.debug, claims.advisories) == ("OutOfDate", True, ())
    assert (claims.measurement, claims.signer) == (OCCLUM_MRENCLAVE, OCCLUM_MRSIGNER)
    assert claims.report_data == (b"test".ljust(64, b"\0")).hex()
    assert claims.detail("attributes") == "0700000000000000e700000000000000"
    assert (claims.detail("qe_svn"), claims.detail("pce_svn")) == ("8", "13")


def test_a_policy_forbidding_debug_denies_the_occlum_sample() -> None:
    claims = verifier(SGX_OCCLUM).verify(SGX_OCCLUM.evidence, at=SGX_OCCLUM.at)
    strict = parse_policy({"id": "sgx-no-debug", "rules": [_rule()]})
    decision = strict.evaluate(claims, now=SGX_OCCLUM.at, nonce_checked=False)
    assert not decision.allowed
    assert decision.reasons == ["rule 1: debug enclave not allowed"]
    lenient = parse_policy({"id": "sgx-debug-ok", "rules": [_rule(debug_allowed=True)]})
    assert lenient.evaluate(claims, now=SGX_OCCLUM.at, nonce_checked=False).allowed


def _cli_material(sample: Sample, tmp_path: Path) -> list[str]:
    collateral = tmp_path / "collateral.json"
    assert sample.collateral is not None
    collateral.write_text(sample.collateral)
    return [str(sample.quote), "--platform", "sgx", "--collateral", str(collateral)]


def test_the_cli_verifies_both_v2_samples_and_its_policy_denies_the_debug_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REKEY_HOME", str(tmp_path / "home"))
    at = SGX_DCAPRS.at.isoformat()
    for sample, measurement, debug in (
        (SGX_DCAPRS, DCAPRS_MRENCLAVE, False),
        (SGX_OCCLUM, OCCLUM_MRENCLAVE, True),
    ):
        code, out, err = run_cli(
            capsys, "attest", "verify", *_cli_material(sample, tmp_path), "--at", at, "--json"
        )
        assert code == 0, err
        claims = json.loads(out)["claims"]
        assert (claims["measurement"], claims["tcb_status"], claims["debug"]) == (
            measurement,
            "OutOfDate",
            debug,
        )
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"id": "sgx-no-debug", "rules": [_rule()]}))
    material = _cli_material(SGX_OCCLUM, tmp_path)
    code, out, err = run_cli(
        capsys, "attest", "verify", *material, "--at", at, "--policy", str(policy), "--json"
    )
    assert code == PolicyDenied.exit_code == 3, err
    assert json.loads(out)["reasons"] == ["rule 1: debug enclave not allowed"]
    code, _out, err = run_cli(capsys, "attest", "verify", *material, "--at", "2025-03-16T00:00:00Z")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "expired at" in err
