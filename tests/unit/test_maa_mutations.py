"""Every changed character of the real MAA token is a typed error, never a pass or a crash.

No sampling: every character of the header, payload and signature segments is replaced by
another base64url character (one RSA check each, about a second for the 3881 characters), and
the token is cut at and around every segment boundary. Forgeries: alg ``none`` (with and without
a signature), HS256 keyed with the signing key's public PEM, the kid swapped for each other
JWKS key and for an unknown one.
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestation.errors import (
    AttestationError,
    ChainInvalid,
    EvidenceSignatureInvalid,
    MalformedEvidence,
)
from attestation.maa import MaaVerifier
from tests.fixtures.maa import (
    IAT,
    ISSUER,
    JWKS,
    KID,
    TOKEN,
    b64url,
    hs256_with_public_key,
    real_claims,
    real_header,
)

AT = IAT + timedelta(minutes=5)
HEADER_SEGMENT, PAYLOAD_SEGMENT, SIGNATURE_SEGMENT = TOKEN.split(b".")
ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.fixture(scope="module")
def verifier() -> MaaVerifier:
    verifier = MaaVerifier(JWKS, issuer=ISSUER)
    assert verifier.verify(TOKEN, at=AT).svn == 1
    return verifier


def _replace(token: bytes, position: int) -> bytes:
    current = token[position]
    other = ALPHABET[(ALPHABET.index(current) + 1) % len(ALPHABET)]
    return token[:position] + bytes([other]) + token[position + 1 :]


def _segment_positions(index: int) -> range:
    start = sum(len(segment) + 1 for segment in TOKEN.split(b".")[:index])
    return range(start, start + len(TOKEN.split(b".")[index]))


@pytest.mark.parametrize("segment", [0, 1, 2], ids=["header", "payload", "signature"])
def test_every_character_of_each_segment(verifier: MaaVerifier, segment: int) -> None:
    positions = _segment_positions(segment)
    assert len(positions) > 100
    for position in positions:
        mutated = _replace(TOKEN, position)
        try:
            verifier.verify(mutated, at=AT)
        except AttestationError:
            continue
        pytest.fail(f"character {position} of segment {segment} changed and the token still verified")


def test_the_last_signature_character_has_no_spare_spelling(verifier: MaaVerifier) -> None:
    # 256 signature bytes are 342 characters: the last one carries 2 bits and 4 unused ones.
    last = len(TOKEN) - 1
    for other in ALPHABET:
        if other == TOKEN[last]:
            continue
        with pytest.raises(AttestationError):
            verifier.verify(TOKEN[:last] + bytes([other]), at=AT)


def test_truncation_at_and_around_every_boundary(verifier: MaaVerifier) -> None:
    dots = [i for i, byte in enumerate(TOKEN) if byte == ord(".")]
    cuts = {0, 1, len(TOKEN) - 1} | {d + delta for d in dots for delta in (-1, 0, 1, 2)}
    for cut in sorted(cuts):
        with pytest.raises(AttestationError):
            verifier.verify(TOKEN[:cut], at=AT)
    with pytest.raises(MalformedEvidence):
        verifier.verify(TOKEN + b".", at=AT)
    with pytest.raises(EvidenceSignatureInvalid):  # a 257th signature byte
        verifier.verify(TOKEN + b"A", at=AT)


def _with_header(header: dict[str, Any], signature: bytes = SIGNATURE_SEGMENT) -> bytes:
    return b64url(json.dumps(header).encode()).encode() + b"." + PAYLOAD_SEGMENT + b"." + signature


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "HS256", "RS512", "PS256", "ES256", ""])
def test_another_alg_is_refused(verifier: MaaVerifier, alg: str) -> None:
    header = {**real_header(), "alg": alg}
    with pytest.raises(EvidenceSignatureInvalid, match="not RS256"):
        verifier.verify(_with_header(header), at=AT)


def test_alg_none_without_a_signature_is_refused(verifier: MaaVerifier) -> None:
    header = {**real_header(), "alg": "none"}
    unsigned = b64url(json.dumps(header).encode()).encode() + b"." + PAYLOAD_SEGMENT + b"."
    with pytest.raises(MalformedEvidence):
        verifier.verify(unsigned, at=AT)
    with pytest.raises(AttestationError):
        verifier.verify(_with_header(header, b""), at=AT)


def test_hs256_with_the_real_public_key_as_secret_is_refused(verifier: MaaVerifier) -> None:
    entry = next(key for key in json.loads(JWKS)["keys"] if key["kid"] == KID)
    cert = x509.load_der_x509_certificate(base64.b64decode(entry["x5c"][0]))
    pem = cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = hs256_with_public_key(real_claims(), {**real_header(), "alg": "HS256"}, pem)
    with pytest.raises(EvidenceSignatureInvalid, match="not RS256"):
        verifier.verify(forged, at=AT)


@pytest.mark.parametrize(
    ("kid", "error"),
    [
        ("dSsaF5uUxZO_LRycmQ4KJu3ctMc", EvidenceSignatureInvalid),  # another 2048-bit key
        ("lH/VQ9TL53cXpeFt3Vf9tiOv+rkWwV+5PbiNzgWcySQ=", ChainInvalid),  # the 1024-bit key
        ("unknown", ChainInvalid),
        ("", MalformedEvidence),
    ],
)
def test_a_swapped_kid_is_refused(verifier: MaaVerifier, kid: str, error: type[AttestationError]) -> None:
    with pytest.raises(error):
        verifier.verify(_with_header({**real_header(), "kid": kid}), at=AT)


def test_a_header_without_kid_or_not_an_object_is_malformed(verifier: MaaVerifier) -> None:
    header = real_header()
    del header["kid"]
    for bad in (
        _with_header(header),
        b64url(b"[1]").encode() + b"." + PAYLOAD_SEGMENT + b"." + SIGNATURE_SEGMENT,
    ):
        with pytest.raises(MalformedEvidence):
            verifier.verify(bad, at=AT)
