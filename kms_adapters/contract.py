"""The adapter contract every KMS backend implements (Vault/OpenBao Transit, AWS KMS, Azure
Managed HSM). An adapter is bound to one key (``backend:name``); it is a ``KeyWrapper`` and a
``RewrapService`` for the sealing code (both protocols, and ``RewrapOutcome``, are defined in
``sealing.keywrap``: the sealing layer never imports this package) and adds key management and
the attestation-gated release. Batch outcomes carry ``KmsError``s.

Key versions are integers from 1 on every backend. Backends that name versions otherwise
(AWS key-per-version: one KMS key per version; Azure: opaque version ids) keep the mapping
themselves and record it where the key lives, so any worker can rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, runtime_checkable

from kms_adapters.errors import KmsError
from kms_adapters.governor import Governor
from kms_adapters.release import ReleasePolicy
from sealing.keywrap import KeyWrapper, RewrapService, WrappedKey
from sealing.keywrap import RewrapOutcome as RewrapOutcome  # defined by the sealing layer's sweep

VersionState = Literal["enabled", "disabled", "pending_deletion", "destroyed"]
RotationMode = Literal["native", "key-per-version"]


@dataclass(frozen=True)
class KeyVersionInfo:
    version: int
    state: VersionState
    primary: bool
    created_at: datetime | None = None
    native_id: str = ""  # the backend's own name for it (AWS key id, Azure version id)


@dataclass(frozen=True)
class KeyInfo:
    key_ref: str
    key_type: str
    rotation_mode: RotationMode
    versions: tuple[KeyVersionInfo, ...]
    notes: tuple[str, ...] = ()  # e.g. "native rotation cannot retire old key material"
    release_policy_id: str | None = None

    @property
    def primary_version(self) -> int:
        return next(v.version for v in self.versions if v.primary)

    def state_of(self, version: int) -> VersionState | None:
        return next((v.state for v in self.versions if v.version == version), None)

    def to_dict(self) -> dict[str, object]:
        return {
            "key_ref": self.key_ref,
            "type": self.key_type,
            "rotation_mode": self.rotation_mode,
            "primary_version": self.primary_version,
            "versions": [
                {
                    "version": v.version,
                    "state": v.state,
                    "primary": v.primary,
                    "created_at": v.created_at.isoformat() if v.created_at else None,
                    "native_id": v.native_id,
                }
                for v in self.versions
            ],
            "notes": list(self.notes),
            "release_policy": self.release_policy_id,
        }


def rewrap_each(
    rewrap: Callable[[bytes], WrappedKey], wrapped: Sequence[bytes], *, workers: int
) -> list[RewrapOutcome]:
    """``rewrap_batch`` for backends without a batch API: one ``rewrap`` per item on a small
    thread pool (the calls share the adapter's governor). One outcome per item, in order; a
    failed item never fails the others."""

    def one(item: tuple[int, bytes]) -> RewrapOutcome:
        index, ciphertext = item
        try:
            return RewrapOutcome(index, wrapped=rewrap(ciphertext))
        except KmsError as exc:
            return RewrapOutcome(index, error=exc)
        except Exception as exc:  # a bug must not sink the other items either
            return RewrapOutcome(index, error=KmsError(f"unexpected failure ({type(exc).__name__})"))

    items = list(enumerate(wrapped))
    if len(items) <= 1 or workers <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(one, items))


@runtime_checkable
class KmsAdapter(KeyWrapper, RewrapService, Protocol):
    """One key on one backend. All methods raise ``kms_adapters.errors`` types only.

    The mutations (``create``, ``rotate``, ``disable_version``, ``enable_version``,
    ``destroy_below``, ``set_release_policy``) are never resent after a failure that may have
    been applied: they raise ``AnswerLost`` and the caller reads the key (``describe``) to learn
    whether it took effect before trying again.

    ``key_ref``, ``wrap``, ``unwrap``, ``rewrap``, ``version_of`` (``KeyWrapper``) and
    ``rewrap_batch`` (``RewrapService``) are the sealing code's view."""

    backend: str

    @property
    def governor(self) -> Governor:
        """The throttling governor every call of this adapter goes through. It is shared by all
        adapters on the same endpoint, so its ``snapshot()`` counts the endpoint's calls."""
        ...

    # --- key management ---
    def create(self, *, rotation_mode: RotationMode | None = None) -> tuple[KeyInfo, bool]:
        """Create the key if missing (idempotent). Returns its description and whether it was created."""
        ...

    def describe(self) -> KeyInfo: ...

    def rotate(self) -> KeyInfo:
        """Add a version and make it primary; new wraps use it."""
        ...

    def disable_version(self, version: int) -> KeyInfo:
        """Refuse unwraps under ``version`` from now on (reversible)."""
        ...

    def enable_version(self, version: int) -> KeyInfo:
        """Undo ``disable_version``: unwraps under ``version`` work again (a re-sweep of blobs
        found on a disabled version needs it). A no-op for an enabled version; refused
        (``InvalidRequest``) for a destroyed or deletion-pending one. On Transit, which disables
        by a minimum, this lowers the minimum to ``version`` (enabling every version after it)."""
        ...

    def destroy_below(self, version: int) -> KeyInfo:
        """Destroy (or schedule deletion of) every version below ``version``."""
        ...

    # --- the attestation gate ---
    def set_release_policy(self, policy: ReleasePolicy) -> None:
        """Record the key's release policy (where the backend keeps one, natively too)."""
        ...

    def release(self, wrapped: bytes, attestation_result: str, recipient_public_key: bytes) -> bytes:
        """Unwrap for an attested workload: verify the result token against the key's release
        policy, then return the DEK encrypted to ``recipient_public_key`` (HPKE), whose SHA-256
        must be the token's ``cnf``. Never returns the DEK in plaintext."""
        ...
