"""Cryptographic operations with a key version: wrapKey/unwrapKey and encrypt/decrypt (AES key wrap,
AES-GCM and AES-CBC on oct-HSM, RSA-OAEP on RSA), and ``POST /rng``."""

from __future__ import annotations

import secrets
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import padding as block_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap,
    aes_key_wrap_with_padding,
)

from emulators.azure_keyvault.state import KeyStore
from emulators.azure_keyvault.throttle import Throttle
from emulators.azure_keyvault.wire import ApiError, b64u, unb64u

__all__ = ["CRYPTO_OPERATIONS", "CryptoOperations"]

#: URL path segment (lower case) -> the key operation it needs in ``key_ops``.
CRYPTO_OPERATIONS = {
    "wrapkey": "wrapKey",
    "unwrapkey": "unwrapKey",
    "encrypt": "encrypt",
    "decrypt": "decrypt",
}
_PRIVATE_OPS = frozenset({"unwrapkey", "decrypt"})


def _oaep(alg: str) -> padding.OAEP:
    if alg == "RSA-OAEP-256":
        return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    if alg == "RSA-OAEP":
        return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303  # nosec B303 # the emulated HSM's OAEP-SHA1 wrap
    raise ApiError(400, "BadParameter", f"Algorithm {alg} is not supported for RSA keys by this emulator.")


def _rsa(key: rsa.RSAPrivateKey, op: str, alg: str, value: bytes) -> bytes:
    pad = _oaep(alg)
    if op in _PRIVATE_OPS:
        try:
            return key.decrypt(value, pad)
        except ValueError:
            raise ApiError(
                400, "BadParameter", "The ciphertext could not be decrypted with this key."
            ) from None
    try:
        return key.public_key().encrypt(value, pad)
    except ValueError:
        raise ApiError(400, "BadParameter", "The value is too long for this key and algorithm.") from None


def _aes_key_wrap(key: bytes, op: str, alg: str, value: bytes) -> dict[str, Any]:
    bits = len(key) * 8
    padded = alg == "CKM_AES_KEY_WRAP_PAD"
    if alg not in (f"A{bits}KW", "CKM_AES_KEY_WRAP", "CKM_AES_KEY_WRAP_PAD"):
        raise ApiError(400, "BadParameter", f"Algorithm {alg} is not valid for a {bits}-bit oct-HSM key.")
    if op == "wrapkey":
        if padded:
            return {"value": b64u(aes_key_wrap_with_padding(key, value))}
        if len(value) < 16 or len(value) % 8:
            raise ApiError(400, "BadParameter", "The key to wrap must be a multiple of 8 bytes, at least 16.")
        return {"value": b64u(aes_key_wrap(key, value))}
    try:
        plain = aes_key_unwrap_with_padding(key, value) if padded else aes_key_unwrap(key, value)
    except (InvalidUnwrap, ValueError):
        raise ApiError(400, "BadParameter", "The wrapped key could not be unwrapped with this key.") from None
    return {"value": b64u(plain)}


def _aes_gcm(key: bytes, op: str, value: bytes, body: dict[str, Any], aad: bytes | None) -> dict[str, Any]:
    if op == "encrypt":
        iv = secrets.token_bytes(12)
        sealed = AESGCM(key).encrypt(iv, value, aad)
        answer = {"value": b64u(sealed[:-16]), "iv": b64u(iv), "tag": b64u(sealed[-16:])}
        if aad is not None:
            answer["aad"] = b64u(aad)
        return answer
    iv = unb64u(body.get("iv"), "iv")
    tag = unb64u(body.get("tag"), "tag")
    try:
        return {"value": b64u(AESGCM(key).decrypt(iv, value + tag, aad))}
    except (InvalidTag, ValueError):
        raise ApiError(400, "BadParameter", "The ciphertext could not be decrypted with this key.") from None


