"""Signing keys held in a KMS, as `sealing.signing.Signer`: the key that signs audit records and
freshness checkpoints then never sits in a file the worker's user (or anyone who copies its
home) can read. Selected by the ``signing_key`` setting and built by
``rekey.backends.signer_for``.

* `TransitSigner` (``vault:NAME``): an OpenBao/Vault Transit key of type ``ed25519``; the digest
  is the signed input, so the signature is Ed25519 over the 32 digest bytes (exactly what a
  `FileSigner` makes). Type ``ecdsa-p256`` works too (``prehashed``, ASN.1 signatures). The
  public key comes from ``read_key``; the signer pins the version it read, so a rotated Transit
  key does not silently change the key records are signed with.
* `AwsKmsSigner` (``aws:KEYID``): an AWS KMS ``ECC_NIST_P256`` key with usage ``SIGN_VERIFY``:
  ``Sign`` with ``ECDSA_SHA_256`` and ``MessageType=DIGEST`` (a DER signature over the prehashed
  digest), public key from ``GetPublicKey``. (moto, up to at least 5.2, ignores
  ``MessageType=DIGEST`` and hashes the digest again, getmoto/moto#10202: its signatures then
  verify over SHA-256 of the digest; real AWS KMS signs the digest itself.)

Errors are `SigningError` with messages of our own (never the SDK's text, which may embed
URLs or request details). Creating such keys: docs/audit-log-format.md, "Signing keys in a KMS".
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

import boto3
import botocore.exceptions
import hvac
import hvac.exceptions
import requests
from botocore.config import Config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kms_adapters.errors import InvalidRequest
from kms_adapters.keyref import InvalidKeyRef, check_name
from kms_adapters.vault_transit import checked_mount, path_segment
from sealing.signing import DIGEST_BYTES, PublicKey, PublicKeyHolder, SigningError, load_public_key_pem

__all__ = ["AwsKmsSigner", "KmsSigningError", "TransitSigner"]

_TRANSIT_TYPES: Final = ("ed25519", "ecdsa-p256")


class KmsSigningError(SigningError):
    """The KMS could not be reached, refused, or holds a key that cannot sign audit digests."""

    exit_code = 1


def _check_digest(digest: bytes) -> None:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
        raise SigningError("only 32-byte SHA-256 digests are signed")


class TransitSigner(PublicKeyHolder):
    """An OpenBao/Vault Transit signing key (``vault:NAME``), pinned to its latest version at
    construction."""

    def __init__(self, client: hvac.Client, name: str, *, mount_point: str = "transit") -> None:
        try:
            self._name = path_segment(check_name("vault", name))
            self._mount = checked_mount(mount_point)
        except (InvalidKeyRef, InvalidRequest) as exc:
            raise SigningError(str(exc)) from None
        self._client = client
        data = self._call(
            "read the signing key",
            lambda: client.secrets.transit.read_key(name=self._name, mount_point=self._mount),
        )["data"]
        key_type = data.get("type")
        if key_type not in _TRANSIT_TYPES:
            raise KmsSigningError(
                f"transit key {name!r} is of type {key_type!r}; audit signing needs ed25519 (or ecdsa-p256)"
            )
        self._type = key_type
        version = data.get("latest_version")
        entry = (data.get("keys") or {}).get(str(version))
        if not isinstance(version, int) or not isinstance(entry, dict):
            raise KmsSigningError(f"transit key {name!r} has no readable public key")
        self._version = version
        self._hold(self._public_of(name, entry.get("public_key")))

    def _public_of(self, name: str, text: object) -> PublicKey:
        if not isinstance(text, str) or not text:
            raise KmsSigningError(f"transit key {name!r} has no readable public key")
        if self._type == "ecdsa-p256":
            return load_public_key_pem(text.encode("ascii", "replace"), f"public key of transit key {name!r}")
        try:
            raw = base64.b64decode(text, validate=True)
            return Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError):
            raise KmsSigningError(f"transit key {name!r} has a malformed public key") from None

    def _call(self, action: str, fn: Any) -> dict[str, Any]:
        what = f"{action} (transit key {self._name!r})"
        try:
            answer = fn()
        except requests.exceptions.RequestException:
            raise KmsSigningError(f"cannot reach OpenBao/Vault to {what}") from None
        except hvac.exceptions.Forbidden:
            raise KmsSigningError(f"OpenBao/Vault denied: {what} (check the token's policy)") from None
        except hvac.exceptions.InvalidPath:
            raise KmsSigningError(f"OpenBao/Vault has no such key: {what}") from None
        except hvac.exceptions.VaultError as exc:
            raise KmsSigningError(f"OpenBao/Vault failed to {what} ({type(exc).__name__})") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), dict):
            raise KmsSigningError(f"OpenBao/Vault gave no answer to {what}")
        return answer

    @property
    def version(self) -> int:
        return self._version

    def sign(self, digest: bytes) -> bytes:
        _check_digest(digest)
        extra: dict[str, Any] = {}
        if self._type == "ecdsa-p256":
            extra = {"prehashed": True, "hash_algorithm": "sha2-256", "marshaling_algorithm": "asn1"}
        answer = self._call(
            "sign",
            lambda: self._client.secrets.transit.sign_data(
                name=self._name,
                hash_input=base64.b64encode(digest).decode("ascii"),
                key_version=self._version,
                mount_point=self._mount,
                **extra,
            ),
        )
        text = answer["data"].get("signature")
        prefix = f"vault:v{self._version}:"
        if not isinstance(text, str) or not text.startswith(prefix):
            raise KmsSigningError(f"OpenBao/Vault returned no signature of version {self._version}")
        try:
            return base64.b64decode(text[len(prefix) :], validate=True)
        except binascii.Error:
            raise KmsSigningError("OpenBao/Vault returned a malformed signature") from None

    def __repr__(self) -> str:
        return f"TransitSigner({self._name!r}, version={self._version}, key_id={self._key_id!r})"


class AwsKmsSigner(PublicKeyHolder):
    """An AWS KMS ``ECC_NIST_P256`` ``SIGN_VERIFY`` key (``aws:KEYID``: a key id or ``alias/NAME``)."""

    def __init__(
        self,
        key_id: str,
        *,
        endpoint_url: str | None,
        region: str,
        credentials: dict[str, str] | None = None,
        client: Any = None,
    ) -> None:
        try:
            check_name("aws", key_id)
        except InvalidKeyRef as exc:
            raise SigningError(str(exc)) from None
        self._kms_key = key_id
        if client is None:
            config = Config(
                retries={"total_max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30
            )
            client = boto3.session.Session().client(
                "kms", region_name=region, endpoint_url=endpoint_url, config=config, **(credentials or {})
            )
        self._client: Any = client
        answer = self._call("read the public key of", "get_public_key", KeyId=key_id)
        spec = answer.get("KeySpec") or answer.get("CustomerMasterKeySpec")  # moto: the older name only
        if spec != "ECC_NIST_P256" or answer.get("KeyUsage") != "SIGN_VERIFY":
            raise KmsSigningError(
                f"AWS KMS key {key_id!r} is {spec!r}/{answer.get('KeyUsage')!r};"
                " audit signing needs ECC_NIST_P256 with SIGN_VERIFY"
            )
        if "ECDSA_SHA_256" not in (answer.get("SigningAlgorithms") or ["ECDSA_SHA_256"]):
            raise KmsSigningError(f"AWS KMS key {key_id!r} cannot sign with ECDSA_SHA_256")
        der = answer.get("PublicKey")
        try:
            key = serialization.load_der_public_key(der if isinstance(der, bytes) else b"")
        except (ValueError, TypeError):
            raise KmsSigningError(f"AWS KMS key {key_id!r} has a malformed public key") from None
        self._hold(
            load_public_key_pem(
                key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
                f"public key of AWS KMS key {key_id!r}",
            )
        )

    def _call(self, action: str, op: str, **kwargs: Any) -> dict[str, Any]:
        what = f"{action} AWS KMS key {self._kms_key!r}"
        try:
            answer: dict[str, Any] = getattr(self._client, op)(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise KmsSigningError(f"AWS KMS refused to {what} ({code})") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise KmsSigningError(f"cannot reach AWS KMS to {what} ({type(exc).__name__})") from None
        return answer

    def sign(self, digest: bytes) -> bytes:
        _check_digest(digest)
        answer = self._call(
            "sign with",
            "sign",
            KeyId=self._kms_key,
            Message=digest,
            MessageType="DIGEST",
            SigningAlgorithm="ECDSA_SHA_256",
        )
        signature = answer.get("Signature")
        if not isinstance(signature, bytes) or not signature:
            raise KmsSigningError(f"AWS KMS returned no signature for key {self._kms_key!r}")
        return signature

    def __repr__(self) -> str:
        return f"AwsKmsSigner({self._kms_key!r}, key_id={self._key_id!r})"
