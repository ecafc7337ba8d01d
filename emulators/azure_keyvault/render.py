"""Key Vault's JSON shapes of keys: the JWK, the attributes, the key bundle, the deleted-key
bundle and paged lists with ``nextLink``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from emulators.azure_keyvault.state import Key, KeyMaterial, KeyVersion
from emulators.azure_keyvault.wire import ApiError, b64u, int_bytes

__all__ = ["PAGE_SIZE", "RECOVERABLE_DAYS", "attributes", "bundle", "deleted_bundle", "jwk", "page"]

RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90
PAGE_SIZE = 25


def jwk(name: str, v: KeyVersion, key: KeyMaterial, base: str, *, private: bool = False) -> dict[str, Any]:
    """The version's JWK; ``private`` puts the key material in it (only Secure Key Release does)."""
    answer: dict[str, Any] = {"kid": f"{base}/keys/{name}/{v.id}", "kty": v.kty, "key_ops": list(v.key_ops)}
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        answer["n"] = b64u(int_bytes(numbers.public_numbers.n))
        answer["e"] = b64u(int_bytes(numbers.public_numbers.e))
        if private:
            for label, value in (
                ("d", numbers.d),
                ("p", numbers.p),
                ("q", numbers.q),
                ("dp", numbers.dmp1),
                ("dq", numbers.dmq1),
                ("qi", numbers.iqmp),
            ):
                answer[label] = b64u(int_bytes(value))
    elif private:
        answer["k"] = b64u(key)
    return answer


def attributes(v: KeyVersion) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "enabled": v.enabled,
        "created": v.created,
        "updated": v.updated,
        "recoveryLevel": RECOVERY_LEVEL,
        "recoverableDays": RECOVERABLE_DAYS,
        "exportable": v.exportable,
    }
    if v.nbf is not None:
        answer["nbf"] = v.nbf
    if v.exp is not None:
        answer["exp"] = v.exp
    return answer


def bundle(name: str, v: KeyVersion, key: KeyMaterial, base: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"key": jwk(name, v, key, base), "attributes": attributes(v)}
    if v.tags:
        answer["tags"] = dict(v.tags)
    if v.release_policy is not None:
        answer["release_policy"] = dict(v.release_policy)
    return answer


def deleted_bundle(key: Key, material: KeyMaterial, base: str) -> dict[str, Any]:
    """The bundle of a soft-deleted key's current version (``material`` is that version's key)."""
    deleted = key.deleted or 0
    return {
        **bundle(key.name, key.current, material, base),
        "recoveryId": f"{base}/deletedkeys/{key.name}",
        "deletedDate": deleted,
        "scheduledPurgeDate": deleted + RECOVERABLE_DAYS * 86400,
    }


def page(
    items: list[dict[str, Any]], query: Mapping[str, list[str]], next_base: str, api_version: str
) -> dict[str, Any]:
    """One page of ``items`` (``maxresults`` <= 25, ``$skiptoken`` an offset) with ``nextLink``."""
    try:
        size = int((query.get("maxresults") or [str(PAGE_SIZE)])[0])
        skip = int((query.get("$skiptoken") or ["0"])[0])
    except ValueError:
        raise ApiError(400, "BadParameter", "maxresults and $skiptoken must be integers") from None
    if not 1 <= size <= PAGE_SIZE:
        raise ApiError(400, "BadParameter", f"maxresults must be between 1 and {PAGE_SIZE}")
    skip = max(0, skip)
    answer: dict[str, Any] = {"value": items[skip : skip + size], "nextLink": None}
    if skip + size < len(items):
        answer["nextLink"] = (
            f"{next_base}?api-version={api_version}&$skiptoken={skip + size}&maxresults={size}"
        )
    return answer
