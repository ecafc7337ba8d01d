"""MaaVerifier: the real MAA SGX token in vectors/maa/ verifies against the captured JWKS at a time
inside its validity, with the claims PROVENANCE.md states; everything else is a typed error."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from attestation.errors import ChainInvalid, EvidenceSignatureInvalid, MalformedEvidence
from attestation.maa import MaaVerifier
from attestation.platform import PlatformVerifier
from attestation.policy import parse_policy
from attestation.token import ResultSigner
from attestation.verifier import Verifier, expected_report_data
from tests.fixtures.maa import (
    EXP,
    IAT,
    ISSUER,
    JWKS,
    KID,
    TOKEN,
    TestSigner,
    b64url,
    hs256_with_public_key,
    later,
    real_claims,
)

MRENCLAVE = "f56735aa42563627a832e0c7ba9911382eb68afed75830b3f97266f3e67bdc99"
MRSIGNER = "a595c6c5805da0c9c4cb920334d354aeaee2207e479dff679d5f360375f557dd"
RUNTIME_DATA = b"This is some runtime data"


@pytest.fixture(scope="module")
def verifier() -> MaaVerifier:
    return MaaVerifier(JWKS, issuer=ISSUER)


@pytest.fixture(scope="module")
def signer() -> TestSigner:
    return TestSigner()


@pytest.fixture(scope="module")
def test_verifier(signer: TestSigner) -> MaaVerifier:
    return MaaVerifier(signer.jwks())


# -- the real token ------------------------------------------------------------------------------


def test_the_jwks_has_the_three_stated_keys(verifier: MaaVerifier) -> None:
    kids = [key["kid"] for key in json.loads(JWKS)["keys"]]
    assert len(kids) == 3 and KID in kids
    assert all(kid in repr(verifier) for kid in kids)
    plain: PlatformVerifier = verifier  # mypy checks the protocol here
    assert plain.platform == "sgx"


@pytest.mark.parametrize(
    "at", [IAT, later(3600), EXP - timedelta(seconds=1)], ids=["iat", "iat+1h", "exp-1s"]
)
def test_the_real_token_verifies_with_the_stated_claims(verifier: MaaVerifier, at: datetime) -> None:
    claims = verifier.verify(TOKEN, at=at)
    assert claims.platform == "sgx"
    assert claims.measurement == MRENCLAVE
    assert claims.signer == MRSIGNER
    assert (claims.product_id, claims.svn, claims.debug) == (1, 1, False)
    assert claims.report_data == hashlib.sha256(RUNTIME_DATA).hexdigest() + "00" * 32
    assert bytes.fromhex(claims.detail("ehd") or "") == RUNTIME_DATA
    assert claims.tcb_status == "UpToDate"
    assert claims.detail("tcb_identifier") == "10"
    assert (claims.detail("collateral_quotehash") or "").startswith("89ee11a8")
    assert claims.detail("issuer") == ISSUER
    assert claims.detail("kid") == KID
    assert claims.detail("policy_hash") == "OwEvpSVEWA5eisCEncBt8NSZFLYDRKoLaoONPrZgoeY"
    assert claims.evidence_time == IAT
    assert claims.evidence_digest == "1717568b56373f41c43c2e2f4be5cfefbadc05db926edf31a96c74ab4326ea08"


def test_the_issuer_is_optional_and_checked_when_given() -> None:
    assert MaaVerifier(JWKS).verify(TOKEN, at=IAT).measurement == MRENCLAVE
    with pytest.raises(ChainInvalid, match="another issuer"):
        MaaVerifier(JWKS, issuer="https://evil.attest.azure.net").verify(TOKEN, at=IAT)


@pytest.mark.parametrize(
    ("at", "match"),
    [
        (EXP, "expired"),
        (EXP + timedelta(days=1), "expired"),
        (IAT - timedelta(seconds=1), "not valid before"),
        (datetime(2026, 11, 27, tzinfo=UTC), "expired"),
        (datetime(2051, 1, 1, tzinfo=UTC), "signing certificate"),
    ],
    ids=["exp", "exp+1d", "iat-1s", "2026", "after-the-certificate"],
)
def test_times_outside_the_validity_fail(verifier: MaaVerifier, at: datetime, match: str) -> None:
    with pytest.raises(ChainInvalid, match=match):
        verifier.verify(TOKEN, at=at)


def test_a_naive_time_is_a_programming_error(verifier: MaaVerifier) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verifier.verify(TOKEN, at=datetime(2023, 9, 26, 15))


def test_chain_cache_key_is_the_kid(verifier: MaaVerifier) -> None:
    assert verifier.chain_cache_key(TOKEN) == KID.encode()


def test_a_policy_on_signer_product_and_svn_allows_the_real_token(verifier: MaaVerifier) -> None:
    policy = parse_policy(
        {
            "id": "maa",
            "rules": [
                {
                    "platform": "sgx",
                    "signer": MRSIGNER,
                    "product_id": 1,
                    "min_svn": 1,
                    "nonce_required": False,
                }
            ],
        }
    )
    assert policy.evaluate(verifier.verify(TOKEN, at=IAT), now=IAT, nonce_checked=False).allowed


# -- other keys ----------------------------------------------------------------------------------


def test_the_token_fails_with_another_key_under_its_kid(signer: TestSigner) -> None:
    jwks = json.dumps({"keys": [signer.jwk(kid=KID)]})
    with pytest.raises(EvidenceSignatureInvalid):
        MaaVerifier(jwks).verify(TOKEN, at=IAT)


def test_the_token_fails_with_a_jwks_without_its_kid(signer: TestSigner) -> None:
    with pytest.raises(ChainInvalid, match="not in the trusted JWKS"):
        MaaVerifier(signer.jwks()).verify(TOKEN, at=IAT)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_a_key_under_2048_bits_is_not_trusted(signer: TestSigner) -> None:
    weak = TestSigner(kid="weak", bits=1024)
    verifier = MaaVerifier(signer.jwks(weak.jwk()))
    with pytest.raises(ChainInvalid, match="under 2048 bits"):
        verifier.verify(weak.token(), at=IAT)
    assert verifier.verify(signer.token(), at=IAT).measurement == MRENCLAVE
    with pytest.raises(ValueError, match="no RSA key of at least 2048 bits"):
        MaaVerifier(json.dumps({"keys": [weak.jwk()]}))


def test_a_jwk_with_modulus_and_exponent_works(signer: TestSigner) -> None:
    numbers = signer.key.public_key().public_numbers()
    jwk = {
        "kid": signer.kid,
        "kty": "RSA",
        "n": b64url(numbers.n.to_bytes(256, "big")),
        "e": b64url(numbers.e.to_bytes(3, "big")),
    }
    assert MaaVerifier(json.dumps({"keys": [jwk]})).verify(signer.token(), at=IAT).svn == 1


@pytest.mark.parametrize(
    "jwks",
    [
        "not json",
        "[]",
        '{"keys": {}}',
        '{"keys": []}',
        '{"keys": [{"kty": "RSA"}]}',
        '{"keys": [{"kid": "a", "kty": "RSA", "x5c": ["bm90IGEgY2VydA=="]}]}',
        '{"keys": [{"kid": "a", "kty": "RSA", "n": "AQAB"}]}',
        '{"keys": [{"kid": "a", "kty": "EC", "crv": "P-256"}]}',
    ],
)
def test_bad_jwks_is_a_configuration_error(jwks: str) -> None:
    with pytest.raises(ValueError):
        MaaVerifier(jwks)


def test_duplicate_kids_are_refused(signer: TestSigner) -> None:
    with pytest.raises(ValueError, match="two keys"):
        MaaVerifier(signer.jwks(signer.jwk()))


# -- claims of other tokens (signed by the test key) ---------------------------------------------


def test_a_debuggable_enclave_is_refused_by_a_policy_that_forbids_debug(
    signer: TestSigner, test_verifier: MaaVerifier
) -> None:
    claims = test_verifier.verify(signer.token({"x-ms-sgx-is-debuggable": True}), at=IAT)
    assert claims.debug is True
    rule: dict[str, Any] = {"platform": "sgx", "measurements": [MRENCLAVE], "nonce_required": False}
    decision = parse_policy({"id": "p", "rules": [rule]}).evaluate(claims, now=IAT, nonce_checked=False)
    assert not decision.allowed
    assert any("debug enclave not allowed" in reason for reason in decision.reasons)
    lax = parse_policy({"id": "p", "rules": [{**rule, "debug_allowed": True}]})
    assert lax.evaluate(claims, now=IAT, nonce_checked=False).allowed


def test_a_stated_tcb_status_is_taken(signer: TestSigner, test_verifier: MaaVerifier) -> None:
    claims = test_verifier.verify(signer.token({"x-ms-sgx-tcb-status": "OutOfDate"}), at=IAT)
    assert claims.tcb_status == "OutOfDate"


BAD_CLAIMS: list[dict[str, Any]] = [
    {"x-ms-attestation-type": "sevsnpvm"},
    {"x-ms-attestation-type": None},
    {"x-ms-sgx-mrenclave": None},
    {"x-ms-sgx-mrenclave": "xyz"},
    {"x-ms-sgx-mrenclave": MRENCLAVE[:-2]},
    {"x-ms-sgx-mrsigner": 12},
    {"x-ms-sgx-product-id": "1"},
    {"x-ms-sgx-product-id": 1 << 16},
    {"x-ms-sgx-svn": -1},
    {"x-ms-sgx-svn": True},
    {"x-ms-sgx-is-debuggable": "false"},
    {"x-ms-sgx-is-debuggable": None},
    {"x-ms-sgx-report-data": "00" * 32},
    {"x-ms-sgx-tcb-status": "Bogus"},
    {"x-ms-sgx-ehd": 5},
    {"iat": None},
    {"iat": "1695737747"},
    {"exp": None},
    {"exp": 1e300},
    {"exp": 253402300800},  # year 10000: past what datetime holds
    {"nbf": 1 << 40},
    {"nbf": True},
]


@pytest.mark.parametrize("override", BAD_CLAIMS, ids=[repr(c)[:40] for c in BAD_CLAIMS])
def test_missing_or_mistyped_claims_are_malformed(
    signer: TestSigner, test_verifier: MaaVerifier, override: dict[str, Any]
) -> None:
    with pytest.raises(MalformedEvidence):
        test_verifier.verify(signer.token(override), at=IAT)


def test_a_future_nbf_fails(signer: TestSigner, test_verifier: MaaVerifier) -> None:
    token = signer.token({"nbf": int(IAT.timestamp()) + 60})
    with pytest.raises(ChainInvalid, match=r"not valid before .*\(nbf\)"):
        test_verifier.verify(token, at=later(59))
    assert test_verifier.verify(token, at=later(60)).svn == 1


def test_the_payload_must_be_an_object(signer: TestSigner, test_verifier: MaaVerifier) -> None:
    token = jwt.api_jws.encode(b"[1, 2]", signer.key, algorithm="RS256", headers={"kid": signer.kid})
    with pytest.raises(MalformedEvidence):
        test_verifier.verify(token.encode(), at=IAT)


@pytest.mark.parametrize("evidence", [b"", b"a.b", b"a.b.c.d", b"\xff.\xff.\xff", b"x" * 70_000, "a.b.c"])
def test_non_tokens_are_malformed(verifier: MaaVerifier, evidence: Any) -> None:
    with pytest.raises(MalformedEvidence):
        verifier.verify(evidence, at=IAT)


# -- the core ------------------------------------------------------------------------------------


async def test_the_core_issues_a_token_for_a_bound_maa_token(
    signer: TestSigner, test_verifier: MaaVerifier
) -> None:
    key, nonce = b"-----enclave public key-----", b"fresh nonce"
    token = signer.token({"x-ms-sgx-report-data": expected_report_data(nonce, key).hex()})
    policy = parse_policy({"id": "maa", "rules": [{"platform": "sgx", "measurements": [MRENCLAVE]}]})
    result_signer = ResultSigner.generate()
    async with Verifier({"sgx": test_verifier}, result_signer, clock=lambda: IAT) as core:
        result = await core.verify(
            token, platform="sgx", expected_nonce=nonce, policy=policy, audience="kms", cnf_public_key=key
        )
    claims = result_signer.verify(result, audience="kms", policy_id="maa", now=IAT).claims
    assert (claims.platform, claims.measurement, claims.nonce) == ("sgx", MRENCLAVE, nonce.hex())


def test_the_public_key_pem_is_not_an_hs256_secret(signer: TestSigner, test_verifier: MaaVerifier) -> None:
    pem = signer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = hs256_with_public_key(real_claims(), {"alg": "HS256", "kid": signer.kid, "typ": "JWT"}, pem)
    with pytest.raises(EvidenceSignatureInvalid, match="not RS256"):
        test_verifier.verify(forged, at=IAT)
