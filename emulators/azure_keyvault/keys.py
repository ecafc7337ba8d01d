"""Keys and their versions: create, get, list, update, rotate, the rotation policy, and soft delete
with recover and purge.

Each operation that changes a key checks that it exists, takes a token of its throttling class,
then looks it up again under the store's lock before changing it: a missing key is answered 404
before any throttling, slow work (RSA key generation) runs without the lock, and a key deleted in
between is answered 404, not changed.
"""

from __future__ import annotations

import base64
import re
import secrets
import uuid
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from emulators.azure_keyvault import render
from emulators.azure_keyvault.release import parse_release_policy
from emulators.azure_keyvault.state import Key, KeyStore, KeyVersion
from emulators.azure_keyvault.throttle import Throttle
from emulators.azure_keyvault.wire import ApiError, unix_now

__all__ = ["KeyOperations"]

_DURATION = re.compile(r"P(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+D)?(?:T(?:[0-9]+H)?(?:[0-9]+M)?(?:[0-9]+S)?)?")
_OCT_OPS = ["encrypt", "decrypt", "wrapKey", "unwrapKey"]
_RSA_OPS = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
_KNOWN_OPS = frozenset({"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import", "export"})


def _new_version(kty: str, size: int, key_ops: list[str], *, public_exponent: int = 65537) -> KeyVersion:
    if kty.startswith("RSA"):
        private = rsa.generate_private_key(public_exponent=public_exponent, key_size=size)
        material = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")
    else:
        material = base64.b64encode(secrets.token_bytes(size // 8)).decode("ascii")
    now = unix_now()
    return KeyVersion(
        id=uuid.uuid4().hex,
        kty=kty,
        size=size,
        key_ops=key_ops,
        material=material,
        created=now,
        updated=now,
    )


def _apply_attributes(v: KeyVersion, attributes: object) -> None:
    if attributes is None:
        return
    if not isinstance(attributes, dict):
        raise ApiError(400, "BadParameter", "attributes must be an object")
    if "enabled" in attributes and attributes["enabled"] is not None:
        v.enabled = bool(attributes["enabled"])
    for label in ("nbf", "exp"):
        if label in attributes:
            value = attributes[label]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ApiError(400, "BadParameter", f"attributes.{label} must be a Unix time")
            setattr(v, label, int(value) if value is not None else None)


def _tags(tags: object) -> dict[str, str]:
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in tags.items()
    ):
        raise ApiError(400, "BadParameter", "tags must be an object of strings")
    if len(tags) > 15:
        raise ApiError(400, "BadParameter", "at most 15 tags are allowed")
    return dict(tags)


def _key_ops(ops: object, default: list[str]) -> list[str]:
    if ops is None:
        return list(default)
    if not isinstance(ops, list) or not all(isinstance(op, str) and op in _KNOWN_OPS for op in ops):
        raise ApiError(400, "BadParameter", f"key_ops must be a list of {', '.join(sorted(_KNOWN_OPS))}")
    return list(ops)


def _check_rotation_policy(body: dict[str, Any]) -> tuple[list[Any], str | None]:
    """The lifetime actions and the expiry duration of a rotation policy as sent on the wire."""
    actions = body.get("lifetimeActions") or []
    if not isinstance(actions, list) or len(actions) > 2:
        raise ApiError(400, "BadParameter", "lifetimeActions must be a list of at most two actions")
    for action in actions:
        kind = (action.get("action") or {}).get("type") if isinstance(action, dict) else None
        trigger = action.get("trigger") if isinstance(action, dict) else None
        if (
            not isinstance(kind, str)
            or kind.lower() not in ("rotate", "notify")
            or not isinstance(trigger, dict)
        ):
            raise ApiError(
                400, "BadParameter", "each lifetime action needs a trigger and type Rotate or Notify"
            )
        for label in ("timeAfterCreate", "timeBeforeExpiry"):
            value = trigger.get(label)
            if value is not None and (not isinstance(value, str) or not _DURATION.fullmatch(value)):
                raise ApiError(400, "BadParameter", f"{label} must be an ISO 8601 duration like P90D")
    attributes = body.get("attributes") or {}
    expiry = attributes.get("expiryTime") if isinstance(attributes, dict) else None
    if expiry is not None and (not isinstance(expiry, str) or not _DURATION.fullmatch(expiry)):
        raise ApiError(400, "BadParameter", "expiryTime must be an ISO 8601 duration like P90D")
    return actions, expiry


class KeyOperations:
    """The key-management half of the REST API (``/keys`` and ``/deletedkeys``)."""

    def __init__(self, store: KeyStore, throttle: Throttle) -> None:
        self._store = store
        self._throttle = throttle

    def _bundle(self, name: str, v: KeyVersion, base: str) -> dict[str, Any]:
        return render.bundle(name, v, self._store.material(v), base)

    def _deleted_bundle(self, key: Key, base: str) -> dict[str, Any]:
        return render.deleted_bundle(key, self._store.material(key.current), base)

    # ------------------------------------------------------------------ keys and versions

    def create(self, name: str, body: dict[str, Any], base: str) -> dict[str, Any]:
        """A new key, or a new version of an existing one."""
        kty = body.get("kty")
        if kty not in ("oct-HSM", "RSA-HSM", "RSA"):
            raise ApiError(
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
            raise ApiError(400, "BadParameter", f"Key size {size} is not allowed for {kty}.")
        exponent = body.get("public_exponent") or 65537
        if exponent not in (3, 65537):
            raise ApiError(400, "BadParameter", "public_exponent must be 3 or 65537")
        key_ops = _key_ops(body.get("key_ops"), default_ops)
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise ApiError(400, "BadParameter", "attributes must be an object")
        exportable = bool(attributes.get("exportable", False))
        policy = parse_release_policy(body["release_policy"]) if body.get("release_policy") else None
        if exportable and policy is None:
            raise ApiError(400, "BadParameter", "An exportable key must have a release policy.")
        tags = _tags(body.get("tags") or {})
        with self._store.lock:
            existing = self._store.keys.get(name)
            if existing is not None and existing.deleted is not None:
                raise ApiError(
                    409,
                    "Conflict",
                    f"Key {name} is currently in a deleted but recoverable state, and its name cannot be "
                    "reused; in this state, the key can only be recovered or purged.",
                )
        self._throttle.take("create")
        v = _new_version(str(kty), int(size), key_ops, public_exponent=int(exponent))
        v.exportable, v.release_policy, v.tags = exportable, policy, tags
        _apply_attributes(v, {k: attributes[k] for k in ("enabled", "nbf", "exp") if k in attributes})
        with self._store.lock:
            key = self._store.keys.get(name)
            if key is None or key.deleted is not None:
                key = self._store.keys[name] = Key(name)
            key.versions.append(v)
            self._store.save()
            return self._bundle(name, v, base)

    def rotate(self, name: str, base: str) -> dict[str, Any]:
        """A new version with the current one's type, size, ops, exportability and release policy."""
        with self._store.lock:
            current = self._store.active(name).current
        self._throttle.take("create")
        v = _new_version(current.kty, current.size, list(current.key_ops))
        v.exportable = current.exportable
        v.release_policy = dict(current.release_policy) if current.release_policy else None
        with self._store.lock:
            key = self._store.active(name)
            key.versions.append(v)
            self._store.save()
            return self._bundle(name, v, base)

    def get(self, name: str, version: str, base: str) -> dict[str, Any]:
        with self._store.lock:
            v = self._store.lookup(name, version)
            self._throttle.take("read")
            return self._bundle(name, v, base)

    def update(self, name: str, version: str, body: dict[str, Any], base: str) -> dict[str, Any]:
        """``PATCH``: enabled, nbf, exp, key_ops, tags (replaced) and the release policy."""
        with self._store.lock:
            v = self._store.lookup(name, version)
        self._throttle.take("manage")
        with self._store.lock:
            v = self._store.lookup(name, version)
            if body.get("key_ops") is not None:
                v.key_ops = _key_ops(body["key_ops"], v.key_ops)
            _apply_attributes(v, body.get("attributes"))
            if body.get("tags") is not None:
                v.tags = _tags(body["tags"])
            if body.get("release_policy") is not None:
                if v.release_policy is not None and v.release_policy.get("immutable"):
                    raise ApiError(400, "BadParameter", "The key's release policy is immutable.")
                v.release_policy = parse_release_policy(body["release_policy"])
            v.updated = unix_now()
            self._store.save()
            return self._bundle(name, v, base)

    def list_keys(self, query: Mapping[str, list[str]], base: str, api_version: str) -> dict[str, Any]:
        self._throttle.take("read")
        with self._store.lock:
            items = [
                {
                    "kid": f"{base}/keys/{key.name}",
                    "attributes": render.attributes(key.current),
                    **({"tags": dict(key.current.tags)} if key.current.tags else {}),
                }
                for key in sorted(self._store.keys.values(), key=lambda k: k.name)
                if key.deleted is None
            ]
        return render.page(items, query, f"{base}/keys", api_version)

    def list_versions(
        self, name: str, query: Mapping[str, list[str]], base: str, api_version: str
    ) -> dict[str, Any]:
        """Every version in version-id order (not creation order, as Key Vault lists them)."""
        with self._store.lock:
            key = self._store.active(name)
            items = [
                {
                    "kid": f"{base}/keys/{name}/{v.id}",
                    "attributes": render.attributes(v),
                    **({"tags": dict(v.tags)} if v.tags else {}),
                }
                for v in sorted(key.versions, key=lambda v: v.id)
            ]
        self._throttle.take("read")
        return render.page(items, query, f"{base}/keys/{name}/versions", api_version)

    # -------------------------------------------------------------------- rotation policy

    def get_rotation_policy(self, name: str, base: str) -> dict[str, Any]:
        """The stored policy, or Key Vault's default (notify 30 days before expiry)."""
        with self._store.lock:
            key = self._store.active(name)
            self._throttle.take("read")
            if key.rotation_policy is None:
                return {
                    "id": f"{base}/keys/{name}/rotationpolicy",
                    "lifetimeActions": [
                        {"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}}
                    ],
                    "attributes": {},
                }
            return {"id": f"{base}/keys/{name}/rotationpolicy", **key.rotation_policy}

    def put_rotation_policy(self, name: str, body: dict[str, Any], base: str) -> dict[str, Any]:
        """Store the policy; the emulator never rotates on its own."""
        actions, expiry = _check_rotation_policy(body)
        with self._store.lock:
            key = self._store.active(name)
        self._throttle.take("manage")
        with self._store.lock:
            key = self._store.active(name)
            now = unix_now()
            created = (key.rotation_policy or {}).get("attributes", {}).get("created", now)
            stored_attributes: dict[str, Any] = {"created": created, "updated": now}
            if expiry is not None:
                stored_attributes["expiryTime"] = expiry
            key.rotation_policy = {"lifetimeActions": actions, "attributes": stored_attributes}
            self._store.save()
            return {"id": f"{base}/keys/{name}/rotationpolicy", **key.rotation_policy}

    # ------------------------------------------------------------------------ soft delete

    def delete(self, name: str, base: str) -> dict[str, Any]:
        """Soft delete (recoverable for 90 days; the emulator never purges on its own)."""
        with self._store.lock:
            self._store.active(name)
        self._throttle.take("manage")
        with self._store.lock:
            key = self._store.active(name)
            key.deleted = unix_now()
            self._store.save()
            return self._deleted_bundle(key, base)

    def get_deleted(self, name: str, base: str) -> dict[str, Any]:
        with self._store.lock:
            key = self._store.deleted(name)
            self._throttle.take("read")
            return self._deleted_bundle(key, base)

    def list_deleted(self, query: Mapping[str, list[str]], base: str, api_version: str) -> dict[str, Any]:
        self._throttle.take("read")
        with self._store.lock:
            items = []
            for key in sorted(self._store.keys.values(), key=lambda k: k.name):
                if key.deleted is None:
                    continue
                deleted = self._deleted_bundle(key, base)
                items.append(
                    {
                        "kid": f"{base}/keys/{key.name}",
                        "attributes": deleted["attributes"],
                        "recoveryId": deleted["recoveryId"],
                        "deletedDate": deleted["deletedDate"],
                        "scheduledPurgeDate": deleted["scheduledPurgeDate"],
                    }
                )
        return render.page(items, query, f"{base}/deletedkeys", api_version)

    def purge(self, name: str) -> tuple[int, None]:
        with self._store.lock:
            self._store.deleted(name)
        self._throttle.take("manage")
        with self._store.lock:
            self._store.deleted(name)
            self._store.purge(name)
            self._store.save()
        return 204, None

    def recover(self, name: str, base: str) -> dict[str, Any]:
        with self._store.lock:
            self._store.deleted(name)
        self._throttle.take("manage")
        with self._store.lock:
            key = self._store.deleted(name)
            key.deleted = None
            self._store.save()
            return self._bundle(name, key.current, base)
