"""Attestation-result tokens: round trip, time checks, audience/policy/issuer, and forgeries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.claims import Claims
from attestation.errors import TokenInvalid
from attestation.token import ResultSigner, VerifiedResult, jwk_thumbprint, verify_result

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CLAIMS = Claims(
    platform="sim",
    measurement="1a" * 32,
    signer="2b" * 32,
    product_id=1,
    svn=4,
    debug=False,
    tcb_status="UpToDate",
    report_data="3c" * 64,
    evidence_digest="4d" * 32,
    evidence_time=NOW - timedelta(seconds=5),
    nonce="5e" * 16,
)
CNF = hashlib.sha256(b"enclave public key").hexdigest()


@pytest.fixture(scope="module")
def signer() -> ResultSigner:
    return ResultSigner.generate()


def issue(signer: ResultSigner, **overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "policy_id": "payments-release",
        "policy_digest": "ab" * 32,
        "cnf_key_hash": CNF,
        "audience": "kms",
        "now": NOW,
        **overrides,
    }
    return signer.issue(CLAIMS, **arguments)


def check(signer: ResultSigner, token: str, **overrides: Any) -> VerifiedResult:
    arguments: dict[str, Any] = {
        "public_key": signer.public_key,
        "audience": "kms",
        "policy_id": "payments-release",
        "now": NOW,
        **overrides,
    }
    return verify_result(token, **arguments)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pad(segment: str) -> str:
    return segment + "=" * (-len(segment) % 4)


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return (
        json.loads(base64.urlsafe_b64decode(pad(header))),
        json.loads(base64.urlsafe_b64decode(pad(payload))),
        signature,
    )


def test_round_trip(signer: ResultSigner) -> None:
    token = issue(signer)
    result = check(signer, token)
    assert result.claims == CLAIMS
    assert result.policy_id == "payments-release"
    assert result.policy_digest == "ab" * 32
    assert result.cnf_key_hash == CNF
    assert result.issued_at == NOW
    assert result.expires_at == NOW + timedelta(minutes=5)
    assert result.issuer == "rekey-verifier"
    assert result.jti and result.jti != check(signer, issue(signer)).jti


def test_token_layout(signer: ResultSigner) -> None:
    header, payload, _ = segments(issue(signer))
    assert header == {"alg": "ES256", "typ": "rekey-ar+jwt", "kid": signer.kid}
    assert payload["iss"] == "rekey-verifier" and payload["aud"] == "kms"
    assert payload["iat"] == payload["nbf"] == int(NOW.timestamp())
    assert payload["exp"] == int(NOW.timestamp()) + 300
    assert payload["cnf"] == {"kid-sha256": CNF}
    assert payload["claims"] == CLAIMS.to_dict()  # nested, not flattened
    assert {"policy_id", "policy_digest", "jti"} <= payload.keys()


def test_tokens_are_the_compact_jws_pyjwt_writes(signer: ResultSigner) -> None:
    """The issuer writes its tokens itself (a pre-encoded header, the key it holds): header and
    payload segments are byte for byte what ``jwt.encode`` writes for them, and the signature is
    the raw 64-byte r || s of JWS ES256 that PyJWT verifies, not DER."""
    token = issue(signer)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(pad(payload)))
    reference = jwt.encode(
        claims,
        serialization.load_pem_private_key(signer.private_pem(), None),  # type: ignore[arg-type]
        algorithm="ES256",
        headers={"kid": signer.kid, "typ": "rekey-ar+jwt"},
    )
    assert reference.split(".")[:2] == [header, payload]
    assert len(base64.urlsafe_b64decode(pad(signature))) == 64
    assert json.loads(jwt.PyJWS().decode(token, signer.public_key, algorithms=["ES256"])) == claims
    assert token != issue(signer)  # a fresh jti (and ECDSA nonce) every time


def test_kid_is_the_rfc7638_thumbprint(signer: ResultSigner) -> None:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signer.public_key))
    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, sort_keys=True, separators=(",", ":")
    )
    assert signer.kid == b64(hashlib.sha256(canonical.encode()).digest())
    assert jwk_thumbprint(signer.public_key) == signer.kid
    assert signer.public_jwk()["kid"] == signer.kid


def test_custom_issuer_and_ttl() -> None:
    signer = ResultSigner(ec.generate_private_key(ec.SECP256R1()), issuer="other", ttl=timedelta(seconds=30))
    token = issue(signer)
    result = signer.verify(token, audience="kms", policy_id=None, now=NOW)
    assert result.expires_at == NOW + timedelta(seconds=30)
    with pytest.raises(TokenInvalid, match="wrong issuer 'other'"):
        check(signer, token)


# -- time ---------------------------------------------------------------------------------------


def test_expiry(signer: ResultSigner) -> None:
    token = issue(signer)
    check(signer, token, now=NOW + timedelta(minutes=5) - timedelta(seconds=1))
    with pytest.raises(TokenInvalid, match="token expired at 2026-03-01T12:05:00"):
        check(signer, token, now=NOW + timedelta(minutes=5))
    check(signer, token, now=NOW + timedelta(minutes=5, seconds=10), leeway=timedelta(seconds=30))


def test_not_yet_valid(signer: ResultSigner) -> None:
    token = issue(signer, now=NOW + timedelta(minutes=1))
    with pytest.raises(TokenInvalid, match="not valid before"):
        check(signer, token)
    check(signer, token, leeway=timedelta(minutes=1))


def test_naive_now_is_a_programming_error(signer: ResultSigner) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        check(signer, issue(signer), now=NOW.replace(tzinfo=None))


# -- audience, policy, key ----------------------------------------------------------------------


def test_wrong_audience(signer: ResultSigner) -> None:
    with pytest.raises(TokenInvalid, match="wrong audience 'kms' \\(expected 'vault'\\)"):
        check(signer, issue(signer), audience="vault")


def test_policy_mismatch_and_any_policy(signer: ResultSigner) -> None:
    token = issue(signer)
    with pytest.raises(TokenInvalid, match="wrong policy 'payments-release' \\(expected 'other'\\)"):
        check(signer, token, policy_id="other")
    assert check(signer, token, policy_id=None).policy_id == "payments-release"


def test_other_key(signer: ResultSigner) -> None:
    other = ResultSigner.generate()
    token = issue(other)
    with pytest.raises(TokenInvalid, match="signed by another key"):
        check(signer, token)
    # Without the kid hint the signature itself fails.
    _, payload, signature = token.split(".")
    decoded = segments(token)[0]
    del decoded["kid"]
    stripped = ".".join([b64(json.dumps(decoded).encode()), payload, signature])
    with pytest.raises(TokenInvalid, match="bad signature"):
        check(signer, stripped)


def test_tampered_payload(signer: ResultSigner) -> None:
    header, _, signature = issue(signer).split(".")
    payload = segments(issue(signer))[1]
    payload["claims"]["debug"] = True
    forged = ".".join([header, b64(json.dumps(payload).encode()), signature])
    with pytest.raises(TokenInvalid, match=r"^bad signature$"):
        check(signer, forged)


# -- forgeries and garbage ----------------------------------------------------------------------


def forge_hs256(signer: ResultSigner, secret: bytes) -> str:
    """The classic key-confusion forgery: HMAC over the token with the *public* key as secret."""
    _, payload, _ = segments(issue(signer))
    payload["claims"]["measurement"] = "ff" * 32
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': signer.kid}).encode())}."
    signing_input += b64(json.dumps(payload).encode())
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_algorithm_confusion_hs256_with_public_key_bytes(signer: ResultSigner, encoding: str) -> None:
    if encoding == "pem":
        secret = signer.public_pem()
    else:
        secret = signer.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    forged = forge_hs256(signer, secret)
    with pytest.raises(TokenInvalid, match="algorithm 'HS256' is not allowed \\(only ES256\\)"):
        check(signer, forged)


def test_alg_none(signer: ResultSigner) -> None:
    _, payload, _ = segments(issue(signer))
    for alg in ("none", "None", "NONE"):
        unsigned = f"{b64(json.dumps({'alg': alg}).encode())}.{b64(json.dumps(payload).encode())}."
        with pytest.raises(TokenInvalid, match="is not allowed"):
            check(signer, unsigned)


def test_other_ecdsa_algorithm_is_refused(signer: ResultSigner) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    token = jwt.encode({"iss": "rekey-verifier"}, p384, algorithm="ES384")
    with pytest.raises(TokenInvalid, match="algorithm 'ES384' is not allowed"):
        check(signer, token)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b", "x" * 20000, "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"])
def test_malformed(signer: ResultSigner, token: str) -> None:
    with pytest.raises(TokenInvalid, match=r"malformed|bad signature"):
        check(signer, token)


def test_signed_but_incomplete_payload() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = ResultSigner(key)
    base = segments(issue(signer))[1]
    for drop, reason in (
        ("exp", "missing exp"),
        ("jti", "missing jti"),
        ("cnf", "missing cnf"),
        ("aud", "aud"),
    ):
        payload = {k: v for k, v in base.items() if k != drop}
        token = jwt.encode(
            payload, key, algorithm="ES256", headers={"kid": signer.kid, "typ": "rekey-ar+jwt"}
        )
        with pytest.raises(TokenInvalid, match=reason):
            check(signer, token)
    payload = {**base, "claims": {**base["claims"], "svn": "4"}}
    token = jwt.encode(payload, key, algorithm="ES256", headers={"typ": "rekey-ar+jwt"})
    with pytest.raises(TokenInvalid, match=r"claims\.svn has the wrong type"):
        check(signer, token)


# -- key handling -------------------------------------------------------------------------------


def test_save_and_load(tmp_path: Path, signer: ResultSigner) -> None:
    path = tmp_path / "result-signer.pem"
    signer.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = ResultSigner.load(path)
    assert loaded.kid == signer.kid
    check(loaded, issue(signer))
    with pytest.raises(FileExistsError):
        signer.save(path)  # O_EXCL: never overwrite a key


def test_save_does_not_follow_a_planted_symlink(tmp_path: Path, signer: ResultSigner) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "key.pem"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        signer.save(link)
    assert not target.exists()


def test_encrypted_key(tmp_path: Path, signer: ResultSigner) -> None:
    path = tmp_path / "key.pem"
    signer.save(path, password=b"correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    assert ResultSigner.load(path, password=b"correct horse").kid == signer.kid
    with pytest.raises(ValueError, match="cannot load the result-signing key"):
        ResultSigner.load(path, password=b"wrong")


def test_no_secret_in_repr() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = ResultSigner(key)
    text = repr(signer)
    private_value = key.private_numbers().private_value
    assert signer.kid in text
    assert "PRIVATE" not in text and str(private_value) not in text and hex(private_value)[2:] not in text


def test_only_p256_keys() -> None:
    with pytest.raises(ValueError, match="P-256"):
        ResultSigner(ec.generate_private_key(ec.SECP384R1()))


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "verifier" / "es256.pem"
    created = ResultSigner.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) & 0o077 == 0
    assert ResultSigner.load_or_create(path).kid == created.kid
