"""Vault / OpenBao Transit as a ``KeyWrapper`` (hvac).

Wrapped DEKs are Transit ciphertexts (``vault:v<N>:<base64>``) stored as ASCII bytes; the
version prefix tells which key version wraps a DEK without a server call. ``rewrap`` uses
Transit's server-side rewrap, so a rotation never holds plaintext DEKs.

hvac has no retries of its own; retries and throttling belong to the governor (issue 4).
Every hvac/requests failure is mapped onto the ``sealing.errors`` taxonomy here, with a
message of our own (hvac's messages embed URLs and sometimes request data).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import hvac
import hvac.exceptions
import requests

from sealing.errors import (
    InvalidWrappedKey,
    KeyServiceUnavailable,
    KeyWrapError,
    SealingError,
    UnknownKey,
    UnknownKeyVersion,
)
from sealing.keywrap import WrappedKey, parse_versioned_prefix


class KeyPermissionDenied(KeyWrapError):
    """The KMS refused the request for lack of permission (wrong or expired token)."""


@dataclass(frozen=True)
class TransitKeyInfo:
    """What ``rekey key show`` reports about a Transit key."""

    name: str
    key_type: str
    versions: tuple[int, ...]
    latest_version: int
    min_decryption_version: int
    min_encryption_version: int

    def version_state(self, version: int) -> str:
        return "enabled" if version >= self.min_decryption_version else "disabled"


def _message(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)
    return str(exc).split(", on ")[0]


@contextmanager
def _mapped(addr: str, key: str, action: str) -> Iterator[None]:
    """Translate hvac/requests exceptions into typed sealing errors."""
    try:
        yield
    except requests.exceptions.RequestException:
        raise KeyServiceUnavailable(f"cannot reach OpenBao/Vault at {addr} to {action}") from None
    except hvac.exceptions.Forbidden:
        raise KeyPermissionDenied(
            f"OpenBao/Vault denied {action} on transit key {key!r} (check the token)"
        ) from None
    except hvac.exceptions.InvalidPath:
        raise UnknownKey(f"transit key {key!r} does not exist") from None
    except (
        hvac.exceptions.RateLimitExceeded,
        hvac.exceptions.VaultDown,
        hvac.exceptions.InternalServerError,
        hvac.exceptions.BadGateway,
    ) as exc:
        raise KeyServiceUnavailable(f"OpenBao/Vault could not {action}: {type(exc).__name__}") from None
    except hvac.exceptions.InvalidRequest as exc:
        raise _classify(_message(exc), key, action) from None
    except hvac.exceptions.VaultError as exc:
        raise KeyWrapError(
            f"OpenBao/Vault could not {action} with key {key!r}: {type(exc).__name__}"
        ) from None


def _classify(message: str, key: str, action: str) -> SealingError:
    if "encryption key not found" in message:
        return UnknownKey(f"transit key {key!r} does not exist")
    if "version is too new" in message:
        return UnknownKeyVersion(f"transit key {key!r} has no such version")
    if "disallowed by policy" in message:
        return UnknownKeyVersion(
            f"that version of transit key {key!r} is disabled (below its minimum decryption version)"
        )
    if "ciphertext" in message or "authentication failed" in message or "decode" in message:
        return InvalidWrappedKey(f"wrapped key is not a valid ciphertext of transit key {key!r}")
    return KeyWrapError(f"OpenBao/Vault refused to {action} with key {key!r}: {message}")


class TransitKeyWrapper:
    """``KeyWrapper`` over one Transit key."""

    scheme = "vault"

    def __init__(self, client: hvac.Client, name: str, *, mount_point: str = "transit") -> None:
        self._client = client
        self._name = name
        self._mount = mount_point
        self._checked = False

    @property
    def key_ref(self) -> str:
        return f"vault:{self._name}"

    def _call(self, action: str, fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
        with _mapped(self._client.url, self._name, action):
            response = fn(name=self._name, mount_point=self._mount, **kwargs)
        data = response.get("data") if isinstance(response, dict) else None
        if not isinstance(data, dict):
            raise KeyWrapError(f"OpenBao/Vault gave an unexpected answer to {action}")
        return data

    def _ensure_exists(self) -> None:
        # Transit's encrypt endpoint creates missing keys on the fly; a typo in a key ref
        # must be an error, not a new key.
        if not self._checked:
            self._call("read key", self._client.secrets.transit.read_key)
            self._checked = True

    def _wrapped(self, data: dict[str, Any]) -> WrappedKey:
        ciphertext = str(data["ciphertext"]).encode("ascii")
        return WrappedKey(ciphertext, self.version_of(ciphertext))

    def wrap(self, dek: bytes) -> WrappedKey:
        self._ensure_exists()
        plaintext = base64.b64encode(dek).decode("ascii")
        return self._wrapped(
            self._call("wrap", self._client.secrets.transit.encrypt_data, plaintext=plaintext)
        )

    def unwrap(self, wrapped: bytes) -> bytes:
        self.version_of(wrapped)
        data = self._call(
            "unwrap", self._client.secrets.transit.decrypt_data, ciphertext=wrapped.decode("ascii")
        )
        try:
            return base64.b64decode(str(data["plaintext"]), validate=True)
        except (KeyError, binascii.Error):
            raise KeyWrapError("OpenBao/Vault returned a malformed plaintext") from None

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        self.version_of(wrapped)
        return self._wrapped(
            self._call(
                "rewrap",
                self._client.secrets.transit.rewrap_data,
                ciphertext=wrapped.decode("ascii"),
            )
        )

    def version_of(self, wrapped: bytes) -> int:
        return parse_versioned_prefix(wrapped, self.scheme)[0]


class TransitAdmin:
    """Key management on a Transit mount: what ``rekey key create|show`` needs."""

    def __init__(self, client: hvac.Client, *, mount_point: str = "transit") -> None:
        self._client = client
        self._mount = mount_point

    def describe(self, name: str) -> TransitKeyInfo:
        with _mapped(self._client.url, name, "read key"):
            data = self._client.secrets.transit.read_key(name=name, mount_point=self._mount)["data"]
        versions = tuple(sorted(int(v) for v in data.get("keys", {})))
        return TransitKeyInfo(
            name=name,
            key_type=str(data.get("type", "")),
            versions=versions,
            latest_version=int(data["latest_version"]),
            min_decryption_version=int(data["min_decryption_version"]),
            min_encryption_version=int(data.get("min_encryption_version", 0)),
        )

    def create(self, name: str, key_type: str = "aes256-gcm96") -> tuple[TransitKeyInfo, bool]:
        """Create the key if missing. Returns its description and whether it was created."""
        try:
            return self.describe(name), False
        except UnknownKey:
            pass
        with _mapped(self._client.url, name, "create key"):
            self._client.secrets.transit.create_key(name=name, key_type=key_type, mount_point=self._mount)
        return self.describe(name), True

    def rotate(self, name: str) -> TransitKeyInfo:
        with _mapped(self._client.url, name, "rotate key"):
            self._client.secrets.transit.rotate_key(name=name, mount_point=self._mount)
        return self.describe(name)
