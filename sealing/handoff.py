"""Generation-to-generation handoff of hardware-sealed secrets over HPKE (RFC 9180).

A secret sealed under MRENCLAVE policy can only be unsealed by the enclave build that sealed
it. To move it to a patched build, the old enclave verifies the new one's evidence, unseals,
and encrypts the secret to a public key the new enclave bound into that evidence; only the new
enclave holds the private key, so the secret never exists in plaintext outside the two TEEs.

Suite: KEM ML-KEM-768 + X25519 (hybrid), KDF HKDF-SHA256, AEAD AES-256-GCM. Sealed state is
long-lived: a recorded handoff must stay confidential even against a future quantum computer
("harvest now, decrypt later"), and the hybrid KEM is at least as strong as X25519 alone if
ML-KEM should fail. The cost (a 1,216-byte public key, 1,120 bytes of encapsulation per
secret) is irrelevant next to an attestation round trip. Each item's HPKE ``info`` binds the
protocol version, namespace, name and sealing policy, so a ciphertext cannot be replayed as
another item.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from sealing.errors import SealingError

SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
SUITE_NAME = "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"
_MLKEM_PUBLIC_BYTES = 1184
_X25519_PUBLIC_BYTES = 32
PUBLIC_KEY_BYTES = _MLKEM_PUBLIC_BYTES + _X25519_PUBLIC_BYTES
PROTOCOL = b"rekey-handoff-v1"


class HandoffError(SealingError):
    """A handoff package or public key is malformed or does not decrypt."""

    exit_code = 2


class HandoffKeyPair:
    """The recipient's HPKE key pair; it lives only in the agent's (TEE) memory."""

    def __init__(self) -> None:
        mlkem, x25519 = MLKEM768PrivateKey.generate(), X25519PrivateKey.generate()
        self._private = hpke.MLKEM768X25519PrivateKey(mlkem, x25519)
        self.public_bytes = mlkem.public_key().public_bytes_raw() + x25519.public_key().public_bytes_raw()

    def __repr__(self) -> str:
        return f"HandoffKeyPair(public {fingerprint(self.public_bytes)})"

    def open(self, ciphertext: bytes, info: bytes) -> bytes:
        try:
            return SUITE.decrypt(ciphertext, self._private, info=info)
        except Exception:  # cryptography raises InvalidTag or ValueError; both mean the same here
            raise HandoffError("handoff item does not decrypt with this agent's key") from None


def fingerprint(public_bytes: bytes) -> str:
    """SHA-256 hex of a handoff public key: what attestation tokens carry as ``cnf``."""
    return hashlib.sha256(public_bytes).hexdigest()


def load_public_key(data: bytes) -> hpke.MLKEM768X25519PublicKey:
    if len(data) != PUBLIC_KEY_BYTES:
        raise HandoffError(f"handoff public key must be {PUBLIC_KEY_BYTES} bytes, got {len(data)}")
    try:
        return hpke.MLKEM768X25519PublicKey(
            MLKEM768PublicKey.from_public_bytes(data[:_MLKEM_PUBLIC_BYTES]),
            X25519PublicKey.from_public_bytes(data[_MLKEM_PUBLIC_BYTES:]),
        )
    except ValueError:
        raise HandoffError("handoff public key is not a valid ML-KEM-768 + X25519 key") from None


@dataclass(frozen=True)
class ItemLabel:
    """What an item is; bound into its HPKE ``info``."""

    namespace: str
    name: str
    policy: Literal["mrenclave", "mrsigner"]

    def info(self) -> bytes:
        return b"\x00".join((PROTOCOL, self.namespace.encode(), self.name.encode(), self.policy.encode()))


RELEASE_CONTEXT = b"rekey-release-v1"


def release_info(key_ref: str) -> bytes:
    """The HPKE ``info`` of a DEK released to an attested recipient for ``key_ref``
    (`kms_adapters.release.encrypt_for_recipient` encrypts under it, the agent opens with it)."""
    return RELEASE_CONTEXT + b"\x00" + key_ref.encode()


def seal_to(public_bytes: bytes, label: ItemLabel, secret: bytes) -> bytes:
    return SUITE.encrypt(secret, load_public_key(public_bytes), info=label.info())


def report_data_for(nonce: bytes, public_bytes: bytes) -> bytes:
    """64 bytes of report data binding a nonce and a public key: SHA-256(nonce || key) || zeros."""
    return hashlib.sha256(nonce + public_bytes).digest() + bytes(32)
