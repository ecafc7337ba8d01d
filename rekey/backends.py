"""Resolve key references to key wrappers and admin clients, using the configured endpoints."""

from __future__ import annotations

import hvac

from kms_adapters.keyref import KeyRef
from kms_adapters.vault_transit import TransitAdmin, TransitKeyWrapper
from rekey.config import ConfigError, Settings
from sealing.keywrap import KeyWrapper


class BackendNotAvailable(Exception):
    """The key reference names a backend this build cannot use yet."""

    exit_code = 2


def vault_client(settings: Settings) -> hvac.Client:
    token = settings.resolved_vault_token()
    if not token:
        raise ConfigError(
            "no OpenBao/Vault token: set REKEY_VAULT_TOKEN (or vault_token in rekey.toml),"
            " or start the dev stack with `rekey dev up`"
        )
    return hvac.Client(url=settings.vault_addr, token=token, timeout=30)


def _require_vault(ref: KeyRef) -> None:
    if ref.backend != "vault":
        raise BackendNotAvailable(
            f"{ref}: the {ref.backend} backend is not available yet; use a vault: key reference"
        )


def wrapper_for(settings: Settings, key_ref: str) -> KeyWrapper:
    ref = KeyRef.parse(key_ref)
    _require_vault(ref)
    return TransitKeyWrapper(vault_client(settings), ref.name, mount_point=settings.transit_mount)


def transit_admin(settings: Settings, key_ref: str) -> tuple[TransitAdmin, str]:
    ref = KeyRef.parse(key_ref)
    _require_vault(ref)
    return TransitAdmin(vault_client(settings), mount_point=settings.transit_mount), ref.name
