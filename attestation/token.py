"""Attestation-result tokens: ES256 JWTs the verifier issues after evidence passed a policy.

Header: ``{"alg": "ES256", "typ": "rekey-ar+jwt", "kid": <RFC 7638 thumbprint>}``.

Payload::

    iss, aud, iat, nbf, exp, jti       registered claims (NumericDate integers, jti random)
    policy_id, policy_digest           the policy that allowed the claims
    cnf: {"kid-sha256": <hex>}         SHA-256 (hex) of the public key the enclave bound into its
                                       report data; the relying party checks the enclave holds it
    claims: {...}                      ``Claims.to_dict()``, nested under one key so evidence
                                       claims can never collide with or shadow registered claims

``verify_result`` accepts exactly ES256 (a token whose header says ``none``, ``HS256`` or anything
else is refused before any key is used) and checks the times against the caller's ``now``, not the
host clock, so workflows and tests stay deterministic.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from attestation.claims import Claims
from attestation.errors import TokenInvalid

__all__ = [
    "ALGORITHM",
    "DEFAULT_ISSUER",
    "DEFAULT_TTL",
    "TOKEN_TYPE",
    "ResultSigner",
    "VerifiedResult",
    "jwk_thumbprint",
    "verify_result",
]

ALGORITHM = "ES256"
TOKEN_TYPE = "rekey-ar+jwt"  # noqa: S105 - a JWT "typ", not a secret  # nosec B105
DEFAULT_ISSUER = "rekey-verifier"
DEFAULT_TTL = timedelta(minutes=5)
MAX_TOKEN_LENGTH = 16 * 1024


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _require_p256(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> None:
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"ES256 needs a P-256 key, not {key.curve.name}")


def _public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = public_key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }


def jwk_thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of a P-256 public key."""
    _require_p256(public_key)
    canonical = json.dumps(_public_jwk(public_key), sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def _numeric_date(when: datetime) -> int:
    if when.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return int(when.timestamp())


class ResultSigner:
    """Holds the verifier's ES256 signing key. Its repr shows the kid, never the key."""

    __slots__ = ("_header_segment", "_private_key", "issuer", "kid", "public_key", "ttl")

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey,
        issuer: str = DEFAULT_ISSUER,
        ttl: timedelta = DEFAULT_TTL,
    ) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise TypeError("private_key must be an EllipticCurvePrivateKey (P-256)")
        _require_p256(private_key)
        if ttl <= timedelta(0):
            raise ValueError("ttl must be positive")
        if not issuer:
            raise ValueError("issuer must not be empty")
        self._private_key = private_key
        self.public_key: ec.EllipticCurvePublicKey = private_key.public_key()
        self.issuer = issuer
        self.ttl = ttl
        self.kid = jwk_thumbprint(self.public_key)
        # The protected header is the same for every token of this key: encoded once, as PyJWT
        # would (sorted keys, compact separators).
        header = {"alg": ALGORITHM, "kid": self.kid, "typ": TOKEN_TYPE}
        self._header_segment = _b64url(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())

    def __repr__(self) -> str:
        return f"ResultSigner(kid={self.kid!r}, issuer={self.issuer!r}, ttl={self.ttl})"

    # -- key management -----------------------------------------------------------------------

    @classmethod
    def generate(cls, issuer: str = DEFAULT_ISSUER, ttl: timedelta = DEFAULT_TTL) -> ResultSigner:
        return cls(ec.generate_private_key(ec.SECP256R1()), issuer=issuer, ttl=ttl)

    @classmethod
    def from_pem(
        cls,
        data: bytes,
        *,
        password: bytes | None = None,
        issuer: str = DEFAULT_ISSUER,
        ttl: timedelta = DEFAULT_TTL,
    ) -> ResultSigner:
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError) as exc:
            # cryptography's messages name the problem, never the key material
            raise ValueError(f"cannot load the result-signing key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the result-signing key is not an EC key")
        return cls(key, issuer=issuer, ttl=ttl)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        password: bytes | None = None,
        issuer: str = DEFAULT_ISSUER,
        ttl: timedelta = DEFAULT_TTL,
    ) -> ResultSigner:
        """Load a PKCS#8 PEM private key (written by ``save``)."""
        with open(path, "rb") as handle:
            data = handle.read()
        return cls.from_pem(data, password=password, issuer=issuer, ttl=ttl)

    @classmethod
    def load_or_create(
        cls,
        path: str | Path,
        *,
        password: bytes | None = None,
        issuer: str = DEFAULT_ISSUER,
        ttl: timedelta = DEFAULT_TTL,
    ) -> ResultSigner:
        """Load the key at ``path``, or generate one and ``save`` it there (parent directories
        are created with mode 0700). If another process creates it first, its key is loaded."""
        path = Path(path)
        try:
            return cls.load(path, password=password, issuer=issuer, ttl=ttl)
        except FileNotFoundError:
            pass
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        signer = cls.generate(issuer=issuer, ttl=ttl)
        try:
            signer.save(path, password=password)
        except FileExistsError:
            return cls.load(path, password=password, issuer=issuer, ttl=ttl)
        return signer

    def private_pem(self, *, password: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def save(self, path: str | Path, *, password: bytes | None = None) -> None:
        """Write the private key as PKCS#8 PEM to a new file with mode 0600.

        The file is created with O_EXCL: an existing file (or a symlink planted in its place) is
        never overwritten or followed; ``FileExistsError`` instead."""
        data = self.private_pem(password=password)
        flags = (
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        )
        fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # in case the umask or a default ACL widened it
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_jwk(self) -> dict[str, str]:
        return {**_public_jwk(self.public_key), "kid": self.kid, "alg": ALGORITHM, "use": "sig"}

    # -- issuing ------------------------------------------------------------------------------

    def issue(
        self,
        claims: Claims,
        *,
        policy_id: str,
        policy_digest: str,
        cnf_key_hash: str,
        audience: str,
        now: datetime,
    ) -> str:
        """Sign an attestation result. ``cnf_key_hash``: hex SHA-256 of the key the enclave bound
        into its report data (the caller computes it)."""
        if not audience:
            raise ValueError("audience must not be empty")
        iat = _numeric_date(now)
        exp = _numeric_date(now + self.ttl)
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "jti": secrets.token_urlsafe(16),
            "policy_id": policy_id,
            "policy_digest": policy_digest,
            "cnf": {"kid-sha256": cnf_key_hash},
            "claims": claims.to_dict(),
        }
        # RFC 7515 compact serialisation, byte for byte what ``jwt.encode`` writes for this key and
        # header, without its per-call algorithm lookup, key preparation and header validation.
        signing_input = (
            f"{self._header_segment}.{_b64url(json.dumps(payload, separators=(',', ':')).encode())}"
        )
        der = self._private_key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def verify(
        self,
        token: str,
        *,
        audience: str,
        policy_id: str | None,
        now: datetime,
        leeway: timedelta = timedelta(0),
    ) -> VerifiedResult:
        """``verify_result`` with this signer's public key and issuer."""
        return verify_result(
            token,
            public_key=self.public_key,
            audience=audience,
            policy_id=policy_id,
            now=now,
            leeway=leeway,
            issuer=self.issuer,
        )


