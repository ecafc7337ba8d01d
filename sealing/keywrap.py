"""The ``KeyWrapper`` protocol: how the sealing layer asks a KMS to wrap data keys.

A wrapper is bound to one key reference (``vault:orders``). It wraps a fresh 256-bit DEK
under the key's primary version, unwraps a wrapped DEK under whichever version wrapped it,
and re-wraps a wrapped DEK to the primary version (server-side where the KMS can, so the
plaintext DEK never leaves it). Wrapped DEKs name their version (``vault:v3:...``), which
``version_of`` reads without a KMS call.

The re-wrap sweep of a rotation (``sealing.rotation``) needs a little more of a key service:
a batch re-wrap with one ``RewrapOutcome`` per item, which ``RewrapService`` describes. Both
protocols live here, so the sealing layer depends on no KMS package (the KMS adapters depend
on it): every KMS adapter is both a ``KeyWrapper`` and a ``RewrapService``.

``LocalKeyWrapper`` is an in-process implementation for unit tests and benchmarks. It has
the same version semantics as Transit (rotate adds a version; a minimum decryption version
disables older ones) but keeps its key-encryption keys in memory: never use it for real data.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealing.errors import InvalidWrappedKey, KeyWrapError, UnknownKeyVersion

DEK_BYTES = 32


@dataclass(frozen=True)
class WrappedKey:
    """A wrapped DEK and the key version that wraps it."""

    ciphertext: bytes
    key_version: int

    def __repr__(self) -> str:  # the ciphertext is not secret, but keep logs short
        return f"WrappedKey(key_version={self.key_version}, {len(self.ciphertext)} bytes)"


@runtime_checkable
class KeyWrapper(Protocol):
    """Wraps DEKs under one KMS key. Implementations raise ``sealing.errors`` types only."""

    @property
    def key_ref(self) -> str:
        """``backend:name`` of the key this wrapper uses."""
        ...

    def wrap(self, dek: bytes) -> WrappedKey:
        """Wrap ``dek`` under the primary version."""
        ...

    def unwrap(self, wrapped: bytes) -> bytes:
        """Return the DEK inside ``wrapped``.

        Raises ``UnknownKeyVersion`` or ``InvalidWrappedKey``."""
        ...

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        """Re-wrap ``wrapped`` under the primary version without returning the DEK."""
        ...

    def version_of(self, wrapped: bytes) -> int:
        """The key version named by ``wrapped`` (raises ``InvalidWrappedKey`` if unreadable)."""
        ...


@dataclass(frozen=True)
class RewrapOutcome:
    """Result for one item of a batch re-wrap: exactly one of ``wrapped`` and ``error``."""

    index: int
    wrapped: WrappedKey | None = None
    error: KeyWrapError | None = None


@runtime_checkable
class RewrapService(Protocol):
    """What the re-wrap sweep needs of a key service bound to one key.

    Errors are ``KeyWrapError``s; the sweep reads their ``retryable`` flag only."""

    @property
    def key_ref(self) -> str:
        """``backend:name`` of the key."""
        ...

    def unwrap(self, wrapped: bytes) -> bytes:
        """Return the DEK inside ``wrapped`` (the sweep's sample check only)."""
        ...

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        """Re-wrap ``wrapped`` under the primary version without returning the DEK."""
        ...

    def rewrap_batch(self, wrapped: Sequence[bytes]) -> list[RewrapOutcome]:
        """Re-wrap each item to the primary version, splitting into requests the backend
        accepts; one outcome per item, in order. A failed item never fails the others."""
        ...


_VERSIONED = re.compile(rb"^([a-z]+):v([1-9][0-9]{0,9}):")


def parse_versioned_prefix(wrapped: bytes, scheme: str) -> tuple[int, bytes]:
    """Split ``<scheme>:v<N>:<rest>`` into ``(N, rest)``; the form Transit ciphertexts take."""
    match = _VERSIONED.match(wrapped)
    if match is None or match.group(1) != scheme.encode():
        raise InvalidWrappedKey(f"wrapped key is not a '{scheme}:v<N>:' ciphertext")
    return int(match.group(2)), wrapped[match.end() :]


class LocalKeyWrapper:
    """In-process key wrapper with Transit-like versions, for tests and benchmarks only."""

    scheme = "local"

    def __init__(self, key_ref: str = "local:test") -> None:
        self._key_ref = key_ref
        self._keks: dict[int, AESGCM] = {}
        self._min_decryption_version = 1
        self._lock = threading.Lock()
        self.rotate()

    @property
    def key_ref(self) -> str:
        return self._key_ref

    @property
    def primary_version(self) -> int:
        return max(self._keks)

    @property
    def min_decryption_version(self) -> int:
        return self._min_decryption_version

    def rotate(self) -> int:
        """Add a new version and make it primary."""
        with self._lock:
            version = max(self._keks, default=0) + 1
            self._keks[version] = AESGCM(AESGCM.generate_key(bit_length=256))
            return version

    def disable_below(self, version: int) -> None:
        """Refuse to unwrap anything wrapped under a version lower than ``version``."""
        with self._lock:
            self._min_decryption_version = version

    def destroy_below(self, version: int) -> None:
        """Forget the key material of every version lower than ``version``."""
        with self._lock:
            for old in [v for v in self._keks if v < version]:
                del self._keks[old]

    def _aad(self, version: int) -> bytes:
        return f"{self._key_ref}|v{version}".encode()

    def _wrap_with(self, version: int, dek: bytes) -> WrappedKey:
        nonce = os.urandom(12)
        sealed = self._keks[version].encrypt(nonce, dek, self._aad(version))
        text = b"local:v%d:" % version + base64.b64encode(nonce + sealed)
        return WrappedKey(text, version)

    def wrap(self, dek: bytes) -> WrappedKey:
        return self._wrap_with(self.primary_version, dek)

    def version_of(self, wrapped: bytes) -> int:
        return parse_versioned_prefix(wrapped, self.scheme)[0]

    def unwrap(self, wrapped: bytes) -> bytes:
        version, body = parse_versioned_prefix(wrapped, self.scheme)
        kek = self._keks.get(version)
        if kek is None or version < self._min_decryption_version:
            raise UnknownKeyVersion(
                f"{self._key_ref} has no usable version {version}"
                f" (primary {self.primary_version}, minimum {self._min_decryption_version})"
            )
        try:
            raw = base64.b64decode(body, validate=True)
        except binascii.Error:
            raise InvalidWrappedKey("wrapped key is not valid base64") from None
        if len(raw) < 12 + 16:
            raise InvalidWrappedKey("wrapped key is too short")
        try:
            return kek.decrypt(raw[:12], raw[12:], self._aad(version))
        except InvalidTag:
            raise InvalidWrappedKey(f"wrapped key does not authenticate under {self._key_ref}") from None

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        return self._wrap_with(self.primary_version, self.unwrap(wrapped))
