"""An Azure Key Vault / Managed HSM emulator that the unmodified ``azure-keyvault-keys`` SDK talks to.

No emulator of Key Vault's *keys* API can be installed here, so this is one: a stdlib
``ThreadingHTTPServer`` behind TLS (HTTP/1.1 keep-alive) on 127.0.0.1 only.

**TLS.** On first start a CA (``ca.pem``) and a server certificate for ``127.0.0.1`` and
``localhost`` signed by it are written to the state directory; clients pass the CA file as
``connection_verify``. Later starts reuse them (the server certificate is re-issued when it
is about to expire).

**Auth.** Like Key Vault, a request without ``Authorization: Bearer ...`` gets 401 with
``WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>",
resource="https://vault.azure.net"``; the SDK's challenge policy then asks its credential for a
token and repeats the request. Any bearer token is accepted. ``/_emulator/*`` needs no token.

**REST API.** ``api-version`` must be given and look like ``7.x`` or ``YYYY-MM-DD`` (the SDK
sends ``2025-07-01``). Implemented, with Key Vault's JSON shapes and error bodies
(``{"error": {"code": ..., "message": ...}}``)::

    POST   /keys/{name}/create              kty oct-HSM (128/192/256) or RSA-HSM/RSA (2048/3072/4096),
                                            key_ops, attributes (enabled, exportable, nbf, exp), tags,
                                            release_policy; on an existing name: a new version
    GET    /keys                            list keys (paged, nextLink)
    GET    /keys/{name}[/]  /keys/{name}/{version}
    GET    /keys/{name}/versions            paged with nextLink ($skiptoken, maxresults <= 25)
    PATCH  /keys/{name}/{version}           enabled, nbf, exp, key_ops, tags (replaced), release_policy
    POST   /keys/{name}/rotate              new version with the same type, size, ops, exportability
                                            and release policy (tags are not copied)
    POST   /keys/{name}/{version}/wrapkey|unwrapkey   A128KW/A192KW/A256KW and CKM_AES_KEY_WRAP
                                            (RFC 3394), CKM_AES_KEY_WRAP_PAD (RFC 5649) on oct-HSM,
                                            RSA-OAEP / RSA-OAEP-256 on RSA
    POST   /keys/{name}/{version}/encrypt|decrypt     A*GCM (server-chosen 96-bit IV, 128-bit tag),
                                            A*CBC / A*CBCPAD (client IV) on oct-HSM, RSA-OAEP(-256) on RSA
    POST   /keys/{name}/{version}/release   Secure Key Release (below)
    GET|PUT /keys/{name}/rotationpolicy     stored and returned; the emulator never rotates on its own
    DELETE /keys/{name}                     soft delete (recoveryLevel Recoverable+Purgeable, 90 days)
    GET    /deletedkeys  /deletedkeys/{name};  DELETE /deletedkeys/{name} (purge);
    POST   /deletedkeys/{name}/recover;  POST /rng

A disabled version refuses cryptographic operations and release with 403
``{"error": {"code": "Forbidden", "message": "Operation unwrapKey is not allowed on a disabled
key.", "innererror": {"code": "KeyDisabled"}}}``, modelled on Key Vault's answer for a disabled
secret (403 ``Forbidden``, "Operation get is not allowed on a disabled secret.", inner
``SecretDisabled``).
A ciphertext that does not decrypt gets 400 ``BadParameter``. Version ids are 32 hex digits;
``created``/``updated`` are whole Unix seconds, as Key Vault sends them, and version lists come
back in version-id order (not creation order), so clients cannot lean on list order.

**Secure Key Release.** ``target`` must be a JWT whose ``iss`` equals an ``authority`` of the
key's release policy (``{"version": "1.0.0", "anyOf": [{"authority": ..., "allOf": [{"claim":
"a.b", "equals": ...}]}]}``; ``anyOf``/``allOf`` may nest; a dotted claim name is looked up as a
top-level claim first, then as a path into nested objects) and whose claims satisfy it. With
``attestation_verifier`` (a PEM public key, EC or RSA) the token's signature is verified against
it; without one the signature is NOT checked (only ``exp``/``nbf``, 60 s leeway). Only
exportable, enabled versions are released (our choice of answers: 400 ``BadParameter`` for a
key that is not exportable or has no policy, 403 ``Forbidden`` for a token that cannot be verified
or does not satisfy the policy). The answer is ``{"value": <JWS>}``, an RS256 JWS
signed by a release-signing key of the emulator (its certificate and the CA in ``x5c``) whose
payload is ``{"request": {...}, "response": {"key": {"key": <JWK>, "attributes": ...,
"release_policy": ...}}}``. If the token carries an RSA key in ``x-ms-runtime.keys`` (as Azure
Attestation tokens do), the key material is wrapped to it like Key Vault does (``enc``
CKM_RSA_AES_KEY_WRAP / RSA_AES_KEY_WRAP_256 / _384: RSA-OAEP of a fresh AES-256 key, then
RFC 5649 AES key wrap with padding of the raw AES key or the PKCS#8 RSA key) in ``key_hsm``;
otherwise the JWK carries the key material IN THE CLEAR (``k``, or ``d``/``p``/``q``/...),
which Key Vault never does.

**Throttling.** A token bucket per operation class (capacity one second of the rate); over the
limit: HTTP 429 ``{"error": {"code": "Throttled", ...}}`` with ``Retry-After`` (whole seconds,
at least 1) unless ``retry_after`` is off. Defaults (per second, per emulator) follow Managed
HSM's documented figures where there is one (AES 9,000, RSA-2048 private-key operations 1,100,
key creation 1) and are our choices otherwise; ``rate_scale`` multiplies them and ``limits``
overrides single classes (0 = unlimited). Classes: see ``DEFAULT_LIMITS``. Counters per class
(served, throttled) are at ``GET /_emulator/stats``; ``POST /_emulator/stats/reset`` zeroes
them, ``POST /_emulator/config`` (``{"limits": {...}, "retry_after": bool}``) changes the
throttling of a running emulator and ``GET /_emulator/health`` answers ``{"status": "ok"}``.
These need no token: the emulator listens on 127.0.0.1 only.

**State.** Keys (KEY MATERIAL INCLUDED, unencrypted: this is an emulator) are kept in
``keys.json`` in the state directory, rewritten atomically after each change, so keys survive
a restart.

Run alone (prints the URL and the CA file, serves until SIGTERM or Ctrl-C)::

    python -m loadtest.emulators.azure_keyvault --port 8443 --state-dir DIR [--limit wrap=50]
        [--rate-scale 0.1] [--retry-after off] [--attestation-verifier verifier.pem]

or in-process: ``with AzureKeyVaultEmulator(state_dir, port=0, limits={"wrap": 50}) as emu:
emu.url, emu.ca_file``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import math
import os
import re
import secrets
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as block_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap,
    aes_key_wrap_with_padding,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEFAULT_LIMITS", "AzureKeyVaultEmulator", "main"]

#: Requests per second per operation class. Documented Managed HSM figures: AES-256 operations
#: 9,000/s, RSA-2048 private-key operations 1,100/s, key creation 1/s; the rest are our choices.
DEFAULT_LIMITS: dict[str, float] = {
    "wrap": 9000.0,  # wrapKey/unwrapKey/encrypt/decrypt with an oct-HSM (AES) key
    "rsa2048": 1100.0,  # unwrapKey/decrypt with RSA-2048 (private-key operations)
    "rsa2048-public": 5000.0,  # wrapKey/encrypt with RSA-2048 done by the service
    "rsa3072": 500.0,
    "rsa3072-public": 2000.0,
    "rsa4096": 160.0,
    "rsa4096-public": 1000.0,
    "create": 1.0,  # create, rotate
    "release": 100.0,  # Secure Key Release
    "read": 1100.0,  # get key, list keys/versions/deleted keys, get rotation policy, rng
    "manage": 10.0,  # update, delete, purge, recover, set rotation policy
}

_API_VERSION = re.compile(r"(?:7\.[0-9]+|20[0-9]{2}-[0-9]{2}-[0-9]{2})(?:-preview(?:\.[0-9]+)?)?")
_KEY_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_DURATION = re.compile(r"P(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+D)?(?:T(?:[0-9]+H)?(?:[0-9]+M)?(?:[0-9]+S)?)?")
_OCT_OPS = ["encrypt", "decrypt", "wrapKey", "unwrapKey"]
_RSA_OPS = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
_KNOWN_OPS = frozenset({"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import", "export"})
_RECOVERY_LEVEL = "Recoverable+Purgeable"
_RECOVERABLE_DAYS = 90
_PAGE_SIZE = 25
_SERVICE_VERSION = "1.9.0.0"
_MAX_BODY = 1 << 20
_RESOURCE = "https://vault.azure.net"
_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
_POLICY_CONTENT_TYPE = "application/json; charset=utf-8"
_RELEASE_ENC: dict[str, hashes.HashAlgorithm] = {
    "CKM_RSA_AES_KEY_WRAP": hashes.SHA1(),  # noqa: S303 - PKCS#11's CKM_RSA_AES_KEY_WRAP is OAEP-SHA1
    "RSA_AES_KEY_WRAP_256": hashes.SHA256(),
    "RSA_AES_KEY_WRAP_384": hashes.SHA384(),
}
_CRYPTO_OPS = {"wrapkey": "wrapKey", "unwrapkey": "unwrapKey", "encrypt": "encrypt", "decrypt": "decrypt"}
_PRIVATE_OPS = frozenset({"unwrapkey", "decrypt"})


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise _ApiError(400, "BadParameter", f"{what} must be a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise _ApiError(400, "BadParameter", f"{what} is not valid base64url") from None


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _now() -> int:
    return int(time.time())


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _ApiError(Exception):
    """An error answer in Key Vault's shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        inner: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