@dataclass(frozen=True)
class VerifiedResult:
    claims: Claims
    policy_id: str
    policy_digest: str
    cnf_key_hash: str
    issued_at: datetime
    expires_at: datetime
    jti: str
    issuer: str
    audience: str


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise TokenInvalid(f"malformed token: duplicate claim {key!r}")
        result[key] = value
    return result


def _number(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    if value is None:
        raise TokenInvalid(f"malformed token: missing {name}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenInvalid(f"malformed token: {name} is not a number")
    return int(value)


def _string(mapping: dict[str, Any], name: str, where: str = "") -> str:
    value = mapping.get(name)
    if value is None:
        raise TokenInvalid(f"malformed token: missing {where}{name}")
    if not isinstance(value, str):
        raise TokenInvalid(f"malformed token: {where}{name} is not a string")
    return value


def _claims_from(data: object) -> Claims:
    if not isinstance(data, dict):
        raise TokenInvalid("malformed token: claims is not an object")
    values: dict[str, Any] = {}
    types: dict[str, tuple[type, ...]] = {
        "platform": (str,),
        "measurement": (str,),
        "signer": (str,),
        "product_id": (int,),
        "svn": (int,),
        "debug": (bool,),
        "tcb_status": (str,),
        "report_data": (str,),
        "evidence_digest": (str,),
        "evidence_time": (str, type(None)),
        "nonce": (str, type(None)),
        "cpu_svn": (str,),
        "advisories": (list,),
        "details": (dict,),
    }
    for item in fields(Claims):
        if item.name not in data:
            if item.name in ("nonce", "cpu_svn", "advisories", "details"):  # have defaults
                continue
            raise TokenInvalid(f"malformed token: claims.{item.name} is missing")
        value = data[item.name]
        expected = types.get(item.name, (object,))
        bad_bool = isinstance(value, bool) and bool not in expected
        if bad_bool or not isinstance(value, expected):
            raise TokenInvalid(f"malformed token: claims.{item.name} has the wrong type")
        values[item.name] = value
    if values.get("evidence_time") is not None:
        try:
            values["evidence_time"] = datetime.fromisoformat(values["evidence_time"])
        except ValueError:
            raise TokenInvalid("malformed token: claims.evidence_time is not a timestamp") from None
    if "advisories" in values:
        if not all(isinstance(item, str) for item in values["advisories"]):
            raise TokenInvalid("malformed token: claims.advisories has the wrong type")
        values["advisories"] = tuple(values["advisories"])
    if "details" in values:
        details = values["details"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in details.items()):
            raise TokenInvalid("malformed token: claims.details has the wrong type")
        values["details"] = tuple(sorted(details.items()))
    return Claims(**values)


def _header(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenInvalid("malformed token: not three dot-separated parts")
    try:
        segment = parts[0].encode("ascii")
        raw = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeError):
        raise TokenInvalid("malformed token: cannot decode the header") from None
    if not isinstance(header, dict):
        raise TokenInvalid("malformed token: the header is not an object")
    return header


def _when(timestamp: int) -> datetime:
    try:
        return datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        raise TokenInvalid("malformed token: timestamp out of range") from None


def verify_result(
    token: str,
    *,
    public_key: ec.EllipticCurvePublicKey,
    audience: str,
    policy_id: str | None,
    now: datetime,
    leeway: timedelta = timedelta(0),
    issuer: str = DEFAULT_ISSUER,
) -> VerifiedResult:
    """Verify an attestation-result token. Every failure raises ``TokenInvalid`` with a one-line
    reason. ``policy_id=None`` accepts any policy id. ``now`` must be timezone-aware."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TypeError("public_key must be an EllipticCurvePublicKey (P-256)")
    _require_p256(public_key)
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    if not isinstance(token, str) or not token:
        raise TokenInvalid("malformed token: empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenInvalid(f"malformed token: longer than {MAX_TOKEN_LENGTH} characters")

    # 1. The header: the algorithm must be exactly ES256 before any key is used.
    header = _header(token)
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise TokenInvalid(f"algorithm {alg!r} is not allowed (only {ALGORITHM})")
    if header.get("typ", TOKEN_TYPE) != TOKEN_TYPE:
        raise TokenInvalid(f"wrong token type {header.get('typ')!r} (expected {TOKEN_TYPE})")
    kid = header.get("kid")
    if kid is not None and kid != jwk_thumbprint(public_key):
        raise TokenInvalid(f"signed by another key (kid {str(kid)[:64]!r})")

    # 2. The signature (PyJWT's JWS layer; claim checks below use our own clock).
    try:
        decoded = jwt.PyJWS().decode_complete(token, public_key, algorithms=[ALGORITHM])
    except jwt.InvalidSignatureError:
        raise TokenInvalid("bad signature") from None
    except jwt.InvalidAlgorithmError as exc:
        raise TokenInvalid(f"algorithm not allowed: {exc}") from None
    except jwt.PyJWTError as exc:
        raise TokenInvalid(f"malformed token: {' '.join(str(exc).split())}") from None
    try:
        payload = json.loads(decoded["payload"], object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError):
        raise TokenInvalid("malformed token: the payload is not JSON") from None
    if not isinstance(payload, dict):
        raise TokenInvalid("malformed token: the payload is not an object")

    # 3. Registered claims.
    iat, nbf, exp = (_number(payload, name) for name in ("iat", "nbf", "exp"))
    issued_at, not_before, expires_at = _when(iat), _when(nbf), _when(exp)
    if now - leeway >= expires_at:
        raise TokenInvalid(f"token expired at {expires_at.isoformat()}")
    if now + leeway < not_before:
        raise TokenInvalid(f"token not valid before {not_before.isoformat()}")
    if now + leeway < issued_at:
        raise TokenInvalid(f"token issued in the future ({issued_at.isoformat()})")
    token_issuer = _string(payload, "iss")
    if token_issuer != issuer:
        raise TokenInvalid(f"wrong issuer {token_issuer!r} (expected {issuer!r})")
    aud = payload.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        raise TokenInvalid("malformed token: missing aud")
    if audience not in audiences:
        raise TokenInvalid(f"wrong audience {', '.join(audiences)!r} (expected {audience!r})")
    jti = _string(payload, "jti")

    # 4. Ours.
    token_policy = _string(payload, "policy_id")
    if policy_id is not None and token_policy != policy_id:
        raise TokenInvalid(f"wrong policy {token_policy!r} (expected {policy_id!r})")
    policy_digest = _string(payload, "policy_digest")
    cnf = payload.get("cnf")
    if not isinstance(cnf, dict):
        raise TokenInvalid("malformed token: missing cnf")
    cnf_key_hash = _string(cnf, "kid-sha256", "cnf.")
    claims = _claims_from(payload.get("claims"))

    return VerifiedResult(
        claims=claims,
        policy_id=token_policy,
        policy_digest=policy_digest,
        cnf_key_hash=cnf_key_hash,
        issued_at=issued_at,
        expires_at=expires_at,
        jti=jti,
        issuer=token_issuer,
        audience=audience,
    )
