"""Verifier for Microsoft Azure Attestation (MAA) SGX tokens (platform ``sgx``).

MAA appraises an SGX quote against Intel's collateral and, if its attestation policy allows,
returns a JWT signed with one of the keys that its ``/certs`` endpoint publishes as a JWKS. This
module trusts a JWKS given at construction (never the token's ``jku``: that would let the token
name its own trust anchor) and checks, in order:

1. Structure (``MalformedEvidence``): a compact JWS of at most 64 KiB in canonical base64url, its
   header JSON with a ``kid``.
2. Key (``ChainInvalid``): the JWKS has a key for that ``kid`` whose certificate is valid at
   ``at``.
3. Signature (``EvidenceSignatureInvalid``): the header ``alg`` is RS256 (``none``, HS* and
   anything else are refused before the signature is checked) and the signature verifies (RS256 by
   PyJWT's algorithm implementation).
4. Time (``ChainInvalid``, like an expired certificate): ``iat <= at``, ``nbf <= at`` and
   ``at < exp`` with no leeway, checked here against the given ``at`` (PyJWT would check the
   wall clock); ``iss`` when an issuer was configured.
5. Claims (``MalformedEvidence``): the SGX claims of the token are present and well typed.

Mapping: ``measurement`` = ``x-ms-sgx-mrenclave``, ``signer`` = ``x-ms-sgx-mrsigner``,
``product_id`` = ``x-ms-sgx-product-id``, ``svn`` = ``x-ms-sgx-svn``, ``debug`` =
``x-ms-sgx-is-debuggable``, ``report_data`` = ``x-ms-sgx-report-data`` (the quote's 64 bytes),
``evidence_time`` = ``iat``, ``evidence_digest`` the SHA-256 of the token bytes.

``tcb_status``: a v1.0 MAA token carries no TCB level. ``x-ms-sgx-tcbidentifier`` names Intel's
TCB evaluation data set MAA used and ``x-ms-sgx-collateral`` holds hashes of the collateral; neither
says UpToDate or OutOfDate. MAA issues a token only for a quote its policy accepted, so the status
is ``UpToDate`` unless the token states one itself (``x-ms-sgx-tcb-status``, one of the Intel
statuses). The identifier and the collateral hashes go into ``details`` (``tcb_identifier``,
``collateral_<name>``) for audit, with ``ehd`` (the enclave-held data, hex), ``issuer``, ``kid``,
``jti``, ``policy_hash`` and ``attestation_type``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from attestation.certs import CERT_ERRORS
from attestation.claims import Claims
from attestation.errors import ChainInvalid, EvidenceSignatureInvalid, MalformedEvidence

__all__ = ["MaaVerifier"]

MAX_TOKEN_BYTES = 64 * 1024
MAX_JWKS_BYTES = 1 << 20
MIN_RSA_BITS = 2048
_MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime holds
ALGORITHM = "RS256"
_TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    }
)
_JWS_RE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_URLSAFE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: The last character of a segment whose length is 2 or 3 (mod 4) carries 4 or 2 unused bits,
#: which a canonical encoding leaves zero: only these characters may end such a segment.
_CANONICAL_LAST = {2: frozenset(_URLSAFE[::16]), 3: frozenset(_URLSAFE[::4])}
_HEX32 = re.compile(r"[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{128}")


class _Key:
    __slots__ = ("key", "not_after", "not_before")

    def __init__(
        self, key: rsa.RSAPublicKey, not_before: datetime | None, not_after: datetime | None
    ) -> None:
        self.key = key
        self.not_before = not_before
        self.not_after = not_after


_RS256 = RSAAlgorithm(RSAAlgorithm.SHA256)


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _load_jwk(entry: object) -> tuple[str, _Key | None] | None:
    """One JWKS entry: the key of ``x5c[0]`` (MAA's form) or ``n``/``e``. None for a non-RSA
    entry; ``(kid, None)`` for an RSA key under ``MIN_RSA_BITS`` (MAA still publishes a 1024-bit
    one), which is not trusted."""
    if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or not entry["kid"]:
        raise ValueError("a JWKS entry has no kid")
    if entry.get("kty") != "RSA":
        return None
    kid: str = entry["kid"]
    x5c = entry.get("x5c")
    not_before: datetime | None = None
    not_after: datetime | None = None
    try:
        if x5c is not None:
            if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
                raise ValueError
            cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
            key = cert.public_key()
            not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
        else:
            n = int.from_bytes(_b64url_decode(entry["n"]), "big")
            e = int.from_bytes(_b64url_decode(entry["e"]), "big")
            key = rsa.RSAPublicNumbers(e, n).public_key()
    except (*CERT_ERRORS, KeyError, binascii.Error):
        raise ValueError(f"JWKS key {kid!r} cannot be read") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"JWKS key {kid!r} is not an RSA key")
    if key.key_size < MIN_RSA_BITS:
        return kid, None
    return kid, _Key(key, not_before, not_after)


class _Token(NamedTuple):
    text: str  # the compact JWS
    header: bytes  # the decoded segments
    payload: bytes
    signature: bytes


def _token(evidence: bytes) -> _Token:
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise MalformedEvidence("MAA evidence must be bytes (the JWT)")
    data = bytes(evidence).strip()
    if len(data) > MAX_TOKEN_BYTES:
        raise MalformedEvidence(f"MAA token is larger than {MAX_TOKEN_BYTES} bytes")
    if not _JWS_RE.fullmatch(data):
        raise MalformedEvidence("MAA evidence is not a compact JWS (header.payload.signature)")
    # base64url lets the last character of a segment carry unused bits, and the signature
    # segment is not signed: a lenient decoder would accept several spellings of one token.
    decoded = []
    for segment in data.split(b"."):
        tail = len(segment) % 4  # characters in the last, partial quantum
        if tail == 1 or (tail and segment[-1] not in _CANONICAL_LAST[tail]):
            raise MalformedEvidence("MAA token segment is not canonical base64url")
        try:
            decoded.append(binascii.a2b_base64(segment.translate(_FROM_URLSAFE) + b"=" * (-tail % 4)))
        except binascii.Error:
            raise MalformedEvidence("MAA token segment is not base64url") from None
    return _Token(data.decode("ascii"), *decoded)


def _header(token: _Token) -> dict[str, Any]:
    try:
        header = json.loads(token.header)
    except (ValueError, RecursionError):
        raise MalformedEvidence("MAA token header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise MalformedEvidence("MAA token header is not a JSON object")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise MalformedEvidence("MAA token header has no kid")
    return header


def _int_claim(payload: dict[str, Any], name: str, bound: int) -> int:
    value = payload.get(name)
    if type(value) is not int or not 0 <= value < bound:
        raise MalformedEvidence(f"MAA token claim {name} is missing or not an integer in 0..{bound - 1}")
    return value


def _hex_claim(payload: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value.lower()):
        raise MalformedEvidence(f"MAA token claim {name} is missing or not hex of the right size")
    return value.lower()


def _time(payload: dict[str, Any], name: str, *, required: bool) -> datetime | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= _MAX_SECONDS:
        raise MalformedEvidence(f"MAA token claim {name} is missing or not a NumericDate")
    return datetime.fromtimestamp(value, UTC)


class MaaVerifier:
    """``PlatformVerifier`` for MAA SGX tokens, trusting the keys of one JWKS."""

    platform: str = "sgx"

    def __init__(self, jwks: bytes | str, *, issuer: str | None = None) -> None:
        """``jwks``: the JSON of the MAA provider's ``/certs`` response. ``issuer``: if given,
        the token's ``iss`` must equal it (e.g. ``https://sharedeus.eus.attest.azure.net``)."""
        if len(jwks) > MAX_JWKS_BYTES:
            raise ValueError("jwks is too large")
        try:
            document = json.loads(jwks)
        except ValueError:
            raise ValueError("jwks is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError('jwks is not a JWKS (an object with "keys")')
        keys: dict[str, _Key | None] = {}
        for entry in document["keys"]:
            loaded = _load_jwk(entry)
            if loaded is None:
                continue
            kid, key = loaded
            if kid in keys:
                raise ValueError(f"jwks has two keys with kid {kid!r}")
            keys[kid] = key
        if not any(keys.values()):
            raise ValueError(f"jwks has no RSA key of at least {MIN_RSA_BITS} bits")
        self._keys = keys
        self._issuer = issuer

    def __repr__(self) -> str:
        return f"MaaVerifier(kids={sorted(self._keys)}, issuer={self._issuer!r})"

    def chain_cache_key(self, evidence: bytes) -> bytes:
        """The token's ``kid``: every token of one MAA signing key shares it."""
        return str(_header(_token(evidence))["kid"]).encode()

    def verify(self, evidence: bytes, *, at: datetime) -> Claims:
        if at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        token = _token(evidence)
        header = _header(token)
        kid = header["kid"]
        key = self._keys.get(kid)
        if kid not in self._keys:
            raise ChainInvalid("MAA token is signed with a key that is not in the trusted JWKS")
        if key is None:
            raise ChainInvalid(f"MAA token is signed with a JWKS key under {MIN_RSA_BITS} bits, not trusted")
        if (key.not_before is not None and at < key.not_before) or (
            key.not_after is not None and at > key.not_after
        ):
            raise ChainInvalid(
                f"the MAA signing certificate for the token's kid is not valid at {at.isoformat()}"
            )
        if header.get("alg") != ALGORITHM:
            raise EvidenceSignatureInvalid(f"MAA token alg is not {ALGORITHM}")
        payload = self._decode(token, key.key)
        self._check_times(payload, at)
        return self._claims(payload, kid, hashlib.sha256(token.text.encode("ascii")).hexdigest())

    def _decode(self, token: _Token, key: rsa.RSAPublicKey) -> dict[str, Any]:
        """The payload, once PyJWT's RS256 implementation verified the signature over
        ``header.payload``. ``jwt.decode`` would decode the segments again with a
        per-character check that cost 70% of a verification (``_token`` already decoded them
        and refused any that is not canonical base64url)."""
        signing_input = token.text.rpartition(".")[0].encode("ascii")
        try:
            valid = _RS256.verify(signing_input, key, token.signature)
        except (ValueError, TypeError):
            raise MalformedEvidence("MAA token cannot be decoded") from None
        if not valid:
            raise EvidenceSignatureInvalid("MAA token signature does not verify with the JWKS key")
        try:
            payload = json.loads(token.payload)
        except (ValueError, RecursionError):
            raise MalformedEvidence("MAA token payload is not base64url JSON") from None
        if not isinstance(payload, dict):
            raise MalformedEvidence("MAA token payload is not a JSON object")
        return payload

    def _check_times(self, payload: dict[str, Any], at: datetime) -> None:
        issued = _time(payload, "iat", required=True)
        expires = _time(payload, "exp", required=True)
        not_before = _time(payload, "nbf", required=False)
        assert issued is not None and expires is not None  # required  # nosec B101
        if at >= expires:
            raise ChainInvalid(f"MAA token expired at {expires.isoformat()} (checked at {at.isoformat()})")
        for name, when in (("iat", issued), ("nbf", not_before)):
            if when is not None and at < when:
                raise ChainInvalid(f"MAA token is not valid before {when.isoformat()} ({name})")
        if self._issuer is not None and payload.get("iss") != self._issuer:
            raise ChainInvalid("MAA token is from another issuer than the configured one")

    def _claims(self, payload: dict[str, Any], kid: str, digest: str) -> Claims:
        if payload.get("x-ms-attestation-type") != "sgx":
            raise MalformedEvidence("MAA token is not an SGX attestation (x-ms-attestation-type)")
        debug = payload.get("x-ms-sgx-is-debuggable")
        if not isinstance(debug, bool):
            raise MalformedEvidence("MAA token claim x-ms-sgx-is-debuggable is missing or not a boolean")
        tcb_status = payload.get("x-ms-sgx-tcb-status", "UpToDate")
        if tcb_status not in _TCB_STATUSES:
            raise MalformedEvidence("MAA token claim x-ms-sgx-tcb-status is not a known TCB status")
        details: dict[str, str] = {"kid": kid, "attestation_type": "sgx"}
        for name, claim in (
            ("issuer", "iss"),
            ("jti", "jti"),
            ("policy_hash", "x-ms-policy-hash"),
            ("tcb_identifier", "x-ms-sgx-tcbidentifier"),
            ("ver", "x-ms-ver"),
        ):
            value = payload.get(claim)
            if isinstance(value, str | int) and not isinstance(value, bool):
                details[name] = str(value)
        ehd = payload.get("x-ms-sgx-ehd", payload.get("maa-ehd"))
        if ehd is not None:
            try:
                if not isinstance(ehd, str):
                    raise ValueError
                details["ehd"] = _b64url_decode(ehd).hex()
            except (ValueError, binascii.Error):
                raise MalformedEvidence("MAA token claim x-ms-sgx-ehd is not base64url") from None
        collateral = payload.get("x-ms-sgx-collateral")
        if isinstance(collateral, dict):
            for name, value in collateral.items():
                if isinstance(name, str) and isinstance(value, str):
                    details[f"collateral_{name}"] = value
        issued = _time(payload, "iat", required=True)
        return Claims(
            platform=self.platform,
            measurement=_hex_claim(payload, "x-ms-sgx-mrenclave", _HEX32),
            signer=_hex_claim(payload, "x-ms-sgx-mrsigner", _HEX32),
            product_id=_int_claim(payload, "x-ms-sgx-product-id", 1 << 16),
            svn=_int_claim(payload, "x-ms-sgx-svn", 1 << 16),
            debug=debug,
            tcb_status=tcb_status,
            report_data=_hex_claim(payload, "x-ms-sgx-report-data", _HEX64),
            evidence_digest=digest,
            evidence_time=issued,
            details=tuple(sorted(details.items())),
        )