def _not_found(name: str, version: str = "") -> _ApiError:
    what = f"{name}/{version}" if version else name
    return _ApiError(
        404,
        "KeyNotFound",
        f"A key with (name/id) {what} was not found in this key vault. If you recently deleted this "
        "key you may be able to recover it using the correct recovery command.",
    )


# ---------------------------------------------------------------------------------------------
# TLS material
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    signing_cert: Path
    signing_key: Path


def _load_or_make_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > datetime.now(UTC):
            return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rekey Azure Key Vault emulator CA")])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    # A new CA invalidates every certificate the old one issued.
    for stale in ("server.pem", "server-key.pem", "release-signing.pem", "release-signing-key.pem"):
        (directory / stale).unlink(missing_ok=True)
    return cert, key


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    common_name: str,
    *,
    server: bool,
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=397))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey) and server,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _fresh(path: Path) -> bool:
    """A certificate file that exists and is valid for at least another day."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc > datetime.now(UTC) + timedelta(days=1)


def ensure_tls(directory: Path) -> _TlsFiles:
    """The CA, the server certificate and the release-signing certificate, made on first use."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_cert, ca_key = _load_or_make_ca(directory)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    files = _TlsFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        signing_cert=directory / "release-signing.pem",
        signing_key=directory / "release-signing-key.pem",
    )
    pairs: list[tuple[Path, Path, bool]] = [
        (files.server_cert, files.server_key, True),
        (files.signing_cert, files.signing_key, False),
    ]
    for cert_path, key_path, server in pairs:
        if _fresh(cert_path) and key_path.exists():
            continue
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if server:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _issue(ca_cert, ca_key, key.public_key(), "127.0.0.1", server=True)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            cert = _issue(
                ca_cert,
                ca_key,
                key.public_key(),
                "rekey Azure Key Vault emulator release signing",
                server=False,
            )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_atomic(key_path, key_pem, 0o600)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM) + ca_pem, 0o644)
    return files


# ---------------------------------------------------------------------------------------------
# Keys and their persistence
# ---------------------------------------------------------------------------------------------


@dataclass
class _Version:
    id: str
    kty: str  # "oct-HSM" or "RSA-HSM" / "RSA"
    size: int
    key_ops: list[str]
    material: str  # oct: base64 of the raw key; RSA: PKCS#8 PEM
    enabled: bool = True
    created: int = 0
    updated: int = 0
    exportable: bool = False
    release_policy: dict[str, Any] | None = None
    tags: dict[str, str] = field(default_factory=dict)
    nbf: int | None = None
    exp: int | None = None

    @property
    def is_rsa(self) -> bool:
        return self.kty.startswith("RSA")

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Version:
        return cls(**dict(data))


