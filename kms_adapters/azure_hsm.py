"""Azure Managed HSM / Key Vault as a ``KmsAdapter`` (azure-keyvault-keys) for ``azure:NAME``.

**Versions.** Key Vault names key versions with opaque ids (32 hex digits). rekey numbers them
1..N in creation order, rebuilt from the key alone by any worker: list the versions and sort them
by ``created_on``; Key Vault stamps whole seconds, so ties within one second are broken by the
current version last, then by the ``rekey-version`` tag that rekey writes on each version it
creates (untagged versions, e.g. from Key Vault's own rotation policy, after tagged ones), then
by id. The primary is the key's current version (what ``get_key(name)`` answers). The numbering
and the primary are cached for ``cache_ttl`` seconds (this adapter's own changes refresh them), so
after a rotation by another worker wraps may use the previous version for that long; such DEKs
carry the older number and are re-wrapped by the next pass.

**Wrapped DEKs** are ``azure:v<N>:<version id>:<base64 of the wrapped bytes>``: the id sends an
unwrap straight to its version; N is what ``version_of`` reads without a call. An unwrap refuses
(``InvalidCiphertext``) a blob whose id is not a version of the key or whose N is not that
version's number.

**Operations.** wrap = ``wrapKey`` with A256KW (oct-HSM) or RSA-OAEP-256 (RSA-HSM) under the
primary; unwrap = ``unwrapKey`` on the version named. Key Vault has no server-side re-wrap:
``rewrap`` unwraps and wraps again under the primary, so the DEK passes through this process's
memory. ``rewrap_batch`` does that per item on a small thread pool (Key Vault has no batch API
either). ``rotate`` is ``rotate_key``. ``disable_version`` disables one version
(``update_key_properties(enabled=False)``). Key Vault cannot delete a single version (only the
whole key), so ``destroy_below`` disables each older version and tags it
``rekey-destroyed=true``; ``describe`` reports those as ``destroyed``, but their key material
stays in the HSM until the whole key is deleted and purged.

**Release.** ``release`` is the shared ``ReleaseGate`` (the attestation result is verified
against the key's release policy, then the DEK is unwrapped and HPKE-encrypted to the
recipient). ``set_release_policy`` also writes an Azure-native release policy on the key
(``native_release_policy``: each rule of our attestation policy as far as Key Vault's
``claim``/``equals`` conditions can say it), and ``release_key_material`` asks Key Vault itself to
release an exportable key (Secure Key Release) after our gate, so the service applies its policy
too. Keys created while a release policy is set are exportable and carry the native policy.

**SDK notes.** SDK retries are off (``retry_total=0``): every call goes through the endpoint's
governor, which owns retries; errors are mapped onto ``kms_adapters.errors``. azure-core says
whether a request left: ``ServiceRequestError`` (refused, DNS, connect timeout, TLS) was not
sent (``Unavailable``); ``ServiceResponseError`` (read timeout, connection reset or closed after
sending), a 408 or 5xx, or an unreadable answer may have been applied (``AnswerLost``).
Mutations (create, rotate, enable/disable/destroy a version, the release policy) are sent with
``idempotent=False``: the governor does not resend them after a lost answer. Cryptographic
operations use ``CryptographyClient`` (one per key version, cached) with its local cryptography
disabled: azure-keyvault-keys 4.11 downloads the key on first use and then wraps locally where
it can, and for an oct-HSM key, whose bytes the service never returns, it builds a *random*
local AES key and wraps with that (nothing can ever unwrap the result). RSA wraps would likewise
happen locally with the public key, outside the HSM's authorization, audit and quotas.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, TypeVar

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenCredential, TokenRequestOptions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    DecodeError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.keyvault.keys import KeyClient, KeyOperation, KeyProperties, KeyReleasePolicy, KeyVaultKey
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

from attestation.policy import Rule
from attestation.token import DEFAULT_ISSUER
from kms_adapters.accounting import sdk_answered, sdk_sent
from kms_adapters.contract import (
    KeyInfo,
    KeyVersionInfo,
    RewrapOutcome,
    RotationMode,
    VersionState,
    rewrap_each,
)
from kms_adapters.errors import (
    AnswerLost,
    InvalidCiphertext,
    InvalidRequest,
    KmsError,
    NotFound,
    PermissionDenied,
    PolicyDenied,
    Throttled,
    Unavailable,
    VersionDisabled,
)
from kms_adapters.governor import Governor, governor_for
from kms_adapters.release import ReleaseGate, ReleasePolicy, ReleasePolicyStore, check_release
from sealing.errors import InvalidWrappedKey
from sealing.keywrap import WrappedKey, parse_versioned_prefix

__all__ = ["AzureHsmAdapter", "RemoteCryptographyClient", "StaticTokenCredential", "map_azure_error"]

T = TypeVar("T")
KeyType = Literal["oct-HSM", "RSA-HSM"]

log = logging.getLogger(__name__)

TAG_VERSION = "rekey-version"
TAG_DESTROYED = "rekey-destroyed"
KEY_OPERATIONS = [KeyOperation.wrap_key, KeyOperation.unwrap_key, KeyOperation.encrypt, KeyOperation.decrypt]
NOTES = (
    "Key Vault versions are opaque ids; rekey numbers them by creation order",
    "Key Vault cannot delete single versions: destroyed versions are disabled and tagged "
    f"{TAG_DESTROYED}=true, their key material stays in the HSM until the whole key is purged",
    "Key Vault has no server-side re-wrap: rewrap unwraps and wraps again in this process",
)
_AZURE_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_VERSION_ID = re.compile(rb"[0-9A-Za-z]{1,64}")
_UNWRAP = "unwrap"
_RELEASE = "release key"


# ---------------------------------------------------------------------------------------------
# Credential for the dev stack and the emulator
# ---------------------------------------------------------------------------------------------


class StaticTokenCredential:
    """Hands out one fixed bearer token (``TokenCredential`` and ``SupportsTokenInfo``).

    For the dev stack and the Key Vault emulator, which accept any token; never for Azure
    (use ``azure.identity`` there)."""

    def __init__(self, token: str = "rekey-dev-token", *, lifetime: int = 3600) -> None:  # noqa: S107  # nosec B107 # the emulator's dev token
        if not token:
            raise ValueError("token must not be empty")
        self._token = token
        self._lifetime = lifetime

    def __repr__(self) -> str:
        return "StaticTokenCredential(token=***)"

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + self._lifetime)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        return AccessTokenInfo(self._token, int(time.time()) + self._lifetime)

    def close(self) -> None:
        return None

    def __enter__(self) -> StaticTokenCredential:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Error mapping
# ---------------------------------------------------------------------------------------------


def _retry_after(exc: HttpResponseError) -> float | None:
    headers: Mapping[str, str] | None = getattr(exc.response, "headers", None)
    if headers is None:
        return None
    for name, scale in (("Retry-After", 1.0), ("retry-after-ms", 0.001), ("x-ms-retry-after-ms", 0.001)):
        value = headers.get(name)
        if not value:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            continue
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return None


def _details(exc: HttpResponseError) -> tuple[str, str, str]:
    """(code, message, inner error code) of a Key Vault error answer."""
    error = exc.error
    if error is None:
        return "", "", ""
    inner = error.innererror.get("code") if isinstance(error.innererror, dict) else None
    message = " ".join(str(error.message or "").split())[:300]
    return str(error.code or ""), message, str(inner or "")


def map_azure_error(exc: BaseException, op: str, key_ref: str) -> KmsError:
    """Translate an azure-core/azure-keyvault-keys exception from operation ``op`` into the taxonomy."""
    if isinstance(exc, KmsError):
        return exc
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        status = exc.status_code
        code, message, inner = _details(exc)
        said = f": {message}" if message else ""
        if status == 429:
            return Throttled(f"Azure Key Vault throttled {op} on {key_ref}", _retry_after(exc))
        if status == 404:
            return NotFound(f"Azure Key Vault has no key {key_ref} (or no such version)")
        if status == 403:
            if inner == "KeyDisabled" or "disabled" in message.lower():
                return VersionDisabled(f"that version of {key_ref} is disabled{said}")
            if op == _RELEASE:
                return PolicyDenied([f"Azure Key Vault refused to release {key_ref}{said}"])
            return PermissionDenied(
                f"Azure Key Vault denied {op} on {key_ref} (check the role assignments){said}"
            )
        if status == 401:
            return PermissionDenied(f"Azure Key Vault did not accept the credentials for {op} on {key_ref}")
        if status == 400 and op == _UNWRAP and code in ("BadParameter", ""):
            return InvalidCiphertext(f"wrapped key is not a valid ciphertext of {key_ref}{said}")
        if status == 408 or status >= 500 or isinstance(exc, DecodeError) or status < 400:
            return AnswerLost(
                f"Azure Key Vault failed to {op} on {key_ref} ({status}): the request may have been applied",
                _retry_after(exc),
            )
        return InvalidRequest(f"Azure Key Vault refused {op} on {key_ref} ({code or status}){said}")
    if isinstance(exc, ClientAuthenticationError):
        return PermissionDenied(f"no usable Azure credential to {op} on {key_ref} ({type(exc).__name__})")
    if isinstance(exc, ServiceRequestError):  # azure-core: no request was sent
        return Unavailable(f"cannot reach Azure Key Vault to {op} on {key_ref} ({type(exc).__name__})")
    if isinstance(exc, ServiceResponseError | DecodeError):  # sent; the answer was lost or unreadable
        return AnswerLost(
            f"no answer from Azure Key Vault to {op} on {key_ref} ({type(exc).__name__}):"
            " the request may have been applied"
        )
    if isinstance(exc, ValueError | TypeError):
        return InvalidRequest(f"invalid request to {op} on {key_ref} ({type(exc).__name__})")
    if isinstance(exc, AzureError):
        return KmsError(f"Azure SDK failure to {op} on {key_ref} ({type(exc).__name__})")
    return KmsError(f"unexpected failure to {op} on {key_ref} ({type(exc).__name__})")


# ---------------------------------------------------------------------------------------------
# SDK plumbing
# ---------------------------------------------------------------------------------------------


class RemoteCryptographyClient(CryptographyClient):
    """A ``CryptographyClient`` that never downloads the key and never works locally.

    ``_initialize`` is where 4.11 fetches the key and picks a local provider; without it the
    client keeps ``NoLocalCryptography`` and sends every operation to the service. Public for
    the benchmarks and tests that time or probe the service through the bare SDK client."""

    def __init__(self, key: KeyVaultKey | str, credential: TokenCredential, **kwargs: Any) -> None:
        _check_sdk()  # the adapter checks too; a direct user must not get a local client either
        super().__init__(key, credential, **kwargs)

    def _initialize(self, **kwargs: Any) -> None:
        self._initialized = True


def _check_sdk() -> None:
    # The override above hooks a private method; if an SDK upgrade renames it, fail loudly
    # instead of silently wrapping with a random local key.
    if not callable(getattr(CryptographyClient, "_initialize", None)):
        raise RuntimeError(
            "this azure-keyvault-keys version has no CryptographyClient._initialize: "
            "kms_adapters.azure_hsm cannot switch off its local cryptography safely"
        )


@dataclass(frozen=True)
class _Entry:
    number: int
    id: str
    enabled: bool
    destroyed: bool
    created_on: datetime | None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> VersionState:
        if self.destroyed:
            return "destroyed"
        return "enabled" if self.enabled else "disabled"


@dataclass(frozen=True)
class _Snapshot:
    kty: str
    versions: tuple[_Entry, ...]
    primary: _Entry
    at: float

    def by_id(self, version_id: str) -> _Entry | None:
        return next((e for e in self.versions if e.id == version_id), None)

    def by_number(self, number: int) -> _Entry | None:
        return next((e for e in self.versions if e.number == number), None)


def _kty(key: KeyVaultKey) -> str:
    kty = key.key_type
    return str(getattr(kty, "value", kty))


def _sequence(props: KeyProperties) -> float:
    text = (props.tags or {}).get(TAG_VERSION, "")
    return float(int(text)) if text.isdigit() else math.inf


def _wrap_algorithm(kty: str) -> KeyWrapAlgorithm:
    if kty.startswith("oct"):
        return KeyWrapAlgorithm.aes_256
    if kty.startswith("RSA"):
        return KeyWrapAlgorithm.rsa_oaep_256
    raise InvalidRequest(f"{kty} keys cannot wrap data keys (use oct-HSM or RSA-HSM)")


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


class AzureHsmAdapter(ReleaseGate):
    """``KmsAdapter`` over one Key Vault / Managed HSM key (``azure:NAME``)."""

    backend = "azure"

    def __init__(
        self,
        name: str,
        *,
        vault_url: str,
        credential: TokenCredential,
        release_store: ReleasePolicyStore,
        connection_verify: str | bool = True,
        key_type: KeyType = "oct-HSM",
        governor: Governor | None = None,
        rsa_key_size: int = 2048,
        release_authority: str = DEFAULT_ISSUER,
        verify_challenge_resource: bool = False,
        cache_ttl: float = 30.0,
        batch_workers: int = 8,
        timeout: float = 30.0,
        sdk_retries: bool = False,
    ) -> None:
        """``sdk_retries=True`` turns azure-core's default retry policy back on: only for measuring
        the governor against (``rekey stress run --strategy sdk-default``), paired with a
        ``PassThroughGovernor``; each HTTP attempt is reported to ``governor.accounting()``."""
        if not _AZURE_NAME.fullmatch(name):
            raise InvalidRequest(
                f"Azure Key Vault key names are 1-127 letters, digits and dashes, not {name!r}"
            )
        if key_type not in ("oct-HSM", "RSA-HSM"):
            raise InvalidRequest(f"key_type must be oct-HSM or RSA-HSM, not {key_type!r}")
        _check_sdk()
        self.name = name
        self.key_ref = f"azure:{name}"
        self.release_store = release_store
        self._vault_url = vault_url.rstrip("/")
        self._credential = credential
        self._key_type: KeyType = key_type
        self._rsa_key_size = rsa_key_size
        self._release_authority = release_authority
        self.governor = governor or governor_for(self._vault_url)
        self._cache_ttl = cache_ttl
        self._batch_workers = max(1, batch_workers)
        self._options: dict[str, Any] = {
            "verify_challenge_resource": verify_challenge_resource,
            "connection_verify": connection_verify,
            "connection_timeout": min(10.0, timeout),
            "read_timeout": timeout,
        }
        if sdk_retries:
            self._options["per_retry_policies"] = [_SdkAttemptPolicy()]
        else:
            self._options["retry_total"] = 0
        self._keys = KeyClient(self._vault_url, credential, **self._options)
        self._lock = threading.Lock()
        self._crypto: dict[str, CryptographyClient] = {}
        self._snap: _Snapshot | None = None

    def __repr__(self) -> str:
        return f"AzureHsmAdapter({self.key_ref!r}, vault_url={self._vault_url!r})"

    def close(self) -> None:
        with self._lock:
            clients, self._crypto = list(self._crypto.values()), {}
        for client in clients:
            client.close()
        self._keys.close()

    # ------------------------------------------------------------------ SDK plumbing

    def _call(self, op: str, fn: Callable[[], T], *, idempotent: bool = True) -> T:
        """One SDK call through the governor; raises taxonomy errors only. ``idempotent=False``
        for mutations: never resent after an answer that may have been lost after applying."""

        def attempt() -> T:
            try:
                return fn()
            except KmsError:
                raise
            except Exception as exc:  # every SDK failure becomes one of ours, without chaining
                raise map_azure_error(exc, op, self.key_ref) from None

        return self.governor.call(attempt, op=f"azure:{op}", idempotent=idempotent)

    def _crypto_client(self, version_id: str) -> CryptographyClient:
        with self._lock:
            client = self._crypto.get(version_id)
            if client is None:
                key_id = f"{self._vault_url}/keys/{self.name}/{version_id}"
                client = RemoteCryptographyClient(key_id, self._credential, **self._options)
                self._crypto[version_id] = client
            return client

    def _snapshot(self, *, refresh: bool = False) -> _Snapshot:
        with self._lock:
            snap = self._snap
        if not refresh and snap is not None and time.monotonic() - snap.at < self._cache_ttl:
            return snap
        current = self._call("get key", lambda: self._keys.get_key(self.name))
        props = self._call(
            "list key versions", lambda: list(self._keys.list_properties_of_key_versions(self.name))
        )
        primary_id = current.properties.version or ""
        if not any(p.version == primary_id for p in props):
            props.append(current.properties)  # listed before the version appeared

        def order(p: KeyProperties) -> tuple[float, bool, float, str]:
            created = p.created_on.timestamp() if p.created_on else 0.0
            return created, p.version == primary_id, _sequence(p), p.version or ""

        entries = tuple(
            _Entry(
                number=index,
                id=p.version or "",
                enabled=bool(p.enabled),
                destroyed=(p.tags or {}).get(TAG_DESTROYED) == "true",
                created_on=p.created_on,
                tags=dict(p.tags or {}),
            )
            for index, p in enumerate(sorted(props, key=order), start=1)
        )
        primary = next(e for e in entries if e.id == primary_id)
        snap = _Snapshot(kty=_kty(current), versions=entries, primary=primary, at=time.monotonic())
        with self._lock:
            self._snap = snap
        return snap

    def _invalidate(self) -> None:
        with self._lock:
            self._snap = None

    # ----------------------------------------------------------------- wrapped format

    @staticmethod
    def _parse(wrapped: bytes) -> tuple[int, str, bytes]:
        try:
            number, rest = parse_versioned_prefix(wrapped, "azure")
        except InvalidWrappedKey:
            raise InvalidCiphertext("wrapped key is not an 'azure:v<N>:<version>:' ciphertext") from None
        version_id, sep, body = rest.partition(b":")
        if not sep or not _VERSION_ID.fullmatch(version_id):
            raise InvalidCiphertext("wrapped key has no Key Vault version id after 'azure:v<N>:'")
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidCiphertext("wrapped key is not valid base64") from None
        if not raw:
            raise InvalidCiphertext("wrapped key is empty")
        return number, version_id.decode("ascii"), raw

    def _format(self, entry: _Entry, blob: bytes) -> WrappedKey:
        text = f"azure:v{entry.number}:{entry.id}:".encode("ascii") + base64.b64encode(blob)
        return WrappedKey(text, entry.number)

    # ---------------------------------------------------------------------- KeyWrapper

    def version_of(self, wrapped: bytes) -> int:
        return self._parse(wrapped)[0]

    def _wrap_with(self, entry: _Entry, kty: str, dek: bytes) -> WrappedKey:
        client = self._crypto_client(entry.id)
        algorithm = _wrap_algorithm(kty)
        result = self._call("wrap", lambda: client.wrap_key(algorithm, dek))
        return self._format(entry, result.encrypted_key)

    def wrap(self, dek: bytes) -> WrappedKey:
        snap = self._snapshot()
        try:
            return self._wrap_with(snap.primary, snap.kty, dek)
        except VersionDisabled:
            # Our cached primary may be stale (rotated and then disabled elsewhere).
            fresh = self._snapshot(refresh=True)
            if fresh.primary.id == snap.primary.id:
                raise
            return self._wrap_with(fresh.primary, fresh.kty, dek)

    def unwrap(self, wrapped: bytes) -> bytes:
        number, version_id, raw = self._parse(wrapped)
        snap = self._snapshot()
        entry = snap.by_id(version_id)
        if entry is None:
            snap = self._snapshot(refresh=True)
            entry = snap.by_id(version_id)
        if entry is None:
            raise InvalidCiphertext(f"wrapped key names a version of {self.key_ref} that does not exist")
        if entry.number != number:
            raise InvalidCiphertext(
                f"wrapped key says v{number} but its version id is version {entry.number} of {self.key_ref}"
            )
        client = self._crypto_client(version_id)
        algorithm = _wrap_algorithm(snap.kty)
        result = self._call(_UNWRAP, lambda: client.unwrap_key(algorithm, raw))
        return result.key

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        """Unwrap, then wrap under the primary: Key Vault has no server-side re-wrap, so the DEK
        is in this process's memory for the moment between the two calls."""
        return self.wrap(self.unwrap(wrapped))

    def rewrap_batch(self, wrapped: Sequence[bytes]) -> list[RewrapOutcome]:
        """Key Vault has no batch API: one unwrap + wrap per item (see ``rewrap_each``)."""
        return rewrap_each(self.rewrap, wrapped, workers=self._batch_workers)

    # ------------------------------------------------------------------ key management

    def list_names(self) -> list[str]:
        """Names of every key in this vault / HSM (not only this adapter's)."""
        return sorted(
            self._call("list keys", lambda: [str(p.name) for p in self._keys.list_properties_of_keys()])
        )

    def describe(self) -> KeyInfo:
        snap = self._snapshot(refresh=True)
        policy = self.release_store.get(self.key_ref)
        return KeyInfo(
            key_ref=self.key_ref,
            key_type=snap.kty,
            rotation_mode="native",
            versions=tuple(
                KeyVersionInfo(e.number, e.state, e.id == snap.primary.id, e.created_on, e.id)
                for e in snap.versions
            ),
            notes=NOTES,
            release_policy_id=policy.id if policy else None,
        )

    def create(self, *, rotation_mode: RotationMode | None = None) -> tuple[KeyInfo, bool]:
        """Create the key if it does not exist. (Key Vault's own create would add a version to an
        existing key; two workers creating the same new key at once can still both do that.)"""
        if rotation_mode not in (None, "native"):
            raise InvalidRequest("Azure Key Vault keys rotate natively; key-per-version is for AWS KMS")
        try:
            return self.describe(), False
        except NotFound:
            pass
        options: dict[str, Any] = {
            "size": self._rsa_key_size if self._key_type == "RSA-HSM" else 256,
            "key_operations": list(KEY_OPERATIONS),
            "tags": {TAG_VERSION: "1"},
        }
        policy = self.release_store.get(self.key_ref)
        if policy is not None:
            options["exportable"] = True
            options["release_policy"] = KeyReleasePolicy(self._native_policy_bytes(policy))
        self._call(
            "create key",
            lambda: self._keys.create_key(self.name, self._key_type, **options),
            idempotent=False,  # on an existing key it adds a version
        )
        return self.describe(), True

    def rotate(self) -> KeyInfo:
        before = self._snapshot(refresh=True)
        new = self._call("rotate key", lambda: self._keys.rotate_key(self.name), idempotent=False)
        version_id = new.properties.version or ""
        tags = {k: v for k, v in (new.properties.tags or {}).items() if k != TAG_DESTROYED}
        tags[TAG_VERSION] = str(len(before.versions) + 1)
        try:
            self._call(
                "tag version",
                lambda: self._keys.update_key_properties(self.name, version_id, tags=tags),
                idempotent=False,
            )
        except KmsError as exc:  # the tag only orders versions created within one second
            log.warning("could not tag the new version of %s: %s", self.key_ref, exc)
        self._invalidate()
        return self.describe()

    def _existing(self, version: int) -> tuple[_Snapshot, _Entry]:
        snap = self._snapshot(refresh=True)
        entry = snap.by_number(version)
        if entry is None:
            raise InvalidRequest(f"{self.key_ref} has no version {version}")
        return snap, entry

    def disable_version(self, version: int) -> KeyInfo:
        snap, entry = self._existing(version)
        if entry.id == snap.primary.id:
            raise InvalidRequest(f"version {version} is the primary of {self.key_ref}; rotate first")
        if entry.enabled:
            self._call(
                "disable version",
                lambda: self._keys.update_key_properties(self.name, entry.id, enabled=False),
                idempotent=False,
            )
        self._invalidate()
        return self.describe()

    def enable_version(self, version: int) -> KeyInfo:
        """Undo ``disable_version`` (refused for destroyed versions)."""
        _, entry = self._existing(version)
        if entry.destroyed:
            raise InvalidRequest(f"version {version} of {self.key_ref} is destroyed")
        if not entry.enabled:
            self._call(
                "enable version",
                lambda: self._keys.update_key_properties(self.name, entry.id, enabled=True),
                idempotent=False,
            )
        self._invalidate()
        return self.describe()

    def destroy_below(self, version: int) -> KeyInfo:
        """Disable every version below ``version`` and tag it ``rekey-destroyed=true`` (Key Vault
        cannot delete single versions; the material stays until the whole key is purged)."""
        snap = self._snapshot(refresh=True)
        if version > snap.primary.number:
            raise InvalidRequest(
                f"destroying below {version} would destroy the primary "
                f"(v{snap.primary.number}) of {self.key_ref}"
            )
        for entry in snap.versions:
            if entry.number >= version or entry.destroyed:
                continue
            tags = {**entry.tags, TAG_DESTROYED: "true"}
            self._call(
                "destroy version",
                lambda entry=entry, tags=tags: self._keys.update_key_properties(  # type: ignore[misc]
                    self.name, entry.id, enabled=False, tags=tags
                ),
                idempotent=False,
            )
        self._invalidate()
        return self.describe()

    # ------------------------------------------------------------------------- release

    def native_release_policy(self, policy: ReleasePolicy) -> dict[str, Any]:
        """Key Vault's release policy for ``policy``: one ``anyOf`` alternative per rule (per
        measurement of an allowlist), each an ``allOf`` of the rule's conditions that ``equals``
        can express on our attestation results (claims nested under ``claims``). A minimum SVN,
        several allowed TCB statuses, evidence age and nonces cannot be said there; our own gate
        checks them."""
        alternatives: list[dict[str, Any]] = []
        for rule in policy.policy.rules:
            for conditions in _rule_conditions(rule):
                alternatives.append({"authority": self._release_authority, "allOf": conditions})
        return {"version": "1.0.0", "anyOf": alternatives}

    def _native_policy_bytes(self, policy: ReleasePolicy) -> bytes:
        return json.dumps(self.native_release_policy(policy), separators=(",", ":")).encode()

    def set_release_policy(self, policy: ReleasePolicy) -> None:
        """Keep ``policy`` in the release store and write the native policy on the current version
        (if the key exists yet; ``create`` applies it otherwise)."""
        self.release_store.put(self.key_ref, policy)
        native = KeyReleasePolicy(self._native_policy_bytes(policy))
        with contextlib.suppress(NotFound):
            self._call(
                "set release policy",
                lambda: self._keys.update_key_properties(self.name, release_policy=native),
                idempotent=False,
            )

    def release_key_material(
        self, attestation_result: str, *, recipient_public_key: bytes | None = None
    ) -> str:
        """Secure Key Release of the current version: our gate first (the result token is verified
        against the key's release policy; with ``recipient_public_key`` also its ``cnf``), then
        Key Vault's ``release`` (exportable keys only), which applies the native policy itself.
        Returns the service's answer: a JWS whose payload carries the key, wrapped to the key in
        the token's ``x-ms-runtime`` claims."""
        policy = self.release_store.get(self.key_ref)
        check_release(policy, attestation_result, recipient_public_key)
        result = self._call(_RELEASE, lambda: self._keys.release_key(self.name, attestation_result))
        if not result.value:
            raise Unavailable(f"Azure Key Vault answered the release of {self.key_ref} without a value")
        return result.value


def _rule_conditions(rule: Rule) -> list[list[dict[str, Any]]]:
    common: list[dict[str, Any]] = [{"claim": "claims.platform", "equals": rule.platform}]
    if not rule.debug_allowed:
        common.append({"claim": "claims.debug", "equals": False})
    if len(rule.tcb_statuses) == 1:
        common.append({"claim": "claims.tcb_status", "equals": rule.tcb_statuses[0]})
    if rule.measurements is not None:
        return [
            [{"claim": "claims.measurement", "equals": measurement}, *common]
            for measurement in sorted(set(rule.measurements))
        ]
    return [
        [
            {"claim": "claims.signer", "equals": rule.signer},
            {"claim": "claims.product_id", "equals": rule.product_id},
            *common,
        ]
    ]


class _SdkAttemptPolicy(SansIOHTTPPolicy[Any, Any]):
    """Placed after azure-core's RetryPolicy: sees every HTTP attempt, for the stress harness."""

    def on_request(self, request: PipelineRequest[Any]) -> None:
        sdk_sent()

    def on_response(self, request: PipelineRequest[Any], response: PipelineResponse[Any, Any]) -> None:
        sdk_answered(throttled=response.http_response.status_code == 429)
