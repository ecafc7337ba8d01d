"""Resolve key references to KMS adapters, using the configured endpoints.

Against the dev stack (loopback endpoints) the AWS and Azure credentials default to the
emulators' dummy ones; elsewhere AWS uses boto3's usual credential chain, and Azure needs a
bearer token in ``azure_token`` (a credential from azure-identity can be wired in here).

``adapter_for`` is also how a record read from the store gets its wrapper, before its blob is
authenticated, so it accepts only key refs the configuration knows: the backend is one of this
build's, the name is in its backend's safe alphabet (``kms_adapters.keyref``: no ``/`` for Transit,
no ``.`` or ``..`` segment anywhere), and, when ``allowed_keys`` is set (``rekey.config``), the ref
is listed there. Anything else is ``InvalidKeyRef`` and no backend is contacted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import hvac

from attestation.platform import PlatformVerifier
from attestation.sim import SimVerifier
from attestation.token import ResultSigner
from audit import default_signing_key_path, found_public_keys, load_or_create_signing_key, load_signing_key
from kms_adapters.aws_kms import AwsKmsAdapter
from kms_adapters.azure_hsm import AzureHsmAdapter, StaticTokenCredential
from kms_adapters.contract import KmsAdapter
from kms_adapters.governor import Governor
from kms_adapters.keyref import InvalidKeyRef, KeyRef
from kms_adapters.release import FileReleasePolicyStore
from kms_adapters.signing import AwsKmsSigner, TransitSigner
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey.config import ConfigError, Settings
from sealing.agent import KeyReleaser, KmsUnavailable
from sealing.signing import FileSigner, PublicKey, Signer, pinned_keys
from sealing.tee.sim import ROOT_CA_CERT_FILE, host_id_of
from sealing.witness import DirectoryWitness

_MOTO_SECRET = "testing"  # noqa: S105 - moto's fixed dev credential, not a secret  # nosec B105
DEV_AWS_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": _MOTO_SECRET}


class BackendNotAvailable(Exception):
    """The key reference names a backend this build cannot use."""

    exit_code = 2


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def vault_client(settings: Settings) -> hvac.Client:
    token = settings.resolved_vault_token()
    if not token:
        raise ConfigError(
            "no OpenBao/Vault token: set REKEY_VAULT_TOKEN (or vault_token in rekey.toml),"
            " or start the dev stack with `rekey dev up`"
        )
    return hvac.Client(url=settings.vault_addr, token=token, timeout=30)


def release_store(settings: Settings) -> FileReleasePolicyStore:
    return FileReleasePolicyStore(settings.home / "release-policies")


def release_token_signer(settings: Settings) -> ResultSigner:
    """The verifier key that signs attestation results (``<home>/verifier/es256.pem``, created
    on first use; `rekey attest verify` signs with it too): the key release policies trust."""
    return ResultSigner.load_or_create(settings.home / "verifier" / "es256.pem")


def agent_releaser(settings: Settings) -> Callable[[str], KeyReleaser]:
    """The release gate of a key ref for an enclave agent, with the agent's own KMS settings;
    a key it cannot reach (no token for its backend, a key ref the configuration refuses) is
    `sealing.agent.KmsUnavailable`, a one-line refusal."""

    def releaser(key_ref: str) -> KeyReleaser:
        try:
            return adapter_for(settings, key_ref)
        except (ConfigError, InvalidKeyRef, BackendNotAvailable) as exc:
            raise KmsUnavailable(f"this agent cannot reach the KMS of {key_ref}: {exc}") from None

    return releaser


def sim_root_cas(settings: Settings) -> dict[str, bytes]:
    """The root CAs of the simulated hosts this installation can read, by host id:
    ``<home>/sim-host`` and every ``<home>/hosts/*`` (root CAs only, nothing secret)."""
    found: dict[str, bytes] = {}
    for directory in [settings.home / "sim-host", *sorted((settings.home / "hosts").glob("*"))]:
        try:
            root = (directory / ROOT_CA_CERT_FILE).read_bytes()
            found.setdefault(host_id_of(root), root)
        except (OSError, ValueError):
            continue
    return found


def sim_root_ca(settings: Settings) -> Callable[[str], list[bytes]]:
    """The root CA of a simulated host by its id (`sim_root_cas`), as a one-item list; an
    unknown host raises ValueError."""

    def roots(host_id: str) -> list[bytes]:
        root = sim_root_cas(settings).get(host_id)
        if root is None:
            raise ValueError(f"no simulated host with id {host_id} under {settings.home} (sim-host, hosts/*)")
        return [root]

    return roots


def sim_verifiers(settings: Settings) -> Callable[[str], PlatformVerifier]:
    """Verifiers of sim evidence by host id, from the simulated hosts this worker can read:
    ``<home>/sim-host`` and every ``<home>/hosts/*`` (their root CAs, nothing secret). An
    unknown host raises ValueError (the migration names it)."""

    def verifier(host_id: str) -> PlatformVerifier:
        return SimVerifier(sim_root_ca(settings)(host_id)[0])

    return verifier


def known_key_ref(settings: Settings, key_ref: str) -> KeyRef:
    """``key_ref`` parsed, if the configuration knows it (see the module docstring)."""
    ref = KeyRef.parse(key_ref)
    if not settings.allows_key(str(ref)):
        raise InvalidKeyRef(
            f"key reference {key_ref!r} is not in allowed_keys (rekey.toml or REKEY_ALLOWED_KEYS)"
        )
    return ref


def adapter_for(
    settings: Settings, key_ref: str, *, governor: Governor | None = None, sdk_retries: bool = False
) -> KmsAdapter:
    """The adapter of ``key_ref``. ``governor``: instead of the endpoint's shared one;
    ``sdk_retries``: turn the SDK's own retries back on (AWS, Azure; hvac has none). Both only for
    ``rekey stress run --strategy``: everything else uses the defaults."""
    return _adapter(settings, known_key_ref(settings, key_ref), governor=governor, sdk_retries=sdk_retries)


def lister_for(settings: Settings, backend: str) -> KmsAdapter:
    """An adapter only for ``list_names`` on ``backend`` (not bound to a key ref anyone uses)."""
    return _adapter(settings, KeyRef(backend, "rekey-list"))


def _adapter(
    settings: Settings, ref: KeyRef, *, governor: Governor | None = None, sdk_retries: bool = False
) -> KmsAdapter:
    store = release_store(settings)
    if ref.backend == "vault":
        client = vault_client(settings)
        return VaultTransitAdapter(
            client, ref.name, mount_point=settings.transit_mount, release_store=store, governor=governor
        )
    if ref.backend == "aws":
        credentials = DEV_AWS_CREDENTIALS if _is_loopback(settings.aws_endpoint) else None
        return AwsKmsAdapter(
            ref.name,
            endpoint_url=settings.aws_endpoint,
            region=settings.aws_region,
            release_store=store,
            credentials=credentials,
            governor=governor,
            sdk_retries=sdk_retries,
        )
    if ref.backend == "azure":
        token = settings.azure_token or ("rekey-dev-token" if _is_loopback(settings.azure_vault_url) else "")
        if not token:
            raise ConfigError("no Azure token: set REKEY_AZURE_TOKEN (or azure_token in rekey.toml)")
        verify: str | bool = settings.azure_ca_file if _is_loopback(settings.azure_vault_url) else True
        return AzureHsmAdapter(
            ref.name,
            vault_url=settings.azure_vault_url,
            credential=StaticTokenCredential(token),
            connection_verify=verify,
            release_store=store,
            governor=governor,
            sdk_retries=sdk_retries,
        )
    raise BackendNotAvailable(f"{ref}: unknown backend")


def signer_for(settings: Settings) -> Signer:
    """This installation's signing key (audit records, freshness checkpoints), as the
    ``signing_key`` setting says: ``file`` (default), the Ed25519 key file
    ``<home>/audit/ed25519.pem``, created on first use; ``vault:NAME``, a Transit ``ed25519``
    key on ``vault_addr``; ``aws:KEYID``, an AWS KMS ``ECC_NIST_P256`` key on ``aws_endpoint``."""
    backend, _, name = settings.signing_key.partition(":")
    if backend == "vault":
        return TransitSigner(vault_client(settings), name, mount_point=settings.transit_mount)
    if backend == "aws":
        credentials = DEV_AWS_CREDENTIALS if _is_loopback(settings.aws_endpoint) else None
        return AwsKmsSigner(
            name, endpoint_url=settings.aws_endpoint, region=settings.aws_region, credentials=credentials
        )
    return FileSigner(load_or_create_signing_key(default_signing_key_path(settings.home)))


def own_public_key(settings: Settings) -> PublicKey | None:
    """This installation's own public key, derived from what signs (never from a public key file
    found beside it): the private key file's (None if there is none yet: nothing creates it
    here), or the configured KMS key's."""
    if settings.signing_key != "file":
        return signer_for(settings).public_key
    try:
        return load_signing_key(default_signing_key_path(settings.home)).public_key()
    except FileNotFoundError:
        return None


def witness_for(
    settings: Settings,
    *,
    writable: bool = True,
    signer: Signer | None = None,
    trusted: dict[str, PublicKey] | None = None,
) -> DirectoryWitness:
    """The freshness witness in ``witness_dir``, signing with ``signer`` (default `signer_for`)
    when ``writable`` (checkpoints then verify against the signer's own key). ``trusted``
    (key id -> public key, pinned keys only) adds keys that checkpoints may be signed with; a
    read-only witness trusts only those. By default these are the public keys in
    ``<home>/audit/`` whose fingerprints ``trusted_key_fingerprints`` pins, so checkpoints
    signed before a signing-key rotation still verify."""
    if writable and signer is None:
        signer = signer_for(settings)
    if trusted is None:
        trusted = pinned_keys(found_public_keys(settings.home).values(), settings.trusted_key_fingerprints)
    return DirectoryWitness(Path(settings.witness_dir), signer if writable else None, trusted)