@dataclass
class _Key:
    name: str
    versions: list[_Version] = field(default_factory=list)
    rotation_policy: dict[str, Any] | None = None
    deleted: int | None = None  # deletedDate of a soft-deleted key

    @property
    def current(self) -> _Version:
        return self.versions[-1]

    def version(self, version_id: str) -> _Version | None:
        if not version_id:
            return self.current
        return next((v for v in self.versions if v.id == version_id), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [v.to_json() for v in self.versions],
            "rotation_policy": self.rotation_policy,
            "deleted": self.deleted,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Key:
        return cls(
            name=str(data["name"]),
            versions=[_Version.from_json(v) for v in data["versions"]],
            rotation_policy=data.get("rotation_policy"),
            deleted=data.get("deleted"),
        )


class _Bucket:
    """Token bucket: ``rate`` tokens per second, capacity one second's worth (at least 1)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        if self.rate <= 0 or math.isinf(self.rate):
            return 0.0
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


# ---------------------------------------------------------------------------------------------
# Release policy evaluation
# ---------------------------------------------------------------------------------------------


def _validate_policy(node: object, depth: int = 0) -> None:
    if depth > 8:
        raise ValueError("nested too deeply")
    if not isinstance(node, dict):
        raise ValueError("every rule must be an object")
    if "claim" in node:
        if not isinstance(node["claim"], str) or not node["claim"]:
            raise ValueError("claim must be a non-empty string")
        if "equals" not in node:
            raise ValueError(f"condition on {node['claim']!r} needs 'equals' (the only operator supported)")
        return
    groups = [key for key in ("anyOf", "allOf") if key in node]
    if len(groups) != 1 or not isinstance(node[groups[0]], list) or not node[groups[0]]:
        raise ValueError("a rule needs exactly one non-empty anyOf or allOf list, or a claim condition")
    if "authority" in node and not isinstance(node["authority"], str):
        raise ValueError("authority must be a string")
    for child in node[groups[0]]:
        _validate_policy(child, depth + 1)


def _parse_release_policy(policy: object) -> dict[str, Any]:
    """Validate a release policy as sent on the wire (``{"contentType", "data", "immutable"}``)."""
    if not isinstance(policy, dict):
        raise _ApiError(400, "BadParameter", "release_policy must be an object")
    raw = _unb64u(policy.get("data"), "release_policy.data")
    try:
        document = json.loads(raw)
        if not isinstance(document, dict) or not isinstance(document.get("version"), str):
            raise ValueError("the policy needs a version string")
        _validate_policy({k: v for k, v in document.items() if k != "version"})
    except ValueError as exc:
        raise _ApiError(400, "BadParameter", f"Invalid key release policy: {exc}") from None
    return {
        "contentType": str(policy.get("contentType") or _POLICY_CONTENT_TYPE),
        "data": _b64u(raw),
        "immutable": bool(policy.get("immutable", False)),
    }


def _claim(claims: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    if name in claims:
        return True, claims[name]
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(expected, bool) and isinstance(actual, bool) and expected is actual
    return bool(expected == actual)


def _satisfies(node: Mapping[str, Any], claims: Mapping[str, Any], reasons: list[str]) -> bool:
    if "claim" in node:
        found, value = _claim(claims, node["claim"])
        if not found:
            reasons.append(f"claim {node['claim']} is missing")
            return False
        if not _same(node["equals"], value):
            reasons.append(f"claim {node['claim']} is {value!r}, not {node['equals']!r}")
            return False
        return True
    authority = node.get("authority")
    if isinstance(authority, str):
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer.rstrip("/") != authority.rstrip("/"):
            reasons.append(f"token issuer {issuer!r} is not the authority {authority!r}")
            return False
    if "anyOf" in node:
        return any(_satisfies(child, claims, reasons) for child in node["anyOf"])
    return all(_satisfies(child, claims, reasons) for child in node["allOf"])


# ---------------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rekey-azure-keyvault-emulator"
    timeout = 60  # idle keep-alive connections are closed after this

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _emulator(self) -> AzureKeyVaultEmulator:
        return cast(_Server, self.server).emulator

    def do_GET(self) -> None:
        self._emulator()._dispatch(self)

    do_POST = do_GET
    do_PUT = do_GET
    do_PATCH = do_GET
    do_DELETE = do_GET
    do_HEAD = do_GET


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, port: int, emulator: AzureKeyVaultEmulator, context: ssl.SSLContext) -> None:
        self.emulator = emulator
        self.ssl_context = context
        super().__init__(("127.0.0.1", port), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread, not in the accept loop.
        raw = cast(socket.socket, request)
        raw.settimeout(10)
        # Headers and body go out in separate writes; without this, Nagle + delayed ACK stall
        # every keep-alive response by ~40 ms.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.ssl_context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.emulator._track(conn, True)
        try:
            _Handler(conn, client_address, self)
        except (ssl.SSLError, OSError):
            pass
        finally:
            self.emulator._track(conn, False)
            with contextlib.suppress(OSError):
                conn.close()


# ---------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------


class AzureKeyVaultEmulator:
    """An Azure Key Vault keys endpoint on 127.0.0.1 (see the module docstring).

    ``start()`` returns the vault URL; ``ca_file`` is the CA certificate clients must trust;
    ``stop()`` closes the listener and every open connection. Also a context manager.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        port: int = 0,
        limits: Mapping[str, float] | None = None,
        rate_scale: float = 1.0,
        retry_after: bool = True,
        attestation_verifier: str | os.PathLike[str] | bytes | None = None,
        tenant: str = _TENANT,
        resource: str = _RESOURCE,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.port = port
        self.tenant = tenant
        self.resource = resource
        self.retry_after = retry_after
        self._rate_scale = rate_scale
        self._verifier = self._load_verifier(attestation_verifier)
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._objects: dict[str, bytes | rsa.RSAPrivateKey] = {}
        self._limit_lock = threading.Lock()
        self._limits: dict[str, float] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._served: dict[str, int] = {}
        self._throttled: dict[str, int] = {}
        self._unauthorized = 0
        self._requests = 0
        self._statuses: dict[str, int] = {}
        self.set_limits(limits or {}, reset=True)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[ssl.SSLSocket] = set()
        self._conn_lock = threading.Lock()
        self._tls: _TlsFiles | None = None
        self._signing_key: rsa.RSAPrivateKey | None = None
        self._signing_chain: list[str] = []

    # ----------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not running")
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    @property
    def ca_file(self) -> str:
        return str(self.state_dir / "ca.pem")

    @property
    def state_file(self) -> Path:
        return self.state_dir / "keys.json"

    def start(self) -> str:
        if self._server is not None:
            return self.url
        self._tls = ensure_tls(self.state_dir)
        signing = serialization.load_pem_private_key(self._tls.signing_key.read_bytes(), password=None)
        if not isinstance(signing, rsa.RSAPrivateKey):
            raise RuntimeError("the release-signing key is not an RSA key")
        self._signing_key = signing
        self._signing_chain = [
            base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
            for cert in x509.load_pem_x509_certificates(self._tls.signing_cert.read_bytes())
        ]
        self._load()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._tls.server_cert, self._tls.server_key)
        self._server = _Server(self.port, self, context)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="azure-kv-emulator",
            daemon=True,
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> AzureKeyVaultEmulator:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _track(self, conn: ssl.SSLSocket, add: bool) -> None:
        with self._conn_lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # ------------------------------------------------------------------- throttling

    def set_limits(self, limits: Mapping[str, float], *, reset: bool = False) -> None:
        """Override the limits of some classes (requests/s; 0 or less = unlimited). ``reset``
        first restores the defaults times ``rate_scale``."""
        unknown = sorted(set(limits) - set(DEFAULT_LIMITS))
        if unknown:
            raise ValueError(
                f"unknown throttling classes: {', '.join(unknown)} (known: {', '.join(DEFAULT_LIMITS)})"
            )
        with self._limit_lock:
            if reset:
                self._limits = {name: rate * self._rate_scale for name, rate in DEFAULT_LIMITS.items()}
            for name, rate in limits.items():
                self._limits[name] = float(rate) if rate > 0 else math.inf
            self._buckets = {name: _Bucket(rate) for name, rate in self._limits.items()}
            for name in self._limits:
                self._served.setdefault(name, 0)
                self._throttled.setdefault(name, 0)

    def set_attestation_verifier(self, source: str | os.PathLike[str] | bytes | None) -> None:
        """Trust attestation tokens signed by this PEM public key for release (None: verify no
        signatures)."""
        self._verifier = self._load_verifier(source)

    @property
    def limits(self) -> dict[str, float]:
        with self._limit_lock:
            return dict(self._limits)

    def _throttle(self, klass: str) -> None:
        with self._limit_lock:
            bucket = self._buckets.get(klass)
            wait = bucket.take(time.monotonic()) if bucket is not None else 0.0
            if wait <= 0:
                self._served[klass] = self._served.get(klass, 0) + 1
                return
            self._throttled[klass] = self._throttled.get(klass, 0) + 1
            limit = self._limits[klass]
        headers = {"Retry-After": str(max(1, math.ceil(wait)))} if self.retry_after else {}
        raise _ApiError(
            429,
            "Throttled",
            f"Request was not processed because too many requests were received. "
            f"Reason: the {klass} limit of {limit:g} requests per second is exceeded.",
            headers=headers,
        )

    def stats(self) -> dict[str, Any]:
        with self._limit_lock:
            classes = {
                name: {
                    "limit": None if math.isinf(rate) else rate,
                    "served": self._served.get(name, 0),
                    "throttled": self._throttled.get(name, 0),
                }
                for name, rate in self._limits.items()
            }
            return {
                "retry_after": self.retry_after,
                "classes": classes,
                "unauthorized": self._unauthorized,
                "requests": self._requests,
                "statuses": dict(self._statuses),
            }

    def reset_stats(self) -> None:
        with self._limit_lock:
            self._served = dict.fromkeys(self._limits, 0)
            self._throttled = dict.fromkeys(self._limits, 0)
            self._unauthorized = 0
            self._requests = 0
            self._statuses = {}

    # ------------------------------------------------------------------- persistence

    def _load(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return
        with self._lock:
            self._keys = {name: _Key.from_json(key) for name, key in data.get("keys", {}).items()}

    def _save(self) -> None:
        """Write every key atomically (the caller holds ``_lock``)."""
        document = {
            "format": 1,
            "note": "Azure Key Vault emulator state: key material in the clear, for tests only",
            "keys": {name: key.to_json() for name, key in self._keys.items()},
        }
        _write_atomic(self.state_file, json.dumps(document, indent=1, sort_keys=True).encode())

    # ---------------------------------------------------------------------- dispatch

    def _dispatch(self, handler: _Handler) -> None:
        method = handler.command
        try:
            length = int(handler.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY:
            self._send(handler, _ApiError(400, "BadParameter", "bad Content-Length"), close=True)
            return
        body = handler.rfile.read(length) if length else b""
        split = urlsplit(handler.path)
        query = parse_qs(split.query, keep_blank_values=True)
        segments = [unquote(part) for part in split.path.split("/")[1:]]
        with self._limit_lock:
            self._requests += 1
        if segments and segments[0] == "_emulator":
            self._admin(handler, method, segments[1:], body)
            return
        auth = handler.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            with self._limit_lock:
                self._unauthorized += 1
            challenge = (
                f'Bearer authorization="https://login.microsoftonline.com/{self.tenant}", '
                f'resource="{self.resource}"'
            )
            error = _ApiError(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
                headers={"WWW-Authenticate": challenge},
            )
            self._send(handler, error)
            return
        api_version = (query.get("api-version") or [""])[0]
        host = handler.headers.get("Host") or f"127.0.0.1:{cast(_Server, handler.server).server_port}"
        base = f"https://{host}"
        try:
            if not api_version:
                raise _ApiError(
                    400, "BadParameter", "The api-version query parameter (?api-version=) is required."
                )
            if not _API_VERSION.fullmatch(api_version):
                raise _ApiError(
                    400, "BadParameter", f"The specified version ({api_version}) is not recognized."
                )
            payload = self._route(method, segments, query, body, base, api_version)
        except _ApiError as error:
            self._send(handler, error)
            return
        except Exception as exc:  # an emulator bug: answer like a server error, keep serving
            self._send(
                handler, _ApiError(500, "InternalServerError", f"emulator error: {type(exc).__name__}")
            )
            return
        status, answer = payload
        self._send(handler, status, answer)

    def _send(
        self,
        handler: _Handler,
        status: int | _ApiError,
        payload: Mapping[str, Any] | None = None,
        *,
        close: bool = False,
    ) -> None:
        headers: dict[str, str] = {}
        if isinstance(status, _ApiError):
            payload, headers, status = status.body(), status.headers, status.status
        data = json.dumps(payload).encode() if payload is not None else b""
        with self._limit_lock:
            self._statuses[str(status)] = self._statuses.get(str(status), 0) + 1
        try:
            handler.send_response(status)
            if payload is not None:
                handler.send_header("Content-Type", "application/json; charset=utf-8")
            handler.send_header("Content-Length", str(len(data)))
            handler.send_header("Cache-Control", "no-cache")
            handler.send_header("x-ms-request-id", str(uuid.uuid4()))
            handler.send_header("x-ms-keyvault-service-version", _SERVICE_VERSION)
            for name, value in headers.items():
                handler.send_header(name, value)
            if close:
                handler.send_header("Connection", "close")
                handler.close_connection = True
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)
        except OSError:
            handler.close_connection = True

    def _admin(self, handler: _Handler, method: str, segments: list[str], body: bytes) -> None:
        route = "/".join(segments)
        if method == "GET" and route == "stats":
            self._send(handler, 200, self.stats())
        elif method == "GET" and route == "health":
            self._send(handler, 200, {"status": "ok"})
        elif method == "POST" and route == "stats/reset":
            self.reset_stats()
            self._send(handler, 200, self.stats())
        elif method == "POST" and route == "config":
            try:
                config = json.loads(body or b"{}")
                if not isinstance(config, dict):
                    raise ValueError("the body must be a JSON object")
                if "limits" in config:
                    self.set_limits({str(k): float(v) for k, v in dict(config["limits"]).items()})
                if "retry_after" in config:
                    self.retry_after = bool(config["retry_after"])
            except (ValueError, TypeError) as exc:
                self._send(handler, _ApiError(400, "BadParameter", str(exc)))
                return
            self._send(handler, 200, self.stats())
        else:
            self._send(
                handler, _ApiError(404, "NotFound", f"no emulator endpoint {method} /_emulator/{route}")
            )

    def _route(
        self,
        method: str,
        seg: list[str],
        query: Mapping[str, list[str]],
        body: bytes,
        base: str,
        api_version: str,
    ) -> tuple[int, dict[str, Any] | None]:
        n = len(seg)
        if seg[:1] == ["rng"] and n == 1:
            return self._expect(method, "POST", lambda: self._rng(self._json(body)))
        if seg[:1] == ["keys"]:
            if n == 1:
                return self._expect(method, "GET", lambda: self._list_keys(query, base, api_version))
            name = seg[1]
            if not _KEY_NAME.fullmatch(name):
                raise _ApiError(400, "BadParameter", f"The request URI contains an invalid name: {name}")
            if n == 2:
                if method == "DELETE":
                    return 200, self._delete(name, base)
                if method == "GET":
                    return 200, self._get(name, "", base)
                if method == "PUT":
                    raise _ApiError(400, "BadParameter", "import is not supported by this emulator")
                raise self._bad_method(method)
            action = seg[2]
            if n == 3:
                if action == "create":
                    return self._expect(method, "POST", lambda: self._create(name, self._json(body), base))
                if action == "rotate":
                    return self._expect(method, "POST", lambda: self._rotate(name, base))
                if action == "versions":
                    return self._expect(
                        method, "GET", lambda: self._list_versions(name, query, base, api_version)
                    )
                if action == "rotationpolicy":
                    if method == "GET":
                        return 200, self._get_rotation_policy(name, base)
                    if method == "PUT":
                        return 200, self._put_rotation_policy(name, self._json(body), base)
                    raise self._bad_method(method)
                if action in ("backup", "restore"):
                    raise _ApiError(400, "BadParameter", f"{action} is not supported by this emulator")
                if method == "GET":
                    return 200, self._get(name, action, base)
                if method == "PATCH":
                    return 200, self._update(name, action, self._json(body), base)
                raise self._bad_method(method)
            if n == 4:
                op = seg[3].lower()
                if op in _CRYPTO_OPS:
                    return self._expect(
                        method, "POST", lambda: self._crypto(name, action, op, self._json(body), base)
                    )
                if op == "release":
                    return self._expect(
                        method,
                        "POST",
                        lambda: self._release(name, action, self._json(body), base, api_version),
                    )
                raise _ApiError(400, "BadParameter", f"operation {seg[3]} is not supported by this emulator")
        if seg[:1] == ["deletedkeys"]:
            if n == 1:
                return self._expect(method, "GET", lambda: self._list_deleted(query, base, api_version))
            name = seg[1]
            if n == 2:
                if method == "GET":
                    return 200, self._get_deleted(name, base)
                if method == "DELETE":
                    return self._purge(name)
                raise self._bad_method(method)
            if n == 3 and seg[2] == "recover":
                return self._expect(method, "POST", lambda: self._recover(name, base))
        raise _ApiError(404, "NotFound", f"no such resource: /{'/'.join(seg)}")

    @staticmethod
    def _bad_method(method: str) -> _ApiError:
        return _ApiError(405, "MethodNotAllowed", f"The requested method {method} is not allowed here.")

    def _expect(self, method: str, wanted: str, fn: Any) -> tuple[int, dict[str, Any] | None]:
        if method != wanted:
            raise self._bad_method(method)
        result = fn()
        return result if isinstance(result, tuple) else (200, result)

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        if not body:
            return {}
        try:
            data = json.loads(body)
        except ValueError:
            raise _ApiError(400, "BadParameter", "The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise _ApiError(400, "BadParameter", "The request body must be a JSON object.")
        return data

    # --------------------------------------------------------------------- rendering

    def _jwk(self, name: str, v: _Version, base: str, *, private: bool = False) -> dict[str, Any]:
        jwk: dict[str, Any] = {"kid": f"{base}/keys/{name}/{v.id}", "kty": v.kty, "key_ops": list(v.key_ops)}
        key = self._object(v)
        if isinstance(key, rsa.RSAPrivateKey):
            numbers = key.private_numbers()
            jwk["n"] = _b64u(_int_bytes(numbers.public_numbers.n))
            jwk["e"] = _b64u(_int_bytes(numbers.public_numbers.e))
            if private:
                for label, value in (
                    ("d", numbers.d),
                    ("p", numbers.p),
                    ("q", numbers.q),
                    ("dp", numbers.dmp1),
                    ("dq", numbers.dmq1),
                    ("qi", numbers.iqmp),
                ):
                    jwk[label] = _b64u(_int_bytes(value))
        elif private:
            jwk["k"] = _b64u(key)
        return jwk

    @staticmethod
    def _attributes(v: _Version) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "enabled": v.enabled,
            "created": v.created,
            "updated": v.updated,
            "recoveryLevel": _RECOVERY_LEVEL,
            "recoverableDays": _RECOVERABLE_DAYS,
            "exportable": v.exportable,
        }
        if v.nbf is not None:
            attributes["nbf"] = v.nbf
        if v.exp is not None:
            attributes["exp"] = v.exp
        return attributes

    def _bundle(self, name: str, v: _Version, base: str) -> dict[str, Any]:
        bundle: dict[str, Any] = {"key": self._jwk(name, v, base), "attributes": self._attributes(v)}
        if v.tags:
            bundle["tags"] = dict(v.tags)
        if v.release_policy is not None:
            bundle["release_policy"] = dict(v.release_policy)
        return bundle

    def _deleted_bundle(self, key: _Key, base: str) -> dict[str, Any]:
        deleted = key.deleted or 0
        return {
            **self._bundle(key.name, key.current, base),
            "recoveryId": f"{base}/deletedkeys/{key.name}",
            "deletedDate": deleted,
            "scheduledPurgeDate": deleted + _RECOVERABLE_DAYS * 86400,
        }

    @staticmethod
    def _page(
        items: list[dict[str, Any]], query: Mapping[str, list[str]], next_base: str, api_version: str
    ) -> dict[str, Any]:
        try:
            size = int((query.get("maxresults") or [str(_PAGE_SIZE)])[0])
            skip = int((query.get("$skiptoken") or ["0"])[0])
        except ValueError:
            raise _ApiError(400, "BadParameter", "maxresults and $skiptoken must be integers") from None
        if not 1 <= size <= _PAGE_SIZE:
            raise _ApiError(400, "BadParameter", f"maxresults must be between 1 and {_PAGE_SIZE}")
        skip = max(0, skip)
        page: dict[str, Any] = {"value": items[skip : skip + size], "nextLink": None}
        if skip + size < len(items):
            page["nextLink"] = (
                f"{next_base}?api-version={api_version}&$skiptoken={skip + size}&maxresults={size}"
            )
        return page

    # ------------------------------------------------------------------------ lookups

    def _active(self, name: str) -> _Key:
        key = self._keys.get(name)
        if key is None or key.deleted is not None:
            raise _not_found(name)
        return key

    def _lookup(self, name: str, version: str) -> _Version:
        v = self._active(name).version(version)
        if v is None:
            raise _not_found(name, version)
        return v

    def _object(self, v: _Version) -> bytes | rsa.RSAPrivateKey:
        cached = self._objects.get(v.id)
        if cached is not None:
            return cached
        obj: bytes | rsa.RSAPrivateKey
        if v.is_rsa:
            loaded = serialization.load_pem_private_key(v.material.encode("ascii"), password=None)
            if not isinstance(loaded, rsa.RSAPrivateKey):
                raise RuntimeError(f"stored key {v.id} is not an RSA key")
            obj = loaded
        else:
            obj = base64.b64decode(v.material)
        self._objects[v.id] = obj
        return obj

    # ---------------------------------------------------------------------- handlers

    def _new_version(
        self,
        kty: str,
        size: int,
        key_ops: list[str],
        *,
        public_exponent: int = 65537,
    ) -> _Version:
        if kty.startswith("RSA"):
            private = rsa.generate_private_key(public_exponent=public_exponent, key_size=size)
            material = private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode("ascii")
        else:
            material = base64.b64encode(secrets.token_bytes(size // 8)).decode("ascii")
        now = _now()
        return _Version(
            id=uuid.uuid4().hex,
            kty=kty,
            size=size,
            key_ops=key_ops,
            material=material,
            created=now,
            updated=now,
        )

    @staticmethod
    def _apply_attributes(v: _Version, attributes: object) -> None:
        if attributes is None:
            return
        if not isinstance(attributes, dict):
            raise _ApiError(400, "BadParameter", "attributes must be an object")
        if "enabled" in attributes and attributes["enabled"] is not None:
            v.enabled = bool(attributes["enabled"])
        for label in ("nbf", "exp"):
            if label in attributes:
                value = attributes[label]
                if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                    raise _ApiError(400, "BadParameter", f"attributes.{label} must be a Unix time")
                setattr(v, label, int(value) if value is not None else None)

    @staticmethod
    def _tags(tags: object) -> dict[str, str]:
        if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in tags.items()
        ):
            raise _ApiError(400, "BadParameter", "tags must be an object of strings")
        if len(tags) > 15:
            raise _ApiError(400, "BadParameter", "at most 15 tags are allowed")
        return dict(tags)

    @staticmethod
    def _key_ops(ops: object, default: list[str]) -> list[str]:
        if ops is None:
            return list(default)
        if not isinstance(ops, list) or not all(isinstance(op, str) and op in _KNOWN_OPS for op in ops):
            raise _ApiError(400, "BadParameter", f"key_ops must be a list of {', '.join(sorted(_KNOWN_OPS))}")
        return list(ops)

    def _create(self, name: str, body: dict[str, Any], base: str) -> dict[str, Any]:
        kty = body.get("kty")
        if kty not in ("oct-HSM", "RSA-HSM", "RSA"):
            raise _ApiError(
                400,
                "BadParameter",
                f"Key type {kty!r} is not supported (this emulator knows oct-HSM and RSA-HSM).",
            )
        size = body.get("key_size")
        if kty == "oct-HSM":
            size = 256 if size is None else size
            allowed, default_ops = (128, 192, 256), _OCT_OPS
        else:
            size = 2048 if size is None else size
            allowed, default_ops = (2048, 3072, 4096), _RSA_OPS
        if size not in allowed:
            raise _ApiError(400, "BadParameter", f"Key size {size} is not allowed for {kty}.")
        exponent = body.get("public_exponent") or 65537
        if exponent not in (3, 65537):
            raise _ApiError(400, "BadParameter", "public_exponent must be 3 or 65537")
        key_ops = self._key_ops(body.get("key_ops"), default_ops)
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise _ApiError(400, "BadParameter", "attributes must be an object")
        exportable = bool(attributes.get("exportable", False))
        policy = _parse_release_policy(body["release_policy"]) if body.get("release_policy") else None
        if exportable and policy is None:
            raise _ApiError(400, "BadParameter", "An exportable key must have a release policy.")
        tags = self._tags(body.get("tags") or {})
        with self._lock:
            existing = self._keys.get(name)
            if existing is not None and existing.deleted is not None:
                raise _ApiError(
                    409,
                    "Conflict",
                    f"Key {name} is currently in a deleted but recoverable state, and its name cannot be "
                    "reused; in this state, the key can only be recovered or purged.",
                )
        self._throttle("create")
        v = self._new_version(str(kty), int(size), key_ops, public_exponent=int(exponent))
        v.exportable, v.release_policy, v.tags = exportable, policy, tags
        self._apply_attributes(v, {k: attributes[k] for k in ("enabled", "nbf", "exp") if k in attributes})
        with self._lock:
            key = self._keys.get(name)
            if key is None or key.deleted is not None:
                key = self._keys[name] = _Key(name)
            key.versions.append(v)
            self._save()
            return self._bundle(name, v, base)

    def _rotate(self, name: str, base: str) -> dict[str, Any]:
        with self._lock:
            current = self._active(name).current
        self._throttle("create")
        v = self._new_version(current.kty, current.size, list(current.key_ops))
        v.exportable = current.exportable
        v.release_policy = dict(current.release_policy) if current.release_policy else None
        with self._lock:
            key = self._active(name)
            key.versions.append(v)
            self._save()
            return self._bundle(name, v, base)

    def _get(self, name: str, version: str, base: str) -> dict[str, Any]:
        with self._lock:
            v = self._lookup(name, version)
            self._throttle("read")
            return self._bundle(name, v, base)

    def _update(self, name: str, version: str, body: dict[str, Any], base: str) -> dict[str, Any]:
        with self._lock:
            v = self._lookup(name, version)
        self._throttle("manage")
        with self._lock:
            v = self._lookup(name, version)
            if body.get("key_ops") is not None:
                v.key_ops = self._key_ops(body["key_ops"], v.key_ops)
            self._apply_attributes(v, body.get("attributes"))
            if body.get("tags") is not None:
                v.tags = self._tags(body["tags"])
            if body.get("release_policy") is not None:
                if v.release_policy is not None and v.release_policy.get("immutable"):
                    raise _ApiError(400, "BadParameter", "The key's release policy is immutable.")
                v.release_policy = _parse_release_policy(body["release_policy"])
            v.updated = _now()
            self._save()
            return self._bundle(name, v, base)

    def _list_keys(self, query: Mapping[str, list[str]], base: str, api_version: str) -> dict[str, Any]:
        self._throttle("read")
        with self._lock:
            items = [
                {
                    "kid": f"{base}/keys/{key.name}",
                    "attributes": self._attributes(key.current),
                    **({"tags": dict(key.current.tags)} if key.current.tags else {}),
                }
                for key in sorted(self._keys.values(), key=lambda k: k.name)
                if key.deleted is None
            ]
        return self._page(items, query, f"{base}/keys", api_version)

    def _list_versions(
        self, name: str, query: Mapping[str, list[str]], base: str, api_version: str
    ) -> dict[str, Any]:
        with self._lock:
            key = self._active(name)
            items = [
                {
                    "kid": f"{base}/keys/{name}/{v.id}",
                    "attributes": self._attributes(v),
                    **({"tags": dict(v.tags)} if v.tags else {}),
                }
                for v in sorted(key.versions, key=lambda v: v.id)
            ]
        self._throttle("read")
        return self._page(items, query, f"{base}/keys/{name}/versions", api_version)

    def _crypto(self, name: str, version: str, op: str, body: dict[str, Any], base: str) -> dict[str, Any]:
        with self._lock:
            v = self._lookup(name, version)
            key = self._object(v)
        klass = "wrap"
        if v.is_rsa:
            klass = f"rsa{v.size}" if op in _PRIVATE_OPS else f"rsa{v.size}-public"
        self._throttle(klass)
        operation = _CRYPTO_OPS[op]
        if not v.enabled:
            raise _ApiError(
                403,
                "Forbidden",
                f"Operation {operation} is not allowed on a disabled key.",
                inner="KeyDisabled",
            )
        if operation not in v.key_ops:
            raise _ApiError(403, "Forbidden", f"Operation {operation} is not permitted for this key.")
        alg = body.get("alg")
        if not isinstance(alg, str):
            raise _ApiError(400, "BadParameter", "alg is required")
        value = _unb64u(body.get("value"), "value")
        kid = f"{base}/keys/{name}/{v.id}"
        if isinstance(key, rsa.RSAPrivateKey):
            return {"kid": kid, "value": _b64u(self._rsa(key, op, alg, value))}
        return {"kid": kid, **self._aes(key, op, alg, value, body)}

    @staticmethod
    def _oaep(alg: str) -> padding.OAEP:
        if alg == "RSA-OAEP-256":
            return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        if alg == "RSA-OAEP":
            return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
        raise _ApiError(
            400, "BadParameter", f"Algorithm {alg} is not supported for RSA keys by this emulator."
        )

    def _rsa(self, key: rsa.RSAPrivateKey, op: str, alg: str, value: bytes) -> bytes:
        pad = self._oaep(alg)
        if op in _PRIVATE_OPS:
            try:
                return key.decrypt(value, pad)
            except ValueError:
                raise _ApiError(
                    400, "BadParameter", "The ciphertext could not be decrypted with this key."
                ) from None
        try:
            return key.public_key().encrypt(value, pad)
        except ValueError:
            raise _ApiError(
                400, "BadParameter", "The value is too long for this key and algorithm."
            ) from None

    def _aes(self, key: bytes, op: str, alg: str, value: bytes, body: dict[str, Any]) -> dict[str, Any]:
        bits = len(key) * 8
        if op in ("wrapkey", "unwrapkey"):
            padded = alg == "CKM_AES_KEY_WRAP_PAD"
            if alg not in (f"A{bits}KW", "CKM_AES_KEY_WRAP", "CKM_AES_KEY_WRAP_PAD"):
                raise _ApiError(
                    400, "BadParameter", f"Algorithm {alg} is not valid for a {bits}-bit oct-HSM key."
                )
            if op == "wrapkey":
                if padded:
                    return {"value": _b64u(aes_key_wrap_with_padding(key, value))}
                if len(value) < 16 or len(value) % 8:
                    raise _ApiError(
                        400, "BadParameter", "The key to wrap must be a multiple of 8 bytes, at least 16."
                    )
                return {"value": _b64u(aes_key_wrap(key, value))}
            try:
                plain = aes_key_unwrap_with_padding(key, value) if padded else aes_key_unwrap(key, value)
            except (InvalidUnwrap, ValueError):
                raise _ApiError(
                    400, "BadParameter", "The wrapped key could not be unwrapped with this key."
                ) from None
            return {"value": _b64u(plain)}
        aad = _unb64u(body["aad"], "aad") if body.get("aad") else None
        if alg == f"A{bits}GCM":
            if op == "encrypt":
                iv = secrets.token_bytes(12)
                sealed = AESGCM(key).encrypt(iv, value, aad)
                answer = {"value": _b64u(sealed[:-16]), "iv": _b64u(iv), "tag": _b64u(sealed[-16:])}
                if aad is not None:
                    answer["aad"] = _b64u(aad)
                return answer
            iv = _unb64u(body.get("iv"), "iv")
            tag = _unb64u(body.get("tag"), "tag")
            try:
                return {"value": _b64u(AESGCM(key).decrypt(iv, value + tag, aad))}
            except (InvalidTag, ValueError):
                raise _ApiError(
                    400, "BadParameter", "The ciphertext could not be decrypted with this key."
                ) from None
        if alg in (f"A{bits}CBC", f"A{bits}CBCPAD"):
            iv = _unb64u(body.get("iv"), "iv")
            if len(iv) != 16:
                raise _ApiError(400, "BadParameter", "iv must be 16 bytes for AES-CBC")
            cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
            pad = alg.endswith("PAD")
            if op == "encrypt":
                if pad:
                    padder = block_padding.PKCS7(128).padder()
                    value = padder.update(value) + padder.finalize()
                if len(value) % 16:
                    raise _ApiError(400, "BadParameter", "AES-CBC plaintext must be a multiple of 16 bytes")
                encryptor = cipher.encryptor()
                return {"value": _b64u(encryptor.update(value) + encryptor.finalize()), "iv": _b64u(iv)}
            if len(value) % 16:
                raise _ApiError(400, "BadParameter", "AES-CBC ciphertext must be a multiple of 16 bytes")
            decryptor = cipher.decryptor()
            plain = decryptor.update(value) + decryptor.finalize()
            if pad:
                try:
                    unpadder = block_padding.PKCS7(128).unpadder()
                    plain = unpadder.update(plain) + unpadder.finalize()
                except ValueError:
                    raise _ApiError(
                        400, "BadParameter", "The ciphertext could not be decrypted with this key."
                    ) from None
            return {"value": _b64u(plain)}
        raise _ApiError(400, "BadParameter", f"Algorithm {alg} is not valid for a {bits}-bit oct-HSM key.")

    # ------------------------------------------------------------------------ release

    @staticmethod
    def _load_verifier(
        source: str | os.PathLike[str] | bytes | None,
    ) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey | None:
        if source is None:
            return None
        pem = source if isinstance(source, bytes) else Path(source).read_bytes()
        key = serialization.load_pem_public_key(pem)
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise ValueError("the attestation verifier key must be an EC or RSA public key (PEM)")
        return key

    def _target_claims(self, token: object) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise _ApiError(400, "BadParameter", "target (the attestation token) is required")
        options: Any = {
            "verify_aud": False,
            "verify_iat": False,
            "verify_exp": True,
            "verify_nbf": True,
        }
        try:
            if self._verifier is None:
                unsigned: Any = {**options, "verify_signature": False}
                claims = jwt.decode(token, options=unsigned, leeway=60)
            else:
                header = jwt.get_unverified_header(token)
                allowed = (
                    ["ES256", "ES384", "ES512"]
                    if isinstance(self._verifier, ec.EllipticCurvePublicKey)
                    else ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
                )
                if header.get("alg") not in allowed:
                    raise jwt.InvalidAlgorithmError(f"algorithm {header.get('alg')!r} is not allowed")
                claims = jwt.decode(token, self._verifier, algorithms=allowed, options=options, leeway=60)
        except jwt.PyJWTError as exc:
            raise _ApiError(
                403, "Forbidden", f"Target environment attestation statement cannot be verified: {exc}"
            ) from None
        if not isinstance(claims, dict):
            raise _ApiError(
                403, "Forbidden", "Target environment attestation statement is not a JSON object."
            )
        return claims

    def _release(
        self, name: str, version: str, body: dict[str, Any], base: str, api_version: str
    ) -> dict[str, Any]:
        with self._lock:
            v = self._lookup(name, version)
            key = self._object(v)
        self._throttle("release")
        if not v.enabled:
            raise _ApiError(
                403, "Forbidden", "Operation release is not allowed on a disabled key.", inner="KeyDisabled"
            )
        if not v.exportable:
            raise _ApiError(
                400,
                "BadParameter",
                f"Key {name}/{v.id} is not exportable; only exportable keys are released.",
            )
        if v.release_policy is None:
            raise _ApiError(400, "BadParameter", f"Key {name}/{v.id} has no release policy.")
        claims = self._target_claims(body.get("target"))
        policy = json.loads(_unb64u(v.release_policy["data"], "release policy"))
        reasons: list[str] = []
        if not _satisfies({k: x for k, x in policy.items() if k != "version"}, claims, reasons):
            raise _ApiError(
                403,
                "Forbidden",
                "Target environment attestation statement does not satisfy the key release policy: "
                + "; ".join(reasons[:5]),
            )
        enc = body.get("enc") or "CKM_RSA_AES_KEY_WRAP"
        if enc not in _RELEASE_ENC:
            raise _ApiError(400, "BadParameter", f"enc {enc!r} is not supported")
        jwk = self._released_jwk(name, v, key, base, claims, str(enc))
        request: dict[str, Any] = {"api-version": api_version, "enc": enc, "kid": jwk["kid"]}
        if body.get("nonce"):
            request["nonce"] = body["nonce"]
        released: dict[str, Any] = {
            "key": jwk,
            "attributes": self._attributes(v),
            "release_policy": v.release_policy,
        }
        if v.tags:
            released["tags"] = dict(v.tags)
        payload = {"request": request, "response": {"key": released}, "iat": _now()}
        assert self._signing_key is not None
        cert_der = base64.b64decode(self._signing_chain[0])
        headers = {
            "x5c": self._signing_chain,
            "x5t#S256": _b64u(hashlib.sha256(cert_der).digest()),
            "kid": _b64u(hashlib.sha256(cert_der).digest()),
        }
        return {"value": jwt.encode(payload, self._signing_key, algorithm="RS256", headers=headers)}

    def _released_jwk(
        self,
        name: str,
        v: _Version,
        key: bytes | rsa.RSAPrivateKey,
        base: str,
        claims: Mapping[str, Any],
        enc: str,
    ) -> dict[str, Any]:
        runtime = claims.get("x-ms-runtime")
        target: dict[str, Any] | None = None
        if isinstance(runtime, dict) and isinstance(runtime.get("keys"), list):
            target = next(
                (
                    k
                    for k in runtime["keys"]
                    if isinstance(k, dict) and k.get("kty") == "RSA" and "n" in k and "e" in k
                ),
                None,
            )
        if target is None:  # no key to wrap to: the material goes out in the clear (emulator only)
            return self._jwk(name, v, base, private=True)
        try:
            public = rsa.RSAPublicNumbers(
                int.from_bytes(_unb64u(target["e"], "e"), "big"),
                int.from_bytes(_unb64u(target["n"], "n"), "big"),
            ).public_key()
        except ValueError:
            raise _ApiError(400, "BadParameter", "x-ms-runtime.keys holds an invalid RSA key") from None
        if isinstance(key, rsa.RSAPrivateKey):
            material = key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        else:
            material = key
        digest = _RELEASE_ENC[enc]
        transport = secrets.token_bytes(32)
        wrapped = public.encrypt(
            transport, padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)
        ) + aes_key_wrap_with_padding(transport, material)
        blob = {
            "schema_version": "1.0",
            "header": {"kid": str(target.get("kid", "")), "alg": "dir", "enc": enc},
            "ciphertext": _b64u(wrapped),
            "generator": "rekey Azure Key Vault emulator",
        }
        jwk = self._jwk(name, v, base)
        jwk["key_hsm"] = _b64u(json.dumps(blob).encode())
        return jwk

    # -------------------------------------------------------------- rotation policy

    def _default_rotation_policy(self, name: str, base: str) -> dict[str, Any]:
        return {
            "id": f"{base}/keys/{name}/rotationpolicy",
            "lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}}],
            "attributes": {},
        }

    def _get_rotation_policy(self, name: str, base: str) -> dict[str, Any]:
        with self._lock:
            key = self._active(name)
            self._throttle("read")
            if key.rotation_policy is None:
                return self._default_rotation_policy(name, base)
            return {"id": f"{base}/keys/{name}/rotationpolicy", **key.rotation_policy}

    def _put_rotation_policy(self, name: str, body: dict[str, Any], base: str) -> dict[str, Any]:
        actions = body.get("lifetimeActions") or []
        if not isinstance(actions, list) or len(actions) > 2:
            raise _ApiError(400, "BadParameter", "lifetimeActions must be a list of at most two actions")
        for action in actions:
            kind = (action.get("action") or {}).get("type") if isinstance(action, dict) else None
            trigger = action.get("trigger") if isinstance(action, dict) else None
            if (
                not isinstance(kind, str)
                or kind.lower() not in ("rotate", "notify")
                or not isinstance(trigger, dict)
            ):
                raise _ApiError(
                    400, "BadParameter", "each lifetime action needs a trigger and type Rotate or Notify"
                )
            for label in ("timeAfterCreate", "timeBeforeExpiry"):
                value = trigger.get(label)
                if value is not None and (not isinstance(value, str) or not _DURATION.fullmatch(value)):
                    raise _ApiError(400, "BadParameter", f"{label} must be an ISO 8601 duration like P90D")
        attributes = body.get("attributes") or {}
        expiry = attributes.get("expiryTime") if isinstance(attributes, dict) else None
        if expiry is not None and (not isinstance(expiry, str) or not _DURATION.fullmatch(expiry)):
            raise _ApiError(400, "BadParameter", "expiryTime must be an ISO 8601 duration like P90D")
        with self._lock:
            key = self._active(name)
        self._throttle("manage")
        with self._lock:
            key = self._active(name)
            now = _now()
            created = (key.rotation_policy or {}).get("attributes", {}).get("created", now)
            stored_attributes: dict[str, Any] = {"created": created, "updated": now}
            if expiry is not None:
                stored_attributes["expiryTime"] = expiry
            key.rotation_policy = {"lifetimeActions": actions, "attributes": stored_attributes}
            self._save()
            return {"id": f"{base}/keys/{name}/rotationpolicy", **key.rotation_policy}

    # ---------------------------------------------------------------- soft delete

    def _delete(self, name: str, base: str) -> dict[str, Any]:
        with self._lock:
            self._active(name)
        self._throttle("manage")
        with self._lock:
            key = self._active(name)
            key.deleted = _now()
            self._save()
            return self._deleted_bundle(key, base)

    def _deleted(self, name: str) -> _Key:
        key = self._keys.get(name)
        if key is None or key.deleted is None:
            raise _ApiError(404, "KeyNotFound", f"Deleted Key not found: {name}")
        return key

    def _get_deleted(self, name: str, base: str) -> dict[str, Any]:
        with self._lock:
            key = self._deleted(name)
            self._throttle("read")
            return self._deleted_bundle(key, base)

    def _list_deleted(self, query: Mapping[str, list[str]], base: str, api_version: str) -> dict[str, Any]:
        self._throttle("read")
        with self._lock:
            items = []
            for key in sorted(self._keys.values(), key=lambda k: k.name):
                if key.deleted is None:
                    continue
                bundle = self._deleted_bundle(key, base)
                items.append(
                    {
                        "kid": f"{base}/keys/{key.name}",
                        "attributes": bundle["attributes"],
                        "recoveryId": bundle["recoveryId"],
                        "deletedDate": bundle["deletedDate"],
                        "scheduledPurgeDate": bundle["scheduledPurgeDate"],
                    }
                )
        return self._page(items, query, f"{base}/deletedkeys", api_version)

    def _purge(self, name: str) -> tuple[int, None]:
        with self._lock:
            self._deleted(name)
        self._throttle("manage")
        with self._lock:
            key = self._deleted(name)
            for v in key.versions:
                self._objects.pop(v.id, None)
            del self._keys[name]
            self._save()
        return 204, None

    def _recover(self, name: str, base: str) -> dict[str, Any]:
        with self._lock:
            self._deleted(name)
        self._throttle("manage")
        with self._lock:
            key = self._deleted(name)
            key.deleted = None
            self._save()
            return self._bundle(name, key.current, base)

    def _rng(self, body: dict[str, Any]) -> dict[str, Any]:
        count = body.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 128:
            raise _ApiError(400, "BadParameter", "count must be an integer from 1 to 128")
        self._throttle("read")
        return {"value": _b64u(secrets.token_bytes(count))}

    # ------------------------------------------------------------------- inspection

    def keys(self) -> Iterator[tuple[str, int, bool]]:
        """``(name, number of versions, deleted)`` of every key (for tests)."""
        with self._lock:
            items = [(k.name, len(k.versions), k.deleted is not None) for k in self._keys.values()]
        yield from items


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parse_limit(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--limit takes CLASS=N, not {text!r}")
    if name not in DEFAULT_LIMITS:
        raise argparse.ArgumentTypeError(f"unknown class {name!r} (known: {', '.join(DEFAULT_LIMITS)})")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {name}= needs a number") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.emulators.azure_keyvault",
        description="Azure Key Vault / Managed HSM emulator on 127.0.0.1 (HTTPS; see the module docstring).",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--state-dir", required=True, help="directory for keys.json and the TLS files")
    parser.add_argument(
        "--limit",
        action="append",
        type=_parse_limit,
        default=[],
        metavar="CLASS=N",
        help=f"requests/s for one class (0 = unlimited); classes: {', '.join(DEFAULT_LIMITS)}",
    )
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply every default limit")
    parser.add_argument("--retry-after", choices=("on", "off"), default="on", help="send Retry-After on 429")
    parser.add_argument(
        "--attestation-verifier",
        help="PEM public key that signs attestation tokens for release (without it, signatures are "
        "NOT checked)",
    )
    args = parser.parse_args(argv)
    emulator = AzureKeyVaultEmulator(
        args.state_dir,
        port=args.port,
        limits=dict(args.limit),
        rate_scale=args.rate_scale,
        retry_after=args.retry_after == "on",
        attestation_verifier=args.attestation_verifier,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    url = emulator.start()
    print(f"AZURE_KEYVAULT_URL={url}", flush=True)
    print(f"AZURE_KEYVAULT_CA_FILE={emulator.ca_file}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