def _aes_cbc(key: bytes, op: str, alg: str, value: bytes, body: dict[str, Any]) -> dict[str, Any]:
    iv = unb64u(body.get("iv"), "iv")
    if len(iv) != 16:
        raise ApiError(400, "BadParameter", "iv must be 16 bytes for AES-CBC")
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    pad = alg.endswith("PAD")
    if op == "encrypt":
        if pad:
            padder = block_padding.PKCS7(128).padder()
            value = padder.update(value) + padder.finalize()
        if len(value) % 16:
            raise ApiError(400, "BadParameter", "AES-CBC plaintext must be a multiple of 16 bytes")
        encryptor = cipher.encryptor()
        return {"value": b64u(encryptor.update(value) + encryptor.finalize()), "iv": b64u(iv)}
    if len(value) % 16:
        raise ApiError(400, "BadParameter", "AES-CBC ciphertext must be a multiple of 16 bytes")
    decryptor = cipher.decryptor()
    plain = decryptor.update(value) + decryptor.finalize()
    if pad:
        try:
            unpadder = block_padding.PKCS7(128).unpadder()
            plain = unpadder.update(plain) + unpadder.finalize()
        except ValueError:
            raise ApiError(
                400, "BadParameter", "The ciphertext could not be decrypted with this key."
            ) from None
    return {"value": b64u(plain)}


def _aes(key: bytes, op: str, alg: str, value: bytes, body: dict[str, Any]) -> dict[str, Any]:
    bits = len(key) * 8
    if op in ("wrapkey", "unwrapkey"):
        return _aes_key_wrap(key, op, alg, value)
    aad = unb64u(body["aad"], "aad") if body.get("aad") else None
    if alg == f"A{bits}GCM":
        return _aes_gcm(key, op, value, body, aad)
    if alg in (f"A{bits}CBC", f"A{bits}CBCPAD"):
        return _aes_cbc(key, op, alg, value, body)
    raise ApiError(400, "BadParameter", f"Algorithm {alg} is not valid for a {bits}-bit oct-HSM key.")


class CryptoOperations:
    """``POST /keys/{name}/{version}/{wrapkey|unwrapkey|encrypt|decrypt}`` and ``POST /rng``.

    The throttling class is ``wrap`` for oct-HSM keys and ``rsa<size>`` (private-key operations)
    or ``rsa<size>-public`` for RSA keys.
    """

    def __init__(self, store: KeyStore, throttle: Throttle) -> None:
        self._store = store
        self._throttle = throttle

    def run(self, name: str, version: str, op: str, body: dict[str, Any], base: str) -> dict[str, Any]:
        """The operation ``op`` (a key of ``CRYPTO_OPERATIONS``) with one key version."""
        with self._store.lock:
            v = self._store.lookup(name, version)
            key = self._store.material(v)
        klass = "wrap"
        if v.is_rsa:
            klass = f"rsa{v.size}" if op in _PRIVATE_OPS else f"rsa{v.size}-public"
        self._throttle.take(klass)
        operation = CRYPTO_OPERATIONS[op]
        if not v.enabled:
            raise ApiError(
                403,
                "Forbidden",
                f"Operation {operation} is not allowed on a disabled key.",
                inner="KeyDisabled",
            )
        if operation not in v.key_ops:
            raise ApiError(403, "Forbidden", f"Operation {operation} is not permitted for this key.")
        alg = body.get("alg")
        if not isinstance(alg, str):
            raise ApiError(400, "BadParameter", "alg is required")
        value = unb64u(body.get("value"), "value")
        kid = f"{base}/keys/{name}/{v.id}"
        if isinstance(key, rsa.RSAPrivateKey):
            return {"kid": kid, "value": b64u(_rsa(key, op, alg, value))}
        return {"kid": kid, **_aes(key, op, alg, value, body)}

    def random_bytes(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /rng``: ``count`` (1 to 128) random bytes."""
        count = body.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 128:
            raise ApiError(400, "BadParameter", "count must be an integer from 1 to 128")
        self._throttle.take("read")
        return {"value": b64u(secrets.token_bytes(count))}
