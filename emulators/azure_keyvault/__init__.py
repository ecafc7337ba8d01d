"""An Azure Key Vault / Managed HSM emulator that the unmodified ``azure-keyvault-keys`` SDK talks to:
HTTPS on 127.0.0.1 with a CA it generates, the Bearer challenge, the keys REST API of version
2025-07-01 with Key Vault's error bodies, Secure Key Release, per-class throttling with HTTP 429,
and keys persisted in ``keys.json``. What it implements and where it deviates from Key Vault:
docs/azure-keyvault-emulator.md.

Keys are kept with their material in the clear: never put real secrets in it.

Run alone: ``python -m emulators.azure_keyvault --port 8443 --state-dir DIR``; in-process:
``with AzureKeyVaultEmulator(state_dir, port=0, limits={"wrap": 50}) as emu: emu.url, emu.ca_file``;
Managed HSM's limits scaled to R and the sustained-load model:
``AzureKeyVaultEmulator(state_dir, limits=managed_hsm_limits(R), sustained=SustainedLoad())``.

Modules: ``emulator`` (the entry point), ``server`` (HTTPS, auth challenge, dispatch), ``routes``,
``keys`` (key management), ``crypto`` (wrap/unwrap, encrypt/decrypt), ``release`` (Secure Key
Release), ``throttle``, ``state`` (keys and ``keys.json``), ``tls``, ``render`` (JSON shapes),
``wire`` (error answers, base64url). Names without an underscore in these modules are shared
inside the package; only what this module exports is the emulator's public API.
"""

from emulators.azure_keyvault.cli import main
from emulators.azure_keyvault.emulator import AzureKeyVaultEmulator
from emulators.azure_keyvault.throttle import (
    CRYPTO_CLASSES,
    DEFAULT_LIMITS,
    SustainedLoad,
    managed_hsm_limits,
)
from emulators.azure_keyvault.tls import TlsFiles, ensure_tls

__all__ = [
    "CRYPTO_CLASSES",
    "DEFAULT_LIMITS",
    "AzureKeyVaultEmulator",
    "SustainedLoad",
    "TlsFiles",
    "ensure_tls",
    "main",
    "managed_hsm_limits",
]
