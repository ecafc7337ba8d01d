"""Signing keys for statements rekey must be able to prove later: audit records and the
checkpoints of the freshness witness (`sealing.witness`).

A `Signer` signs a 32-byte SHA-256 digest. Two kinds of public key verify:

* Ed25519 (a key file, `FileSigner`, or an OpenBao/Vault Transit ``ed25519`` key): the
  signature is Ed25519 over the digest bytes;
* ECDSA P-256 (an AWS KMS ``ECC_NIST_P256`` key, ``ECDSA_SHA_256`` with ``MessageType=DIGEST``,
  or a Transit ``ecdsa-p256`` key with ``prehashed``): a DER signature over the prehashed digest.

Keys are named two ways: the short ``key_id`` (16 hex digits) that records carry, and the full
`fingerprint` (``sha256:<64 hex>``) that an operator pins in the configuration. Only pinned
fingerprints are trusted when verifying; the short id merely finds the key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "DIGEST_BYTES",
    "FileSigner",
    "PublicKey",
    "PublicKeyHolder",
    "Signer",
    "SigningError",
    "check_fingerprint",
    "fingerprint",
    "key_id_of",
    "load_public_key_pem",
    "pinned_keys",
    "public_key_pem",
    "verify_digest",
]

DIGEST_BYTES: Final = 32
_FINGERPRINT_PREFIX: Final = "sha256:"

PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey


class SigningError(Exception):
    """A signing key that cannot be used, an unsupported key type, or a bad fingerprint."""

    exit_code = 2


@runtime_checkable
class Signer(Protocol):
    """Signs SHA-256 digests. ``key_id`` is ``key_id_of(public_key)``."""

    @property
    def key_id(self) -> str: ...

    @property
    def public_key(self) -> PublicKey: ...

    def sign(self, digest: bytes) -> bytes:
        """The signature over the 32-byte ``digest``. Raises `SigningError` (or the backend's
        own error) if the key cannot sign."""
        ...


def _check_public_key(key: object) -> PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise SigningError("unsupported signing key type (expected Ed25519 or ECDSA P-256)")


def _key_bytes(key: PublicKey) -> bytes:
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id_of(key: PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw Ed25519 key, or over the DER
    SubjectPublicKeyInfo of an EC key."""
    return hashlib.sha256(_key_bytes(_check_public_key(key))).hexdigest()[:16]


def fingerprint(key: PublicKey) -> str:
    """``sha256:<64 hex digits>`` over the same bytes as `key_id_of` (which is its prefix)."""
    return _FINGERPRINT_PREFIX + hashlib.sha256(_key_bytes(_check_public_key(key))).hexdigest()


def check_fingerprint(value: object) -> str:
    """A pinned fingerprint as configured, normalised to lower case; `SigningError` otherwise."""
    if not isinstance(value, str):
        raise SigningError("a key fingerprint must be a string sha256:<64 hex digits>")
    text = value.strip().lower()
    digits = text.removeprefix(_FINGERPRINT_PREFIX)
    hex_digits = len(digits) == 64 and all(c in "0123456789abcdef" for c in digits)
    if not text.startswith(_FINGERPRINT_PREFIX) or not hex_digits:
        raise SigningError(f"key fingerprint {value[:80]!r} is not sha256:<64 hex digits>")
    return text


def public_key_pem(key: PublicKey) -> bytes:
    return _check_public_key(key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key_pem(data: bytes, what: str = "public key") -> PublicKey:
    """An Ed25519 or P-256 public key from PEM (SubjectPublicKeyInfo)."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"cannot load the {what}: {exc}") from None
    try:
        return _check_public_key(key)
    except SigningError:
        raise SigningError(f"the {what} is not an Ed25519 or ECDSA P-256 key") from None


def verify_digest(key: PublicKey, signature: bytes, digest: bytes) -> bool:
    """True if ``signature`` is ``key``'s signature over the 32-byte ``digest``."""
    if len(digest) != DIGEST_BYTES:
        return False
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, digest)
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            key.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def pinned_keys(keys: Iterable[PublicKey], pins: Iterable[str]) -> dict[str, PublicKey]:
    """key id -> key for those ``keys`` whose fingerprint is among ``pins``; others are dropped
    (a key merely found beside the data is never trusted on its own)."""
    wanted = {check_fingerprint(pin) for pin in pins}
    return {key_id_of(key): key for key in keys if fingerprint(key) in wanted}


class PublicKeyHolder:
    """What every signer shares: its public key and the key id derived from it (set once the
    key is known, with `_hold`)."""

    _public: PublicKey
    _key_id: str

    def _hold(self, public_key: PublicKey) -> None:
        self._public = _check_public_key(public_key)
        self._key_id = key_id_of(self._public)

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def public_key(self) -> PublicKey:
        return self._public


class FileSigner(PublicKeyHolder):
    """An Ed25519 private key held in this process (loaded from a key file)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError("private_key must be an Ed25519 private key")
        self._key = private_key
        self._hold(private_key.public_key())

    def sign(self, digest: bytes) -> bytes:
        if len(digest) != DIGEST_BYTES:
            raise SigningError("only 32-byte SHA-256 digests are signed")
        return self._key.sign(digest)

    def __repr__(self) -> str:
        return f"FileSigner(key_id={self._key_id!r})"
