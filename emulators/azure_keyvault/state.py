"""The emulator's keys and their persistence in ``keys.json`` (key material included, unencrypted:
this is an emulator), rewritten atomically after each change so keys survive a restart."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from emulators.azure_keyvault.wire import ApiError, key_not_found

__all__ = ["Key", "KeyMaterial", "KeyStore", "KeyVersion", "write_atomic"]

#: A version's key as the cryptography library uses it: raw AES bytes or an RSA private key.
KeyMaterial = bytes | rsa.RSAPrivateKey


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
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


@dataclass
class KeyVersion:
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
    def from_json(cls, data: Mapping[str, Any]) -> KeyVersion:
        return cls(**dict(data))


@dataclass
class Key:
    name: str
    versions: list[KeyVersion] = field(default_factory=list)
    rotation_policy: dict[str, Any] | None = None
    deleted: int | None = None  # deletedDate of a soft-deleted key

    @property
    def current(self) -> KeyVersion:
        return self.versions[-1]

    def version(self, version_id: str) -> KeyVersion | None:
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
    def from_json(cls, data: Mapping[str, Any]) -> Key:
        return cls(
            name=str(data["name"]),
            versions=[KeyVersion.from_json(v) for v in data["versions"]],
            rotation_policy=data.get("rotation_policy"),
            deleted=data.get("deleted"),
        )


class KeyStore:
    """Every key of the vault, by name, and ``keys.json``.

    Callers hold ``lock`` while they read or change ``keys`` and call :meth:`save` before
    releasing it after a change; the lookups below expect it held too.
    """

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file
        self.lock = threading.Lock()
        self.keys: dict[str, Key] = {}
        self._materials: dict[str, KeyMaterial] = {}  # parsed key material by version id

    def load(self) -> None:
        """Read ``keys.json`` if there is one (takes ``lock`` itself)."""
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return
        with self.lock:
            self.keys = {name: Key.from_json(key) for name, key in data.get("keys", {}).items()}

    def save(self) -> None:
        """Write every key atomically (the caller holds ``lock``)."""
        document = {
            "format": 1,
            "note": "Azure Key Vault emulator state: key material in the clear, for tests only",
            "keys": {name: key.to_json() for name, key in self.keys.items()},
        }
        write_atomic(self.state_file, json.dumps(document, indent=1, sort_keys=True).encode())

    def active(self, name: str) -> Key:
        """The key ``name`` unless it is missing or soft-deleted (404)."""
        key = self.keys.get(name)
        if key is None or key.deleted is not None:
            raise key_not_found(name)
        return key

    def lookup(self, name: str, version: str) -> KeyVersion:
        """A version of an active key; ``""`` is the current version."""
        v = self.active(name).version(version)
        if v is None:
            raise key_not_found(name, version)
        return v

    def deleted(self, name: str) -> Key:
        """The soft-deleted key ``name`` (404 if there is none)."""
        key = self.keys.get(name)
        if key is None or key.deleted is None:
            raise ApiError(404, "KeyNotFound", f"Deleted Key not found: {name}")
        return key

    def purge(self, name: str) -> None:
        """Forget a key and the parsed material of its versions (the caller saves)."""
        key = self.keys.pop(name)
        for v in key.versions:
            self._materials.pop(v.id, None)

    def material(self, v: KeyVersion) -> KeyMaterial:
        """The version's key, parsed once and then cached."""
        cached = self._materials.get(v.id)
        if cached is not None:
            return cached
        obj: KeyMaterial
        if v.is_rsa:
            loaded = serialization.load_pem_private_key(v.material.encode("ascii"), password=None)
            if not isinstance(loaded, rsa.RSAPrivateKey):
                raise RuntimeError(f"stored key {v.id} is not an RSA key")
            obj = loaded
        else:
            obj = base64.b64decode(v.material)
        self._materials[v.id] = obj
        return obj
